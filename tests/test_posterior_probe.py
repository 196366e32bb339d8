"""The ``posterior`` probe of ``vrmoe eval``: single routing samples against the evaluation selection,
and the variational router's sigma against the gap between the K-th and the (K+1)-th mean logit."""

from __future__ import annotations

import dataclasses
import json
import math
from types import SimpleNamespace

import pytest
import torch

from vrmoe.eval import schema
from vrmoe.eval.probes import PROBES, ordered_probes
from vrmoe.eval.probes.posterior import PosteriorProbe, Z_EDGES, gap_statistics
from vrmoe.eval.run import evaluate_run
from vrmoe.model import build_model
from vrmoe.model.routers.variational import LogitPosterior
from vrmoe.tracking import EVAL_FILE
from vrmoe.train import train

from conftest import TINY, make_config

SMALL_EVAL = ["eval.windows=8", "eval.mcq_items=8", "eval.stability_windows=2", "eval.batch_size=4",
              "eval.gammas=[0,0.01]"]
VARIATIONAL_KEYS = {"sigma_mean", "gap_mean", "sd_gap_mean", "z_median", "eval_vs_mean_flip", "flip_rate_by_z"}


def light_context(*overrides: str, windows: int = 8) -> SimpleNamespace:
    """What the probe reads of an EvalContext, around an untrained tiny model: the model and random
    token windows (the probe switches the model's own routers to single samples)."""
    app = make_config(*TINY, *overrides)
    model = build_model(app).eval()
    gen = torch.Generator().manual_seed(0)
    x = torch.randint(0, app.model.vocab_size, (windows, app.model.seq_len), generator=gen)
    batches = [(xb, xb) for xb in x.split(app.eval.batch_size)]
    return SimpleNamespace(app=app, model=model, unit="lm", lm_sets={"in": batches}, device=torch.device("cpu"))


def test_probe_is_registered_between_stability_and_cost():
    order = [p.name for p in ordered_probes()]
    assert isinstance(PROBES["posterior"], PosteriorProbe)
    assert order.index("stability") < order.index("posterior") < order.index("cost")


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_variational_run_writes_the_posterior_block(tmp_path, corpus_cache, covariance):
    app = make_config(*TINY, "router=variational", f"router.covariance={covariance}", "router.sigma_init=0.5",
                      "S=3", "train.max_steps=2", *SMALL_EVAL)
    train(app, tmp_path)
    result = evaluate_run(tmp_path, app)
    written = json.loads((tmp_path / EVAL_FILE).read_text())
    assert written["posterior"] == result["posterior"]
    block = result["posterior"]
    layers = schema.posterior_layers(written)
    assert set(layers) == {"layer0", "layer1"} and block["draws"] > 1
    assert block["tokens"] == 8 * 32  # eval.windows x seq_len, under the probe's cap
    for entry in layers.values():
        assert 0 <= entry["flip_rate"] <= 1 and 0 <= entry["sample_jaccard"] <= 1
        assert VARIATIONAL_KEYS <= set(entry)
        assert entry["sigma_mean"] > 0 and entry["gap_mean"] >= 0 and entry["sd_gap_mean"] > 0
        curve = entry["flip_rate_by_z"]
        assert curve["edges"] == list(Z_EDGES) and len(curve["flip_rate"]) == len(curve["count"]) == len(Z_EDGES)
        assert sum(curve["count"]) == block["tokens"]
        assert all(r is None if n == 0 else 0 <= r <= 1 for r, n in zip(curve["flip_rate"], curve["count"]))
    headline = PROBES["posterior"].headline(block)
    assert set(headline["posterior/flip_rate"]) == set(headline["posterior/z_median"]) == {"layer0", "layer1"}


def test_flip_rate_follows_sigma():
    tiny = PROBES["posterior"].measure(light_context("router=variational", "router.sigma_init=1e-6", "S=4"))
    large = PROBES["posterior"].measure(light_context("router=variational", "router.sigma_init=5", "S=4"))
    for entry in tiny["layers"].values():
        assert entry["flip_rate"] <= 1e-3 and entry["sample_jaccard"] >= 0.999
        assert entry["z_median"] > 100 and entry["sigma_mean"] == pytest.approx(1e-6, rel=1e-4)
    for entry in large["layers"].values():
        assert entry["flip_rate"] > 0.3 and entry["z_median"] < 1
        assert entry["sigma_mean"] == pytest.approx(5, rel=1e-4)
        assert entry["eval_vs_mean_flip"] > 0.3  # S = 4 samples often disagree with the mean's Top-K


