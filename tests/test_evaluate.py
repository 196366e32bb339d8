"""`vrmoe eval`: the eval.json schema, the metrics' defining properties, FLOPs, bad input."""

from __future__ import annotations

import gzip
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
from vrmoe.eval.context import SingleSample, score_items, score_windows
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


@pytest.mark.parametrize("overrides, deterministic", [("router=topk", True), ("router=vtsr", False),
                                                      ("router=vtsr router.eval_mode=topk", True),
                                                      ("router=temperature", False), ("router=mc_dropout", False),
                                                      ("router=variational router.sigma_init=1.0", False)])
def test_mutual_information_is_zero_exactly_for_deterministic_routing(overrides, deterministic):
    app = make_config(*TINY, *overrides.split(), "S=4")
    model = build_model(app).eval()
    x = torch.randint(0, 256, (4, 32))
    torch.manual_seed(0)
    scored = score_windows(model, SingleSample(model), [(x, x)], 4, "u")
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


def test_builtin_corpus_as_an_ood_set_in_both_formats(run_dir):
    """eval.ood_text names a built-in corpus: other packages' docstrings are a near-OOD set of their own
    (the word-shuffled near set stays, a control), as text windows or as items in either format."""
    for extra in (["eval.ood_task=lm"], ["eval.ood_task=mcq", "task.format=cloze"],
                  ["eval.ood_task=mcq", "task.format=letter", "model.seq_len=128"]):
        app = make_config(*TINY, *SMALL_EVAL, "eval.ood_text=[thirdparty_docs]", *extra)
        result = evaluate_run(run_dir, app, output="eval_thirdparty.json")
        assert {"near", "far", "thirdparty_docs"} <= set(result["ood"]), extra
        assert len(result["ood"]["scores"]["thirdparty_docs"]["predictive_entropy"]) > 0
        if "eval.ood_task=mcq" in extra:
            assert result["items"]["sets"]["thirdparty_docs"]["items"] == 24


def test_an_unknown_ood_entry_names_files_and_corpora(run_dir):
    with pytest.raises(ConfigError, match="give text files or built-in corpus names .*thirdparty_docs"):
        evaluate_run(run_dir, make_config(*TINY, *SMALL_EVAL, "eval.ood_text=[thirdparty]"))


