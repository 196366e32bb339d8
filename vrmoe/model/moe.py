"""The MoE feed-forward layer: a router, E SwiGLU experts and token dispatch.

Dispatch sorts the T*K token slots (token t's k-th choice) by expert, so each
expert runs once on one contiguous block, and combines each token's K outputs
by gathering them back, weighted by the gates. Two kernels run the blocks
(``model.dispatch``):

* ``grouped_mm`` (the default on CUDA in bf16): each of the three matmuls is a single
  ``torch._grouped_mm`` call over all experts, differentiated by autograd. The
  block offsets stay on the device, so there is no host sync and
  ``torch.compile`` sees the layer as one graph.
* ``loop`` (the default elsewhere: on CPU ``_grouped_mm`` has a forward but no
  backward, and in fp32 it is a loop with a host sync): one autograd function walks the experts' blocks, forward and
  backward, each block gathered, multiplied and finished while it is still in
  cache, and each expert's weight gradient written straight into its slice.
  It reads the block sizes on the host once per layer (free on CPU) and runs
  outside ``torch.compile``'s graphs.

Neither path loops over tokens, copies expert weights per token, or runs an
expert twice for a token, whatever the router's sample count S.
"""

from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from .. import metrics
from ..distributed import sum_over_ranks
from ..config import RouterConfig
from .routers import Router, Routing, build_router


@dataclass
class MoEOutput:
    y_TD: torch.Tensor
    routing: Routing
    stats: dict[str, torch.Tensor]  # detached per-layer diagnostics


def expert_counts(expert_ids: torch.Tensor, n_experts: int) -> torch.Tensor:
    """How many slots chose each expert (long, shape (E,)). A scatter-add rather than
    ``bincount``, whose data-dependent output size would break a compiled graph."""
    ids = expert_ids.reshape(-1)
    return torch.zeros(n_experts, dtype=torch.long, device=ids.device).scatter_add_(0, ids, torch.ones_like(ids))


def routing_stats(routing: Routing, n_experts: int, over_ranks: bool = False) -> dict[str, torch.Tensor]:
    """Utilisation fractions (sum to 1), mean routing entropy (nats, in [0, log E]) and the
    load's coefficient of variation; all on device, no host sync. With ``over_ranks`` (training
    under torchrun, every rank in step) the load is the global batch's; this rank's entropy is
    averaged over ranks when logged."""
    counts_E = expert_counts(routing.expert_ids_TK, n_experts).float()
    if over_ranks:  # training under torchrun: the load of the global batch
        counts_E = sum_over_ranks(counts_E)
    utilisation_E = counts_E / counts_E.sum().clamp_min(1)
    p = routing.probs_TE.detach().float()
    entropy = metrics.entropy(p).mean().float()
    load_cv = counts_E.std(unbiased=False) / counts_E.mean().clamp_min(1e-12)
    stats = {"utilisation": utilisation_E, "entropy": entropy, "load_cv": load_cv}
    stats.update({k: v.detach() for k, v in routing.stats.items()})
    return stats


@dataclass
class SlotOrder:
    """The N = T*K token slots sorted by expert: expert e's block of the sorted order starts
    where expert e-1's ends."""

    token_N: torch.Tensor  # the token each sorted slot reads
    position_TK: torch.Tensor  # where slot (t, k) sits in the sorted order
    counts_E: torch.Tensor  # block sizes


