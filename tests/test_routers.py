"""The routers' behaviour: the variational posterior's maths, Monte-Carlo averaging before Top-K,
temperature sampling, gradients into every head, S costing router work only, and each router
training end to end through the CLI."""

from __future__ import annotations

import dataclasses

import json
import math

import pytest
import torch
from torch.distributions import MultivariateNormal, Normal, kl_divergence

from vrmoe.config import ConfigError
from vrmoe.model.routers import ROUTERS, build_router, renormalised_topk, router_config
from vrmoe.model.routers.base import (ScoreMean, expert_softmax, sample_chunks, standard_exponential_like,
                                      token_chunks)
from vrmoe.model.routers.mc_dropout import GeometricGaps, Scratch, shared_scratch
from vrmoe.model.routers.topk import TopKRouter
from vrmoe.model.routers.variational import VariationalRouter
from vrmoe.checkpoint import load_checkpoint
from vrmoe.model import build_model
from vrmoe.train import train

from conftest import TINY, interrupt_after_first_checkpoint, make_config, run_cli

D_MODEL, N_EXPERTS = 16, 6


def make_router(name: str, **fields) -> torch.nn.Module:
    """A router with the given keys, those it does not have left out (tests pass one set to all)."""
    own = {f.name for f in dataclasses.fields(ROUTERS[name].Config)}
    torch.manual_seed(0)
    return build_router(D_MODEL, N_EXPERTS, router_config(name, **{k: v for k, v in fields.items() if k in own}))


def tokens(n: int = 12) -> torch.Tensor:
    return torch.randn(n, D_MODEL, generator=torch.Generator().manual_seed(1))


def randomise_heads(router: VariationalRouter, std: float = 0.3) -> None:
    """Move the zero-initialised heads so the residual and the covariance are far from their start."""
    with torch.no_grad():
        for head in (router.residual_head, router.scale_head):
            head[-1].weight.normal_(std=std)


def entropy(probs_TE: torch.Tensor) -> torch.Tensor:
    return -(probs_TE * probs_TE.clamp_min(1e-12).log()).sum(-1).mean()


# Rows e_i - e_0: the logits up to the softmax's shift, which a routing distribution determines.
CONTRAST = torch.cat([-torch.ones(N_EXPERTS - 1, 1), torch.eye(N_EXPERTS - 1)], 1)


def contrasts(probs: torch.Tensor) -> torch.Tensor:
    """``l_i - l_0 = log p_i - log p_0`` for i >= 1: a routing distribution's logits, recovered up to
    the shift that the softmax forgets (flattened to samples x (E - 1), in float64)."""
    log_p = probs.double().log()
    return (log_p[..., 1:] - log_p[..., :1]).reshape(-1, N_EXPERTS - 1)


def assert_moments(x_NX: torch.Tensor, mean_X: torch.Tensor, cov_XX: torch.Tensor, z: float = 5.0) -> None:
    """The sample's mean and covariance equal the closed form within ``z`` standard errors, each
    error estimated from the sample itself (the variance of x_i, and of (x_i - m_i)(x_j - m_j)),
    so that non-Gaussian samples (dropout) get honest tolerances too."""
    n = x_NX.shape[0]
    mean_X, cov_XX = mean_X.double(), cov_XX.double()
    centred = x_NX - x_NX.mean(0)
    products_NXX = centred[:, :, None] * centred[:, None, :]
    assert ((x_NX.mean(0) - mean_X).abs() <= z * (centred.var(0) / n).sqrt()).all(), (x_NX.mean(0), mean_X)
    assert ((products_NXX.mean(0) - cov_XX).abs() <= z * (products_NXX.var(0) / n).sqrt()).all(), \
        (products_NXX.mean(0), cov_XX)


def assert_uncorrelated(a_NX: torch.Tensor, b_NX: torch.Tensor, z: float = 5.0) -> None:
    """Independent draws: every cross-covariance is 0 within ``z`` standard errors."""
    products = (a_NX - a_NX.mean(0))[:, :, None] * (b_NX - b_NX.mean(0))[:, None, :]
    assert (products.mean(0).abs() <= z * (products.var(0) / a_NX.shape[0]).sqrt()).all()


# ---------------------------------------------------------------------------
# Variational router
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("shared_hidden", [False, True])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_heads_start_at_the_deterministic_router_with_sigma_init(covariance, shared_hidden):
    router = make_router("variational", covariance=covariance, sigma_init=0.3, shared_hidden=shared_hidden)
    post = router.posterior(tokens())
    torch.testing.assert_close(post.mean_TE, router.gate(tokens()))
    torch.testing.assert_close(post.covariance_TEE(), 0.09 * torch.eye(N_EXPERTS).expand(12, -1, -1))


@pytest.mark.parametrize("shared_hidden", [False, True])
@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_kl_matches_torch_distributions_and_enters_aux_loss_times_beta(covariance, shared_hidden):
    router = make_router("variational", covariance=covariance, beta=0.25, load_balance_weight=0.0,
                         shared_hidden=shared_hidden)
    randomise_heads(router)
    post = router.posterior(tokens())
    if covariance == "diag":
        expected_T = kl_divergence(Normal(post.residual_TE, post.log_scale_TE.exp()), Normal(0.0, 1.0)).sum(-1)
    else:
        assert (post.chol_TEE.triu(1) == 0).all() and (post.chol_TEE.diagonal(dim1=-2, dim2=-1) > 0).all()
        rows, cols = torch.tril_indices(N_EXPERTS, N_EXPERTS, offset=-1)
        assert post.chol_TEE[:, rows, cols].abs().min() > 0  # off-diagonal entries are really in play
        expected_T = kl_divergence(MultivariateNormal(post.residual_TE, scale_tril=post.chol_TEE),
                                   MultivariateNormal(torch.zeros(N_EXPERTS), torch.eye(N_EXPERTS)))
    torch.testing.assert_close(post.kl_T(), expected_T)
    routing = router(tokens())
    torch.testing.assert_close(routing.aux_loss, 0.25 * expected_T.mean())
    torch.testing.assert_close(routing.stats["kl"], expected_T.mean())
    # The OOD signal is tr(Sigma_post) per token.
    torch.testing.assert_close(routing.uncertainty_T, post.covariance_TEE().diagonal(dim1=-2, dim2=-1).sum(-1))


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_sample_covariance_matches_the_posterior(covariance):
    router = make_router("variational", covariance=covariance)
    randomise_heads(router)
    with torch.no_grad():
        post = router.posterior(tokens(1))
        torch.manual_seed(0)
        l_SE = post.sample(40_000)[:, 0]
        sigma_EE = post.covariance_TEE()[0]
    # 40k samples: the estimates' standard errors are under 1% of the largest variance.
    scale = float(sigma_EE.diag().max())
    torch.testing.assert_close(l_SE.mean(0), post.mean_TE[0], atol=0.03 * scale ** 0.5, rtol=0)
    torch.testing.assert_close(torch.cov(l_SE.T), sigma_EE, atol=0.03 * scale, rtol=0)
    if covariance == "full":
        assert (sigma_EE - torch.diag(sigma_EE.diag())).abs().max() > 0.2 * scale  # correlated for real


