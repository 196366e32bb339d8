"""4-way multiple choice made from the text (``task=mcq``): the paper's over-confident regime."""

from __future__ import annotations

from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import distributed
from ..data.batches import derived_seed
from ..data.mcq import N_OPTIONS, MCQBatch, item_len, items_from_text
from ..data.mcq_datasets import encode_questions
from .base import register_task

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AppConfig
    from ..data.corpora import Corpus
    from ..model.backbone import ModelOutput


@register_task
class MCQTask:
    """Cross-entropy over the four option scores: cloze items built from the training split, or with
    data=mcq the dataset's questions in the answer-letter form (softmax over the letters' logits).

    Batches walk the items epoch by epoch, in an order drawn from (seed, epoch), so a
    resumed run sees the same batches as an uninterrupted one."""

    name = "mcq"

    def __init__(self, app: "AppConfig", corpus: "Corpus"):
        max_len = item_len(app)
        tokenizer = corpus.tokenizer
        if corpus.questions is not None:  # data=mcq: the dataset's questions, in the answer-letter form
            self.train_set = encode_questions(corpus.questions["train"][:app.task.train_items], tokenizer,
                                              app.model.seq_len, "task=mcq")
            self.val_set = encode_questions(corpus.questions["eval"][:app.task.val_items], tokenizer,
                                            app.model.seq_len, "task=mcq")
        else:  # cloze items made from the text
            self.train_set = items_from_text(tokenizer.decode(corpus.train), app.task.train_items, max_len,
                                             "task=mcq", tokenizer=tokenizer)
            self.val_set = items_from_text(tokenizer.decode(corpus.val), app.task.val_items, max_len, "task=mcq",
                                           tokenizer=tokenizer)
        self.batch_size = app.train.batch_size
        self.seed = app.seed
        self.eval_batch_size = app.train.batch_size
        self.tokens_per_step = self.batch_size * N_OPTIONS * max_len
        self._orders: dict[int, torch.Tensor] = {}
        self.dist = distributed.env()

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch not in self._orders:
            gen = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
            self._orders = {epoch: torch.randperm(len(self.train_set), generator=gen)}
        return self._orders[epoch]

    def train_batch(self, step: int, device: torch.device) -> MCQBatch:
        n = len(self.train_set)
        positions = step * self.batch_size + torch.arange(self.batch_size)
        index = torch.stack([self._order(int(p) // n)[int(p) % n] for p in positions])
        return self.train_set.batch(index[self.dist.rows(len(index))], device)  # this rank's slice

    def forward(self, model, batch: MCQBatch) -> "ModelOutput":
        out = model(batch.inputs_NL)
        loss = F.cross_entropy(batch.option_scores(out.logits_BLV), batch.answers_B)
        return replace(out, loss=loss)

    @torch.no_grad()
    def validate(self, model, device: torch.device) -> dict[str, float]:
        was_training = model.training
        model.eval()
        loss_sum, correct = 0.0, 0
        here = self.dist
        for index in torch.arange(len(self.val_set)).split(self.eval_batch_size):
            index = index[here.rank::here.world_size]  # the ranks score every world-size-th item
            if len(index) == 0:
                continue
            batch = self.val_set.batch(index, device)
            scores = batch.option_scores(model(batch.inputs_NL).logits_BLV)
            loss_sum += float(F.cross_entropy(scores, batch.answers_B, reduction="sum"))
            correct += int((scores.argmax(-1) == batch.answers_B).sum())
        model.train(was_training)
        if here.enabled:
            totals = distributed.sum_over_ranks(torch.tensor([loss_sum, correct], dtype=torch.float64, device=device))
            loss_sum, correct = float(totals[0]), int(totals[1])
        return {"val/loss": loss_sum / len(self.val_set), "val/accuracy": correct / len(self.val_set)}