@pytest.mark.parametrize("covariance", ["diag", "full"])
def test_close_decisions_flip_more_often(covariance):
    # sigma comparable with the untrained gate's logit gaps: z spreads over the bins.
    block = PROBES["posterior"].measure(light_context("router=variational", f"router.covariance={covariance}",
                                                      "router.sigma_init=0.05", "S=4", windows=32))
    for entry in block["layers"].values():
        curve = entry["flip_rate_by_z"]
        assert sum(curve["count"]) == block["tokens"] == 32 * 32
        close, clear = curve["flip_rate"][0], curve["flip_rate"][4]  # z < 0.25 against 2 <= z < 4
        assert curve["count"][0] > 20 and curve["count"][4] > 20 and close > 0.3 > 0.1 > clear


def test_gap_statistics_use_the_full_covariance():
    # Two experts whose logits are perfectly correlated: their difference has no variance at all,
    # although each has std 1; mean-field would call it sqrt(2).
    mean = torch.tensor([[2.0, 1.0, 0.0]])
    chol = torch.tensor([[[1.0, 0.0, 0.0], [1.0, 1e-3, 0.0], [0.0, 0.0, 1.0]]])
    full = gap_statistics(LogitPosterior(mean, mean * 0, chol.diagonal(dim1=-2, dim2=-1).log(), chol), k=1)
    assert full["gap_T"].item() == pytest.approx(1.0)
    assert full["sd_gap_T"].item() == pytest.approx(1e-3)
    assert full["sigma_TE"][0].tolist() == pytest.approx([1.0, math.sqrt(1 + 1e-6), 1.0])
    diag = gap_statistics(LogitPosterior(mean, mean * 0, torch.zeros(1, 3)), k=1)
    assert diag["sd_gap_T"].item() == pytest.approx(math.sqrt(2))
    assert gap_statistics(LogitPosterior(mean, mean * 0, torch.zeros(1, 3)), k=3) is None  # K = E


@pytest.mark.parametrize("overrides, reason", [(["router=topk", "S=4"], "does not average"),
                                               (["router=vtsr", "S=4"], "does not average"),
                                               (["router=variational", "S=1"], "S = 1")])
def test_routers_without_averaged_samples_get_a_note(overrides, reason):
    probe = PROBES["posterior"]
    block = probe.measure(light_context(*overrides))
    assert block["layers"] == {} and reason in block["note"]
    assert probe.headline(block) == {} and schema.posterior_layers({"posterior": block}) == {}
    probe.show(block, {})


def test_mc_dropout_gets_flip_rates_without_posterior_keys():
    probe = PROBES["posterior"]
    block = probe.measure(light_context("router=mc_dropout", "router.dropout=0.3", "S=4"))
    assert set(block["layers"]) == {"layer0", "layer1"}
    for entry in block["layers"].values():
        assert set(entry) == {"flip_rate", "sample_jaccard"} and 0 < entry["flip_rate"] <= 1
    assert set(probe.headline(block)) == {"posterior/flip_rate"}
    probe.show(block, {})


def test_only_the_sampling_layers_are_measured_and_the_rng_is_left_alone():
    ctx = light_context("router=variational", "router.layers=1", "router.sigma_init=2", "S=4")
    torch.manual_seed(123)
    state = torch.get_rng_state()
    block = PROBES["posterior"].measure(ctx)
    assert torch.equal(torch.get_rng_state(), state)
    assert set(block["layers"]) == {"layer1"} and block["deterministic_layers"] == ["layer0"]
    assert PROBES["posterior"].measure(ctx) == block  # seeded from the evaluation seed


@pytest.mark.parametrize("overrides", [("router=variational", "router.sigma_init=0.5"),
                                       ("router=variational", "router.covariance=full", "router.sigma_init=0.5"),
                                       ("router=mc_dropout", "router.dropout=0.3")])
def test_single_draws_on_the_model_itself_equal_a_second_copy_bitwise(monkeypatch, overrides):
    """The draws run the model's own routers switched to one sample; the block is the one a second
    model built with router.samples=1 (what the probe drew from before) gives, bit for bit."""
    from contextlib import contextmanager

    from vrmoe.eval.probes import posterior

    ctx = light_context(*overrides, "S=4")
    same_modules = PROBES["posterior"].measure(ctx)
    copy = build_model(dataclasses.replace(ctx.app, router=dataclasses.replace(ctx.app.router, samples=1)))
    copy.load_state_dict(ctx.model.state_dict())
    copy.eval()

    @contextmanager
    def the_copys_routers(model):
        routers = [layer.router for layer in model.moe_layers]
        for layer, twin in zip(model.moe_layers, copy.moe_layers):
            layer.router = twin.router
        try:
            yield model
        finally:
            for layer, router in zip(model.moe_layers, routers):
                layer.router = router

    monkeypatch.setattr(posterior, "single_sample_routing", the_copys_routers)
    assert PROBES["posterior"].measure(ctx) == same_modules
    assert {layer.router.cfg.samples for layer in ctx.model.moe_layers} == {4}