@pytest.mark.slow
def test_paper_table_quick_form(tmp_path, corpus_cache, monkeypatch):
    """The study end to end at CI size: both formats, the baselines, both predictives, the paired
    intervals, the posterior diagnostics and every sweep with its plot; a second invocation with the
    same --out trains nothing again."""
    script = Path(__file__).resolve().parents[1] / "experiments" / "paper_table.py"
    command = [sys.executable, str(script), "--quick", "--sweep", "--out", str(tmp_path / "table")]
    proc = subprocess.run(command, capture_output=True, text=True, timeout=900)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "  lm_topk seed 0: " in proc.stdout  # a line for each run that finishes
    table = (tmp_path / "table" / "table.md").read_text()
    # Headed by what wrote it: date, commit, device, versions and the command.
    assert all(f"\n- {key}: " in table.split("Command:")[0] for key in ("date", "commit", "device", "torch", "command"))
    for text in ("cloze format", "letter format", "ΔECE vs Top-K", "ΔAUROC near", "Top-K + temperature scaling",
                 "Top-K ensemble of 2 seeds", "| BMA |", "variational full (post-hoc)", "Posterior diagnostics",
                 "### beta (cloze format)", "### model_size (letter format)", "| variational diag, BMA |"):
        assert text in table, text
    results = json.loads((tmp_path / "table" / "results.json").read_text())
    diag = results["formats"]["cloze"]["cloze_diag_bma"]
    assert diag["d_ece_10"]["low"] <= diag["d_ece_10"]["high"] and diag["items"] == 24 and diag["seeds"] == 2
    assert results["formats"]["letter"]["letter_diag_bma"]["items"] > 0  # prompts too long for the model are left out
    assert results["formats"]["cloze"]["topk"]["d_ece_10"] == {**results["formats"]["cloze"]["topk"]["d_ece_10"],
                                                               "estimate": 0.0, "low": 0.0, "high": 0.0}
    assert (tmp_path / "table" / "delta_ece.png").is_file()  # the study at a glance
    with gzip.open(tmp_path / "table" / "per_item.json.gz", "rt") as f:  # what the table is computed from
        per_item = json.load(f)["runs"]
    assert per_item["letter_diag"]["seed1"]["labels"] == \
        json.loads((tmp_path / "table" / "runs" / "letter_diag" / "seed1" / "eval.json").read_text())[
            "calibration"]["predictions"]["mcq"]["labels"]
    assert set(per_item["cloze_swag"]["seed0"]["predictions"]) >= {"routing_mean", "bma", "ts", "bma_ts"}
    for name in ("S", "beta", "sigma_init", "layers", "model_size"):
        for fmt in ("cloze", "letter"):
            assert (tmp_path / "table" / f"ece_vs_{name}_{fmt}.png").is_file()
    # The router on each MoE layer alone, in each format's regime (two layers in the quick models).
    assert results["sweeps"]["letter"]["layers"]["x"] == ["all", "0 only", "1 only"]
    # docs/results.md's sweep tables are made from that results.json.
    docs_pages = experiment_module("docs_pages")
    monkeypatch.setattr(docs_pages, "RESULTS", tmp_path / "table")
    for fmt in ("cloze", "letter"):
        block = docs_pages.sweep_block(fmt).splitlines()
        assert block[0].startswith("Top-K's ECE ") and len([line for line in block if line.startswith("| ")]) == 6
        assert "| MoE layers with the router: all / 0 only / 1 only |" in "\n".join(block)
    # Again with one format's sweeps: nothing is trained again, and the other format's finished
    # sweeps stay in the results (the command stamped says so).
    again = subprocess.run([*command, "--sweep-formats", "cloze"], capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "stage posthoc: 0 runs" in again.stdout
    assert set(json.loads((tmp_path / "table" / "results.json").read_text())["sweeps"]) == {"cloze", "letter"}
    assert "--quick --sweep`" in (tmp_path / "table" / "table.md").read_text()


def experiment_module(name: str = "paper_table"):
    """A script of experiments/ as a module (a fresh one: tests patch what it reads)."""
    import importlib.util

    path = Path(__file__).resolve().parents[1] / "experiments" / f"{name}.py"
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module  # its dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


def test_paper_table_refuses_evaluations_it_cannot_read_and_survives_a_bad_history(tmp_path):
    """An --out whose eval.json is unreadable or lacks per-item predictions stops with one line
    that says what to delete (an unreadable one is evaluated again on the next invocation); an
    unreadable invocations.json costs the earlier timings, not the study."""
    paper_table = experiment_module()
    run = paper_table.run_dir(tmp_path, "cloze_topk", 0)
    run.mkdir(parents=True)
    for text, what in (("{}", "has no per-item predictions"), ("{corrupt", "is missing or unreadable")):
        (run / "eval.json").write_text(text)
        with pytest.raises(ConfigError, match=f"eval.json {what}.*; delete it and re-run with --out"):
            paper_table.load_rows(tmp_path, "cloze_topk", [0])
    (tmp_path / paper_table.INVOCATIONS_FILE).write_text("{corrupt")
    assert paper_table.record_invocation(tmp_path, {"id": "a", "wall_s": 1.0}) == [{"id": "a", "wall_s": 1.0}]
    assert paper_table.record_invocation(tmp_path, {"id": "b", "wall_s": 2.0}) == [{"id": "a", "wall_s": 1.0},
                                                                                 {"id": "b", "wall_s": 2.0}]
    # An invocation records itself again after each run: its own entry is replaced, in place.
    assert paper_table.record_invocation(tmp_path, {"id": "a", "wall_s": 3.0}) == [{"id": "a", "wall_s": 3.0},
                                                                                 {"id": "b", "wall_s": 2.0}]
    # Invocations recording themselves at the same time keep each other's entries.
    from concurrent.futures import ThreadPoolExecutor

    def invocation(name):
        for step in range(20):
            paper_table.record_invocation(tmp_path, {"id": name, "wall_s": float(step)})

    with ThreadPoolExecutor(6) as pool:
        list(pool.map(invocation, "cdefgh"))
    history = json.loads((tmp_path / paper_table.INVOCATIONS_FILE).read_text())
    assert [(e["id"], e["wall_s"]) for e in history][2:] == [(name, 19.0) for name in
                                                              sorted("cdefgh", key=[e["id"] for e in history].index)]


def test_paper_table_continues_a_run_an_earlier_invocation_left_unfinished(tmp_path, monkeypatch):
    """A run stopped mid-training (an invocation killed or interrupted) is continued from its last
    checkpoint by the next invocation, to the numbers an uninterrupted run gives."""
    from vrmoe.train.step import TrainStep

    paper_table = experiment_module()
    overrides = [*TINY, "train.max_steps=4", "train.ckpt_every=2", "seed=3"]
    job = lambda path: paper_table.Job("cloze_topk", 3, overrides, str(path), str(tmp_path / "log.txt"), 1)  # noqa: E731
    paper_table.run_job(job(tmp_path / "whole"))

    step_call, calls = TrainStep.__call__, []

    def stopped_at_step_3(self, *args, **kwargs):
        calls.append(1)
        if len(calls) == 3:
            raise KeyboardInterrupt
        return step_call(self, *args, **kwargs)

    monkeypatch.setattr(TrainStep, "__call__", stopped_at_step_3)
    with pytest.raises(KeyboardInterrupt):
        paper_table.run_job(job(tmp_path / "stopped"))
    monkeypatch.setattr(TrainStep, "__call__", step_call)
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["status"] == "interrupted"
    paper_table.run_job(job(tmp_path / "stopped"))
    rows = {name: [json.loads(r) for r in (tmp_path / name / "metrics.jsonl").read_text().splitlines()]
            for name in ("whole", "stopped")}
    assert [r["step"] for r in rows["stopped"]] == [1, 2, 3, 4]
    assert [r["train/loss"] for r in rows["stopped"]] == [r["train/loss"] for r in rows["whole"]]
    assert json.loads((tmp_path / "stopped" / "summary.json").read_text())["status"] == "completed"

    # Stopped after its last step's checkpoint (Ctrl-C during the final step): evaluated as it is.
    summary = json.loads((tmp_path / "whole" / "summary.json").read_text())
    (tmp_path / "whole" / "summary.json").write_text(json.dumps({**summary, "status": "interrupted"}))
    metrics = (tmp_path / "whole" / "metrics.jsonl").read_text()
    paper_table.run_job(job(tmp_path / "whole"))
    assert (tmp_path / "whole" / "metrics.jsonl").read_text() == metrics


def test_paper_table_says_in_one_line_that_a_worker_died_and_records_the_invocation(tmp_path, monkeypatch, capsys):
    """A worker process killed (for memory, most often) breaks the pool: one line says what
    happened and how to continue, and the invocation's time is still recorded."""
    from concurrent.futures import Future, ThreadPoolExecutor
    from concurrent.futures.process import BrokenProcessPool

    paper_table = experiment_module()

    class KilledPool(ThreadPoolExecutor):  # each run's process dies at once
        def __init__(self, max_workers, mp_context):
            super().__init__(max_workers)

        def submit(self, func, job):
            future = Future()
            future.set_exception(BrokenProcessPool("A process in the process pool was terminated abruptly"))
            return future

    monkeypatch.setattr(paper_table, "ProcessPoolExecutor", KilledPool)
    with pytest.raises(SystemExit) as exit_info:
        paper_table.run_command(paper_table.SCRIPT, paper_table.main, ["--quick", "--jobs", "2", "--out", str(tmp_path)])
    assert exit_info.value.code == 1
    message = " ".join(capsys.readouterr().err.split())
    assert "a run's process died (2 runs in parallel" in message and "with fewer --jobs, to continue" in message
    history = json.loads((tmp_path / paper_table.INVOCATIONS_FILE).read_text())
    assert [entry["completed"] for entry in history] == [False]


def test_paper_table_rows_carry_each_seeds_own_ece_difference_and_refuse_unpaired_seeds():
    from vrmoe import metrics

    paper_table = experiment_module()
    gen = torch.Generator().manual_seed(5)
    labels_N = torch.randint(0, 4, (200,), generator=gen)
    logits_SNC = torch.randn(2, 200, 4, generator=gen, dtype=torch.float64)
    sharp, soft = (paper_table.Predictions(torch.softmax(logits_SNC * t, -1), labels_N, {}, "entropy", [])
                   for t in (3.0, 1.0))
    numbers = paper_table.row_stats(soft, sharp, resamples=20)

    def ece(probs_NC):
        confidence_N, predicted_N = probs_NC.max(-1)
        return metrics.expected_calibration_error(confidence_N, predicted_N == labels_N, 10)

    want = [ece(a) - ece(b) for a, b in zip(soft.probs_SNC, sharp.probs_SNC)]
    assert numbers["d_ece_10_by_seed"] == pytest.approx(want)
    assert numbers["d_ece_10"]["estimate"] == pytest.approx(sum(want) / 2)
    ensemble = paper_table.Predictions(soft.probs_SNC.mean(0)[None], labels_N, {}, "entropy", [])
    assert "d_ece_10_by_seed" not in paper_table.row_stats(ensemble, sharp, resamples=20)

    def evaluation(labels):
        return {"run": "r", "calibration": {"predictions": {"mcq": {"labels": labels, "routing_mean": [[0.25] * 4] * 3}}}}

    with pytest.raises(ConfigError, match="its test items differ from the other seeds'"):
        paper_table.predictions([evaluation([0, 1, 2]), evaluation([0, 1, 3])], "routing_mean", "predictive_entropy")


def test_every_gpu_study_run_composes(tmp_path):
    """The --gpu form cannot run here; every run it would launch, sweeps included, composes into a
    valid config (what a run refuses first)."""
    from vrmoe.compose import compose_config

    paper_table = experiment_module()
    size = paper_table.GPU
    for method in paper_table.methods(size, paper_table.FORMATS):
        app = compose_config([*size.stage_overrides(method), *method.overrides, *size.eval, *method.eval_overrides,
                              "seed=0", "logger=none", *paper_table.swag_overrides(method, size),
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


def test_the_study_sweeps_lighter_evaluation_scores_the_test_split_as_a_full_one(tmp_path, corpus_cache):
    """paper_table's SWEEP_EVAL leaves out what the sweeps do not report; the test split's
    predictions they do report (routing mean, BMA, each after temperature scaling) stay bit for bit."""
    study = experiment_module()
    base = [*TINY, "router=variational", "router.sigma_init=2.0", "S=4", "train.max_steps=2", *SMALL_EVAL,
            "eval.ood_text=[thirdparty_docs]"]
    train(make_config(*base), tmp_path)
    full = evaluate_run(tmp_path, make_config(*base), output="eval_full.json")
    light = evaluate_run(tmp_path, make_config(*base, *study.SWEEP_EVAL), output="eval_light.json")
    assert set(full["calibration"]["predictions"]["mcq"]) >= {"routing_mean", "bma", "ts", "labels"}
    # Compared as JSON, where an empty reliability bin's NaN equals itself.
    assert full["calibration"]["predictions"] == light["calibration"]["predictions"]
    for key in ("mcq", "mcq_bma", "mcq_ts"):
        assert json.dumps(full["calibration"][key]) == json.dumps(light["calibration"][key])
    assert json.dumps(full["temperature_scaling"]) == json.dumps(light["temperature_scaling"])  # the BMA's too
    assert "thirdparty_docs" in full["ood"] and "thirdparty_docs" not in light["ood"]


def test_per_item_probabilities_keep_the_nll_of_small_ones():
    from vrmoe import metrics
    from vrmoe.eval.probes.base import per_item

    probs = torch.tensor([[1 - 3e-12, 1e-12, 1e-12, 1e-12], [0.25, 0.25, 0.25, 0.25]], dtype=torch.float64)
    labels = torch.tensor([1, 2])
    stored = torch.tensor(per_item(probs), dtype=torch.float64)
    assert metrics.nll(stored, labels) == pytest.approx(metrics.nll(probs, labels), rel=1e-6)


def test_temperature_scaling_is_skipped_with_a_warning_when_a_score_is_not_finite(capsys):
    from types import SimpleNamespace

    from vrmoe.eval.context import EvalContext, ScoredSet
    from vrmoe.eval.probes.calibration import CalibrationProbe

    labels = torch.tensor([0, 1])
    logits = torch.tensor([[0.0, -1.0, -2.0, float("-inf")], [1.0, 0.0, 0.0, 0.0]])
    mcq = ScoredSet(logits.softmax(-1), labels, logits_NC=logits)
    lm = ScoredSet(torch.full((3, 5), 0.2), torch.tensor([0, 1, 2]))
    ctx = SimpleNamespace(predictives=("routing_mean",), sampler=None, _temperatures={},
                          scored=lambda name, kind: lm if kind == "lm" else mcq)
    ctx.temperature = lambda predictive: EvalContext.temperature(ctx, predictive)  # the real fit, on these scores
    block = CalibrationProbe().measure(ctx)
    assert "mcq_ts" not in block and "ts" not in block["predictions"]["mcq"] and "mcq" in block
    assert "temperature scaling skipped" in capsys.readouterr().err


def old_single_sample_copy(model, app):
    """What evaluation built for the single-sample passes before they ran on the model itself: a
    second model with router.samples=1 and the same weights."""
    import dataclasses

    copy = build_model(dataclasses.replace(app, router=dataclasses.replace(app.router, samples=1)))
    copy.load_state_dict(model.state_dict())
    return copy.eval()


@pytest.mark.parametrize("overrides", ["router=variational router.sigma_init=1.0",
                                       "router=variational router.covariance=full router.sigma_init=0.5",
                                       "router=mc_dropout router.dropout=0.3", "router=temperature"])
def test_single_sample_passes_on_the_model_itself_equal_a_second_copy_bitwise(overrides):
    from vrmoe.data.mcq_datasets import MCQQuestion, encode_questions

    app = make_config(*TINY, *overrides.split(), "S=3", "model.seq_len=64")  # room for a lettered prompt
    model = build_model(app).eval()
    copy = old_single_sample_copy(model, app)
    x = torch.randint(0, 256, (4, 32), generator=torch.Generator().manual_seed(1))
    questions = [MCQQuestion(f"{a}+{a}?", tuple(str(2 * a + d) for d in range(4)), a % 4) for a in range(6)]
    items = encode_questions(questions, None, app.model.seq_len, "test")
    assert len(items) == 6
    index = list(torch.arange(len(items)).split(4))
    got = {}
    for name, sampler in (("copy", copy), ("same modules", SingleSample(model))):
        torch.manual_seed(0)
        lm = score_windows(model, sampler, [(x[:2], x[:2]), (x[2:], x[2:])], 3, "u")
        torch.manual_seed(0)
        mcq = score_items(model, sampler, items, index, 3, "u", torch.device("cpu"))
        got[name] = (lm, mcq)
    for old, new in zip(got["copy"], got["same modules"]):
        for field in ("probs_NC", "bma_probs_NC", "labels_N", "logits_NC"):
            assert (getattr(old, field) is None) == (getattr(new, field) is None)
            if getattr(old, field) is not None:
                assert torch.equal(getattr(old, field), getattr(new, field)), field
        assert old.scores.keys() == new.scores.keys() and "mutual_information" in new.scores
        assert all(torch.equal(old.scores[k], new.scores[k]) for k in old.scores)
    assert not torch.equal(got["copy"][1].bma_probs_NC, got["copy"][1].probs_NC)  # the passes do sample
    # The routers are back at S = 3 afterwards.
    assert {layer.router.cfg.samples for layer in model.moe_layers} == {3}


HF_RUN = ["logger=none", "model.seq_len=64", "train.batch_size=4", "train.log_every=2", "train.eval_every=2",
          "train.eval_batches=1", "train.warmup_steps=1", "train.max_steps=2"]
HF_EVAL = ["eval.windows=2", "eval.stability_windows=1", "eval.gammas=[0.01]", "eval.batch_size=4"]


@pytest.fixture(scope="module")
def hf_mcq_run(tmp_path_factory, corpus_cache):
    """A post-hoc variational run on a tiny OLMoE stand-in (context 128 tokens, fine-tuned on 64),
    on a dataset whose test split has law-like prompts of up to about 200 tokens, with an OOD
    dataset in MedMCQA's columns whose test split has no answers."""
    pytest.importorskip("transformers")
    from hf_models import save_tiny_model
    from test_mcq_datasets import make_dataset, make_law_split, make_medmcqa

    root = tmp_path_factory.mktemp("hf_eval")
    data = make_dataset(root / "law", 12)
    law = make_law_split(data / "validation.jsonl")
    medmcqa = make_medmcqa(root / "medmcqa")
    overrides = ["model=hf", f"model.hf_name={save_tiny_model('olmoe', root / 'olmoe')}", "router=variational",
                 "train.freeze=backbone", "data=mcq", f"data.mcq_name={data}", "task=mcq", *HF_RUN,
                 f"eval.ood_mcq=[{medmcqa}:test]"]
    train(make_config(*overrides), root / "run")
    return root / "run", overrides, law


def test_hf_evaluation_scores_prompts_up_to_the_models_own_context(hf_mcq_run, capsys):
    from vrmoe.data.mcq_datasets import encode_questions
    from vrmoe.eval import schema
    from vrmoe.eval.context import prompt_len
    from vrmoe.model import build_tokenizer

    run, overrides, law = hf_mcq_run
    app = make_config(*overrides, "S=2", *HF_EVAL)
    assert prompt_len(app) == 128 and app.model.seq_len == 64  # the stand-in's max_position_embeddings
    tokenizer = build_tokenizer(app)
    lengths = [int(encode_questions([q], tokenizer, 10**6, "").lengths_N[0]) for q in law]  # prompt tokens
    fit = sum(n <= 128 for n in lengths)
    assert sum(n <= 64 for n in lengths) < fit < len(law)  # model.seq_len would have kept fewer
    result = evaluate_run(run, app)
    counts = schema.item_counts(result)
    assert result["items"]["prompt_len"] == 128
    assert counts["in"] == {"items": fit, "unlabelled": 0, "too_long": len(law) - fit}
    assert sum(result["calibration"]["mcq"]["reliability"]["bin_count"]) == fit
    assert counts["medmcqa"] == {"items": 6, "unlabelled": 6, "too_long": 0}
    assert len(result["ood"]["scores"]["medmcqa"]["mutual_information"]) == 6
    assert 0 <= result["ood"]["medmcqa"]["auroc"]["predictive_entropy"] <= 1
    line = next(line for line in capsys.readouterr().err.splitlines() if "multiple-choice items:" in line)
    assert f"in {fit} ({len(law) - fit} longer than 128 tokens, left out)" in line
    assert "medmcqa 6 (6 without an answer, OOD scores only)" in line


def alive_parameter_bytes() -> int:
    """Bytes of the distinct storages of every parameter alive in the process."""
    import gc

    gc.collect()
    storages = {}
    for obj in gc.get_objects():
        if issubclass(type(obj), torch.nn.Parameter):  # type(): isinstance would ask deprecated objects
            storage = obj.untyped_storage()
            storages[storage.data_ptr()] = storage.nbytes()
    return sum(storages.values())


def test_hf_evaluation_holds_one_copy_of_the_model(hf_mcq_run, monkeypatch, tmp_path):
    """eval.predictive=both at S = 2 (the BMA and mutual information: S single-sample passes) holds
    the parameters that one routing-mean pass at S = 1 holds; a second model for the single-sample
    passes would double them."""
    from vrmoe.eval import context
    from vrmoe.eval.probes import posterior

    run, overrides, _ = hf_mcq_run
    peaks: list[int] = []

    def measured(function):
        def wrapper(*args, **kwargs):
            peaks.append(alive_parameter_bytes())
            return function(*args, **kwargs)
        return wrapper

    for name in ("score_items", "score_windows"):
        monkeypatch.setattr(context, name, measured(getattr(context, name)))
    monkeypatch.setattr(posterior, "routing_posterior", measured(posterior.routing_posterior))
    held = {}
    for label, settings in (("single", ["S=1", "eval.predictive=routing_mean"]),
                            ("both", ["S=2", "eval.predictive=both"])):
        baseline = alive_parameter_bytes()
        peaks.clear()
        evaluate_run(run, make_config(*overrides, *settings, *HF_EVAL, "eval.mcq_items=4",
                                      "eval.calibration_items=4"), output=f"eval_{label}.json")
        held[label] = max(peaks) - baseline
    model_bytes = sum(p.numel() * p.element_size() for p in build_model(make_config(*overrides)).parameters())
    assert held["single"] >= model_bytes  # the measure sees the model evaluated
    assert held["both"] <= 1.1 * held["single"]


def test_letter_items_made_from_text_count_the_prompts_left_out(corpus_cache):
    from vrmoe.data.corpora import load_corpus
    from vrmoe.data.mcq import as_question, build_items, split_text
    from vrmoe.eval.context import text_set

    app = make_config(*TINY, "model.seq_len=96", "task=mcq", "task.format=letter")
    text = split_text(load_corpus(app.data), "test")
    tensors, counts = text_set(app, text, 40, "eval.mcq_items (test split)", None)
    # Byte tokens: the prompt and the space before the answer letter.
    too_long = sum(len(as_question(item).prompt().encode()) + 1 > 96 for item in build_items(text, 40, 64))
    assert 0 < too_long < 40
    assert counts == {"items": len(tensors), "unlabelled": 0, "too_long": too_long} and len(tensors) == 40 - too_long
    _, every = text_set(app, text, None, "eval.mcq_items (test split)", None)  # null: every item the text yields
    assert every["items"] + every["too_long"] == len(build_items(text, 10**9, app.task.item_len)) > 40
