"""Token dispatch: the fast kernels equal the token-by-token reference in values and gradients."""

from __future__ import annotations

import pytest
import torch
import torch._inductor.config

from vrmoe.bench import compose_config, graph_breaks, model_on, random_tokens
from vrmoe.model.routers import router_config
from vrmoe.model.moe import Experts, build_moe, dispatch, expert_counts, reference_moe, sort_slots
from vrmoe.model.routers import Routing

N_EXPERTS, D_MODEL, HIDDEN = 6, 16, 24


def fixed_routing(n_tokens: int, k: int, dtype=torch.float64, seed: int = 0) -> Routing:
    """Random routing that leaves expert 5 unused (its weights must get zero gradients) and
    sends many slots to expert 0 (an unbalanced block)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(N_EXPERTS - 1, generator=g)[:k] for _ in range(n_tokens)])
    heavy = (torch.arange(n_tokens) % 3 == 0) & ~(ids == 0).any(-1)
    ids[heavy, 0] = 0
    gates = torch.rand(n_tokens, k, generator=g, dtype=dtype).softmax(-1).requires_grad_()
    probs = torch.full((n_tokens, N_EXPERTS), 1.0 / N_EXPERTS, dtype=dtype)
    return Routing(ids, gates, probs, torch.zeros((), dtype=dtype))


def grads(y: torch.Tensor, inputs: list[torch.Tensor], seed: int = 1) -> list[torch.Tensor]:
    grad_y = torch.randn(y.shape, generator=torch.Generator().manual_seed(seed), dtype=y.dtype).to(y.device)
    return list(torch.autograd.grad(y, inputs, grad_y))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_loop_dispatch_equals_reference_in_values_and_gradients(k):
    torch.manual_seed(0)
    experts = Experts(N_EXPERTS, D_MODEL, HIDDEN, dispatch="loop").double()
    x = torch.randn(29, D_MODEL, dtype=torch.float64, requires_grad=True)
    routing = fixed_routing(29, k)
    inputs = [x, routing.gates_TK, experts.w1_EDF, experts.w3_EDF, experts.w2_EFD]

    fast, slow = dispatch(x, routing, experts), reference_moe(x, routing, experts)
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)
    fast_grads = grads(fast, inputs)
    for got, want in zip(fast_grads, grads(slow, inputs)):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-10)
    unused = 5
    assert not (routing.expert_ids_TK == unused).any()
    assert all(g[unused].abs().max() == 0 for g in fast_grads[2:])


def test_loop_dispatch_with_frozen_experts_and_input_still_trains_the_gates():
    """train.freeze=backbone: only the router learns; the gate gradient must not change."""
    torch.manual_seed(0)
    experts = Experts(N_EXPERTS, D_MODEL, HIDDEN, dispatch="loop").double().requires_grad_(False)
    x = torch.randn(17, D_MODEL, dtype=torch.float64)
    routing = fixed_routing(17, 2)
    (fast,) = grads(dispatch(x, routing, experts), [routing.gates_TK])
    (slow,) = grads(reference_moe(x, routing, experts), [routing.gates_TK])
    torch.testing.assert_close(fast, slow, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("router", ["topk", "variational", "vtsr"])
def test_moe_layer_matches_reference_through_its_router(router):
    """The router's own parameters get the same gradient through the fast dispatch (fp32)."""
    torch.manual_seed(0)
    layer = build_moe(D_MODEL, N_EXPERTS, HIDDEN, router_config(router, k=2), "auto")
    x = torch.randn(40, D_MODEL, requires_grad=True)
    torch.manual_seed(1)  # the same router noise for both
    routing = layer.router(x)
    params = [x, *layer.parameters()]
    fast = dispatch(x, routing, layer.experts)
    slow = reference_moe(x, routing, layer.experts)
    torch.testing.assert_close(fast, slow, rtol=1e-5, atol=1e-5)
    got = torch.autograd.grad(fast, params, torch.ones_like(fast), retain_graph=True, allow_unused=True)
    want = torch.autograd.grad(slow, params, torch.ones_like(slow), allow_unused=True)
    for g, w in zip(got, want):
        assert (g is None) == (w is None)
        if g is not None:
            torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-5)


