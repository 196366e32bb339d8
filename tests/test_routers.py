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

import vrmoe.checkpoint as checkpoint_module
from vrmoe.model.routers import ROUTERS, build_router, renormalised_topk, router_config
from vrmoe.model.routers.topk import TopKRouter
from vrmoe.model.routers.variational import VariationalRouter
from vrmoe.checkpoint import load_checkpoint
from vrmoe.model import build_model
from vrmoe.train import train

from conftest import TINY, make_config, run_cli

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


# ---------------------------------------------------------------------------
# Variational router
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_heads_start_at_the_deterministic_router_with_sigma_init(covariance):
    router = make_router("variational", covariance=covariance, sigma_init=0.3)
    post = router.posterior(tokens())
    torch.testing.assert_close(post.mean_TE, router.gate(tokens()))
    torch.testing.assert_close(post.covariance_TEE(), 0.09 * torch.eye(N_EXPERTS).expand(12, -1, -1))


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_kl_matches_torch_distributions_and_enters_aux_loss_times_beta(covariance):
    router = make_router("variational", covariance=covariance, beta=0.25, load_balance_weight=0.0)
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
    routing = router(u)
    assert routing.sample_probs_STE.shape == (8, 12, N_EXPERTS)
    torch.testing.assert_close(routing.probs_TE, routing.sample_probs_STE.mean(0))
    ids_TK, gates_TK = renormalised_topk(routing.probs_TE, router.k)
    assert torch.equal(routing.expert_ids_TK, ids_TK)
    torch.testing.assert_close(routing.gates_TK, gates_TK)
    # The S samples are S independent draws, taken from the global generator.
    assert not torch.allclose(routing.sample_probs_STE[0], routing.sample_probs_STE[1])
    torch.manual_seed(3)
    if name == "variational":
        expected_STE = router.posterior(u).sample(8).softmax(-1)
    else:
        expected_STE = router.gate(torch.nn.functional.dropout(u.expand(8, -1, -1), 0.3)).softmax(-1)
    torch.testing.assert_close(routing.sample_probs_STE, expected_STE)
    # Training is one pass and reports no samples.
    router.train()
    assert router(u).sample_probs_STE is None


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


def test_vtsr_evaluation_is_one_deterministic_topk_pass():
    router = make_router("vtsr").eval()
    u = tokens(64)
    first, second = router(u), router(u)
    assert torch.equal(first.expert_ids_TK, second.expert_ids_TK) and first.sample_probs_STE is None
    # One temperature per token rescales every logit alike: the selection is plain Top-K.
    assert torch.equal(first.expert_ids_TK, router.gate(u).topk(2).indices)


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
                                         ["router=mc_dropout"]])
def test_S_costs_router_work_only(router_args):
    calls, shapes = {}, {}
    x = torch.randint(0, 256, (2, 16))
    for s in (1, 32):
        model = build_model(make_config(*TINY, *router_args, f"S={s}")).eval()
        before = [layer.experts.block_calls for layer in model.moe_layers]
        with torch.no_grad():
            out = model(x)
        calls[s] = [layer.experts.block_calls - b for layer, b in zip(model.moe_layers, before)]
        shapes[s] = [r.expert_ids_TK.shape for r in out.routings]
        assert (out.routings[0].sample_probs_STE is None) == (s == 1)
    assert calls[1] == calls[32] == [1, 1]  # each expert block ran once per layer per forward
    assert shapes[1] == shapes[32] == [(32, 2), (32, 2)]  # K slots per token, whatever S


@pytest.mark.parametrize("layers, expected", [("all", [VariationalRouter, VariationalRouter]),
                                              ("1", [TopKRouter, VariationalRouter]),
                                              ("5", [VariationalRouter, VariationalRouter])])
def test_router_layers_gives_the_router_to_the_last_N_moe_layers(layers, expected):
    model = build_model(make_config(*TINY, "router=variational", f"router.layers={layers}"))
    assert [type(layer.router) for layer in model.moe_layers] == expected
    out = model(torch.randint(0, 256, (1, 8)))
    assert [r.uncertainty_T is not None for r in out.routings] == [cls is VariationalRouter for cls in expected]


def test_variational_resume_replays_the_same_routing_noise(tmp_path, monkeypatch):
    args = (*TINY, "router=variational", "S=2", "train.max_steps=4", "train.ckpt_every=2")
    train(make_config(*args), tmp_path / "full")
    original = checkpoint_module.save_checkpoint

    def save_then_die(path, state):
        original(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(make_config(*args), tmp_path / "part")
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", original)
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


@pytest.mark.parametrize("args, key", [
    (["S=0"], "S=0"),
    (["T=0"], "T=0"),
    (["beta=-1"], "beta=-1"),
    (["K=0"], "K=0"),
    (["K=5"], "K=5"),  # the tiny model has 4 experts
    (["router=variational", "router.covariance=full", "model.n_experts=65"], "router.covariance=full"),
    (["router=variational", "model.moe_every=0"], "model.moe_every=0"),
])
def test_bad_router_input_is_exit_code_2_and_one_line_naming_the_key(tmp_path, args, key):
    proc = run_cli("train", *TINY, *args, cwd=tmp_path, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert len(err.splitlines()) == 1 and "Traceback" not in err
    assert key in err


@pytest.mark.parametrize("name, fields", [("topk", {}), ("variational", {"covariance": "diag"}),
                                          ("variational", {"covariance": "full"}), ("temperature", {}),
                                          ("vtsr", {}), ("mc_dropout", {})])
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
