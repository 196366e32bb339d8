"""The SWAG router: its moments against the closed form over the recorded iterates, its draws,
exact Top-K before any iterate (or with zero variance), S costing router work only, its FLOPs,
its config checks, a resume that continues the collection, and the post-hoc protocol end to end
(the gate of the chosen layers trains, the moments are stored and ``vrmoe eval`` reloads them)."""

from __future__ import annotations

import json

import pytest
import torch

from vrmoe.checkpoint import freeze_loaded, load_checkpoint, load_run_weights
from vrmoe.compose import compose_over_saved
from vrmoe.config import ConfigError
from vrmoe.eval.run import evaluate_run
from vrmoe.model import build_model
from vrmoe.model.routers import build_router, router_config
from vrmoe.model.routers.swag import SWAGRouter
from vrmoe.model.routers.topk import TopKRouter
from vrmoe.tracking import EVAL_FILE
from vrmoe.train import train
from vrmoe.train.step import TrainStep, make_optimizer

from conftest import TINY, interrupt_after_first_checkpoint, make_config

D_MODEL, N_EXPERTS = 16, 6
BUFFERS = ("swag_steps", "swag_collected", "swag_mean_ED", "swag_second_ED", "swag_deviations_RED")


def make_pair(**fields) -> tuple[SWAGRouter, TopKRouter]:
    """A SWAG router and a Top-K router with the same gate."""
    torch.manual_seed(0)
    swag = build_router(D_MODEL, N_EXPERTS, router_config("swag", **fields))
    topk = build_router(D_MODEL, N_EXPERTS, router_config("topk", k=swag.k))
    topk.load_state_dict({"gate.weight": swag.gate.weight.detach().clone()})
    return swag, topk


def tokens(n: int = 12) -> torch.Tensor:
    return torch.randn(n, D_MODEL, generator=torch.Generator().manual_seed(1))


def give_posterior(router: SWAGRouter, collected: int = 5, scale: float = 0.05) -> None:
    """Buffers as if ``collected`` iterates had been recorded, with a nonzero diagonal and low-rank part."""
    gen = torch.Generator().manual_seed(7)
    with torch.no_grad():
        router.swag_collected.fill_(collected)
        router.swag_mean_ED.copy_(router.gate.weight)
        variance_ED = (scale * torch.rand(router.swag_mean_ED.shape, generator=gen)) ** 2
        router.swag_second_ED.copy_(router.swag_mean_ED.square() + variance_ED)
        router.swag_deviations_RED.copy_(scale * torch.randn(router.swag_deviations_RED.shape, generator=gen))


def assert_same_routing(a, b) -> None:
    assert torch.equal(a.expert_ids_TK, b.expert_ids_TK)
    assert torch.equal(a.gates_TK, b.gates_TK)
    assert torch.equal(a.probs_TE, b.probs_TE)
    assert torch.equal(a.aux_loss, b.aux_loss)


# ---------------------------------------------------------------------------
# Collection
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("start, every, rank, steps", [(0, 1, 3, 6), (2, 3, 20, 11)])
def test_moments_are_the_closed_form_over_the_recorded_iterates(start, every, rank, steps):
    """A tiny model trains ``steps`` optimiser steps; a hook records each SWAG gate's weights as
    each training forward sees them. The buffers equal the mean, the second moment and the last
    K deviations ``W_i - mean_i`` computed from the recorded iterates the schedule picks."""
    app = make_config(*TINY, "router=swag", f"router.swag_start={start}", f"router.swag_every={every}",
                      f"router.swag_rank={rank}")
    model = build_model(app, training=True).train()
    optimizer = make_optimizer(model, app.train.lr, app.train.weight_decay)
    step_fn = TrainStep(model, optimizer, app.train, torch.device("cpu"))
    seen: dict[int, list[torch.Tensor]] = {i: [] for i in range(len(model.moe_layers))}
    for i, layer in enumerate(model.moe_layers):
        layer.router.register_forward_pre_hook(
            lambda module, args, i=i: seen[i].append(module.gate.weight.detach().clone().double()))
    gen = torch.Generator().manual_seed(0)
    for step in range(steps):
        x = torch.randint(0, app.model.vocab_size, (4, app.model.seq_len + 1), generator=gen)
        step_fn(step, lambda: model(x[:, :-1], x[:, 1:]))
        assert step_fn.last_ok

    picked = [i for i in range(steps) if i >= start and (i - start) % every == 0]
    for i, layer in enumerate(model.moe_layers):
        router = layer.router
        iterates_NED = torch.stack([seen[i][j] for j in picked])
        assert len(seen[i]) == steps and not torch.equal(iterates_NED[0], iterates_NED[-1])  # the gate trains
        assert int(router.swag_steps) == steps and int(router.swag_collected) == len(picked)
        torch.testing.assert_close(router.swag_mean_ED.double(), iterates_NED.mean(0), rtol=1e-5, atol=1e-9)
        torch.testing.assert_close(router.swag_second_ED.double(), iterates_NED.square().mean(0), rtol=1e-5,
                                   atol=1e-11)
        expected_RED = torch.zeros(rank, *iterates_NED.shape[1:], dtype=torch.float64)
        for n in range(len(picked)):  # iterate n + 1 goes to slot n mod K, over the one K before it
            expected_RED[n % rank] = iterates_NED[n] - iterates_NED[:n + 1].mean(0)
        assert expected_RED.abs().max() > 0
        torch.testing.assert_close(router.swag_deviations_RED.double(), expected_RED, rtol=1e-4, atol=1e-9)


