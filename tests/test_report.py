"""`vrmoe compare`, `vrmoe dashboard` and the run figures, on run records written here.

Most tests write summary.json / metrics.jsonl / eval.json by hand (the formats
train() and `vrmoe eval` write), so they run in milliseconds; one trains a
tiny model to check the end-of-training figures. The dashboard is opened in a
real headless Chromium when one is installed.
"""

from __future__ import annotations

import csv
import io
import json
import re
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from vrmoe import plots
from vrmoe.config import ConfigError
from vrmoe.report.compare import compare, render
from vrmoe.report.dashboard import write_dashboard

from conftest import TINY, make_config, run_cli

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
GAMMAS = [0.001, 0.002, 0.005, 0.01, 0.02, 0.05]


def metrics_rows(n_steps: int, n_layers: int = 2, n_experts: int = 4, val_every: int = 2) -> list[dict]:
    rng = np.random.default_rng(n_steps)
    rows = []
    for step in range(1, n_steps + 1):
        moe = {}
        for layer in range(n_layers):
            util = rng.dirichlet(np.ones(n_experts))
            moe[f"layer{layer}"] = {"utilisation": util.tolist(), "entropy": float(1.3 - 0.01 * step),
                                    "load_cv": float(util.std() / util.mean())}
        row = {"step": step, "train/loss": 5.0 - 0.1 * step, "train/aux_loss": 0.01, "lr": 1e-3,
               "tokens_per_s": 1000.0, "moe": moe}
        if step % val_every == 0:
            row["val/loss"] = 5.1 - 0.1 * step
        rows.append(row)
    return rows