def test_grouped_mm_dispatch_forward_equals_reference_on_cpu():
    """The CUDA kernel's code path, forward only (CPU grouped_mm has no backward), fp32 and bf16."""
    torch.manual_seed(0)
    experts = Experts(N_EXPERTS, D_MODEL, HIDDEN, dispatch="grouped_mm")
    x = torch.randn(33, D_MODEL)
    routing = fixed_routing(33, 2, dtype=torch.float32)
    with torch.no_grad():
        want = reference_moe(x, routing, experts)
        torch.testing.assert_close(dispatch(x, routing, experts), want, rtol=1e-5, atol=1e-5)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            got = dispatch(x, routing, experts)
    assert got.dtype == torch.float32  # back in the residual stream's dtype
    torch.testing.assert_close(got, want, rtol=0.05, atol=0.05)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_grouped_mm_dispatch_equals_reference_on_cuda_in_bf16():
    torch.manual_seed(0)
    device = torch.device("cuda")
    experts = Experts(8, 64, 128, dispatch="auto").to(device)
    x = torch.randn(300, 64, device=device, requires_grad=True)
    g = torch.Generator().manual_seed(0)
    ids = torch.stack([torch.randperm(8, generator=g)[:2] for _ in range(300)]).to(device)
    gates = torch.rand(300, 2, generator=g).softmax(-1).to(device).requires_grad_()
    routing = Routing(ids, gates, torch.full((300, 8), 0.125, device=device), torch.zeros((), device=device))
    with torch.autocast("cuda", dtype=torch.bfloat16):
        assert experts.use_grouped_mm(x)
        fast = dispatch(x, routing, experts)
    slow = reference_moe(x, routing, experts)  # fp32
    torch.testing.assert_close(fast, slow, rtol=0.05, atol=0.05)
    inputs = [x, gates, experts.w1_EDF, experts.w3_EDF, experts.w2_EFD]
    for got, want in zip(grads(fast, inputs), grads(slow, inputs)):
        assert torch.nn.functional.cosine_similarity(got.flatten().float(), want.flatten(), dim=0) > 0.99


def test_sort_slots_makes_contiguous_expert_blocks_and_inverts():
    ids = torch.tensor([[2, 0], [0, 1], [2, 1], [0, 2]])
    slots = sort_slots(ids, 4)
    assert slots.counts_E.tolist() == [3, 2, 3, 0]
    slot_at_position = slots.position_TK.reshape(-1).argsort()
    assert ids.reshape(-1)[slot_at_position].tolist() == [0, 0, 0, 1, 1, 2, 2, 2]  # one block per expert
    assert torch.equal(slots.token_N, slot_at_position // 2)
    # Slot (t, k) sits at a position that reads token t.
    assert (slots.token_N[slots.position_TK] == torch.arange(4)[:, None]).all()
    assert torch.equal(expert_counts(ids, 4), torch.bincount(ids.reshape(-1), minlength=4))


def test_experts_run_once_per_layer_call():
    layer = build_moe(D_MODEL, N_EXPERTS, HIDDEN, router_config("topk", k=2), "auto")
    layer(torch.randn(2, 5, D_MODEL))
    layer(torch.randn(2, 5, D_MODEL))
    assert layer.experts.block_calls == 2


@pytest.mark.parametrize("router", [["router=topk"], ["router=variational", "router.covariance=full"]])
def test_grouped_mm_path_compiles_without_graph_breaks(router):
    """The GPU path (grouped_mm, bf16 autocast) has no host sync: one graph per model."""
    app = compose_config(["model=tiny", "model.dispatch=grouped_mm", *router])
    model = model_on(app, torch.device("cpu"))
    count, reasons = graph_breaks(model, random_tokens(app, 2, torch.device("cpu")))
    assert count == 0, reasons


@pytest.mark.slow
def test_compiled_tiny_model_gives_the_eager_loss_and_gradients():
    app = compose_config(["model=tiny", "router=variational"])
    model = model_on(app, torch.device("cpu"))
    idx = random_tokens(app, 4, torch.device("cpu"))

    def loss_and_grads(forward):
        torch.manual_seed(0)  # the same routing noise
        out = forward(idx, idx)
        total = out.loss + out.aux_loss
        return total.detach(), torch.autograd.grad(total, list(model.parameters()))

    eager_loss, eager_grads = loss_and_grads(model)
    with torch._inductor.config.patch(fallback_random=True):  # eager's random stream, not inductor's
        compiled_loss, compiled_grads = loss_and_grads(torch.compile(model))
    torch.testing.assert_close(compiled_loss, eager_loss, rtol=1e-5, atol=1e-6)
    for got, want in zip(compiled_grads, eager_grads):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-6)