def test_evaluation_forwards_collect_nothing():
    swag, _ = make_pair(swag_start=0, samples=3)
    swag.eval()
    swag(tokens())
    assert int(swag.swag_steps) == int(swag.swag_collected) == 0
    assert all(not getattr(swag, name).any() for name in BUFFERS)


# ---------------------------------------------------------------------------
# Exact Top-K without variance
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("samples", [1, 5])
def test_without_variance_it_routes_exactly_as_topk(samples):
    swag, topk = make_pair(swag_start=0, samples=samples)
    u = tokens()
    # Training routes as Top-K on the gate, aux loss included.
    assert_same_routing(swag.train()(u), topk.train()(u))
    swag.swag_steps.zero_(), swag.swag_collected.zero_(), swag.swag_mean_ED.zero_(), swag.swag_second_ED.zero_()
    swag.swag_deviations_RED.zero_()
    # No iterate yet: evaluation is Top-K on the gate, bit for bit.
    torch.manual_seed(3)
    assert_same_routing(swag.eval()(u), topk.eval()(u))
    # Three identical iterates (no update between the steps): zero variance, exactly.
    swag.train()
    for _ in range(3):
        swag(u)
    assert int(swag.swag_collected) == 3
    assert not swag.sigma_ED().any() and not swag.swag_deviations_RED.any()
    assert torch.equal(swag.swag_mean_ED, swag.gate.weight.detach())
    state = torch.get_rng_state()
    routing = swag.eval()(u)
    assert_same_routing(routing, topk.eval()(u))
    assert torch.equal(routing.uncertainty_T, torch.zeros(u.shape[0]))
    assert torch.equal(torch.get_rng_state(), state)  # nothing drawn
    # It routes on the iterates' mean, not on where the gate went after them.
    with torch.no_grad():
        swag.gate.weight.add_(0.5 * torch.randn_like(swag.gate.weight))
    assert_same_routing(swag(u), topk(u))


# ---------------------------------------------------------------------------
# Evaluation: the SWAG draws, averaged before Top-K
# ---------------------------------------------------------------------------

def test_a_gate_bias_stays_as_loaded():
    """A pretrained family's router bias (gpt-oss) enters every logit; SWAG is over the weights."""
    swag, topk = make_pair(samples=4)
    for router in (swag, topk):  # as the Hugging Face backbone swaps in a biased gate
        weight = router.gate.weight.detach().clone()
        router.gate = torch.nn.Linear(D_MODEL, N_EXPERTS, bias=True)
        with torch.no_grad():
            router.gate.weight.copy_(weight)
            router.gate.bias.copy_(torch.linspace(-1, 1, N_EXPERTS))
    assert swag.posthoc_trained_parameters() == [swag.gate.weight]
    u = tokens()
    assert_same_routing(swag.eval()(u), topk.eval()(u))
    give_posterior(swag)
    swag.keep_samples = True
    torch.manual_seed(3)
    noise_SED = swag.weight_noise(4)
    torch.manual_seed(3)
    logits_STE = u @ swag.swag_mean_ED.T + swag.gate.bias + torch.einsum("sed,td->ste", noise_SED, u)
    torch.testing.assert_close(swag(u).sample_probs_STE, logits_STE.softmax(-1), rtol=1e-5, atol=1e-6)