@pytest.mark.parametrize("name", ["variational", "mc_dropout"])
def test_evaluation_routes_on_the_mean_of_S_softmaxes(name):
    router = make_router(name, samples=8, dropout=0.3)
    if name == "variational":
        randomise_heads(router, std=1.0)
    router.eval()
    u = tokens()
    torch.manual_seed(3)
    assert router(u).sample_probs_STE is None  # kept only where asked for
    router.keep_samples = True
    torch.manual_seed(3)
    routing = router(u)
    assert routing.sample_probs_STE.shape == (8, 12, N_EXPERTS)
    torch.testing.assert_close(routing.probs_TE, routing.sample_probs_STE.mean(0))
    ids_TK, gates_TK = renormalised_topk(routing.probs_TE, router.k)
    assert torch.equal(routing.expert_ids_TK, ids_TK)
    torch.testing.assert_close(routing.gates_TK, gates_TK)
    # The S samples are S different draws, taken from the global generator; keeping them changes
    # nothing else: the same seed gives the same mean without them.
    assert not torch.allclose(routing.sample_probs_STE[0], routing.sample_probs_STE[1])
    router.keep_samples = False
    torch.manual_seed(3)
    again = router(u)
    torch.testing.assert_close(again.probs_TE, routing.probs_TE, rtol=1e-6, atol=1e-7)
    assert torch.equal(again.expert_ids_TK, routing.expert_ids_TK)
    # Training is one pass and reports no samples.
    router.train()
    assert router(u).sample_probs_STE is None


@pytest.mark.parametrize("name", sorted(ROUTERS))
def test_head_outputs_are_every_layer_besides_the_gate(name):
    """``head_outputs`` (what ``vrmoe bench`` times as a router's training floor) reaches every
    parameter but the gate's, and a router has heads exactly when it counts head FLOPs (the
    bench picks the routers to floor by that count)."""
    router = make_router(name)
    outputs = router.head_outputs(tokens().requires_grad_())
    assert bool(outputs) == (router.head_flops_per_token() > 0)
    heads = [p for n, p in router.named_parameters() if not n.startswith("gate.")]
    if outputs:
        grads = torch.autograd.grad(sum(o.sum() for o in outputs), heads, allow_unused=True)
        assert all(g is not None for g in grads)
    else:
        assert not heads


def test_vtsr_temperature_comes_from_its_head():
    router = make_router("vtsr", min_temperature=0.1)
    with torch.no_grad():
        router.temperature_head[-1].weight.normal_(std=0.3)
    u = tokens()
    torch.testing.assert_close(router.temperature(u),
                               torch.nn.functional.softplus(router.temperature_head(u)) + 0.1)


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_fused_head_layers_compute_what_the_heads_do(covariance):
    """The heads' first layers run as one matmul: the same outputs and the same gradients as the
    head modules applied one by one."""
    router = make_router("variational", covariance=covariance)
    randomise_heads(router)
    u = tokens(40).requires_grad_()
    residual, raw = router.head_outputs(u)
    base = router.gate(u)
    torch.testing.assert_close(residual, router.residual_head(u))
    torch.testing.assert_close(raw, router.scale_head(u))
    weights = torch.randn(3, 40, generator=torch.Generator().manual_seed(5))
    params = [u, *router.parameters()]
    got = torch.autograd.grad((weights[0] @ base + weights[1] @ residual).sum() + (weights[2] @ raw).sum(), params)
    want = torch.autograd.grad((weights[0] @ router.gate(u) + weights[1] @ router.residual_head(u)).sum()
                               + (weights[2] @ router.scale_head(u)).sum(), params)
    for g, w in zip(got, want):
        torch.testing.assert_close(g, w)


# ---------------------------------------------------------------------------
# Sampling: the fast paths draw from the closed-form distributions
# ---------------------------------------------------------------------------

def one_token_many_times(n: int) -> torch.Tensor:
    """n copies of one token: every routing sample of it is an independent draw of one distribution."""
    return tokens(1).expand(n, -1).contiguous()


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_variational_samples_have_the_posterior_moments(covariance):
    """Evaluation (chunked, the mean accumulated) and training (one differentiable sample) both
    draw logits from N(mean, Sigma): the contrasts l_i - l_0 recovered from the routing
    distributions have mean A mean and covariance A Sigma A^T (A = CONTRAST), and samples of
    different tokens, or of one token, are uncorrelated."""
    router = make_router("variational", covariance=covariance, samples=4)
    randomise_heads(router, std=0.5)
    u = one_token_many_times(12_000)  # 4 samples each: two token chunks
    with torch.no_grad():
        post = router.posterior(u[:1])
        mean_X, cov_XX = CONTRAST @ post.mean_TE[0], CONTRAST @ post.covariance_TEE()[0] @ CONTRAST.T
        router.eval()
        router.keep_samples = True
        torch.manual_seed(0)
        routing = router(u)
        samples_S = [contrasts(routing.sample_probs_STE[s]) for s in range(4)]
        assert_moments(torch.cat(samples_S), mean_X, cov_XX)
        assert_uncorrelated(samples_S[0], samples_S[1])  # samples of one token
        assert_uncorrelated(samples_S[0][:-1], samples_S[0][1:])  # neighbouring tokens
        torch.testing.assert_close(routing.probs_TE, routing.sample_probs_STE.mean(0))
    if covariance == "full":
        assert (cov_XX - torch.diag(cov_XX.diag())).abs().max() > 0.1 * cov_XX.diag().max()  # correlated for real
    router.train()
    torch.manual_seed(1)
    assert_moments(contrasts(router(u).probs_TE.detach()), mean_X, cov_XX)


