"""Weight-space baseline: MC dropout on the router input."""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import ConfigError, ModelConfig, RouterConfig
from ..flops import SOFTMAX_FLOPS_PER_CLASS, linear_flops
from .base import Router, Routing, register_router, renormalised_topk, topk_overlap


@dataclass
class MCDropoutConfig(RouterConfig):
    name: str = "mc_dropout"
    # Dropout probability on the router input (kept on at evaluation).
    dropout: float = 0.05

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"router.dropout={self.dropout} must be in [0, 1)")

    def samples_at_eval(self) -> bool:
        return True


@register_router
class MCDropoutRouter(Router):
    """Dropout (p = ``router.dropout``) on the router input, kept on at evaluation.

    Training is one dropped-out pass; evaluation runs S passes as one batched matmul, averages
    their softmaxes and takes Top-K of the average (gates renormalised), like the variational
    router. ``topk_overlap`` compares the choice with the dropout-free Top-K.
    """

    name = "mc_dropout"
    Config = MCDropoutConfig

    def forward(self, u_TD: torch.Tensor) -> Routing:
        n_samples = 1 if self.training else self.cfg.samples
        # One independent dropout mask per sample: dropout over the expanded (S, T, D) tensor.
        u_STD = F.dropout(u_TD.expand(n_samples, *u_TD.shape), self.cfg.dropout, training=True)
        sample_probs_STE = self.gate(u_STD).float().softmax(-1)
        probs_TE = sample_probs_STE.mean(0)
        ids_TK, gates_TK = renormalised_topk(probs_TE, self.k)
        clean_logits_TE = self.gate(u_TD).float()
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE,
                       self.balance_terms(clean_logits_TE, probs_TE, ids_TK),
                       {"topk_overlap": topk_overlap(ids_TK, clean_logits_TE)},
                       sample_probs_STE if n_samples > 1 else None)

    def flops_per_token(self, samples: int) -> float:
        # Each sample masks the input (one multiply per feature) and re-runs the logit layer.
        per_sample = self.gate.in_features + linear_flops(self.gate) + SOFTMAX_FLOPS_PER_CLASS * self.n_experts \
            + self.n_experts
        return self.head_flops_per_token() + samples * per_sample + 2 * self.k