def write_run(run_dir: Path, overrides: list[str], status: str = "completed", rows: list[dict] | None = None,
              evaluation: dict | None = None, **summary) -> Path:
    run_dir.mkdir(parents=True)
    rows = metrics_rows(4) if rows is None else rows
    (run_dir / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    k = next((int(o.split("=")[1]) for o in overrides if o.startswith("K=")), 2)
    seed = next((int(o.split("=")[1]) for o in overrides if o.startswith("seed=")), 0)
    full = {"status": status, "step": len(rows), "max_steps": 4, "router": "topk", "overrides": overrides,
            "final_train_loss": rows[-1]["train/loss"] if rows else None,
            "final_val_loss": next((r["val/loss"] for r in reversed(rows) if "val/loss" in r), None),
            "tokens_per_s": 1234.5 + seed, "wall_time_s": 1.0,
            "config": {"K": k, "S": 1, "T": 1.0, "beta": 0.01, "seed": seed,
                       "model": {"name": "tiny", "n_experts": 4}, "router": {"name": "topk", "k": k},
                       "train": {"lr": 0.003, "max_steps": 4}}}
    full.update(summary)
    (run_dir / "summary.json").write_text(json.dumps(full))
    if evaluation is not None:
        (run_dir / "eval.json").write_text(json.dumps(evaluation))
    return run_dir


def evaluation(ece: float, jaccard_01: float, with_scores: bool = True) -> dict:
    """An eval.json as `vrmoe eval` writes it (the parts compare and the dashboard read)."""
    rng = np.random.default_rng(0)
    reliability = {"bin_confidence": [0.05 + 0.1 * i for i in range(10)],
                   "bin_accuracy": [0.04 + 0.1 * i for i in range(10)],
                   "bin_count": [5, 10, 0, 20, 30, 30, 20, 10, 5, 2]}
    reliability["bin_confidence"][2] = reliability["bin_accuracy"][2] = None  # an empty bin (NaN -> null)
    ev = {
        "calibration": {"next_token": {"ece_10": ece, "nll": 3.0, "accuracy": 0.3, "reliability": reliability},
                        "mcq": {"ece_10": 0.2, "reliability": reliability}},
        "ood": {"near": {"auroc": {"predictive_entropy": 0.61, "gate_entropy": 0.66}},
                "far": {"auroc": {"predictive_entropy": 0.72}}},
        "stability": {"gammas": GAMMAS, "jaccard": {"mean": [0.9, 0.85, 0.8, jaccard_01, 0.5, 0.3],
                                                     "layer0": [0.9] * 6, "layer1": [0.8] * 6}},
        "cost": {},
    }
    if with_scores:
        ev["ood"]["scores"] = {name: {"predictive_entropy": rng.normal(shift, 1, 40).tolist(),
                                      "gate_entropy": rng.normal(shift / 2, 1, 40).tolist()}
                               for name, shift in (("in", 0.0), ("near", 0.5), ("far", 1.0))}
    return ev


@pytest.fixture
def sweep(tmp_path) -> Path:
    """A 2 x 2 sweep dir as Hydra lays it out: K=1,2 x seed=0,1; the K=2 runs were evaluated."""
    root = tmp_path / "sweep"
    job = 0
    for k in (1, 2):
        for seed in (0, 1):
            overrides = ["model=tiny", f"K={k}", f"seed={seed}", "train.max_steps=4"]
            ev = evaluation(ece=0.05 * seed + 0.01, jaccard_01=0.7 + 0.1 * seed) if k == 2 else None
            write_run(root / f"{job}_{','.join(overrides)}", overrides, rows=metrics_rows(4 + job), evaluation=ev)
            job += 1
    return root


def _json(*args: str, cwd: Path) -> list[dict]:
    return json.loads(run_cli("compare", *args, "--format", "json", cwd=cwd).stdout)


# ---------------------------------------------------------------------------
# compare
# ---------------------------------------------------------------------------

def test_compare_json_has_one_row_per_run_with_the_recorded_values(sweep, tmp_path):
    rows = _json(str(sweep), cwd=tmp_path)
    assert [r["run"] for r in rows] == ["0", "1", "2", "3"]  # job numbers, in job order
    assert [(r["K"], r["seed"]) for r in rows] == [(1, 0), (1, 1), (2, 0), (2, 1)]
    assert "model" not in rows[0] and "train.max_steps" not in rows[0]  # the same in every run: no column
    for row in rows:
        summary = json.loads((Path(row["path"]) / "summary.json").read_text())
        assert row["train_loss"] == summary["final_train_loss"]
        assert row["val_loss"] == summary["final_val_loss"]
        assert row["tokens_per_s"] == summary["tokens_per_s"]
        assert row["status"] == "completed"
    # Evaluation numbers from eval.json, blank (null) for the runs without one.
    assert [r["ece"] for r in rows] == [None, None, pytest.approx(0.01), pytest.approx(0.06)]
    assert [r["jaccard@0.01"] for r in rows] == [None, None, pytest.approx(0.7), pytest.approx(0.8)]
    # The best AUROC among a run's scores, named.
    assert rows[2]["auroc_near"] == 0.66 and rows[2]["auroc_near_score"] == "gate_entropy"
    assert rows[2]["auroc_far"] == 0.72 and rows[2]["auroc_far_score"] == "predictive_entropy"
    assert "error" not in rows[0]  # no run failed: no error column


def test_columns_appear_only_when_some_run_has_the_number(tmp_path):
    write_run(tmp_path / "a", ["K=1"])
    write_run(tmp_path / "b", ["K=2"])
    rows = compare([tmp_path]).records
    columns = compare([tmp_path]).columns
    assert columns == ["run", "K", "train_loss", "val_loss", "tokens_per_s", "status"]
    assert [r["run"] for r in rows] == ["a", "b"]
    # Now one run has an evaluation with only calibration: ECE appears, blank for the other run.
    (tmp_path / "b" / "eval.json").write_text(json.dumps({"calibration": {"next_token": {"ece_10": 0.2}}}))
    comparison = compare([tmp_path])
    assert "ece" in comparison.columns and "auroc_near" not in comparison.columns
    table = list(csv.DictReader(io.StringIO(render(comparison, "csv"))))
    assert [row["ece"] for row in table] == ["", "0.2"]
    markdown = render(comparison, "markdown").splitlines()
    assert markdown[0].startswith("| run | K |") and "0.2000" in markdown[3] and len(markdown) == 4


def test_overrides_are_compared_against_recorded_defaults(tmp_path):
    # seed=0 given on the command line and the default seed (0) are the same setting, as are T=1 and 1.0.
    write_run(tmp_path / "a", ["seed=0", "T=1", "train.lr=0.01"])
    write_run(tmp_path / "b", [])
    comparison = compare([tmp_path])
    assert "seed" not in comparison.columns and "T" not in comparison.columns
    assert [r["train.lr"] for r in comparison.records] == [0.01, 0.003]


def test_sort_filter_and_their_errors(sweep, tmp_path):
    rows = _json(str(sweep), "--sort", "val_loss", cwd=tmp_path)
    losses = [r["val_loss"] for r in rows]
    assert losses == sorted(losses)
    # Blanks stay last whichever the direction.
    rows = _json(str(sweep), "--sort", "ece", "--reverse", cwd=tmp_path)
    assert [r["ece"] for r in rows][:2] == [pytest.approx(0.06), pytest.approx(0.01)]
    assert [r["ece"] for r in rows][2:] == [None, None]
    # Filters match columns, constant overrides and recorded config keys; all must hold.
    assert [r["run"] for r in _json(str(sweep), "--filter", "K=2", "--filter", "seed=1", cwd=tmp_path)] == ["3"]
    assert len(_json(str(sweep), "--filter", "model=tiny", cwd=tmp_path)) == 4
    assert len(_json(str(sweep), "--filter", "router.k=1", cwd=tmp_path)) == 2
    assert _json(str(sweep), "--filter", "K=7", cwd=tmp_path) == []
    for bad, message in ((["--sort", "nope"], "--sort nope: no such column"),
                         (["--filter", "nope=1"], "--filter nope=...: no run has nope"),
                         (["--filter", "K"], "--filter K: expected KEY=VALUE"),
                         (["--format", "xml"], "invalid choice: 'xml'")):
        proc = run_cli("compare", str(sweep), *bad, cwd=tmp_path, check=False)
        assert proc.returncode == 2 and message in proc.stderr, proc.stderr
        assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_a_dir_without_runs_is_one_clear_error(tmp_path):
    (tmp_path / "empty" / "sub").mkdir(parents=True)
    for target in ("empty", "missing"):
        proc = run_cli("compare", str(tmp_path / target), cwd=tmp_path, check=False)
        assert proc.returncode == 2
        assert proc.stderr.count("\n") == 1 and "Traceback" not in proc.stderr
    assert "no runs found under" in run_cli("compare", str(tmp_path / "empty"), cwd=tmp_path, check=False).stderr
    assert "no such directory" in run_cli("dashboard", str(tmp_path / "missing"), cwd=tmp_path, check=False).stderr


def test_a_truncated_metrics_file_marks_the_run_incomplete(tmp_path):
    write_run(tmp_path / "ok", ["K=1"])
    killed = write_run(tmp_path / "killed", ["K=2"], status="running", final_val_loss=None)
    with open(killed / "metrics.jsonl", "a") as f:
        f.write('{"step": 5, "train/lo')  # the process died mid-line
    rows = _json(str(tmp_path), cwd=tmp_path)
    by_run = {r["run"]: r for r in rows}
    assert by_run["killed"]["status"] == "incomplete"
    assert "truncated" in by_run["killed"]["error"]
    assert by_run["killed"]["val_loss"] is None and by_run["ok"]["status"] == "completed"
    table = run_cli("compare", str(tmp_path), cwd=tmp_path).stdout
    assert re.search(r"killed .*incomplete", table) and re.search(r"ok .*completed", table)
    out, n_plots = write_dashboard([tmp_path], tmp_path / "r.html")  # the dashboard copes too
    assert n_plots >= 3 and "incomplete" in out.read_text()


def test_table_format_prints_a_row_per_run(sweep, tmp_path):
    out = run_cli("compare", str(sweep), cwd=tmp_path).stdout
    lines = [line for line in out.splitlines() if re.match(r"│ \d ", line)]
    assert len(lines) == 4
    header = next(line for line in out.splitlines() if "train_loss" in line)
    for column in ("K", "seed", "val_loss", "ece", "auroc_near", "jaccard@0.01", "tokens_per_s", "status"):
        assert f" {column} " in header
    assert "0.660 (gate_entropy)" in out


# ---------------------------------------------------------------------------
# dashboard
# ---------------------------------------------------------------------------

def _expected_plots(n_runs_with_metrics: int, n_runs_with_scores: int) -> int:
    # loss + one heatmap per run + entropy + two reliability diagrams (next token, MCQ) + Jaccard
    # + one OOD figure per run with scores
    return 1 + n_runs_with_metrics + 1 + 2 + 1 + n_runs_with_scores


def test_dashboard_is_one_self_contained_file(sweep, tmp_path):
    out = tmp_path / "report.html"
    proc = run_cli("dashboard", str(sweep), "-o", str(out), cwd=tmp_path)
    assert f"({_expected_plots(4, 2)} plots" in proc.stderr
    page = out.read_text()
    assert not re.search(r"<script[^>]+src=", page)  # plotly.js is inline, nothing to fetch
    assert page.count("Plotly.newPlot(") == _expected_plots(4, 2)
    assert page.count('<script type="text/javascript">/**\n* plotly.js') <= 1  # the library once, not per plot
    assert 'id="compare"' in page and page.index('id="compare"') < page.index('data-kind="loss"')
    kinds = re.findall(r'data-kind="(\w+)"', page)
    assert kinds == ["loss"] + ["utilisation"] * 4 + ["entropy", "reliability", "reliability", "jaccard", "ood", "ood"]


def test_dashboard_of_runs_without_evaluation_has_only_training_plots(tmp_path):
    write_run(tmp_path / "a", ["K=1"])
    write_run(tmp_path / "b", ["K=2"], status="failed", rows=[], error="boom")
    out, n_plots = write_dashboard([tmp_path], tmp_path / "r.html")
    kinds = re.findall(r'data-kind="(\w+)"', out.read_text())
    assert kinds == ["loss", "utilisation", "entropy"] and n_plots == 3


CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser") or shutil.which("google-chrome")


@pytest.mark.skipif(CHROMIUM is None, reason="no headless browser: install one with `apt-get install -y chromium`")
def test_dashboard_renders_in_a_headless_browser_without_console_errors(sweep, tmp_path):
    out, n_plots = write_dashboard([sweep], tmp_path / "report.html")
    proc = subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", f"--user-data-dir={tmp_path / 'profile'}",
         "--enable-logging=stderr", "--v=0", "--virtual-time-budget=5000", "--dump-dom", out.as_uri()],
        capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines() if ":CONSOLE" in line]
    assert console == []  # page errors and console.error/warn land here
    dom = proc.stdout
    # plotly.js adds js-plotly-plot to each div it has drawn, and one main-svg layer set per plot.
    assert dom.count('class="plotly-graph-div js-plotly-plot"') == n_plots == _expected_plots(4, 2)
    assert dom.count('class="main-svg"') >= n_plots
    assert dom.count("<tr>") == 1 + 4  # the compare table: header and four runs


