"""Variational temperature sampling router (VTSR): a learned per-token temperature."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import ConfigError, ModelConfig, RouterConfig
from ..flops import GUMBEL_FLOPS_PER_CLASS, SOFTMAX_FLOPS_PER_CLASS, linear_flops
from .base import (Router, Routing, check_head_ratio, expert_softmax, gumbel_perturbed, inverse_softplus,
                   register_router, zero_init_head)


@dataclass
class VTSRConfig(RouterConfig):
    name: str = "vtsr"
    # One temperature per token, or one per token and expert.
    per_expert_temperature: bool = False
    # Weight of mean(-log T(u)), against temperature collapse.
    temperature_reg: float = 1e-3
    # T(u) = softplus(head(u)) + min_temperature.
    min_temperature: float = 0.05
    head_hidden_ratio: float = 0.25
    # sample: K experts drawn by Gumbel-top-K from softmax(l / T(u)) at evaluation too (the paper's
    # Sample-K); topk: deterministic Top-K of l / T(u), which with one T per token is Top-K of l.
    eval_mode: str = "sample"

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if not self.min_temperature > 0:
            raise ConfigError(f"router.min_temperature={self.min_temperature} must be > 0")
        if self.temperature_reg < 0:
            raise ConfigError(f"router.temperature_reg={self.temperature_reg} must be >= 0")
        check_head_ratio(self.head_hidden_ratio)
        if self.eval_mode not in ("sample", "topk"):
            raise ConfigError(f"router.eval_mode={self.eval_mode!r} must be sample or topk")

    def samples_at_eval(self) -> bool:
        return False  # one Gumbel draw per pass: S routing samples are never averaged within a pass

    def draws_at_eval(self) -> bool:
        return self.eval_mode == "sample"  # S single-sample passes for the BMA and mutual information


@register_router
class VTSRRouter(Router):
    """Variational temperature sampling: a head predicts ``T_phi(u) = softplus(.) + min_temperature``
    (one per token, or one per expert with ``router.per_expert_temperature=true``), starting at 1;
    K experts are drawn by Gumbel-top-K from ``softmax(l / T_phi)``, at evaluation too unless
    ``router.eval_mode=topk``.

    Training samples K experts by Gumbel-top-K on ``l / T_phi``. The gates the experts see are the
    softmax over the selected scaled logits; their gradient is taken straight through from the
    relaxed sample ``softmax(l / T_phi + g)`` at the selected experts, which depends on T_phi
    through the selection probabilities too (so the head learns even with K = 1, where the hard
    gate is the constant 1). ``temperature_reg * mean(-log T_phi)`` keeps T from collapsing, and
    ``min_temperature`` is a hard floor.

    Evaluation with ``router.eval_mode=sample`` (the default, the paper's Sample-K) draws K experts
    the same way, one draw per pass: S is not averaged within a pass, and evaluation's BMA and
    mutual information come from S single-sample passes, as for ``router=temperature``.
    ``eval_mode=topk`` is one deterministic pass, Top-K on ``l / T_phi``: with one temperature per
    token that selects the same experts as Top-K on ``l`` (T_phi then only reshapes the gates and
    the routing distribution; per-expert temperatures can change the selection), so sampling is
    what lets VTSR route differently from the deterministic router. Gates are as in training. The
    learned temperature itself is the uncertainty signal (``uncertainty_T``).

    Under ``router.scoring_func=sigmoid`` the scores are ``sigmoid(l / T_phi)`` and K experts are
    drawn from them normalised (with a selection bias, from the scores plus the bias), as for
    ``router=temperature``; the relaxed sample is the softmax of the perturbed log-scores.
    """

    name = "vtsr"
    Config = VTSRConfig
    uncertainty_signal = "temperature"

    def __init__(self, d_model: int, n_experts: int, cfg: VTSRConfig):
        super().__init__(d_model, n_experts, cfg)
        n_temperatures = n_experts if cfg.per_expert_temperature else 1
        # softplus(bias) + min_temperature = 1 at initialisation (or just above the floor if it is >= 1).
        bias = inverse_softplus(max(1.0 - cfg.min_temperature, 1e-2))
        self.temperature_head = zero_init_head(d_model, cfg.head_hidden_ratio, n_temperatures, bias)

    def temperature(self, u_TD: torch.Tensor) -> torch.Tensor:
        """``T_phi(u)``: shape (T, 1), or (T, E) with per-expert temperatures."""
        return F.softplus(self.head_outputs(u_TD)[0]) + self.cfg.min_temperature

    def head_outputs(self, u_TD: torch.Tensor) -> list[torch.Tensor]:
        return [self.temperature_head(u_TD).float()]

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        temperature_TX = self.temperature(u_TD)
        scaled_TE = logits_TE / temperature_TX
        scores_TE = self.scoring.scores(scaled_TE)
        probs_TE = self.scoring.distribution(scores_TE)
        if self.training:
            perturbed_TE = gumbel_perturbed(self.sampling_log_weights(scaled_TE, scores_TE))
            ids_TK, hard_TK = self.select(scores_TE, perturbed_TE, scaled_TE)
            relaxed_TK = expert_softmax(perturbed_TE).gather(-1, ids_TK)
            gates_TK = hard_TK.detach() + (relaxed_TK - relaxed_TK.detach())  # value hard, gradient relaxed
        else:
            sample = self.cfg.eval_mode == "sample"
            perturbed_TE = gumbel_perturbed(self.sampling_log_weights(scaled_TE, scores_TE)) if sample else None
            ids_TK, gates_TK = self.select(scores_TE, perturbed_TE, scaled_TE)
        aux = (self.balance_terms(logits_TE, probs_TE, ids_TK)
               + self.cfg.temperature_reg * (-temperature_TX.log()).mean())
        temperature = temperature_TX.detach()
        stats = {"temperature_mean": temperature.mean(), "temperature_std": temperature.std(unbiased=False),
                 "temperature_min": temperature.min(), "topk_overlap": self.overlap_with_topk(ids_TK, scaled_TE)}
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, aux, stats,
                       uncertainty_T=temperature.mean(-1))

    def flops_per_token(self, samples: int) -> float:
        # One pass whatever S: the temperature head, softplus, l / T and, in sample mode, the Gumbel
        # draw (GUMBEL_FLOPS_PER_CLASS counts the division by T too, counted here already).
        e = self.n_experts
        sampling = (GUMBEL_FLOPS_PER_CLASS - 1) * e if self.cfg.eval_mode == "sample" else 0
        return linear_flops(self.gate) + self.head_flops_per_token() + 2 * e + sampling \
            + SOFTMAX_FLOPS_PER_CLASS * e + 2 * self.k
