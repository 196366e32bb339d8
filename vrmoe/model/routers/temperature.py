"""Temperature sampling at a fixed T: Gumbel-top-K from softmax(logits / T)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ConfigError, ModelConfig
from ..flops import GUMBEL_FLOPS_PER_CLASS, SOFTMAX_FLOPS_PER_CLASS, linear_flops
from .base import (Router, Routing, TemperedConfig, expert_softmax, gumbel_perturbed, register_router,
                   topk_overlap)


@dataclass
class TemperatureConfig(TemperedConfig):
    name: str = "temperature"
    # sample (Gumbel-top-K at evaluation too) or topk (deterministic evaluation).
    eval_mode: str = "sample"

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if self.eval_mode not in ("sample", "topk"):
            raise ConfigError(f"router.eval_mode={self.eval_mode!r} must be sample or topk")

    def samples_at_eval(self) -> bool:
        return False  # one Gumbel draw per pass at most: S routing samples are never averaged

    def draws_at_eval(self) -> bool:
        return self.eval_mode == "sample"  # S single-sample passes for the BMA and mutual information


@register_router
class TemperatureRouter(Router):
    """Gumbel-top-K sampling of K experts from ``softmax(l / T)`` with a fixed ``T = cfg.temperature``.

    T < 1 sharpens towards Top-K, T > 1 flattens towards uniform. Sampling happens in training
    and, with ``router.eval_mode=sample``, at evaluation (one draw: S is unused); ``eval_mode=topk``
    evaluates deterministically. Gates are the softmax over the selected scaled logits.
    """

    name = "temperature"
    Config = TemperatureConfig

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        scaled_TE = logits_TE / self.cfg.temperature
        probs_TE = expert_softmax(scaled_TE)
        choose_from_TE = gumbel_perturbed(scaled_TE) if self.training or self.cfg.eval_mode == "sample" else scaled_TE
        ids_TK = choose_from_TE.topk(self.k, dim=-1).indices
        gates_TK = expert_softmax(scaled_TE.gather(-1, ids_TK))
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, self.balance_terms(logits_TE, probs_TE, ids_TK),
                       {"topk_overlap": topk_overlap(ids_TK, logits_TE)})

    def flops_per_token(self, samples: int) -> float:
        e = self.n_experts
        sampling = GUMBEL_FLOPS_PER_CLASS * e if self.cfg.eval_mode == "sample" else e
        return linear_flops(self.gate) + sampling + SOFTMAX_FLOPS_PER_CLASS * e + 2 * self.k
