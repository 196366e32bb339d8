"""4-way multiple choice made from the text (``task=mcq``): the paper's over-confident regime."""

from __future__ import annotations

import sys
from dataclasses import replace
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F

from .. import distributed
from ..config import ConfigError
from ..data.batches import derived_seed
from ..data.mcq import MCQBatch, build_items, item_len, split_items, split_text
from .base import register_task

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AppConfig
    from ..data.corpora import Corpus
    from ..model.backbone import ModelOutput


# Items made from text (cloze items have no natural count): trained on and validated on by default.
TEXT_TRAIN_ITEMS = 2000
VAL_ITEMS = 256
# Fitting on the calibration split holds out this share of it (at most VAL_ITEMS) for validation.
VAL_SHARE = 0.2


def item_counts(app: "AppConfig", corpus: "Corpus") -> tuple[int, int]:
    """(items trained on, items validated on). A dataset's split is used whole by default
    (``task.train_items=null``); text yields up to ``TEXT_TRAIN_ITEMS`` fine-tuning items. Fitting
    on the calibration split, of a dataset or of text, holds its last ``task.val_items`` out for
    validation (by default a fifth, at most 256) and fits on the rest, so both counts must fit in it."""
    task = app.task
    if corpus.questions is None and task.fit_split != "calibration":
        return (task.train_items or TEXT_TRAIN_ITEMS), (task.val_items or VAL_ITEMS)
    n_calibration, said = calibration_size(app, corpus)
    if task.fit_split != "calibration":
        fit_split = corpus.questions[task.fit_split]
        n_fit = len(fit_split) if task.train_items is None else task.train_items
        if n_fit > len(fit_split):
            raise ConfigError(f"task.train_items={n_fit}: the {app.data.mcq_train_split} split has {len(fit_split)} "
                              f"questions; give at most {len(fit_split)}, or null for all of them")
        return n_fit, task.val_items or min(VAL_ITEMS, n_calibration)
    n_val = task.val_items or max(1, min(VAL_ITEMS, round(VAL_SHARE * n_calibration)))
    room = n_calibration - n_val
    if room < 1:
        raise ConfigError(f"task.val_items={n_val}: {said}, too few to hold that many out for "
                          "validation and fit on the rest; lower task.val_items or give a larger calibration split "
                          "(data.mcq_calibration_split, or data.val_fraction for text)")
    n_fit = room if task.train_items is None else task.train_items
    if n_fit > room:
        raise ConfigError(f"task.train_items={n_fit}: {said} and task.val_items={n_val} of them "
                          f"validate; give at most {room}, or null for the rest")
    return n_fit, n_val


def calibration_items_trained_on(app: "AppConfig", corpus: "Corpus") -> int:
    """How many of the calibration split's first items the run trained on: post-hoc heads fit there
    (``task.fit_split=calibration``), so whatever is fit after them (temperature scaling) must start
    beyond those items. Its held-out validation items were only logged, never selected on."""
    if app.task.name != MCQTask.name or app.task.fit_split != "calibration":
        return 0
    return item_counts(app, corpus)[0]


def calibration_size(app: "AppConfig", corpus: "Corpus") -> tuple[int, str]:
    """How many items the calibration split holds, and a message's words for it."""
    if corpus.questions is not None:
        n = len(corpus.questions["calibration"])
        return n, f"the calibration split has {n} questions"
    # Text has no natural count: as many items as its calibration half yields.
    n = len(build_items(split_text(corpus, "calibration"), sys.maxsize, item_len(app)))
    return n, f"the calibration text yields {n} items"


@register_task
class MCQTask:
    """Cross-entropy over the four option scores of the items of ``task.fit_split``: cloze items
    (sentence log-likelihoods) or the letter form (the letters' logits); data=mcq: the dataset's
    questions, in the letter form.

    Batches walk the items epoch by epoch, in an order drawn from (seed, epoch), so a
    resumed run sees the same batches as an uninterrupted one."""

    name = "mcq"

    def __init__(self, app: "AppConfig", corpus: "Corpus"):
        fit = app.task.fit_split
        n_fit, n_val = item_counts(app, corpus)
        self.train_set = split_items(app, corpus, fit, n_fit, f"task.fit_split={fit}")
        # Validation scores held-out calibration items: never ones trained on, never test items.
        skip = n_fit if fit == "calibration" else 0
        self.val_set = split_items(app, corpus, "calibration", n_val, "task.val_items", skip=skip)
        self.batch_size = app.train.batch_size
        self.seed = app.seed
        self.eval_batch_size = app.train.batch_size
        self.tokens_per_step = self.batch_size * self.train_set.tokens_per_item
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
