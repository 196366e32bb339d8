"""`vrmoe eval`: the eval.json schema, the metrics' defining properties, FLOPs, bad input."""

from __future__ import annotations

import hashlib
import json
import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrmoe.cli import main as cli_main
from vrmoe.config import PAPER_GAMMAS, ConfigError
from vrmoe.eval.run import evaluate_run
from vrmoe.jobs import run_job
from vrmoe.eval.context import score_windows, single_sample_copy
from vrmoe.eval.probes.cost import cost_summary
from vrmoe.eval.probes.stability import routing_stability
from vrmoe.model import build_model
from vrmoe.tracking import EVAL_FILE
from vrmoe.train import train

from conftest import TINY, make_config, run_cli

SMALL_EVAL = ["eval.windows=8", "eval.mcq_items=24", "eval.stability_windows=4", "eval.batch_size=8"]
STOCHASTIC = ["router=temperature", "router=variational", "router=variational router.covariance=full",
              "router=mc_dropout"]


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, corpus_cache) -> Path:
    path = tmp_path_factory.mktemp("run")
    train(make_config(*TINY, "train.max_steps=2"), path)
    return path


def _snapshot(folder: Path) -> dict[str, str]:
    return {str(p.relative_to(folder)): hashlib.sha1(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _is_eval_output(name: str) -> bool:
    return name == EVAL_FILE or (name.endswith(".png") and name.startswith(("reliability_", "jaccard_", "ood_")))


def test_eval_cli_writes_every_field_and_only_its_own_files(run_dir, tmp_path):
    before = _snapshot(run_dir)
    proc = run_cli("eval", f"run={run_dir}", "S=3", *SMALL_EVAL, cwd=tmp_path)
    assert "Traceback" not in proc.stderr and "calibration" in proc.stderr
    after = _snapshot(run_dir)
    changed = {k for k in after if before.get(k) != after[k]}
    assert changed and all(_is_eval_output(k) for k in changed), changed
    assert all(k in after for k in before)

    result = json.loads((run_dir / EVAL_FILE).read_text())
    assert result["run"] == str(run_dir) and result["router"] == "topk" and result["S"] == 3
    for task, n in (("next_token", 8 * 32), ("mcq", 24)):
        report = result["calibration"][task]
        assert {"accuracy", "nll", "brier", "ece_10", "ece_15", "mce", "reliability"} <= set(report)
        assert all(math.isfinite(report[k]) for k in ("accuracy", "nll", "brier", "ece_10", "ece_15", "mce"))
        assert 0 <= report["ece_10"] <= report["mce"] <= 1
        assert sum(report["reliability"]["bin_count"]) == n and len(report["reliability"]["bin_accuracy"]) == 10
    # Top-K has no own uncertainty; the BMA predictive (mean of S single-sample passes) adds its entropy
    scores = {"predictive_entropy", "predictive_entropy_bma", "mutual_information", "gate_entropy"}
    for name in ("near", "far"):
        assert set(result["ood"][name]["auroc"]) == scores == set(result["ood"][name]["auprc"])
        assert all(0 <= v <= 1 for v in result["ood"][name]["auroc"].values())
    assert set(result["ood"]["scores"]) == {"in", "near", "far"}
    assert all(len(v) == 8 for v in result["ood"]["scores"]["in"].values())  # per window (task=lm)
    assert set(result["ood"]["scores"]["in"]["mutual_information"]) == {0.0}  # deterministic router
    stability = result["stability"]
    assert stability["gammas"] == PAPER_GAMMAS
    assert set(stability["jaccard"]) == {"layer0", "layer1", "mean"}
    assert all(len(v) == 6 and all(0 <= j <= 1 for j in v) for v in stability["jaccard"].values())
    cost = result["cost"]
    assert set(cost["flops_per_token"]) == {"attention", "experts", "router", "other", "total"}
    assert cost["router_overhead_vs_topk"] == 0.0 and 0 < cost["router_share"] < 0.05 and cost["tokens_per_s"] > 0
    for png in ("reliability_next_token.png", "reliability_mcq.png", "jaccard_vs_gamma.png"):
        assert (run_dir / png).stat().st_size > 1000


def _cli_error(capsys, *args: str) -> str:
    with pytest.raises(SystemExit) as exc:
        cli_main(["eval", *args])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1, err
    return err


@pytest.mark.parametrize("args, message", [
    (("S=8",), "run=<dir> is required"),
    (("run={empty}",), "no checkpoint.pt"),
    (("run={run}", "model=small"), "another model shape"),
    (("run={run}", "eval.ood_text=[{empty_file}]"), "is empty"),
    (("run={run}", "eval.ood_text=[{empty}/missing.txt]"), "is not a file"),
    (("run={run}", "eval.gammas=[0.01,-0.1]"), "eval.gammas"),
    (("run={run}", "eval.windows=0"), "eval.windows=0"),
    (("run={run}", "K=1"), "not an evaluation setting"),
    (("run={run}", "router.eval_mode=maybe"), "router.eval_mode"),
])
def test_bad_input_is_one_line_exit_2_and_writes_nothing(run_dir, tmp_path, capsys, args, message):
    empty = tmp_path / "empty_run"
    empty.mkdir()
    empty_file = tmp_path / "empty.txt"
    empty_file.write_text("  \n")
    (run_dir / EVAL_FILE).unlink(missing_ok=True)
    before = _snapshot(run_dir)
    err = _cli_error(capsys, *(a.format(run=run_dir, empty=empty, empty_file=empty_file) for a in args))
    assert message in err
    assert _snapshot(run_dir) == before and list(empty.iterdir()) == []


def test_gamma_zero_is_exactly_one_and_matched_noise_isolates_the_input(corpus_cache):
    x = torch.randint(0, 256, (4, 32))
    for overrides in ["router=topk", *STOCHASTIC]:
        app = make_config(*TINY, *overrides.split(), "S=2")
        model = build_model(app).eval()
        result = routing_stability(model, [x], [0.0, 0.05], seed=0, unmatched=True)
        assert all(v[0] == 1.0 for v in result["jaccard"].values()), overrides
        assert all(v[1] <= 1.0 for v in result["jaccard"].values())
        if overrides == "router=temperature":
            # Fresh sampling noise changes a sampling router's choice even without input noise.
            assert result["jaccard_unmatched"]["mean"][0] < 1.0
        if overrides == "router=topk":
            assert result["jaccard_unmatched"] == result["jaccard"]


def test_negative_gamma_is_refused_by_the_config():
    with pytest.raises(ConfigError, match="eval.gammas"):
        make_config(*TINY, "eval.gammas=[-0.001]")


@pytest.mark.parametrize("overrides, deterministic", [("router=topk", True), ("router=vtsr", True),
                                                      ("router=temperature", False), ("router=mc_dropout", False),
                                                      ("router=variational router.sigma_init=1.0", False)])
def test_mutual_information_is_zero_exactly_for_deterministic_routing(overrides, deterministic):
    app = make_config(*TINY, *overrides.split(), "S=4")
    model = build_model(app).eval()
    x = torch.randint(0, 256, (4, 32))
    torch.manual_seed(0)
    scored = score_windows(model, single_sample_copy(model, app), [(x, x)], 4, "u")
    mi = scored.scores["mutual_information"]
    if deterministic:
        assert torch.equal(mi, torch.zeros_like(mi))
    else:
        assert bool((mi > 0).all())


def test_flops_match_a_hand_count_for_the_tiny_model():
    app = make_config(*TINY)  # D=32, L=32, 2 MoE layers, E=4, K=2, F=64, V=256
    model = build_model(app)
    d, ctx, e, k, f, v = 32, 32, 4, 2, 64, 256
    attention = 2 * d * 3 * d + 2 * d * d + 2 * 2 * d * (ctx + 1) / 2
    experts = k * 3 * 2 * d * f + 2 * k * d
    router = 2 * d * e + 5 * e + 2 * k
    flops = model.flops_per_token(samples=1)
    assert flops.attention == 2 * attention and flops.experts == 2 * experts and flops.router == 2 * router
    assert flops.other == 2 * d * v and flops.total == 2 * (attention + experts + router) + 2 * d * v

    # Variational, mean-field, S=4: two heads D -> D/4 -> E (with biases), then per sample
    # mu + sigma * eps (2E), a softmax (5E) and the running mean (E); sigma = exp(log sigma) (E).
    var = build_model(make_config(*TINY, "router=variational", "S=4"))
    head = (2 * d * 8 + 8) + (2 * 8 * e + e)
    var_router = 2 * d * e + 2 * head + e + 4 * (2 * e + 5 * e + e) + 2 * k
    assert var.flops_per_token(samples=4).router == 2 * var_router
    cost = cost_summary(var, samples=4)
    assert cost["router_overhead_vs_topk"] == pytest.approx(2 * (var_router - router) / flops.total)
    # S multiplies router work only.
    assert var.flops_per_token(samples=8).experts == flops.experts


@pytest.mark.parametrize("router, own_score", [("variational", "logit_variance"), ("vtsr", "temperature")])
def test_router_uncertainty_becomes_a_named_ood_score(tmp_path, corpus_cache, router, own_score):
    app = make_config(*TINY, f"router={router}", "S=2", "train.max_steps=2", *SMALL_EVAL, "eval.ood_task=mcq")
    train(app, tmp_path)
    result = evaluate_run(tmp_path, app)
    assert own_score in result["ood"]["near"]["auroc"]
    assert len(result["ood"]["scores"]["far"][own_score]) == 24  # per item
    assert all(v > 0 for v in result["ood"]["scores"]["in"][own_score])


def test_eval_at_end_of_training(tmp_path, corpus_cache):
    run_job(make_config(*TINY, "train.max_steps=2", "eval.at_end=true", *SMALL_EVAL), tmp_path)
    assert json.loads((tmp_path / EVAL_FILE).read_text())["step"] == 2


def test_a_dense_model_evaluates_without_routing_scores(tmp_path, corpus_cache):
    run_job(make_config(*TINY, "model.moe_every=0", "train.max_steps=2", "eval.at_end=true", *SMALL_EVAL), tmp_path)
    result = json.loads((tmp_path / EVAL_FILE).read_text())
    assert "gate_entropy" not in result["ood"]["far"]["auroc"]
    assert result["stability"]["jaccard"]["mean"] == [None] * len(result["stability"]["gammas"])
    assert math.isfinite(result["calibration"]["next_token"]["ece_10"])


def test_eval_at_end_refuses_a_missing_ood_file_before_training(tmp_path, corpus_cache):
    with pytest.raises(ConfigError, match="eval.ood_text"):
        run_job(make_config(*TINY, "train.max_steps=2", "eval.at_end=true", f"eval.ood_text=[{tmp_path}/nope.txt]"),
                tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_user_ood_file_is_its_own_set(run_dir, tmp_path):
    notes = tmp_path / "notes.txt"
    notes.write_text("Buy milk, eggs and flour. Call the plumber about the kitchen sink on Monday morning.\n" * 20)
    app = make_config(*TINY, *SMALL_EVAL, f"eval.ood_text=[{notes}]")
    result = evaluate_run(run_dir, app)
    assert set(result["ood"]) == {"near", "far", "notes", "scores"}
    assert set(result["ood"]["notes"]["auroc"]) == {"predictive_entropy", "gate_entropy"}  # S=1: no MI


@pytest.mark.slow
def test_paper_table_quick_form(tmp_path, corpus_cache):
    """The study end to end at CI size: both formats, the baselines, both predictives, the paired
    intervals, the posterior diagnostics and every sweep with its plot; a second invocation with the
    same --out trains nothing again."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "paper_table.py"
    command = [sys.executable, str(script), "--quick", "--sweep", "--out", str(tmp_path / "table")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    table = (tmp_path / "table" / "table.md").read_text()
    for text in ("cloze format", "letter format", "ΔECE vs Top-K", "ΔAUROC near", "Top-K + temperature scaling",
                 "Top-K ensemble of 2 seeds", "| BMA |", "variational full (post-hoc)", "Posterior diagnostics",
                 "### beta", "### model_size"):
        assert text in table, text
    results = json.loads((tmp_path / "table" / "results.json").read_text())
    diag = results["formats"]["cloze"]["cloze_diag_bma"]
    assert diag["d_ece_10"]["low"] <= diag["d_ece_10"]["high"] and diag["items"] == 24 and diag["seeds"] == 2
    assert results["formats"]["letter"]["letter_diag_bma"]["items"] > 0  # prompts too long for the model are left out
    assert results["formats"]["cloze"]["topk"]["d_ece_10"] == {**results["formats"]["cloze"]["topk"]["d_ece_10"],
                                                               "estimate": 0.0, "low": 0.0, "high": 0.0}
    for name in ("S", "beta", "sigma_init", "layers", "model_size"):
        assert (tmp_path / "table" / f"ece_vs_{name}.png").is_file()
    again = subprocess.run(command, capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "stage posthoc: 0 runs" in again.stdout


def paper_table_module():
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / "paper_table.py"
    spec = importlib.util.spec_from_file_location("paper_table", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paper_table_refuses_evaluations_it_cannot_read_and_survives_a_bad_history(tmp_path):
    """An --out whose eval.json is unreadable or lacks per-item predictions stops with one line
    that says what to delete (an unreadable one is evaluated again on the next invocation); an
    unreadable invocations.json costs the earlier timings, not the study."""
    paper_table = paper_table_module()
    run = paper_table.run_dir(tmp_path, "cloze_topk", 0)
    run.mkdir(parents=True)
    for text, what in (("{}", "has no per-item predictions"), ("{corrupt", "is missing or unreadable")):
        (run / "eval.json").write_text(text)
        with pytest.raises(ConfigError, match=f"eval.json {what}.*; delete it and re-run with --out"):
            paper_table.load_rows(tmp_path, "cloze_topk", [0])
    (tmp_path / paper_table.INVOCATIONS_FILE).write_text("{corrupt")
    assert paper_table.record_invocation(tmp_path, {"wall_s": 1.0}) == [{"wall_s": 1.0}]
    assert paper_table.record_invocation(tmp_path, {"wall_s": 2.0}) == [{"wall_s": 1.0}, {"wall_s": 2.0}]


def test_every_gpu_study_run_composes(tmp_path):
    """The --gpu form cannot run here; every run it would launch, sweeps included, composes into a
    valid config (what a run refuses first)."""
    from vrmoe.compose import compose_config

    paper_table = paper_table_module()
    size = paper_table.GPU
    for method in paper_table.methods(size, True):
        app = compose_config([*size.models[method.model], *getattr(size, method.stage), *method.overrides,
                              *size.eval, *method.eval_overrides, "seed=0", "logger=none",
                              *([f"train.init_from={tmp_path}"] if method.parent else [])])
        assert app.model.n_experts >= 16, method.key


def test_the_two_predictives_and_temperature_scaling(tmp_path, corpus_cache):
    """A sampling router's BMA (mean of S single-sample passes) is another prediction than its
    routing-mean single pass; eval.predictive picks what is scored; another output name keeps eval.json."""
    from vrmoe import metrics
    from vrmoe.stats import apply_temperature

    app = make_config(*TINY, "router=variational", "router.sigma_init=2.0", "S=4", "train.max_steps=2",
                      *SMALL_EVAL, "eval.ood_task=mcq")
    train(app, tmp_path)
    result = evaluate_run(tmp_path, app)
    calibration = result["calibration"]
    predictions = calibration["predictions"]["mcq"]
    bma, single = (torch.tensor(predictions[k], dtype=torch.float64) for k in ("bma", "routing_mean"))
    labels = torch.tensor(predictions["labels"])
    assert not torch.allclose(bma, single, atol=1e-4)
    assert calibration["mcq_bma"]["nll"] == pytest.approx(metrics.nll(bma, labels), abs=1e-4)
    assert calibration["mcq"]["nll"] == pytest.approx(metrics.nll(single, labels), abs=1e-4)
    assert "predictive_entropy_bma" in result["ood"]["near"]["auroc"]
    # Temperature scaling divides the option scores: the same ranking, so the same accuracy.
    assert calibration["mcq_ts"]["accuracy"] == calibration["mcq"]["accuracy"]
    scaled = torch.tensor(predictions["ts"], dtype=torch.float64)
    assert torch.equal(scaled.argmax(-1), single.argmax(-1))
    assert apply_temperature(torch.zeros(1, 4), 2.0).sum() == pytest.approx(1.0)

    only_single = evaluate_run(tmp_path, make_config(*TINY, "router=variational", "router.sigma_init=2.0", "S=4",
                                                     "train.max_steps=2", *SMALL_EVAL, "eval.ood_task=mcq",
                                                     "eval.predictive=routing_mean"), output="eval_single.json")
    assert "mcq_bma" not in only_single["calibration"] and "bma" not in only_single["calibration"]["predictions"]["mcq"]
    assert json.loads((tmp_path / "eval_single.json").read_text())["calibration"].keys() == \
        only_single["calibration"].keys()
    assert "mcq_bma" in json.loads((tmp_path / EVAL_FILE).read_text())["calibration"]


def test_per_item_probabilities_keep_the_nll_of_small_ones():
    from vrmoe import metrics
    from vrmoe.eval.probes.base import per_item

    probs = torch.tensor([[1 - 3e-12, 1e-12, 1e-12, 1e-12], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    stored = torch.tensor(per_item(probs), dtype=torch.float64)
    assert metrics.nll(stored, labels) == pytest.approx(metrics.nll(probs, labels), rel=1e-6)


def test_temperature_scaling_is_skipped_with_a_warning_when_a_score_is_not_finite(capsys):
    from types import SimpleNamespace

    from vrmoe.eval.context import ScoredSet
    from vrmoe.eval.probes.calibration import CalibrationProbe

    labels = torch.tensor([0, 1])
    logits = torch.tensor([[0.0, -1.0, -2.0, float("-inf")], [1.0, 0.0, 0.0, 0.0]])
    mcq = ScoredSet(logits.softmax(-1), labels, logits_NC=logits)
    lm = ScoredSet(torch.full((3, 5), 0.2), torch.tensor([0, 1, 2]))
    ctx = SimpleNamespace(predictives=("routing_mean",),
                          scored=lambda name, kind: lm if kind == "lm" else mcq)
    block = CalibrationProbe().measure(ctx)
    assert "mcq_ts" not in block and "ts" not in block["predictions"]["mcq"] and "mcq" in block
    assert "temperature scaling skipped" in capsys.readouterr().err