def test_weight_draws_have_the_swag_covariance():
    """``W_s - mean`` has covariance ``diag(sigma^2) / 2 + D D^T / (2 (K' - 1))`` over the flattened
    E x D weights (each entry within 5 standard errors, estimated from the sample)."""
    torch.manual_seed(0)
    router = build_router(3, 2, router_config("swag", k=1, swag_rank=4))
    give_posterior(router, collected=3, scale=0.5)  # K' = 3 of the 4 slots held
    with torch.no_grad():
        router.swag_deviations_RED[3:] = 0  # the slot not yet written
    sigma_X = router.sigma_ED().reshape(-1).double()
    devs_KX = router.swag_deviations_RED[:3].reshape(3, -1).double()
    expected_XX = torch.diag(sigma_X ** 2) / 2 + devs_KX.T @ devs_KX / (2 * (3 - 1))
    torch.manual_seed(1)
    x_NX = router.weight_noise(40000).reshape(40000, -1).double()
    n = x_NX.shape[0]
    assert (x_NX.mean(0).abs() <= 5 * (x_NX.var(0) / n).sqrt()).all()
    products_NXX = x_NX[:, :, None] * x_NX[:, None, :]
    error_XX = (products_NXX.mean(0) - expected_XX).abs()
    assert (error_XX <= 5 * (products_NXX.var(0) / n).sqrt()).all(), (products_NXX.mean(0), expected_XX)


