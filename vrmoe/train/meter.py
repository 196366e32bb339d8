"""What happened since the last log line: losses, throughput and per-layer routing statistics.

Everything is summed on device and read back once per interval, so a step has no host sync.
Under torchrun each rank sums its own share and the row is the mean over ranks; a checkpoint
keeps every rank's partial sums, so the row whose interval a resume straddles is the row the
uninterrupted run logs.
"""

from __future__ import annotations

import time
from typing import Any

import torch

from ..distributed import gather_objects, mean_over_ranks, rank, world_size
from ..model.backbone import ModelOutput


class IntervalMeter:
    def __init__(self, device: torch.device, layer_names: list[str], tokens_per_step: int,
                 state: dict[str, Any] | None = None):
        self.layer_names, self.tokens_per_step = layer_names, tokens_per_step
        self.loss_sum = torch.zeros((), device=device)
        self.aux_sum = torch.zeros((), device=device)
        self.stat_sums: list[dict[str, torch.Tensor]] | None = None
        self.steps = 0
        self.skipped = 0
        self.started = time.perf_counter()
        if state is not None:  # a resume continues the interval its checkpoint was in
            state = own_share(state)
            self.loss_sum += state["loss_sum"].to(device)
            self.aux_sum += state["aux_sum"].to(device)
            self.stat_sums = ([{k: v.to(device) for k, v in s.items()} for s in state["stat_sums"]]
                              if state["stat_sums"] is not None else None)
            self.steps, self.skipped = state["steps"], state["skipped"]
            self.started -= state["seconds"]

    def state(self) -> dict[str, Any]:
        """The interval so far, for a checkpoint. Under torchrun every rank calls it (it gathers the
        ranks' partial sums): the state holds each rank's (``ranks``, in rank order) and, at the top
        level, their mean over ranks, which is what the row averages."""
        own = {"loss_sum": self.loss_sum.detach().cpu().clone(), "aux_sum": self.aux_sum.detach().cpu().clone(),
               "stat_sums": None if self.stat_sums is None else [{k: v.cpu().clone() for k, v in s.items()}
                                                                 for s in self.stat_sums],
               "steps": self.steps, "skipped": self.skipped, "seconds": time.perf_counter() - self.started}
        ranks = gather_objects(own)
        if len(ranks) == 1:
            return own
        n = len(ranks)
        mean = {**ranks[0], "loss_sum": sum(r["loss_sum"] for r in ranks) / n,
                "aux_sum": sum(r["aux_sum"] for r in ranks) / n}
        if ranks[0]["stat_sums"] is not None:  # the ranks agree on skipped steps, so all have sums or none
            mean["stat_sums"] = [{k: sum(r["stat_sums"][i][k] for r in ranks) / n for k in layer}
                                 for i, layer in enumerate(ranks[0]["stat_sums"])]
        return {**mean, "ranks": ranks}

    def skip(self) -> None:
        """A step whose update was skipped (non-finite): counted, its numbers left out."""
        self.skipped += 1

    def add(self, out: ModelOutput) -> None:
        self.loss_sum += out.loss.detach()
        self.aux_sum += out.aux_loss.detach()
        if self.stat_sums is None:
            self.stat_sums = [{k: v.detach().float().clone() for k, v in s.items()} for s in out.layer_stats]
        else:
            for acc, s in zip(self.stat_sums, out.layer_stats):
                for k, v in s.items():
                    acc[k] += v.detach().float()
        self.steps += 1

    def pop(self, step: int) -> dict[str, Any]:
        """The interval's row (means over its steps, and over ranks under torchrun) for metrics.jsonl;
        the meter starts afresh."""
        for total in (self.loss_sum, self.aux_sum, *(v for s in self.stat_sums or [] for v in s.values())):
            mean_over_ranks(total)
        elapsed = time.perf_counter() - self.started
        n = max(self.steps, 1)
        extra = {"skipped_steps": self.skipped} if self.skipped else {}
        # An interval of skipped steps only measured no loss: null, never a 0 that reads as a perfect fit.
        measured = self.steps > 0
        row: dict[str, Any] = {
            "step": step, "train/loss": float(self.loss_sum / n) if measured else None,
            "train/aux_loss": float(self.aux_sum / n) if measured else None,
            "tokens_per_s": (self.steps + self.skipped) * self.tokens_per_step / max(elapsed, 1e-9),
            "moe": {name: {k: (v / n).cpu().tolist() for k, v in s.items()}
                    for name, s in zip(self.layer_names, self.stat_sums or [])},
            **extra,
        }
        self.loss_sum.zero_(), self.aux_sum.zero_()
        self.stat_sums, self.steps, self.skipped = None, 0, 0
        self.started = time.perf_counter()
        return row


def own_share(state: dict[str, Any]) -> dict[str, Any]:
    """What this rank resumes an interval from. As many ranks as saved it: each its own partial
    sums, so the row's mean over ranks adds what the uninterrupted run adds, bit for bit. Another
    number of ranks (or a checkpoint of one process): every rank the mean over the saved ranks, and
    the mean over the new ranks of (that mean + each rank's new sums) is the uninterrupted row to
    float rounding."""
    ranks = state.get("ranks")
    return ranks[rank()] if ranks is not None and len(ranks) == world_size() else state