def mc_dropout_closed_form(router) -> tuple[torch.Tensor, torch.Tensor]:
    """Logits ``W (m * u) / (1 - p)`` with m_d ~ Bernoulli(1 - p): mean W u, covariance
    ``W diag(u^2 p / (1 - p)) W^T``; their contrasts."""
    p, w, u = router.cfg.dropout, router.gate.weight.detach().double(), tokens(1)[0].double()
    cov = (w * (u.square() * p / (1 - p))) @ w.T
    return CONTRAST.double() @ (w @ u), CONTRAST.double() @ cov @ CONTRAST.double().T


@pytest.mark.parametrize("path", ["sparse, evaluation", "masks, with gradients", "masks, training",
                                  "dense F.dropout"])
def test_mc_dropout_every_path_samples_dropout(path):
    """The sparse evaluation (dropped features only), the gradient-carrying masks filled from the
    same sparse draw, and F.dropout's dense masks (what a GPU runs) draw the same logits."""
    router = make_router("mc_dropout", samples=4, dropout=0.3)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.5)  # logits of order 1
    mean_X, cov_XX = mc_dropout_closed_form(router)
    u = one_token_many_times(10_000)
    router.eval()
    router.keep_samples = True
    torch.manual_seed(0)
    if path == "sparse, evaluation":
        with torch.no_grad():
            probs = router(u).sample_probs_STE
    elif path == "masks, with gradients":
        probs = router(u.requires_grad_()).sample_probs_STE.detach()
    elif path == "masks, training":
        probs = router.train()(u).probs_TE.detach()
    else:
        acc = ScoreMean(4, keep=True)
        with torch.no_grad():
            router._dense_passes(u, acc)
        probs = acc.samples_STE()
    assert_moments(contrasts(probs), mean_X, cov_XX)
    if probs.dim() == 3:
        assert_uncorrelated(contrasts(probs[0]), contrasts(probs[1]))


@pytest.mark.parametrize("samples", [1, 4])
def test_mc_dropout_masked_passes_are_u_times_the_keep_mask(samples):
    """The differentiable passes zero the drawn features of u / (1 - p) in place: the same logits
    and the same input gradient as multiplying u by the keep mask built from the same draw."""
    p = 0.3
    router = make_router("mc_dropout", samples=samples, dropout=p)
    u = tokens(16).requires_grad_()
    torch.manual_seed(5)
    acc = ScoreMean(samples, keep=True)
    router._masked_passes(u, acc)
    probs = acc.samples_STE() if samples > 1 else acc.mean_TE().unsqueeze(0)
    (grad,) = torch.autograd.grad((probs * torch.arange(probs.numel()).view_as(probs)).sum(), u)

    torch.manual_seed(5)
    mask = torch.full((samples * u.numel(),), 1.0 / (1.0 - p))
    mask.index_fill_(0, router._gaps(p, u.device).ones(mask.numel(), p).long(), 0.0)
    expected = router.gate(u * mask.view(samples, *u.shape)).float().softmax(-1)
    (expected_grad,) = torch.autograd.grad((expected * torch.arange(expected.numel()).view_as(expected)).sum(), u)
    assert (mask == 0).any() and (mask != 0).any()
    torch.testing.assert_close(probs, expected, rtol=1e-6, atol=1e-7)
    torch.testing.assert_close(grad, expected_grad, rtol=1e-5, atol=1e-6)


def test_mc_dropout_sparse_path_with_a_biased_gate_and_a_width_not_a_power_of_two():
    """D = 20 is padded to 32 feature positions (the extra ones are zeros); a pretrained gate's
    bias is not scaled by 1 / (1 - p)."""
    router = build_router(20, N_EXPERTS, router_config("mc_dropout", k=2, samples=2, dropout=0.3))
    router.gate = torch.nn.Linear(20, N_EXPERTS, bias=True)
    with torch.no_grad():
        router.gate.weight.normal_(std=0.5)
        router.gate.bias.normal_()
    u0 = torch.randn(20, generator=torch.Generator().manual_seed(2))
    router.eval()
    router.keep_samples = True
    torch.manual_seed(0)
    with torch.no_grad():
        probs = router(u0.expand(20_000, -1).contiguous()).sample_probs_STE
    w, b = router.gate.weight.double(), router.gate.bias.double()
    cov = (w * (u0.double().square() * 0.3 / 0.7)) @ w.T
    a = CONTRAST.double()
    assert_moments(contrasts(probs), a @ (w @ u0.double() + b), a @ cov @ a.T)


def test_geometric_gaps_have_the_geometric_distribution():
    """G + 1 for G ~ Geometric(p): the table's values, the refined ambiguous prefixes (every
    boundary of G lies in one) and the tail (15 leading zero bits) together."""
    p, n = 0.05, 2_000_000
    gaps = GeometricGaps(p, torch.device("cpu"))
    assert 0 < int((gaps.table == 0).sum()) < 0.01 * len(gaps.table)  # a few ambiguous entries, refined
    torch.manual_seed(0)
    g = gaps.draw(n) - 1
    assert int(g.min()) >= 0
    k = torch.arange(60)
    pmf = p * (1 - p) ** k.double()
    freq = (g[:, None] == k).double().mean(0)
    assert ((freq - pmf).abs() <= 5 * (pmf * (1 - pmf) / n).sqrt()).all()
    tail = (1 - p) ** 202  # G >= 202 only from U < 2^-15: the refined prefix 0
    assert abs(float((g >= 202).double().mean()) - tail) <= 5 * math.sqrt(tail / n)


