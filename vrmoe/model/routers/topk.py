"""Deterministic Top-K (the paper's MAP baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import RouterConfig
from .base import Router, Routing, register_router


@dataclass
class TopKConfig(RouterConfig):
    name: str = "topk"


@register_router
class TopKRouter(Router):
    """Deterministic Top-K, the paper's MAP baseline: gates are the softmax over the K selected logits.

    Under ``router.scoring_func=sigmoid`` with its selection bias, groups and factor (DeepSeek-V3's
    routing) it is that family's deterministic router: Top-K of the scores plus the bias, gates the
    selected scores (normalised with ``norm_topk_prob``) times ``routed_scaling_factor``.
    """

    name = "topk"
    Config = TopKConfig

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        scores_TE = self.scoring.scores(logits_TE)
        ids_TK, gates_TK = self.select(scores_TE)
        probs_TE = self.scoring.distribution(scores_TE)
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE,
                       self.balance_terms(logits_TE, probs_TE, ids_TK))