def test_evaluation_routes_on_the_mean_of_S_softmaxes_of_sampled_gates():
    swag, _ = make_pair(samples=8, k=2)
    give_posterior(swag)
    swag.eval().keep_samples = True
    u = tokens()
    torch.manual_seed(3)
    noise_SED = swag.weight_noise(8)
    torch.manual_seed(3)
    routing = swag(u)
    noise_logits_STE = torch.einsum("sed,td->ste", noise_SED, u)
    probs_STE = (u @ swag.swag_mean_ED.T + noise_logits_STE).softmax(-1)
    torch.testing.assert_close(routing.sample_probs_STE, probs_STE, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(routing.probs_TE, probs_STE.mean(0), rtol=1e-5, atol=1e-6)
    top_TK, ids_TK = routing.probs_TE.topk(2, dim=-1)
    assert torch.equal(routing.expert_ids_TK, ids_TK)
    torch.testing.assert_close(routing.gates_TK, top_TK / top_TK.sum(-1, keepdim=True))
    # The uncertainty signal: the S sampled logits' variance (unbiased), summed over experts.
    torch.testing.assert_close(routing.uncertainty_T, noise_logits_STE.var(0).sum(-1), rtol=1e-4, atol=1e-7)
    assert not torch.allclose(probs_STE[0], probs_STE[1])  # S different draws


def test_sampled_logit_variance_converges_to_the_closed_form():
    """With many samples the signal is ``tr Cov(W u)``: ``sum_e sum_d sigma_ed^2 u_d^2 / 2 +
    sum_k |D_k u|^2 / (2 (K' - 1))``."""
    swag, _ = make_pair(samples=20000, swag_rank=4)
    give_posterior(swag, collected=9)
    u = tokens(3)
    torch.manual_seed(0)
    variance_T = swag.eval()(u).uncertainty_T.double()
    sigma_ED, devs_RED, uu = swag.sigma_ED().double(), swag.swag_deviations_RED.double(), u.double()
    expected_T = (uu.square() @ sigma_ED.square().T).sum(-1) / 2 \
        + torch.einsum("red,td->tre", devs_RED, uu).square().sum((1, 2)) / (2 * (4 - 1))
    torch.testing.assert_close(variance_T, expected_T, rtol=0.05, atol=0)


def test_S_samples_share_one_expert_pass():
    """Whatever S, each layer's experts run once per forward on T x K token rows (none twice)."""
    calls, rows, signals = {}, {}, {}
    x = torch.randint(0, 256, (2, 16), generator=torch.Generator().manual_seed(0))
    for s in (1, 32):
        model = build_model(make_config(*TINY, "router=swag", f"S={s}")).eval()
        for layer in model.moe_layers:
            give_posterior(layer.router)
        with torch.no_grad():
            out = model(x)
        calls[s] = [layer.experts.block_calls for layer in model.moe_layers]
        rows[s] = [layer.experts.rows_run for layer in model.moe_layers]
        signals[s] = [float(r.uncertainty_T.mean()) for r in out.routings]
        for r in out.routings:
            assert r.expert_ids_TK.shape == (32, 2) and (r.expert_ids_TK.sort(-1).values.diff(dim=-1) > 0).all()
    assert calls[1] == calls[32] == [1, 1]
    assert rows[1] == rows[32] == [32 * 2, 32 * 2]
    assert signals[1] == [0.0, 0.0] and all(v > 0 for v in signals[32])  # S = 32 did sample


@pytest.mark.parametrize("n_experts", [1, 4])
@pytest.mark.parametrize("training", [True, False])
def test_edge_shapes_one_expert_k_equals_e_one_token_and_bf16(n_experts, training):
    torch.manual_seed(0)
    router = build_router(8, n_experts, router_config("swag", k=n_experts, samples=3, z_loss_weight=1e-3))
    give_posterior(router)
    router.train(training)
    for n_tokens in (1, 5):
        u_TD = torch.randn(n_tokens, 8, requires_grad=True)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            routing = router(u_TD)
        assert routing.expert_ids_TK.shape == (n_tokens, n_experts)
        assert torch.equal(routing.expert_ids_TK.sort(-1).values, torch.arange(n_experts).expand(n_tokens, n_experts))
        torch.testing.assert_close(routing.gates_TK.float().sum(-1), torch.ones(n_tokens), atol=1e-2, rtol=0)
        assert torch.isfinite(routing.aux_loss) and all(torch.isfinite(v).all() for v in routing.stats.values())
        (routing.aux_loss + routing.gates_TK.float().square().sum()).backward()
        assert torch.isfinite(u_TD.grad).all()
        assert (routing.uncertainty_T is None) == training


def test_flops_count_the_samples_and_exceed_topk():
    swag, topk = make_pair(k=2)
    e, d = N_EXPERTS, D_MODEL
    for s in (1, 4, 32):
        per_sample = 2 * e * d + e + 5 * e + e + 3 * e  # noise logits, + mean's, softmax, average, variance sums
        assert swag.flops_per_token(s) == 2 * e * d + s * per_sample + 3 * e + 2 * 2
    assert topk.flops_per_token(1) == 2 * e * d + 5 * e + 2 * 2
    assert topk.flops_per_token(1) < swag.flops_per_token(1) < swag.flops_per_token(4)
    assert swag.head_flops_per_token() == 0 and swag.head_outputs(tokens()) == []


# ---------------------------------------------------------------------------
# Config
# ---------------------------------------------------------------------------

@pytest.mark.parametrize("override, key", [("router.swag_start=-1", "router.swag_start=-1"),
                                           ("router.swag_every=0", "router.swag_every=0"),
                                           ("router.swag_rank=1", "router.swag_rank=1")])
def test_bad_values_are_one_line_naming_the_key(override, key):
    with pytest.raises(ConfigError) as info:
        make_config(*TINY, "router=swag", override)
    message = str(info.value)
    assert message.startswith(key) and "\n" not in message


def test_the_yaml_defaults():
    cfg = make_config(*TINY, "router=swag").router
    assert (cfg.swag_start, cfg.swag_every, cfg.swag_rank) == (50, 1, 20) and cfg.samples_at_eval()


# ---------------------------------------------------------------------------
# Checkpoints and the post-hoc protocol
# ---------------------------------------------------------------------------

def test_resume_continues_the_collection_bit_for_bit(tmp_path, monkeypatch):
    args = (*TINY, "router=swag", "router.swag_start=1", "router.swag_rank=2", "S=2", "train.max_steps=4",
            "train.ckpt_every=2")
    train(make_config(*args), tmp_path / "full")
    interrupt_after_first_checkpoint(make_config(*args), tmp_path / "part", monkeypatch)
    halfway = load_checkpoint(tmp_path / "part", "train.resume")
    assert halfway["step"] == 2 and int(halfway["model"]["blocks.1.moe.router.swag_collected"]) == 1
    train(make_config(*args, f"train.resume={tmp_path / 'part'}"), tmp_path / "part")
    full, part = load_checkpoint(tmp_path / "full", "run")["model"], load_checkpoint(tmp_path / "part", "run")["model"]
    assert set(full) == set(part)
    for name in full:
        assert torch.equal(full[name], part[name]), name
    assert int(full["blocks.1.moe.router.swag_collected"]) == 3 and int(full["blocks.1.moe.router.swag_steps"]) == 4


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_cache):
    run_dir = tmp_path_factory.mktemp("base")
    train(make_config(*TINY, "router=topk", "train.max_steps=4"), run_dir)
    return run_dir