# ---------------------------------------------------------------------------
# figures
# ---------------------------------------------------------------------------

def _is_png(path: Path) -> bool:
    return path.exists() and path.read_bytes()[:8] == PNG_MAGIC and path.stat().st_size > 2000


def test_each_figure_writes_a_png(tmp_path):
    paths = [
        plots.reliability_diagram([0.1, 0.5, 0.9], [0.2, 0.4, 0.95], [10, 0, 30], tmp_path / "a" / "rel.png", "x"),
        plots.jaccard_plot(GAMMAS, {"mean": [0.9, 0.8, 0.7, 0.6, 0.5, 0.4], "layer0": [1.0] * 6},
                           tmp_path / "jac.png"),
        plots.utilisation_heatmap(np.full((2, 4), 0.25), ["layer0", "layer1"], tmp_path / "util.png"),
        plots.entropy_curve([1, 2, 3], {"layer0": [1.3, 1.2, 1.1]}, tmp_path / "ent.png", n_experts=4),
        plots.loss_curves({"train": ([1, 2], [5.0, 4.0])}, tmp_path / "loss.png", reference=3.3),
        plots.score_histograms({"in": [0.1, 0.2, 0.3], "far": [0.5, 0.6, float("nan")]}, tmp_path / "h.png"),
    ]
    assert all(_is_png(p) for p in paths)