@pytest.mark.parametrize("margin, slack", [(8.0, 64), (0.0, 1)])  # (0, 1): most draws need more rounds
def test_bernoulli_positions_are_independent_draws_of_p(margin, slack):
    p, n, width = 0.05, 4_000_000, 256
    gaps = GeometricGaps(p, torch.device("cpu"))
    torch.manual_seed(0)
    positions = torch.cat([gaps.ones(n // 8, p, margin, slack) + i * (n // 8) for i in range(8)])
    assert bool((positions[1:] > positions[:-1]).all()) and 0 <= int(positions[0]) and int(positions[-1]) < n
    ones = torch.zeros(n, dtype=torch.float64)
    ones[positions] = 1.0
    assert abs(float(ones.mean()) - p) <= 5 * math.sqrt(p * (1 - p) / n)
    both = float((ones[1:] * ones[:-1]).mean())
    assert abs(both - p * p) <= 5 * math.sqrt(p * p / n)
    counts = ones.view(-1, width).sum(1)  # per row of 256 features: Binomial(256, p)
    rows = counts.numel()
    assert abs(float(counts.mean()) - width * p) <= 5 * math.sqrt(width * p * (1 - p) / rows)
    assert abs(float(counts.var()) / (width * p * (1 - p)) - 1) <= 5 * math.sqrt(2 / rows)


@pytest.mark.parametrize("margin, slack", [(8.0, 64), (0.0, 1)])
def test_bernoulli_positions_in_scratch_buffers_are_the_same_draws(margin, slack):
    """Drawn into reused buffers, the positions are the ones a fresh draw gives from the same seed
    (also when a round's buffers are overwritten by the next round), and a second draw of the
    same size allocates nothing new."""
    p, n = 0.05, 1 << 20
    gaps = GeometricGaps(p, torch.device("cpu"))
    scratch = Scratch(torch.device("cpu"))
    torch.manual_seed(3)
    fresh = [gaps.ones(n, p, margin, slack) for _ in range(2)]
    torch.manual_seed(3)
    first = gaps.ones(n, p, margin, slack, scratch=scratch).clone()
    pointers = {name: buffer.data_ptr() for name, buffer in scratch.buffers.items()}
    second = gaps.ones(n, p, margin, slack, scratch=scratch)
    assert torch.equal(first, fresh[0]) and torch.equal(second, fresh[1])
    assert {name: buffer.data_ptr() for name, buffer in scratch.buffers.items()} == pointers
    torch.manual_seed(4)  # a larger draw grows the buffers and is still the fresh draw
    fresh_larger = gaps.ones(4 * n, p, margin, slack)
    torch.manual_seed(4)
    assert torch.equal(gaps.ones(4 * n, p, margin, slack, scratch=scratch), fresh_larger)
    assert scratch.buffers[("gaps", torch.int32)].numel() > first.numel()
    assert shared_scratch(torch.device("cpu")) is shared_scratch(torch.device("cpu"))


def test_bernoulli_positions_with_a_vanishing_p_and_an_empty_range():
    gaps = GeometricGaps(1e-12, torch.device("cpu"))
    assert gaps.ones(1_000_000, 1e-12).numel() == 0
    assert GeometricGaps(0.5, torch.device("cpu")).ones(0, 0.5).numel() == 0


@pytest.mark.parametrize("mode", ["samples", "tokens"])
def test_softmax_mean_in_chunks_is_the_mean_of_the_softmaxes(mode):
    logits_STE = torch.randn(7, 50, N_EXPERTS, generator=torch.Generator().manual_seed(4)) * 3
    acc = ScoreMean(7, keep=True)
    if mode == "samples":
        start = 0
        for size in sample_chunks(7, 50 * N_EXPERTS, chunk_elements=2 * 50 * N_EXPERTS):
            acc.add_samples(logits_STE[start:start + size].transpose(1, 2))
            start += size
    else:
        for rows in token_chunks(50, 7 * N_EXPERTS, chunk_elements=9 * 7 * N_EXPERTS):
            acc.add_tokens(logits_STE[:, rows].permute(1, 2, 0))
    torch.testing.assert_close(acc.mean_TE(), logits_STE.softmax(-1).mean(0))
    torch.testing.assert_close(acc.samples_STE(), logits_STE.softmax(-1))
    assert sample_chunks(32, 100, 400, power_of_two=True) == [4] * 8
    assert sample_chunks(3, 100, 1000, power_of_two=True) == [2, 1]


@pytest.mark.parametrize("name, fields", [("variational", {"covariance": "diag", "sigma_init": 1e-6}),
                                          ("variational", {"covariance": "full", "sigma_init": 1e-6}),
                                          ("mc_dropout", {"dropout": 1e-9}), ("mc_dropout", {"dropout": 0.0})])
def test_vanishing_noise_selects_what_topk_selects(name, fields):
    """sigma -> 0 (or p -> 0): every sample is the gate's logits, so S samples route as Top-K."""
    router = make_router(name, samples=32, **fields).eval()
    topk = make_router("topk").eval()
    topk.gate.load_state_dict(router.gate.state_dict())
    u = tokens(500)
    with torch.no_grad():
        got, want = router(u), topk(u)
    assert torch.equal(got.expert_ids_TK, want.expert_ids_TK)
    torch.testing.assert_close(got.gates_TK, want.gates_TK, rtol=0, atol=1e-4)
    torch.testing.assert_close(got.probs_TE, want.probs_TE, rtol=0, atol=1e-4)


def test_mc_dropout_stays_on_at_evaluation():
    router = make_router("mc_dropout", samples=1, dropout=0.5)
    router.eval()
    first, second = router(tokens()).probs_TE, router(tokens()).probs_TE
    assert not torch.allclose(first, second)
    assert router(tokens()).sample_probs_STE is None  # S = 1


# ---------------------------------------------------------------------------
# Temperature routers
# ---------------------------------------------------------------------------

def test_routing_entropy_rises_with_T_and_T_to_zero_recovers_topk():
    u = tokens(200)
    entropies, overlaps = [], []
    for t in (1e-6, 0.5, 1.0, 2.0):
        router = make_router("temperature", temperature=t, k=2)
        with torch.no_grad():  # logits of order 1, so that T = 1 is a real spread
            router.gate.weight.normal_(std=D_MODEL ** -0.5)
        torch.manual_seed(0)
        routing = router(u)
        entropies.append(float(entropy(routing.probs_TE.detach())))
        overlaps.append(float(routing.stats["topk_overlap"]))
        if t == 1e-6:
            topk_ids = router.gate(u).topk(2).indices
            assert torch.equal(routing.expert_ids_TK.sort(-1).values, topk_ids.sort(-1).values)
    assert entropies == sorted(entropies) and len(set(entropies)) == 4
    assert entropies[0] < 1e-3 and entropies[-1] <= math.log(N_EXPERTS)
    assert overlaps[0] == 1.0 and overlaps[-1] < 0.9


def test_gumbel_top1_samples_the_tempered_distribution():
    router = make_router("temperature", temperature=0.7, k=1)
    u = tokens(1).expand(20_000, -1)
    torch.manual_seed(0)
    routing = router(u)
    freq_E = torch.bincount(routing.expert_ids_TK[:, 0], minlength=N_EXPERTS).float() / 20_000
    torch.testing.assert_close(freq_E, routing.probs_TE[0], atol=0.012, rtol=0)
    torch.testing.assert_close(routing.probs_TE[0], (router.gate(u[0]) / 0.7).softmax(-1))


def test_temperature_eval_mode_topk_is_deterministic_and_sample_is_not():
    u = tokens(64)
    deterministic = make_router("temperature", eval_mode="topk", temperature=2.0).eval()
    assert torch.equal(deterministic(u).expert_ids_TK, deterministic.gate(u).topk(2).indices)
    sampling = make_router("temperature", eval_mode="sample", temperature=2.0).eval()
    assert not torch.equal(sampling(u).expert_ids_TK, sampling(u).expert_ids_TK)


@pytest.mark.parametrize("per_expert", [False, True])
def test_vtsr_temperature_starts_at_one_is_floored_and_regularised(per_expert):
    router = make_router("vtsr", per_expert_temperature=per_expert, load_balance_weight=0.0,
                         temperature_reg=0.1, min_temperature=0.05)
    u = tokens()
    temperature = router.temperature(u)
    assert temperature.shape == (12, N_EXPERTS if per_expert else 1)
    torch.testing.assert_close(temperature, torch.ones_like(temperature))
    with torch.no_grad():
        router.temperature_head[-1].bias.fill_(-50.0)  # the head asks for T ~ 0: the floor holds
    routing = router(u)
    torch.testing.assert_close(routing.stats["temperature_min"], torch.tensor(0.05))
    torch.testing.assert_close(routing.aux_loss, torch.tensor(0.1 * -math.log(0.05)))
    torch.testing.assert_close(routing.uncertainty_T, torch.full((12,), 0.05))


def test_vtsr_eval_mode_topk_is_the_old_deterministic_pass():
    """eval_mode=topk is one deterministic pass, Top-K on l / T(u), drawing no noise (so the golden
    record, written before evaluation sampled, still holds); with one T per token that is Top-K of l."""
    router = make_router("vtsr", eval_mode="topk").eval()
    with torch.no_grad():
        router.temperature_head[-1].weight.normal_(std=0.3)  # T varies from token to token
    u = tokens(64)
    state = torch.get_rng_state()
    first, second = router(u), router(u)
    assert torch.equal(torch.get_rng_state(), state)
    assert torch.equal(first.expert_ids_TK, second.expert_ids_TK) and first.sample_probs_STE is None
    assert torch.equal(first.expert_ids_TK, router.gate(u).topk(2).indices)
    scaled_TE = router.gate(u) / router.temperature(u)
    torch.testing.assert_close(first.gates_TK, scaled_TE.gather(-1, first.expert_ids_TK).softmax(-1))
    torch.testing.assert_close(first.probs_TE, scaled_TE.softmax(-1))


def test_vtsr_with_a_temperature_per_expert_overlaps_with_its_own_deterministic_selection():
    """With one T per expert, deterministic selection is Top-K of l / T_e, not of l: topk_overlap
    counts against that selection, so the deterministic pass logs 1."""
    router = make_router("vtsr", eval_mode="topk", per_expert_temperature=True).eval()
    with torch.no_grad():
        router.temperature_head[-1].bias.copy_(torch.linspace(-3.0, 3.0, N_EXPERTS))  # T from 0.05 to 3
        routing = router(tokens(64))
        plain_TK = router.gate(tokens(64)).topk(2).indices.sort(-1).values
    assert float(routing.stats["topk_overlap"]) == 1.0
    assert (plain_TK != routing.expert_ids_TK.sort(-1).values).any(-1).float().mean() > 0.05


def tempered_by_input(router, low: float = -20.0, high: float = 20.0) -> None:
    """Make a VTSR router's temperature depend on the input's first coordinate,
    ``T(u) = softplus(low + (high - low) GELU(u_0)) + floor``: at the floor where u_0 = -1, about
    2 high - low where u_0 = 2; logits of order 1, so that T = 1 is a real spread."""
    head = router.temperature_head
    with torch.no_grad():
        router.gate.weight.normal_(std=D_MODEL ** -0.5, generator=torch.Generator().manual_seed(4))
        head[0].weight.zero_(), head[0].bias.zero_()
        head[0].weight[0, 0] = 1.0  # hidden unit 0 = GELU(u_0)
        head[-1].weight.zero_()
        head[-1].weight[0, 0] = high - low
        head[-1].bias.fill_(low)  # raw = low + (high - low) * GELU(u_0)


def test_vtsr_samples_at_evaluation_and_leaves_top_k_where_the_temperature_is_high():
    router = make_router("vtsr", k=2, min_temperature=0.01).eval()
    tempered_by_input(router)
    u = tokens(200)
    u[:, 0] = torch.tensor([2.0, -1.0]).repeat(100)  # even tokens hot, odd tokens cold
    temperature_T = router.temperature(u)[:, 0].detach()
    assert bool((temperature_T[0::2] > 50).all()) and bool((temperature_T[1::2] < 0.011).all())
    topk_TK = router.gate(u).topk(2).indices.sort(-1).values
    torch.manual_seed(0)
    same_TP = torch.stack([(router(u).expert_ids_TK.sort(-1).values == topk_TK).all(-1) for _ in range(20)], -1)
    hot, cold = same_TP[0::2].double().mean().item(), same_TP[1::2].double().mean().item()
    # A cold token's logits, scaled by 1 / 0.01, dwarf the Gumbel noise: its Top-K almost always.
    # A hot one samples near uniformly: Top-K's pair about 1 time in C(6, 2) = 15.
    assert cold > 0.95 and hot < 0.15, (cold, hot)
    assert not torch.equal(router(u).expert_ids_TK, router(u).expert_ids_TK)


@pytest.mark.parametrize("per_expert", [False, True])
def test_vtsr_evaluation_draws_gumbel_top_k_from_the_tempered_distribution(per_expert):
    """K = 2 at evaluation: the first choice is distributed as p = softmax(l / T(u)) and the pair
    {i, j} as p_i p_j / (1 - p_i) + p_j p_i / (1 - p_j) (sampling without replacement), over 20,000
    draws within a tolerance of about 4 standard errors."""
    router = make_router("vtsr", k=2, per_expert_temperature=per_expert).eval()
    with torch.no_grad():
        router.gate.weight.normal_(std=D_MODEL ** -0.5, generator=torch.Generator().manual_seed(5))
        router.temperature_head[-1].bias.copy_(torch.linspace(-0.5, 1.5, router.temperature_head[-1].bias.numel()))
    n = 20_000
    u = tokens(1).expand(n, -1)
    torch.manual_seed(0)
    routing = router(u)
    p_E = (router.gate(u[:1]) / router.temperature(u[:1])).softmax(-1)[0].detach()
    torch.testing.assert_close(routing.probs_TE[0], p_E)
    first_E = torch.bincount(routing.expert_ids_TK[:, 0], minlength=N_EXPERTS).double() / n
    torch.testing.assert_close(first_E, p_E.double(), atol=0.012, rtol=0)
    pair_EE = torch.zeros(N_EXPERTS, N_EXPERTS, dtype=torch.float64)
    low_N, high_N = routing.expert_ids_TK.min(-1).values, routing.expert_ids_TK.max(-1).values
    pair_EE.index_put_((low_N, high_N), torch.ones(n, dtype=torch.float64), accumulate=True)
    p = p_E.double()
    want_EE = (p[:, None] * p[None, :] / (1 - p[:, None]) + p[:, None] * p[None, :] / (1 - p[None, :])).triu(1)
    torch.testing.assert_close(pair_EE / n, want_EE, atol=0.01, rtol=0)
    assert want_EE.sum().item() == pytest.approx(1.0)


def test_vtsr_eval_mode_counts_the_gumbel_draw_and_is_listed():
    from vrmoe.model.routers.listing import router_rows

    sample, topk = make_router("vtsr", eval_mode="sample"), make_router("vtsr", eval_mode="topk")
    # The draw -log(-log U) and its addition, per expert; l / T is counted in both.
    assert sample.flops_per_token(samples=4) - topk.flops_per_token(samples=4) == 2 * N_EXPERTS
    assert sample.flops_per_token(samples=4) == sample.flops_per_token(samples=1)  # one pass whatever S
    row = next(r for r in router_rows() if r["router"] == "vtsr")
    assert "router.eval_mode=sample" in row["its own keys"] and row["averages S at eval"] == "no"
    # Sampling makes evaluation's S single-sample passes (the BMA, mutual information) differ.
    assert router_config("vtsr").draws_at_eval() and not router_config("vtsr", eval_mode="topk").draws_at_eval()
    assert "at evaluation too unless ``router.eval_mode=topk``" in row["what it does"]


# ---------------------------------------------------------------------------
# Gradients, cost of S, per-layer plan
# ---------------------------------------------------------------------------

def gates_only_loss(router, u):
    """A task-like loss that reaches the router only through the gates (no aux terms)."""
    routing = router(u)
    weights_TK = torch.randn(routing.gates_TK.shape, generator=torch.Generator().manual_seed(2))
    return (routing.gates_TK * weights_TK).sum()


@pytest.mark.parametrize("name, fields, heads", [
    ("variational", {"covariance": "diag"}, ["residual_head", "scale_head"]),
    ("variational", {"covariance": "full"}, ["residual_head", "scale_head"]),
    ("variational", {"covariance": "full", "shared_hidden": True}, ["residual_head", "scale_head"]),
    ("vtsr", {"k": 2}, ["temperature_head"]),
    ("vtsr", {"k": 1}, ["temperature_head"]),  # hard gates are the constant 1: only the estimator reaches T
    ("vtsr", {"k": 2, "per_expert_temperature": True}, ["temperature_head"]),
])
def test_task_gradients_reach_every_head(name, fields, heads):
    router = make_router(name, beta=0.0, load_balance_weight=0.0, temperature_reg=0.0, **fields)
    gates_only_loss(router, tokens(64)).backward()
    for head in heads:
        grad = getattr(router, head)[-1].weight.grad
        assert grad is not None and grad.abs().sum() > 0, head
    if fields.get("covariance") == "full":  # the strictly-lower entries of L learn too
        bias_grad_P = router.scale_head[-1].bias.grad
        assert bias_grad_P[~router.is_diag_P].abs().min() > 0


@pytest.mark.parametrize("router_args", [["router=variational"], ["router=variational", "router.covariance=full"],
                                         ["router=variational", "router.shared_hidden=true"], ["router=mc_dropout"]])
def test_S_costs_router_work_only(router_args):
    """Whatever S, each layer's experts run once per forward, on T x K token rows: each token's K
    distinct experts, none of them twice."""
    calls, rows, shapes = {}, {}, {}
    x = torch.randint(0, 256, (2, 16))
    for s in (1, 32):
        model = build_model(make_config(*TINY, *router_args, f"S={s}")).eval()
        with torch.no_grad():
            out = model(x)
        calls[s] = [layer.experts.block_calls for layer in model.moe_layers]
        rows[s] = [layer.experts.rows_run for layer in model.moe_layers]
        shapes[s] = [r.expert_ids_TK.shape for r in out.routings]
        for r in out.routings:
            assert r.sample_probs_STE is None  # not kept unless asked for
            assert (r.expert_ids_TK.sort(-1).values.diff(dim=-1) > 0).all()  # K distinct experts per token
    assert calls[1] == calls[32] == [1, 1]  # each expert block ran once per layer per forward
    assert rows[1] == rows[32] == [32 * 2, 32 * 2]  # T x K rows: no token ran through an expert twice
    assert shapes[1] == shapes[32] == [(32, 2), (32, 2)]  # K slots per token, whatever S


@pytest.mark.parametrize("layers, expected", [("all", [VariationalRouter, VariationalRouter]),
                                              ("1", [TopKRouter, VariationalRouter]),
                                              ("2", [VariationalRouter, VariationalRouter]),
                                              ("[0]", [VariationalRouter, TopKRouter]),
                                              ("[1]", [TopKRouter, VariationalRouter]),
                                              ("[1,0]", [VariationalRouter, VariationalRouter])])
def test_router_layers_gives_the_router_to_the_chosen_moe_layers(layers, expected):
    model = build_model(make_config(*TINY, "router=variational", f"router.layers={layers}"))
    assert [type(layer.router) for layer in model.moe_layers] == expected
    out = model(torch.randint(0, 256, (1, 8)))
    assert [r.uncertainty_T is not None for r in out.routings] == [cls is VariationalRouter for cls in expected]


def test_router_layers_counts_moe_layers_not_blocks():
    """With an MoE block every second block (blocks 1 and 3 of 4), index 1 is the second MoE
    layer, block 3, and N = 1 the same layer."""
    for layers in ("[1]", "1"):
        model = build_model(make_config(*TINY, "model.n_layers=4", "model.moe_every=2", "router=vtsr",
                                        f"router.layers={layers}"))
        assert [b.moe.router.name if b.moe is not None else None for b in model.blocks] == \
            [None, "topk", None, "vtsr"]


@pytest.mark.parametrize("layers, message", [
    ("5", "router.layers=5 but the model has 2 MoE layer(s); give a number up to 2, or all"),
    ("[2]", "router.layers=[2] lists MoE layer 2 but the model has 2 MoE layer(s); list indices from 0 to 1"),
    ("[0,-1]", "router.layers=[0,-1] lists MoE layer -1 but the model has 2 MoE layer(s); list indices from 0 to 1"),
    ("[1,0,1]", "router.layers=[1,0,1] lists MoE layer 1 more than once (the model has 2 MoE layer(s)); "
                "list each index once, e.g. router.layers=[0,1]"),
])
def test_router_layers_beyond_the_moe_layers_or_repeated_is_refused(layers, message):
    with pytest.raises(ConfigError) as info:
        build_model(make_config(*TINY, "router=variational", f"router.layers={layers}"))
    assert str(info.value) == message


@pytest.mark.parametrize("layers", ["0", "-2", "[]", "[0.5]", "[a]", "alll", "1.5", "true"])
def test_router_layers_of_another_form_is_refused_by_the_config(layers):
    with pytest.raises(ConfigError) as info:
        make_config(*TINY, "router=variational", f"router.layers={layers}")
    message = str(info.value)
    assert message.startswith("router.layers=") and "\n" not in message
    assert message.endswith("must be all, a positive integer N (the last N MoE layers) or a list of MoE layer "
                            "indices, e.g. router.layers=[0,2]")


@pytest.mark.parametrize("layers, recorded", [("all", "all"), ("1", "1"), ("'1'", "1"), ("[0]", [0]),
                                              ("[1,0]", [1, 0])])
def test_router_layers_round_trips_through_records_and_resume(layers, recorded):
    """A run records router.layers in one form (N as the digit string runs have always saved, so a
    checkpoint written before lists existed compares equal on resume); summary.json's config and
    a checkpoint's compose back to the same value, and resuming with the same override finds no
    difference."""
    from vrmoe.checkpoint import check_resumable
    from vrmoe.compose import compose_over_saved, from_dict
    from vrmoe.config import to_dict

    app = make_config(*TINY, "router=variational", f"router.layers={layers}", "train.max_steps=2")
    saved = json.loads(json.dumps(to_dict(app)))  # as summary.json and the checkpoint hold it
    assert saved["router"]["layers"] == recorded
    assert from_dict(saved).router == app.router
    assert compose_over_saved(saved, ["S=2"]).router.layers == recorded
    resumed = make_config(*TINY, "router=variational", f"router.layers={layers}", "train.max_steps=4")
    assert check_resumable({"config": saved, "step": 2}, resumed) == []
    other = make_config(*TINY, "router=variational", "router.layers=[1]", "train.max_steps=4",
                        "train.resume_override=true")
    if recorded != [1]:
        assert check_resumable({"config": saved, "step": 2}, other) == \
            [f"router.layers: {recorded} there, [1] here"]


def test_variational_resume_replays_the_same_routing_noise(tmp_path, monkeypatch):
    args = (*TINY, "router=variational", "S=2", "train.max_steps=4", "train.ckpt_every=2")
    train(make_config(*args), tmp_path / "full")
    interrupt_after_first_checkpoint(make_config(*args), tmp_path / "part", monkeypatch)
    assert load_checkpoint(tmp_path / "part", "train.resume")["step"] == 2
    train(make_config(*args, f"train.resume={tmp_path / 'part'}"), tmp_path / "part")

    def losses(run):
        return [(r["step"], r["train/loss"], r.get("val/loss"))
                for r in map(json.loads, (tmp_path / run / "metrics.jsonl").read_text().splitlines())]

    assert losses("part") == losses("full") and len(losses("full")) == 4


# ---------------------------------------------------------------------------
# End to end through the CLI
# ---------------------------------------------------------------------------

OWN_STATS = {
    "variational": {"kl", "trace_sigma", "residual_norm", "topk_overlap"},
    "temperature": {"topk_overlap"},
    "vtsr": {"temperature_mean", "temperature_std", "temperature_min", "topk_overlap"},
    "mc_dropout": {"topk_overlap"},
}


@pytest.mark.parametrize("name, extra", [("variational", ["S=4"]),
                                         ("variational", ["router.covariance=full", "S=4"]),
                                         ("temperature", ["T=0.7"]), ("vtsr", []), ("mc_dropout", ["S=4"])])
def test_each_router_trains_through_the_cli_and_logs_its_own_stats(tmp_path, name, extra):
    run_dir = tmp_path / "run"
    run_cli("train", *TINY, f"router={name}", *extra, "train.max_steps=20", f"hydra.run.dir={run_dir}",
            cwd=tmp_path)
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["router"] == name
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == list(range(1, 21))
    assert rows[-1]["train/loss"] < rows[0]["train/loss"]  # it learns
    assert math.isfinite(summary["final_val_loss"]) and summary["final_val_loss"] < math.log(256)
    for row in rows:
        for layer in row["moe"].values():
            assert OWN_STATS[name] <= set(layer), (name, set(layer))
            assert 0.0 <= layer["topk_overlap"] <= 1.0
    last = rows[-1]["moe"]["layer1"]
    if name == "variational":
        assert last["kl"] > 0 and last["trace_sigma"] > 0
    if name == "vtsr":
        assert last["temperature_min"] >= 0.05 and last["temperature_std"] >= 0


def test_a_per_layer_sweep_trains_each_layer_set_and_compare_shows_it(tmp_path):
    """`vrmoe train -m 'router.layers=[0],[1]'`: one job per MoE layer, each recording its layer set
    and giving the router to that layer alone; `vrmoe compare` shows the set as a column."""
    sweep_dir = tmp_path / "sweep"
    run_cli("train", "-m", *TINY, "router=variational", "router.layers=[0],[1]", "train.max_steps=2",
            f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path)
    runs = {}
    for summary_path in sweep_dir.glob("*/summary.json"):
        summary = json.loads(summary_path.read_text())
        assert summary["status"] == "completed"
        runs[json.dumps(summary["config"]["router"]["layers"])] = summary_path.parent
    assert sorted(runs) == ["[0]", "[1]"]
    for layers, run_dir in runs.items():
        (chosen,) = json.loads(layers)
        rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
        stats = rows[-1]["moe"]  # the variational layer logs its KL; the Top-K layer has none
        assert {name for name, layer in stats.items() if "kl" in layer} == {f"layer{chosen}"}
    compared = json.loads(run_cli("compare", str(sweep_dir), "--format", "json", cwd=tmp_path).stdout)
    assert sorted(row["router.layers"] for row in compared) == ["[0]", "[1]"]
    assert all(row["status"] == "completed" for row in compared)


@pytest.mark.parametrize("args, key", [
    (["S=0"], "S=0"),
    (["T=0"], "T=0"),
    (["beta=-1"], "beta=-1"),
    (["K=0"], "K=0"),
    (["K=5"], "K=5"),  # the tiny model has 4 experts
    (["router=variational", "router.covariance=full", "model.n_experts=65"], "router.covariance=full"),
    (["router=variational", "model.moe_every=0"], "model.moe_every=0"),
    (["router=vtsr", "router.eval_mode=maybe"], "router.eval_mode='maybe' must be sample or topk"),
    (["router=variational", "router.layers=[0,0]"], "router.layers=[0,0] lists MoE layer 0 more than once"),
    (["router=variational", "router.layers=[2]"], "the model has 2 MoE layer(s); list indices from 0 to 1"),
])
def test_bad_router_input_is_exit_code_2_and_one_line_naming_the_key(tmp_path, args, key):
    proc = run_cli("train", *TINY, *args, cwd=tmp_path, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert key in err


@pytest.mark.parametrize("name, fields", [("topk", {}), ("variational", {"covariance": "diag"}),
                                          ("variational", {"covariance": "full"}),
                                          ("variational", {"covariance": "full", "shared_hidden": True}),
                                          ("temperature", {}), ("vtsr", {}), ("mc_dropout", {})])
@pytest.mark.parametrize("n_experts, k", [(1, 1), (4, 4)])
@pytest.mark.parametrize("training", [True, False])
def test_edge_shapes_one_expert_k_equals_e_one_token_and_bf16(name, fields, n_experts, k, training):
    router = build_router(8, n_experts, router_config(name, k=k, samples=3, z_loss_weight=1e-3, **fields))
    router.train(training)
    for n_tokens in (1, 5):
        u_TD = torch.randn(n_tokens, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            routing = router(u_TD)
        assert routing.expert_ids_TK.shape == (n_tokens, k) and routing.probs_TE.shape == (n_tokens, n_experts)
        # K = E selects every expert once; the gates still sum to 1 per token (bf16 rounding aside).
        assert torch.equal(routing.expert_ids_TK.sort(-1).values, torch.arange(k).expand(n_tokens, k))
        torch.testing.assert_close(routing.gates_TK.float().sum(-1), torch.ones(n_tokens), atol=1e-2, rtol=0)
        assert torch.isfinite(routing.aux_loss) and all(torch.isfinite(v).all() for v in routing.stats.values())
        (routing.aux_loss + routing.gates_TK.float().square().sum()).backward()
        assert torch.isfinite(u_TD.grad).all()


@pytest.mark.parametrize("shape, dtype", [((4096, 8), torch.float32), ((7, 3), torch.float32), ((5,), torch.float64)])
def test_exponential_draws_are_torchs_own_numbers(shape, dtype):
    """The vectorised inversion draws what exponential_() draws: the same numbers, and the
    generator left in the same state (so training's noise, and the golden records, are unchanged)."""
    x = torch.zeros(shape, dtype=dtype)
    torch.manual_seed(3)
    want, want_state = torch.empty_like(x).exponential_(), torch.get_rng_state()
    torch.manual_seed(3)
    got, got_state = standard_exponential_like(x), torch.get_rng_state()
    assert got.dtype == dtype and torch.equal(got, want) and torch.equal(got_state, want_state)


@pytest.mark.parametrize("n_experts", [2, 8, 64])
def test_expert_softmax_is_the_softmax_forward_and_backward(n_experts):
    scores = (3 * torch.randn(512, n_experts, dtype=torch.float64)).float().requires_grad_()
    upstream = torch.randn(512, n_experts)
    got = expert_softmax(scores)
    (grad_got,) = torch.autograd.grad(got, scores, upstream)
    want = scores.softmax(-1)
    (grad_want,) = torch.autograd.grad(want, scores, upstream)
    assert torch.allclose(got, want, rtol=0, atol=1e-6) and torch.allclose(grad_got, grad_want, rtol=0, atol=1e-5)
    assert torch.allclose(got.sum(-1), torch.ones(512))
