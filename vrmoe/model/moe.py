"""The MoE feed-forward layer: a router, E SwiGLU experts and token dispatch.

Dispatch sorts the T*K token slots by expert so each expert runs once on one
contiguous block. On CUDA the blocks go through ``torch._grouped_mm`` in a
single call; on CPU (where grouped_mm has no backward) a loop over the E
experts runs the blocks, which needs the per-expert counts on the host once
per layer. Neither path loops over tokens, and no expert ever runs twice for
a token, whatever the router's sample count S.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RouterConfig
from .routers import Router, Routing, build_router


@dataclass
class MoEOutput:
    y_TD: torch.Tensor
    routing: Routing
    stats: dict[str, torch.Tensor]  # detached per-layer diagnostics


def routing_stats(routing: Routing, n_experts: int) -> dict[str, torch.Tensor]:
    """Utilisation fractions (sum to 1), mean routing entropy (nats, in [0, log E]) and the
    load's coefficient of variation; all on device, no host sync."""
    ids = routing.expert_ids_TK.reshape(-1)
    counts_E = torch.bincount(ids, minlength=n_experts).float()
    utilisation_E = counts_E / counts_E.sum().clamp_min(1)
    p = routing.probs_TE.detach().float()
    entropy = -(p * p.clamp_min(1e-12).log()).sum(-1).mean()
    load_cv = counts_E.std(unbiased=False) / counts_E.mean().clamp_min(1e-12)
    stats = {"utilisation": utilisation_E, "entropy": entropy, "load_cv": load_cv}
    stats.update({k: v.detach() for k, v in routing.stats.items()})
    return stats


class Experts(nn.Module):
    """E SwiGLU experts with stacked weights (E, D, F): ``w2(silu(x w1) * (x w3))``."""

    def __init__(self, n_experts: int, d_model: int, hidden: int, dispatch: str = "auto"):
        super().__init__()
        self.n_experts, self.dispatch = n_experts, dispatch
        self.w1_EDF = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w3_EDF = nn.Parameter(torch.empty(n_experts, d_model, hidden))
        self.w2_EFD = nn.Parameter(torch.empty(n_experts, hidden, d_model))
        for w, fan_in in ((self.w1_EDF, d_model), (self.w3_EDF, d_model), (self.w2_EFD, hidden)):
            nn.init.normal_(w, std=fan_in ** -0.5)
        #: how many times each expert ran on a block since the last reset (test hook for
        #: "S costs router work only"); a plain int, so it costs nothing on device.
        self.block_calls = 0

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.dispatch == "grouped_mm":
            return True
        return self.dispatch == "auto" and x.is_cuda and hasattr(torch, "_grouped_mm")

    def forward(self, x_sorted_ND: torch.Tensor, counts_E: torch.Tensor) -> torch.Tensor:
        """Run each expert on its contiguous block of the expert-sorted token slots."""
        self.block_calls += 1
        if self.use_grouped_mm(x_sorted_ND):
            offs = counts_E.cumsum(0).to(torch.int32)
            w1, w3, w2 = (w.to(x_sorted_ND.dtype) for w in (self.w1_EDF, self.w3_EDF, self.w2_EFD))
            h = F.silu(torch._grouped_mm(x_sorted_ND, w1, offs=offs)) * torch._grouped_mm(x_sorted_ND, w3, offs=offs)
            return torch._grouped_mm(h, w2, offs=offs)
        outs = []
        for e, x_e in enumerate(x_sorted_ND.split(counts_E.tolist())):
            h = F.silu(x_e @ self.w1_EDF[e]) * (x_e @ self.w3_EDF[e])
            outs.append(h @ self.w2_EFD[e])
        return torch.cat(outs)


class MoELayer(nn.Module):
    def __init__(self, d_model: int, n_experts: int, hidden: int, router: Router, dispatch: str = "auto"):
        super().__init__()
        self.router = router
        self.experts = Experts(n_experts, d_model, hidden, dispatch)
        self.n_experts = n_experts

    def forward(self, x_BLD: torch.Tensor) -> MoEOutput:
        shape = x_BLD.shape
        x_TD = x_BLD.reshape(-1, shape[-1])
        routing = self.router(x_TD)
        y_TD = dispatch(x_TD, routing, self.experts)
        return MoEOutput(y_TD.reshape(shape), routing, routing_stats(routing, self.n_experts))


def dispatch(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Sort token slots by expert, run the experts on contiguous blocks, scatter back
    weighted by the gates."""
    n_tokens, k = routing.expert_ids_TK.shape
    flat_ids = routing.expert_ids_TK.reshape(-1)
    order = flat_ids.argsort(stable=True)
    token_of_slot = order // k
    counts_E = torch.bincount(flat_ids, minlength=experts.n_experts)
    out_ND = experts(x_TD[token_of_slot], counts_E)
    gates_N = routing.gates_TK.reshape(-1)[order].to(out_ND.dtype)
    y_TD = torch.zeros_like(x_TD, dtype=out_ND.dtype)
    y_TD.index_add_(0, token_of_slot, out_ND * gates_N[:, None])
    return y_TD.to(x_TD.dtype)


def reference_moe(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Token-by-token reference (slow, for tests): y_t = sum_k g_tk * expert_{e_tk}(x_t)."""
    rows = []
    for t in range(x_TD.shape[0]):
        y = torch.zeros_like(x_TD[t])
        for j in range(routing.expert_ids_TK.shape[1]):
            e = int(routing.expert_ids_TK[t, j])
            h = F.silu(x_TD[t] @ experts.w1_EDF[e]) * (x_TD[t] @ experts.w3_EDF[e])
            y = y + routing.gates_TK[t, j] * (h @ experts.w2_EFD[e])
        rows.append(y)
    return torch.stack(rows)


def build_moe(d_model: int, n_experts: int, hidden: int, router_cfg: RouterConfig, dispatch: str) -> MoELayer:
    return MoELayer(d_model, n_experts, hidden, build_router(d_model, n_experts, router_cfg), dispatch)


__all__ = ["MoELayer", "MoEOutput", "Experts", "dispatch", "reference_moe", "routing_stats", "build_moe"]
