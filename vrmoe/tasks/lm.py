"""Next-token prediction on random windows of the training split (``task=lm``, the default)."""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from ..data.batches import eval_batches, train_batch
from .. import distributed
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
        self.dist = distributed.env()

    def train_batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's slice of the step's global batch (all of it in one process)."""
        x, y = train_batch(self.corpus.train, self.app.train.batch_size, self.app.model.seq_len, self.app.seed,
                           step, device)
        rows = self.dist.rows(len(x))
        return x[rows], y[rows]

    def forward(self, model, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return model(x, y)

    @torch.no_grad()
    def validate(self, model, device: torch.device) -> dict[str, float]:
        """Mean next-token loss over fixed, evenly spaced windows of the validation split (the ranks
        score every world-size-th window and add up)."""
        app, here = self.app, self.dist
        was_training = model.training
        model.eval()
        total, count = torch.zeros((), device=device), torch.zeros((), device=device)
        for x, y in eval_batches(self.corpus.val, app.train.batch_size, app.model.seq_len, app.train.eval_batches,
                                 device):
            x, y = x[here.rank::here.world_size], y[here.rank::here.world_size]
            if len(x) == 0:
                continue
            with autocast(device, app.train.precision):
                out = model(x, y)
            total += out.loss.float() * x.numel()
            count += x.numel()
        model.train(was_training)
        distributed.sum_over_ranks(total), distributed.sum_over_ranks(count)
        return {"val/loss": float(total / count.clamp_min(1))}
