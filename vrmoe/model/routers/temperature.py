"""Temperature sampling at a fixed T: Gumbel-top-K from softmax(logits / T) (or the normalised sigmoid scores)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import ConfigError, ModelConfig
from ..flops import GUMBEL_FLOPS_PER_CLASS, SOFTMAX_FLOPS_PER_CLASS, linear_flops
from .base import Router, Routing, TemperedConfig, gumbel_perturbed, register_router


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

    Under ``router.scoring_func=sigmoid`` the draw is from the normalised scores ``sigmoid(l / T) /
    sum`` (with a selection bias, from the scores plus the bias: :meth:`Router.sampling_log_weights`),
    and the gates are the selected scores, normalised and scaled as the scoring says. T then moves
    every score towards 0 or 1 (T < 1) or towards 1/2 (T > 1) on its own, so T < 1 does not
    approach Top-K as it does under softmax: it approaches a uniform draw among the experts with
    positive logits.
    """

    name = "temperature"
    Config = TemperatureConfig

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        scaled_TE = logits_TE / self.cfg.temperature
        scores_TE = self.scoring.scores(scaled_TE)
        if self.training or self.cfg.eval_mode == "sample":
            perturbed_TE = gumbel_perturbed(self.sampling_log_weights(scaled_TE, scores_TE))
        else:
            perturbed_TE = None
        ids_TK, gates_TK = self.select(scores_TE, perturbed_TE, scaled_TE)
        probs_TE = self.scoring.distribution(scores_TE)
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, self.balance_terms(logits_TE, probs_TE, ids_TK),
                       {"topk_overlap": self.overlap_with_topk(ids_TK, scaled_TE)})

    def flops_per_token(self, samples: int) -> float:
        e = self.n_experts
        sampling = GUMBEL_FLOPS_PER_CLASS * e if self.cfg.eval_mode == "sample" else e
        return linear_flops(self.gate) + sampling + SOFTMAX_FLOPS_PER_CLASS * e + 2 * self.k