def test_router_statistics_are_read_per_layer_in_layer_order():
    rows = metrics_rows(3, n_layers=2) + [{"step": 4, "train/loss": 1.0}]  # a row without router stats
    rows[1]["moe"]["layer10"] = {"entropy": 0.5}  # a layer logged only once: NaN (a gap) elsewhere
    steps, series = plots.moe_series(rows, "entropy")
    assert steps == [1, 2, 3] and list(series) == ["layer0", "layer1", "layer10"]  # 10 after 1, not before
    assert series["layer0"] == [r["moe"]["layer0"]["entropy"] for r in rows[:3]]
    assert np.isnan(series["layer10"][0]) and series["layer10"][1] == 0.5
    layers, util_LE = plots.last_utilisation(rows)
    assert layers == ["layer0", "layer1"] and util_LE.shape == (2, 4)
    assert util_LE[1].tolist() == rows[2]["moe"]["layer1"]["utilisation"]


class _ImageLogger:
    records_images = True

    def __init__(self):
        self.images = []

    def log_images(self, images, step):
        self.images.append((step, dict(images)))


def test_images_reach_only_loggers_that_record_them(tmp_path):
    stats = metrics_rows(1)[0]["moe"]
    logger = _ImageLogger()
    path = plots.log_utilisation_image(logger, tmp_path, stats, step=7)
    assert _is_png(path) and logger.images == [(7, {"moe/utilisation_heatmap": path})]

    class _Silent:
        records_images = False

    (tmp_path / "silent").mkdir()
    assert plots.log_utilisation_image(_Silent(), tmp_path / "silent", stats, step=7) is None
    assert not any((tmp_path / "silent").iterdir())  # nothing drawn for a logger that drops images