def sort_slots(expert_ids_TK: torch.Tensor, n_experts: int) -> SlotOrder:
    n_tokens, k = expert_ids_TK.shape
    flat_ids_N = expert_ids_TK.reshape(-1)
    slot_of_position_N = flat_ids_N.argsort(stable=True)  # stable: a deterministic order within a block
    position_N = torch.empty_like(slot_of_position_N).scatter_(
        0, slot_of_position_N, torch.arange(flat_ids_N.numel(), device=flat_ids_N.device))
    return SlotOrder(slot_of_position_N // k, position_N.view(n_tokens, k), expert_counts(flat_ids_N, n_experts))


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
        #: how many times the experts ran on their blocks, and on how many token rows in all,
        #: since the last reset (test hooks for "S costs router work only": T x K rows a call,
        #: whatever S); plain ints, so they cost nothing on device.
        self.block_calls = 0
        self.rows_run = 0

    def use_grouped_mm(self, x: torch.Tensor) -> bool:
        if self.dispatch != "auto":
            return self.dispatch == "grouped_mm"
        # grouped_mm's fast CUDA kernels, and its shape rules under torch.compile, are bf16-only;
        # in fp32 it would fall back to a loop with a host sync anyway.
        return x.is_cuda and compute_dtype(x) == torch.bfloat16

    def forward(self, x_TD: torch.Tensor, slots: SlotOrder, gates_TK: torch.Tensor) -> torch.Tensor:
        """``y_t = sum_k gates_tk * expert_{e_tk}(x_t)``, the experts run on the sorted blocks."""
        self.block_calls += 1
        self.rows_run += slots.token_N.numel()
        if self.use_grouped_mm(x_TD):
            return grouped_mm_experts(x_TD, slots, gates_TK, self.w1_EDF, self.w3_EDF, self.w2_EFD)
        return loop_experts(x_TD, slots, gates_TK, self.w1_EDF, self.w3_EDF, self.w2_EFD)


def compute_dtype(x: torch.Tensor) -> torch.dtype:
    """The dtype matmuls on ``x`` run in: autocast's when it is on for x's device."""
    device = x.device.type
    return torch.get_autocast_dtype(device) if torch.is_autocast_enabled(device) else x.dtype


def grouped_mm_experts(x_TD, slots: SlotOrder, gates_TK, w1_EDF, w3_EDF, w2_EFD) -> torch.Tensor:
    """The experts as three grouped matmuls over the sorted blocks, in the autocast dtype
    when autocast is on (grouped_mm is not on autocast's list, so it is cast here)."""
    dtype = compute_dtype(x_TD)
    offsets_E = slots.counts_E.cumsum(0).to(torch.int32)
    w1, w3, w2 = (w.to(dtype) for w in (w1_EDF, w3_EDF, w2_EFD))
    x_ND = x_TD.to(dtype).index_select(0, slots.token_N)
    h_NF = F.silu(torch._grouped_mm(x_ND, w1, offs=offsets_E)) * torch._grouped_mm(x_ND, w3, offs=offsets_E)
    out_ND = torch._grouped_mm(h_NF, w2, offs=offsets_E)
    return _gather_sum(out_ND, slots.position_TK, gates_TK.to(dtype)).to(x_TD.dtype)


@torch.compiler.disable  # reads the block sizes on the host; runs eagerly between compiled graphs
def loop_experts(x_TD, slots: SlotOrder, gates_TK, w1_EDF, w3_EDF, w2_EFD) -> torch.Tensor:
    dtype = x_TD.dtype
    w1, w3, w2 = (w.to(dtype) for w in (w1_EDF, w3_EDF, w2_EFD))
    # Under no_grad (evaluation) nothing is kept for a backward that will not come.
    return _ExpertLoop.apply(x_TD, slots.token_N, slots.position_TK, gates_TK.to(dtype),
                             slots.counts_E.tolist(), torch.is_grad_enabled(), w1, w3, w2)


def _blocks(counts: list[int]):
    """(expert, rows of its block in the sorted order) for every expert with work."""
    start = 0
    for expert, count in enumerate(counts):
        if count:
            yield expert, slice(start, start + count)
        start += count


class _ExpertLoop(torch.autograd.Function):
    """Forward and backward of the experts over their sorted blocks, one expert at a time.

    Working per block keeps its gathered inputs and SwiGLU intermediates in cache; the
    combine gathers each token's K outputs back. Saved for backward: the pre-activations
    ``a = x w1`` and ``b = x w3``, the unweighted outputs (for the gate gradient) and, when
    the expert weights need gradients, the gathered inputs (N x D: gathering them again costs
    more time than they cost memory); the SwiGLU product is recomputed, which is cheaper than
    keeping N x F more numbers alive.
    """

    @staticmethod
    def forward(ctx, x_TD, token_N, position_TK, gates_TK, counts, grad_mode, w1_EDF, w3_EDF, w2_EFD):
        with _no_autocast(x_TD):
            n_slots, d_model, hidden = token_N.numel(), x_TD.shape[1], w1_EDF.shape[-1]
            gate_N = gates_TK.new_empty(n_slots).scatter_(0, position_TK.reshape(-1), gates_TK.reshape(-1))
            a_NF = x_TD.new_empty(n_slots, hidden)
            b_NF = torch.empty_like(a_NF)
            out_ND = x_TD.new_empty(n_slots, d_model)
            keep_x = grad_mode and any(ctx.needs_input_grad[6:])  # the weight gradients read the gathered inputs
            x_ND = x_TD.new_empty(n_slots, d_model) if keep_x else None
            for e, rows in _blocks(counts):
                x_e = torch.index_select(x_TD, 0, token_N[rows], out=x_ND[rows]) if keep_x else \
                    x_TD.index_select(0, token_N[rows])
                a = torch.mm(x_e, w1_EDF[e], out=a_NF[rows])
                b = torch.mm(x_e, w3_EDF[e], out=b_NF[rows])
                torch.mm(F.silu(a).mul_(b), w2_EFD[e], out=out_ND[rows])
            y_TD = _gather_sum(out_ND, position_TK, gates_TK)
        ctx.save_for_backward(x_ND, token_N, position_TK, gate_N, w1_EDF, w3_EDF, w2_EFD, a_NF, b_NF, out_ND)
        ctx.counts = counts
        return y_TD

    @staticmethod
    def backward(ctx, grad_y_TD):
        x_ND, token_N, position_TK, gate_N, w1_EDF, w3_EDF, w2_EFD, a_NF, b_NF, out_ND = ctx.saved_tensors
        with _no_autocast(grad_y_TD):
            grad_y_TD = grad_y_TD.contiguous()
            # Only the gradients asked for: train.freeze=backbone freezes the experts (three of the
            # seven matmuls per block are theirs). Experts without tokens get zero gradients.
            need_x, need_w = ctx.needs_input_grad[0], any(ctx.needs_input_grad[6:])
            grad_w1, grad_w3, grad_w2 = ((torch.zeros_like(w) for w in (w1_EDF, w3_EDF, w2_EFD)) if need_w
                                         else (None, None, None))
            grad_x_ND = torch.empty_like(out_ND) if need_x else None
            grad_gate_N = torch.empty_like(gate_N)
            for e, rows in _blocks(ctx.counts):
                tokens = token_N[rows]
                grad_y = grad_y_TD.index_select(0, tokens)
                torch.linalg.vecdot(grad_y, out_ND[rows], out=grad_gate_N[rows])  # d y_t / d g_tk = out
                grad_out = grad_y.mul_(gate_N[rows, None])
                a, b = a_NF[rows], b_NF[rows]
                silu_a = F.silu(a)
                if need_w:
                    torch.mm((silu_a * b).T, grad_out, out=grad_w2[e])
                grad_h = grad_out @ w2_EFD[e].T
                grad_b = silu_a.mul_(grad_h)
                grad_a = torch.ops.aten.silu_backward(grad_h.mul_(b), a)
                if need_w:
                    x_e = x_ND[rows]
                    torch.mm(x_e.T, grad_a, out=grad_w1[e])
                    torch.mm(x_e.T, grad_b, out=grad_w3[e])
                if need_x:
                    torch.mm(grad_a, w1_EDF[e].T, out=grad_x_ND[rows]).addmm_(grad_b, w3_EDF[e].T)
            # Every slot is in some block, so grad_x_ND and grad_gate_N are fully written.
            grad_x_TD = _gather_sum(grad_x_ND, position_TK) if need_x else None
            grad_gates_TK = grad_gate_N[position_TK]
        return grad_x_TD, None, None, grad_gates_TK, None, None, grad_w1, grad_w3, grad_w2


def _gather_sum(rows_ND: torch.Tensor, position_TK: torch.Tensor, weights_TK: torch.Tensor | None = None):
    """``y_t = sum_k w_tk * rows[position_tk]`` (w = 1 when None): K row gathers added in place.
    No scatter: it is deterministic, and ``index_add_`` collapses on a busy multi-threaded CPU."""
    y_TD = rows_ND.index_select(0, position_TK[:, 0])
    if weights_TK is not None:
        y_TD.mul_(weights_TK[:, :1])
    for j in range(1, position_TK.shape[1]):
        rows_TD = rows_ND.index_select(0, position_TK[:, j])
        if weights_TK is None:
            y_TD.add_(rows_TD)
        else:
            y_TD.addcmul_(rows_TD, weights_TK[:, j:j + 1])
    return y_TD


def _no_autocast(x: torch.Tensor):
    """The loop computes in its inputs' dtype: ``out=`` matmuls are outside autocast anyway."""
    if torch.is_autocast_enabled(x.device.type):
        return torch.autocast(x.device.type, enabled=False)
    return contextlib.nullcontext()


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
        return MoEOutput(y_TD.reshape(shape), routing, routing_stats(routing, self.n_experts, over_ranks=self.training))


def dispatch(x_TD: torch.Tensor, routing: Routing, experts: Experts) -> torch.Tensor:
    """Sort token slots by expert, run the experts on contiguous blocks, and sum each token's
    K outputs weighted by the gates."""
    return experts(x_TD, sort_slots(routing.expert_ids_TK, experts.n_experts), routing.gates_TK)


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


__all__ = ["MoELayer", "MoEOutput", "Experts", "SlotOrder", "dispatch", "sort_slots", "expert_counts",
           "reference_moe", "routing_stats", "build_moe"]
