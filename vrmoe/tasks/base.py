"""The task contract: what a batch is, what loss it gives, how it is validated.

A task is built from the config and the corpus (``Task(app, corpus)``) and gives
the training loop:

* ``tokens_per_step``: tokens one optimiser step processes (for throughput);
* ``train_batch(step, device)``: the batch of a step, a pure function of
  (seed, step), so a resumed run sees exactly the batches it would have seen;
* ``forward(model, batch)``: the model's :class:`~vrmoe.model.backbone.ModelOutput`
  with ``loss`` set to this task's loss;
* ``validate(model, device)``: a row of numbers with at least ``val/loss``
  (the model is put in evaluation mode and restored).

A task is one module in ``vrmoe/tasks/`` whose class is registered with
:func:`register_task`, plus its YAML in ``conf/task/``.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, Callable, ClassVar, Protocol

import torch

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AppConfig
    from ..data.corpora import Corpus
    from ..model.backbone import ModelOutput


class Task(Protocol):
    name: ClassVar[str]
    tokens_per_step: int

    def train_batch(self, step: int, device: torch.device) -> Any: ...
    def forward(self, model: Callable[..., "ModelOutput"], batch: Any) -> "ModelOutput": ...
    def validate(self, model: Any, device: torch.device) -> dict[str, float]: ...


TASKS: dict[str, Callable[["AppConfig", "Corpus"], Task]] = {}


def register_task(cls):
    TASKS[cls.name] = cls
    return cls


def build_task(app: "AppConfig", corpus: "Corpus") -> Task:
    return TASKS[app.task.name](app, corpus)
