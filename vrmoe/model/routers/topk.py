"""Deterministic Top-K (the paper's MAP baseline)."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ...config import RouterConfig
from .base import Router, Routing, expert_softmax, register_router, renormalised_topk


@dataclass
class TopKConfig(RouterConfig):
    name: str = "topk"


@register_router
class TopKRouter(Router):
    """Deterministic Top-K, the paper's MAP baseline: gates are the softmax over the K selected logits."""

    name = "topk"
    Config = TopKConfig

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        probs_TE = expert_softmax(logits_TE)
        ids_TK, gates_TK = renormalised_topk(probs_TE, self.k)
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE,
                       self.balance_terms(logits_TE, probs_TE, ids_TK))
