"""Next-token prediction on random windows of the training split (``task=lm``, the default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data.batches import eval_batches, train_batch
from ..device import autocast
from .base import register_task

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AppConfig
    from ..data.corpora import Corpus


@register_task
class LMTask:
    name = "lm"

    def __init__(self, app: "AppConfig", corpus: "Corpus"):
        self.app, self.corpus = app, corpus
        self.tokens_per_step = app.train.batch_size * app.model.seq_len

    def train_batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return train_batch(self.corpus.train, self.app.train.batch_size, self.app.model.seq_len, self.app.seed,
                           step, device)

    def forward(self, model, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return model(x, y)

    @torch.no_grad()
    def validate(self, model, device: torch.device) -> dict[str, float]:
        """Mean next-token loss over fixed, evenly spaced windows of the validation split."""
        app = self.app
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), device=device), 0
        for x, y in eval_batches(self.corpus.val, app.train.batch_size, app.model.seq_len, app.train.eval_batches,
                                 device):
            with autocast(device, app.train.precision):
                out = model(x, y)
            total += out.loss.float() * x.numel()
            count += x.numel()
        model.train(was_training)
        return {"val/loss": float(total / max(count, 1))}