def test_training_leaves_the_run_figures_in_its_dir(tmp_path):
    from vrmoe.train import train

    train(make_config(*TINY, "train.max_steps=3"), tmp_path)
    assert _is_png(tmp_path / plots.UTILISATION_PNG)
    assert _is_png(tmp_path / plots.ENTROPY_PNG)
    assert _is_png(tmp_path / plots.LOSS_PNG)


def test_a_figure_that_cannot_be_drawn_warns_and_keeps_the_run(tmp_path):
    rows = metrics_rows(2)
    rows[1]["moe"]["layer0"]["utilisation"] = [0.5, 0.5, 0.0]  # ragged: one layer has fewer experts
    with pytest.warns(UserWarning, match="could not be drawn"):
        written = plots.write_run_plots(tmp_path, rows=rows)
    assert [p.name for p in written] == [plots.ENTROPY_PNG, plots.LOSS_PNG]  # the others are still drawn


def test_compare_api_refuses_bad_paths_with_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="no such directory"):
        compare([tmp_path / "nope"])


def test_a_killed_run_shows_as_killed_not_running(tmp_path):
    from vrmoe.tracking import SUMMARY_FILE, write_json

    run = tmp_path / "killed"
    run.mkdir()
    write_json(run / SUMMARY_FILE, {"status": "running", "step": 3})  # no live writer holds the dir
    assert compare([tmp_path]).records[0]["status"] == "killed"


def test_the_dashboard_names_runs_by_what_differs_and_shares_one_colour_scale(sweep, tmp_path):
    from vrmoe.report.dashboard import dashboard_figures, label_by_differences

    comparison = compare([sweep])
    label_by_differences(comparison)
    assert [r["run"] for r in comparison.records] == ["K=1, seed=0", "K=1, seed=1", "K=2, seed=0", "K=2, seed=1"]
    assert [run.label for run in comparison.runs] == [r["run"] for r in comparison.records]
    heatmaps = [fig.data[0] for kind, _, fig in dashboard_figures(comparison.runs) if kind == "utilisation"]
    assert len(heatmaps) == 4 and len({(h.zmin, h.zmax) for h in heatmaps}) == 1  # equal colours, equal shares
    out, _ = write_dashboard([sweep], tmp_path / "report.html")
    assert "K=2, seed=1" in out.read_text()