def test_posthoc_trains_only_the_chosen_gates_stores_the_moments_and_evaluates(tmp_path, base_run):
    cfg = make_config(*TINY, "router=swag", "router.layers=1", "router.swag_start=1", "router.swag_rank=2",
                      "train.max_steps=5", f"train.init_from={base_run}", "train.freeze=backbone")
    summary = train(cfg, tmp_path)
    router = "blocks.1.moe.router"
    base, state = load_checkpoint(base_run, "run")["model"], load_checkpoint(tmp_path, "run")
    # The checkpoint stores what the run trained: the last layer's gate and its SWAG buffers.
    assert set(state["model"]) == {f"{router}.gate.weight", *(f"{router}.{name}" for name in BUFFERS)}
    assert summary["params_trainable"] == cfg.model.n_experts * cfg.model.d_model
    n_optimised = sum(v["exp_avg"].numel() for v in state["optimizer"]["state"].values())
    assert n_optimised == cfg.model.n_experts * cfg.model.d_model  # no optimiser state for frozen weights
    stored = state["model"]
    assert int(stored[f"{router}.swag_steps"]) == 5 and int(stored[f"{router}.swag_collected"]) == 4
    assert stored[f"{router}.swag_second_ED"].sum() > 0 and stored[f"{router}.swag_deviations_RED"].abs().sum() > 0

    # vrmoe eval rebuilds the model from the base and the stored state: the frozen weights are the
    # base's, the trained gate and the moments are the run's.
    model = build_model(cfg)
    load_run_weights(model, state, "run", tmp_path, cfg)
    after = model.state_dict()
    for name, value in base.items():
        if name == f"{router}.gate.weight":
            assert not torch.equal(after[name], value)  # the chosen gate trained
        else:
            assert torch.equal(after[name], value), name  # everything else, layer 0's gate included, did not
    for name, value in stored.items():
        assert torch.equal(after[name], value), name
    assert [type(layer.router) for layer in model.moe_layers] == [TopKRouter, SWAGRouter]

    app_eval = compose_over_saved(state["config"], ["S=4", "eval.windows=4", "eval.mcq_items=8",
                                                    "eval.stability_windows=2", "eval.gammas=[0.01]"])
    result = evaluate_run(tmp_path, app_eval)
    assert json.loads((tmp_path / EVAL_FILE).read_text())["S"] == 4 and result["router"] == "swag"
    for probe in ("calibration", "ood", "stability", "posterior", "cost"):
        assert result[probe], probe
    assert {"sampled_logit_variance", "mutual_information", "gate_entropy"} <= set(result["ood"]["far"]["auroc"])
    assert set(result["posterior"]["layers"]) == {"layer1"}  # the sampling layer; layer 0 is Top-K
    assert result["cost"]["router_overhead_vs_topk"] > 0 and result["stability"]["jaccard"]["mean"][0] > 0


HF_RUN = ["logger=none", "model.seq_len=32", "train.batch_size=4", "train.log_every=2", "train.eval_every=2",
          "train.eval_batches=1", "train.warmup_steps=1", "train.max_steps=3"]


def test_posthoc_on_a_pretrained_hf_model(tmp_path):
    """The Hugging Face backbone marks the swapped gates as pretrained; train.freeze=backbone keeps
    the SWAG gate (the last layer's, with router.layers=1) trainable and freezes everything else,
    the checkpoint stores that gate and its moments, and ``vrmoe eval`` samples from them."""
    pytest.importorskip("transformers")
    from hf_models import save_tiny_model

    path = save_tiny_model("qwen2_moe", tmp_path / "model")
    app = make_config("model=hf", f"model.hf_name={path}", "router=swag", "router.layers=1", "router.swag_start=0",
                      "train.freeze=backbone", *HF_RUN)
    model = build_model(app)
    assert [layer.router.name for layer in model.moe_layers] == ["topk", "swag"]
    freeze_loaded(model, set(model.pretrained_parameters))
    gate = model.moe_layers[1].router.gate.weight
    assert [name for name, p in model.named_parameters() if p.requires_grad] == \
        [name for name, p in model.named_parameters() if p is gate]

    summary = train(app, tmp_path / "run")
    state = load_checkpoint(tmp_path / "run", "run")
    gate_name = next(name for name, p in model.named_parameters() if p is gate)
    prefix = gate_name.removesuffix(".gate.weight")
    assert set(state["model"]) == {gate_name, *(f"{prefix}.{name}" for name in BUFFERS)}
    assert summary["params_trainable"] == gate.numel()
    assert int(state["model"][f"{prefix}.swag_collected"]) == 3
    app_eval = compose_over_saved(state["config"], ["S=2", "eval.windows=2", "eval.mcq_items=4",
                                                    "eval.stability_windows=1", "eval.gammas=[0.01]"])
    result = evaluate_run(tmp_path / "run", app_eval)
    assert "sampled_logit_variance" in result["ood"]["far"]["auroc"]
    assert set(result["posterior"]["layers"]) == {"layer1"} and result["cost"]["router_overhead_vs_topk"] > 0
