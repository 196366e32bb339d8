"""Routers: every router maps token states ``u_TD`` to a :class:`Routing`.

The MoE layer and the training loop only read :class:`Routing`; they never ask
which router produced it. A router's own loss terms arrive already weighted in
``Routing.aux_loss`` and its diagnostics in ``Routing.stats`` (detached tensors,
turned into numbers only when the loop logs).

Shape suffixes: T tokens, D model width, E experts, K experts per token,
S Monte-Carlo samples.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RouterConfig


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # long, the selected experts
    gates_TK: torch.Tensor  # the selected experts' weights, summing to 1 per token
    probs_TE: torch.Tensor  # the routing distribution selection was made from (S-averaged at evaluation)
    aux_loss: torch.Tensor  # scalar, weighted: load balance + z-loss + the router's own terms
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached diagnostics
    # Per-sample routing distributions at evaluation, for mutual information (None when S = 1).
    sample_probs_STE: torch.Tensor | None = None
    # The router's own per-token uncertainty signal for OOD scores (None if it has none):
    # tr(Sigma_post) for the variational router, the mean temperature for vtsr.
    uncertainty_T: torch.Tensor | None = None


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss ``E * sum_e f_e P_e``: 1 when the load is uniform."""
    n_experts = probs_TE.shape[-1]
    counts_E = torch.zeros(n_experts, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), torch.ones_like(expert_ids_TK, dtype=probs_TE.dtype).reshape(-1))
    fraction_E = counts_E / expert_ids_TK.numel()
    return n_experts * (fraction_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: keeps logits small so the softmax stays well conditioned."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def renormalised_topk(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of a probability vector, the selected entries renormalised to sum to 1."""
    top_TK, ids_TK = scores_TE.topk(k, dim=-1)
    return ids_TK, top_TK / top_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(top_TK.dtype).tiny)


class Router(nn.Module):
    """Base: holds the deterministic logit layer ``gate`` (NN_det in the paper).

    Every router keeps the name ``gate`` for it so a Top-K checkpoint loads into
    any router (the post-hoc protocol uses it as the frozen mean base).
    """

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig):
        super().__init__()
        self.n_experts, self.k, self.cfg = n_experts, cfg.k, cfg
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model ** -0.5 * 0.1)

    def balance_terms(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        loss = self.cfg.load_balance_weight * load_balance_loss(probs_TE, ids_TK)
        if self.cfg.z_loss_weight > 0:
            loss = loss + self.cfg.z_loss_weight * z_loss(logits_TE)
        return loss

    def forward(self, u_TD: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


class TopKRouter(Router):
    """Deterministic Top-K: gates are the softmax over the K selected logits."""

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        probs_TE = logits_TE.softmax(-1)
        ids_TK, gates_TK = renormalised_topk(probs_TE, self.k)
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE,
                       self.balance_terms(logits_TE, probs_TE, ids_TK))


ROUTER_CLASSES: dict[str, Callable[..., Router]] = {"topk": TopKRouter}


def build_router(d_model: int, n_experts: int, cfg: RouterConfig) -> Router:
    try:
        cls = ROUTER_CLASSES[cfg.name]
    except KeyError:
        raise ValueError(f"router={cfg.name!r} is unknown; choose one of {', '.join(ROUTER_CLASSES)}") from None
    return cls(d_model, n_experts, cfg)
