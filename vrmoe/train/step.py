"""One optimisation step, as the loop and ``vrmoe bench`` take it: the optimiser, the schedule, the step."""

from __future__ import annotations

import math
from typing import Callable

import torch

from ..config import TrainConfig
from ..device import autocast
from ..distributed import sum_over_ranks
from ..model.backbone import ModelOutput
from ..model.routers.base import balancing_routers


def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    """AdamW over the trainable parameters only (frozen ones get no optimiser state); matrices
    decay, vectors (norms, biases) do not."""
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier on the base learning rate: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


class Diverged(RuntimeError):
    """``train.max_bad_steps`` steps in a row had a non-finite loss or gradient."""


class TrainStep:
    """Forward under the run's precision, task loss + the routers' weighted terms, backward,
    gradient clipping and the optimiser step, at the learning rate the schedule gives.

    A step whose loss or gradient norm is not finite changes nothing (its update is skipped
    and counted, and the routers' selection bias does not move either); ``train.max_bad_steps`` of them in a row raise :class:`Diverged`, so the
    weights, and every checkpoint, stay those of the last finite step. Telling costs one
    host read of a flag per step (under torchrun the ranks agree on it)."""

    def __init__(self, model: torch.nn.Module, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                 device: torch.device):
        self.optimizer, self.cfg, self.device = optimizer, cfg, device
        self.trainable = [p for p in model.parameters() if p.requires_grad]
        self.balancing = balancing_routers(model)
        self.lr = cfg.lr  # the learning rate of the latest step
        self.last_ok = True  # whether the latest step updated the weights
        self.bad_in_a_row = 0
        self.skipped = 0

    def __call__(self, step: int, forward: Callable[[], ModelOutput]) -> ModelOutput:
        self.lr = self.cfg.lr * lr_at(step, self.cfg.max_steps, self.cfg.warmup_steps, self.cfg.min_lr_ratio)
        for group in self.optimizer.param_groups:
            group["lr"] = self.lr
        with autocast(self.device, self.cfg.precision):
            out = forward()
        loss = out.loss + out.aux_loss
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if self.cfg.grad_clip > 0:
            norm = torch.nn.utils.clip_grad_norm_(self.trainable, self.cfg.grad_clip)
        else:
            norm = torch.nn.utils.get_total_norm([p.grad for p in self.trainable if p.grad is not None])
        bad = (~(torch.isfinite(loss.detach()) & torch.isfinite(norm))).float()
        self.last_ok = bool(sum_over_ranks(bad) == 0)
        for router in self.balancing:
            router.settle_bias_update(apply=self.last_ok)
        if not self.last_ok:
            self.optimizer.zero_grad(set_to_none=True)
            self.bad_in_a_row += 1
            self.skipped += 1
            if self.bad_in_a_row >= self.cfg.max_bad_steps:
                raise Diverged(f"training diverged at step {step + 1}: loss {float(loss.detach()):.4g}, gradient "
                               f"norm {float(norm):.4g}, {self.bad_in_a_row} non-finite steps in a row (lower "
                               "train.lr or set train.grad_clip)")
            return out
        self.bad_in_a_row = 0
        self.optimizer.step()
        return out
