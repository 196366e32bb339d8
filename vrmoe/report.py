"""Runs side by side: ``vrmoe compare`` (a table) and ``vrmoe dashboard`` (one offline HTML file).

Both read only run records: ``summary.json`` (status, overrides, final losses,
throughput), ``metrics.jsonl`` (curves and router statistics) and, when
``vrmoe eval`` has run, ``eval.json`` (calibration, OOD, stability). A run dir
is any directory holding a ``summary.json``; sweep dirs are searched
recursively. Columns appear only when at least one run has the number, and a
run without it shows a blank.
"""

from __future__ import annotations

import argparse
import csv
import html
import io
import json
import math
import os
import re
import sys
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from .config import ConfigError
from .console import log_line
from .tracking import EVAL_FILE, METRICS_FILE, SUMMARY_FILE, read_metrics

# Overrides that say where or how a run was recorded, not what it is: never a compare column.
_RECORDING_KEYS = ("hydra", "train.resume", "logger")
# The noise scale the paper quotes routing stability at.
JACCARD_GAMMA = 0.01


# ---------------------------------------------------------------------------
# Finding and reading runs
# ---------------------------------------------------------------------------

@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    evaluation: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    metrics_truncated: bool = False
    label: str = ""

    @property
    def status(self) -> str:
        # A truncated metrics.jsonl means the process died mid-write, whatever summary.json last said.
        if self.metrics_truncated:
            return "incomplete"
        return str(self.summary.get("status") or "unknown")


def _natural_key(path: Path) -> list[Any]:
    """Sort job dirs 2_..., 10_... by number, not as text."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run dirs (those with a summary.json) at or below each path, in a stable order."""
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{raw}: no such directory; give run dirs or sweep dirs (e.g. outputs/multirun/...)")
        if (path / SUMMARY_FILE).is_file():
            found[path.resolve()] = None
            continue
        below = [p.parent for p in path.rglob(SUMMARY_FILE)
                 if not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])]
        for run_dir in sorted(below, key=_natural_key):
            found[run_dir.resolve()] = None
    if not found:
        raise ConfigError(f"no runs found under {', '.join(str(p) for p in paths)} (no {SUMMARY_FILE} there); "
                          "give a run dir or a sweep dir")
    return list(found)


def _read_json(path: Path) -> dict[str, Any] | None:
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return None
    except (OSError, ValueError) as exc:
        log_line(f"[yellow]warning:[/] {path} is unreadable ({type(exc).__name__}); ignored")
        return None
    return data if isinstance(data, dict) else None


def load_run(path: Path) -> Run:
    rows, complete = read_metrics(path)
    summary = _read_json(path / SUMMARY_FILE) or {"status": "unreadable"}
    return Run(path=path, summary=summary, evaluation=_read_json(path / EVAL_FILE), rows=rows,
               metrics_truncated=not complete and (path / METRICS_FILE).exists())


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    runs = [load_run(p) for p in find_runs(paths)]
    # Labels relative to the runs' common parent: short, and unique because the paths are.
    root = Path(os.path.commonpath([r.path for r in runs])) if len(runs) > 1 else runs[0].path.parent
    labels = [str(run.path.relative_to(root)) or run.path.name for run in runs]
    # A sweep job dir is named <job number>_<its overrides>; the override columns already say the
    # rest, so the number alone labels it (unless that would make two labels equal).
    short = [str(Path(label).parent / job.group(1)) if (job := re.match(r"(\d+)_.", run.path.name))
             and run.summary.get("overrides") else label for label, run in zip(labels, runs)]
    if len(runs) > 1 and len(set(short)) == len(short):
        labels = short
    for run, label in zip(runs, labels):
        run.label = label
    return runs


# ---------------------------------------------------------------------------
# The numbers of one run
# ---------------------------------------------------------------------------

def _dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def _number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def best_auroc(evaluation: dict[str, Any] | None, split: str) -> tuple[float | None, str | None]:
    """The highest AUROC among the OOD scores a run has on one split, and that score's name.

    Routers offer different scores (a deterministic router has no mutual
    information), so each is credited with its best one and the name says which."""
    scores = _dig(evaluation, "ood", split, "auroc")
    if not isinstance(scores, dict):
        return None, None
    valid = {name: float(v) for name, v in scores.items() if _number(v) is not None and math.isfinite(v)}
    if not valid:
        return None, None
    name = max(valid, key=valid.get)
    return valid[name], name


def jaccard_at(evaluation: dict[str, Any] | None, gamma: float = JACCARD_GAMMA) -> float | None:
    """Mean-over-layers Jaccard of the Top-K sets at one noise scale gamma."""
    gammas = _dig(evaluation, "stability", "gammas")
    mean = _dig(evaluation, "stability", "jaccard", "mean")
    if not isinstance(gammas, list) or not isinstance(mean, list):
        return None
    for g, value in zip(gammas, mean):
        if _number(g) is not None and math.isclose(g, gamma, rel_tol=1e-6):
            return _number(value)
    return None


# Metric columns: name -> how to read it from a run. Order is the table's order.
METRIC_COLUMNS: dict[str, Callable[[Run], Any]] = {
    "train_loss": lambda r: _number(r.summary.get("final_train_loss")),
    "val_loss": lambda r: _number(r.summary.get("final_val_loss")),
    "ece": lambda r: _number(_dig(r.evaluation, "calibration", "next_token", "ece_10")),
    "mcq_ece": lambda r: _number(_dig(r.evaluation, "calibration", "mcq", "ece_10")),
    "auroc_near": lambda r: best_auroc(r.evaluation, "near")[0],
    "auroc_near_score": lambda r: best_auroc(r.evaluation, "near")[1],
    "auroc_far": lambda r: best_auroc(r.evaluation, "far")[0],
    "auroc_far_score": lambda r: best_auroc(r.evaluation, "far")[1],
    f"jaccard@{JACCARD_GAMMA:g}": lambda r: jaccard_at(r.evaluation),
    "tokens_per_s": lambda r: _number(r.summary.get("tokens_per_s")),
    "status": lambda r: r.status,
    "error": lambda r: r.summary.get("error") or (f"{METRICS_FILE} ends in a truncated line"
                                                  if r.metrics_truncated else None),
}


def _flatten_config(config: Any, prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    if isinstance(config, dict):
        for key, value in config.items():
            out.update(_flatten_config(value, f"{prefix}{key}."))
    else:
        out[prefix[:-1]] = config
    return out


def override_values(run: Run) -> dict[str, str]:
    """The run's command-line overrides as key -> value text (``+key`` counts as ``key``)."""
    values: dict[str, str] = {}
    for item in run.summary.get("overrides") or []:
        if not isinstance(item, str) or "=" not in item or item.startswith("~"):
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if not key.startswith(_RECORDING_KEYS):
            values[key] = value
    return values


def config_value(run: Run, key: str) -> Any:
    """A key's value in the run's recorded config: ``seed`` or ``train.lr``, and for a config
    group such as ``model`` the chosen option's name; None when the config lacks it."""
    config = run.summary.get("config")
    if not isinstance(config, dict):
        return None
    flat = _flatten_config(config)
    if key in flat:
        value = flat[key]
        return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    return _dig(config, key, "name")


def _typed(text: str) -> Any:
    """An override's text as the value it spells (1, 0.5, true, null), else the text itself."""
    if text == "null":
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def setting(run: Run, key: str) -> Any:
    """What the run used for ``key``: its override when given, else its recorded config value
    (so ``T=1`` and the default T of 1.0 are the same setting)."""
    overrides = override_values(run)
    return _typed(overrides[key]) if key in overrides else config_value(run, key)


def run_record(run: Run, override_keys: Iterable[str]) -> dict[str, Any]:
    """Every value a run can be shown, sorted or filtered by (before dropping empty columns)."""
    record: dict[str, Any] = {"run": run.label}
    for key in override_keys:
        record[key] = setting(run, key)
    for name, read in METRIC_COLUMNS.items():
        record[name] = read(run)
    return record


def varied_override_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose setting is not the same in every run."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in override_values(run) if k not in keys]
    return [key for key in keys if len({setting(run, key) for run in runs}) > 1]


# ---------------------------------------------------------------------------
# The comparison table
# ---------------------------------------------------------------------------

@dataclass
class Comparison:
    columns: list[str]
    records: list[dict[str, Any]]
    runs: list[Run]


def _parse_filters(filters: Sequence[str]) -> list[tuple[str, str]]:
    parsed = []
    for item in filters:
        if "=" not in item:
            raise ConfigError(f"--filter {item}: expected KEY=VALUE, e.g. --filter router=topk")
        key, value = item.split("=", 1)
        parsed.append((key.strip(), value.strip()))
    return parsed


def _matches(value: Any, wanted: str) -> bool:
    if value is None:
        return wanted in ("", "null", "None")
    return value == _typed(wanted) or str(value) == wanted  # K=2 matches 2 and 2.0; router=topk the text


def _lookup(run: Run, record: dict[str, Any], key: str) -> tuple[bool, Any]:
    """A filter key's value in a run: a column, an override, or any recorded config key."""
    if key in record:
        return True, record[key]
    value = setting(run, key)
    return value is not None or key in override_values(run), value


def _sort_key(value: Any) -> tuple[int, Any]:
    if value is None or value == "":
        return (2, 0)
    number = _number(value)
    if number is None:
        try:
            number = float(value)
        except (TypeError, ValueError):
            return (1, str(value))
    return (0, number)


def compare(paths: Sequence[str | Path], sort: str | None = None, filters: Sequence[str] = (),
            reverse: bool = False) -> Comparison:
    """The comparison of the runs at or below ``paths``: one record per run, the columns that
    hold a value for some run."""
    runs = load_runs(paths)
    wanted = _parse_filters(filters)
    if wanted:
        every_key = varied_override_keys(runs)
        full = [(run, run_record(run, every_key)) for run in runs]
        for key, _ in wanted:
            if not any(_lookup(run, record, key)[0] for run, record in full):
                raise ConfigError(f"--filter {key}=...: no run has {key}; filter on a column "
                                  f"({', '.join(['run', *every_key, *METRIC_COLUMNS])}) or a config key")
        runs = [run for run, record in full
                if all(_matches(_lookup(run, record, key)[1], value) for key, value in wanted)]
    keys = varied_override_keys(runs) if len(runs) > 1 else []
    pairs = []
    for run in runs:
        record = run_record(run, keys)
        record["path"] = str(run.path)
        pairs.append((record, run))
    columns = ["run", *keys] + [c for c in METRIC_COLUMNS if any(r[c] is not None for r, _ in pairs)]
    if sort:
        if sort not in ("run", "path", *keys, *METRIC_COLUMNS):
            raise ConfigError(f"--sort {sort}: no such column; choose one of {', '.join(columns)}")
        present = [p for p in pairs if _sort_key(p[0].get(sort))[0] < 2]
        blank = [p for p in pairs if _sort_key(p[0].get(sort))[0] == 2]  # blanks last in either direction
        present.sort(key=lambda p: _sort_key(p[0].get(sort)), reverse=reverse)
        pairs = present + blank
    return Comparison(columns=columns, records=[r for r, _ in pairs], runs=[run for _, run in pairs])


# Display precision per column: losses and calibration need 4 digits to tell routers apart.
_FORMATS = {"train_loss": "{:.4f}", "val_loss": "{:.4f}", "ece": "{:.4f}", "mcq_ece": "{:.4f}",
            "auroc_near": "{:.3f}", "auroc_far": "{:.3f}", f"jaccard@{JACCARD_GAMMA:g}": "{:.3f}",
            "tokens_per_s": "{:,.0f}"}


def format_cell(column: str, value: Any, width: int | None = None) -> str:
    if value is None:
        return ""
    if column in _FORMATS and _number(value) is not None:
        text = _FORMATS[column].format(value)
    else:
        text = str(value)
    if width and len(text) > width:
        text = text[: width - 1] + "…"
    return text


def _display_columns(comparison: Comparison) -> list[str]:
    # In a table, a best-AUROC's score name goes in the same cell as the number.
    return [c for c in comparison.columns if not c.endswith("_score")]


def _display_cell(record: dict[str, Any], column: str, width: int | None = None) -> str:
    text = format_cell(column, record.get(column), width)
    score = record.get(f"{column}_score")
    return f"{text} ({score})" if text and score else text


def render(comparison: Comparison, fmt: str) -> str:
    columns, records = comparison.columns, comparison.records
    if fmt == "json":
        return json.dumps([{c: r.get(c) for c in [*columns, "path"]} for r in records], indent=2) + "\n"
    if fmt == "csv":
        out = io.StringIO()
        writer = csv.writer(out, lineterminator="\n")
        writer.writerow([*columns, "path"])
        for r in records:
            writer.writerow(["" if r.get(c) is None else r.get(c) for c in [*columns, "path"]])
        return out.getvalue()
    shown = _display_columns(comparison)
    if fmt == "markdown":
        lines = ["| " + " | ".join(shown) + " |", "|" + "|".join("---" for _ in shown) + "|"]
        for r in records:
            cells = [_display_cell(r, c, 60 if c in ("run", "error") else None).replace("|", "\\|") for c in shown]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines) + "\n"
    raise ValueError(fmt)


def print_table(comparison: Comparison) -> None:
    """The comparison as a rich table on stdout. Numbers and settings are never cut; only the
    free-text run label and error message are shortened, so a row stays one line."""
    from rich.console import Console
    from rich.markup import escape
    from rich.table import Table

    shown = _display_columns(comparison)
    limits = {"run": 32, "error": 40}
    rows = [[_display_cell(r, c, limits.get(c)) for c in shown] for r in comparison.records]
    table = Table(header_style="bold")
    for i, column in enumerate(shown):
        widest = max([len(column), *(len(row[i]) for row in rows)])
        table.add_column(column, justify="right" if column in _FORMATS else "left", no_wrap=True, min_width=widest)
    status_style = {"completed": "green", "failed": "red", "incomplete": "yellow", "running": "yellow"}
    for record, cells in zip(comparison.records, rows):
        styled = []
        for column, text in zip(shown, cells):
            style = status_style.get(str(record.get("status"))) if column == "status" else None
            styled.append(f"[{style}]{escape(text)}[/]" if style else escape(text))
        table.add_row(*styled)
    console = Console()
    # Piped output has no terminal width to respect: print the table whole rather than squeezed to 80.
    Console(width=console.width if console.is_terminal else 10_000).print(table)


# ---------------------------------------------------------------------------
# The dashboard
# ---------------------------------------------------------------------------

def _reliability_bins(block: Any) -> tuple[list, list, list] | None:
    """(confidence, accuracy, count) per bin from a calibration block of eval.json
    (``vrmoe.metrics.ReliabilityBins.as_dict``; empty bins hold null)."""
    bins = block.get("reliability") if isinstance(block, dict) else None
    if not isinstance(bins, dict) or not all(isinstance(bins.get(k), list) for k in _BIN_KEYS):
        return None
    return tuple(bins[k] for k in _BIN_KEYS)  # type: ignore[return-value]


_BIN_KEYS = ("bin_confidence", "bin_accuracy", "bin_count")


def _ood_scores(evaluation: dict[str, Any] | None) -> dict[str, dict[str, list[float]]]:
    """eval.json ``ood.scores`` ({set: {score: values}}, the in-distribution set being ``in``)
    turned around to {score: {set: values}}: one figure per score compares the sets."""
    raw = _dig(evaluation, "ood", "scores")
    out: dict[str, dict[str, list[float]]] = {}
    for dataset, by_score in (raw.items() if isinstance(raw, dict) else ()):
        for score, values in (by_score.items() if isinstance(by_score, dict) else ()):
            finite = [float(v) for v in values or [] if _number(v) is not None and math.isfinite(v)]
            if finite:
                out.setdefault(score, {})[dataset] = finite
    return out


def _figure_html(fig, include_plotlyjs: bool) -> str:
    import plotly.io as pio

    return pio.to_html(fig, full_html=False, include_plotlyjs=include_plotlyjs,
                       config={"displaylogo": False, "responsive": True})


def dashboard_figures(runs: Sequence[Run]) -> list[tuple[str, str, Any]]:
    """(kind, title, plotly figure) for every plot the runs have data for."""
    import plotly.graph_objects as go
    from plotly.colors import qualitative
    from plotly.subplots import make_subplots

    from .plots import last_utilisation, moe_series

    palette = qualitative.Plotly
    colour = {run.label: palette[i % len(palette)] for i, run in enumerate(runs)}
    figures: list[tuple[str, str, Any]] = []

    def layout(fig, title: str, x: str, y: str, height: int = 420, log_x: bool = False):
        fig.update_layout(title=title, height=height, template="plotly_white", margin=dict(l=60, r=20, t=50, b=50),
                          legend=dict(font=dict(size=10)))
        fig.update_xaxes(title_text=x, type="log" if log_x else None)
        fig.update_yaxes(title_text=y)
        return fig

    # Loss curves: training on the left, validation on the right, one colour per run.
    with_loss = [r for r in runs if any("train/loss" in row for row in r.rows)]
    if with_loss:
        fig = make_subplots(rows=1, cols=2, subplot_titles=("train loss", "validation loss"))
        for run in with_loss:
            train_pts = [(row["step"], row["train/loss"]) for row in run.rows if row.get("train/loss") is not None]
            val_pts = [(row["step"], row["val/loss"]) for row in run.rows if row.get("val/loss") is not None]
            for col, pts, mode in ((1, train_pts, "lines"), (2, val_pts, "lines+markers")):
                if pts:
                    xs, ys = zip(*pts)
                    fig.add_trace(go.Scatter(x=xs, y=ys, mode=mode, name=run.label, legendgroup=run.label,
                                             showlegend=col == 1, line=dict(color=colour[run.label])),
                                  row=1, col=col)
        figures.append(("loss", "Loss curves", layout(fig, "Loss (nats/token)", "step", "loss")))

    # Expert utilisation at the last logged step: one layer x expert heatmap per run,
    # coloured around the uniform share 1/E so over- and under-used experts stand out.
    for run in runs:
        util = last_utilisation(run.rows)
        if util is None:
            continue
        layers, util_LE = util
        uniform = 1.0 / util_LE.shape[1]
        spread = max(float(abs(util_LE - uniform).max()), 1e-6)
        fig = go.Figure(go.Heatmap(z=util_LE.tolist(), x=[str(e) for e in range(util_LE.shape[1])], y=layers,
                                   colorscale="RdBu_r", zmin=uniform - spread, zmax=uniform + spread,
                                   colorbar=dict(title="share"), text=[[f"{v:.3f}" for v in row] for row in util_LE],
                                   texttemplate="%{text}", hovertemplate="%{y} expert %{x}: %{z:.4f}<extra></extra>"))
        fig.update_yaxes(autorange="reversed")  # first layer on top, as in the PNG
        step = next((row.get("step") for row in reversed(run.rows) if row.get("moe")), None)
        figures.append(("utilisation", f"Expert utilisation: {run.label}",
                        layout(fig, f"Expert utilisation, {run.label} (step {step}; uniform {uniform:.3f})",
                               "expert", "layer", height=max(260, 60 * len(layers) + 160))))

    # Routing entropy over training: one colour per run, one dash per layer.
    dashes = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]
    entropy_traces = []
    for run in runs:
        steps, series = moe_series(run.rows, "entropy")
        for i, (layer, values) in enumerate(series.items()):
            entropy_traces.append(go.Scatter(x=steps, y=values, mode="lines", name=f"{run.label} {layer}",
                                             legendgroup=run.label,
                                             line=dict(color=colour[run.label], dash=dashes[i % len(dashes)])))
    if entropy_traces:
        fig = go.Figure(entropy_traces)
        figures.append(("entropy", "Routing entropy", layout(fig, "Routing entropy per layer", "step", "nats")))

    # Reliability diagrams: every run's bins on one diagonal, one figure per calibration task.
    kinds = list(dict.fromkeys(k for r in runs for k, v in (_dig(r.evaluation, "calibration") or {}).items()
                               if _reliability_bins(v)))
    for kind in kinds:
        fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                                   line=dict(color="grey", dash="dash")))
        for run in runs:
            bins = _reliability_bins(_dig(run.evaluation, "calibration", kind))
            if bins is None:
                continue
            filled = [(c, a, n) for c, a, n in zip(*bins) if n and c is not None and a is not None]
            if not filled:
                continue
            conf, acc, count = zip(*filled)
            ece = _number(_dig(run.evaluation, "calibration", kind, "ece_10"))
            name = run.label + (f" (ECE {ece:.3f})" if ece is not None else "")
            fig.add_trace(go.Scatter(x=conf, y=acc, mode="lines+markers", name=name, customdata=count,
                                     hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>n=%{customdata}",
                                     line=dict(color=colour[run.label])))
        fig.update_xaxes(range=[0, 1])
        fig.update_yaxes(range=[0, 1])
        figures.append(("reliability", f"Reliability: {kind}",
                        layout(fig, f"Reliability diagram ({kind.replace('_', ' ')})", "confidence", "accuracy")))

    # Routing stability: mean Jaccard of the Top-K sets against the embedding-noise scale.
    with_stability = [r for r in runs if isinstance(_dig(r.evaluation, "stability", "jaccard", "mean"), list)]
    if with_stability:
        fig = go.Figure()
        for run in with_stability:
            fig.add_trace(go.Scatter(x=_dig(run.evaluation, "stability", "gammas"),
                                     y=_dig(run.evaluation, "stability", "jaccard", "mean"),
                                     mode="lines+markers", name=run.label, line=dict(color=colour[run.label])))
        fig.update_yaxes(range=[0, 1.02])
        figures.append(("jaccard", "Routing stability",
                        layout(fig, "Jaccard of Top-K sets under embedding noise (mean over layers)",
                               "gamma", "Jaccard", log_x=True)))

    # OOD scores: per run, histograms of each dataset for one score; a menu switches the score.
    for run in runs:
        scores = _ood_scores(run.evaluation)
        if not scores:
            continue
        fig = go.Figure()
        owners = []
        for s_i, (score, by_dataset) in enumerate(scores.items()):
            # One set of bin edges per score, so the overlaid sets compare bin by bin.
            lo = min(min(v) for v in by_dataset.values())
            hi = max(max(v) for v in by_dataset.values())
            xbins = dict(start=lo, end=hi, size=(hi - lo) / 30 if hi > lo else 1.0)
            for dataset, values in by_dataset.items():
                fig.add_trace(go.Histogram(x=values, name=dataset, opacity=0.55, histnorm="probability density",
                                           xbins=xbins, visible=s_i == 0, legendgroup=dataset))
                owners.append(score)
        names = list(scores)
        if len(names) > 1:
            fig.update_layout(updatemenus=[dict(buttons=[
                dict(label=name, method="update", args=[{"visible": [o == name for o in owners]},
                                                        {"xaxis.title.text": name}])
                for name in names], x=0.5, xanchor="center", y=1.12, yanchor="bottom")])
        fig.update_layout(barmode="overlay")
        figures.append(("ood", f"OOD scores: {run.label}",
                        layout(fig, f"OOD scores, {run.label}", names[0], "density")))
    return figures


_PAGE = """<!DOCTYPE html>
<html lang="en">
<head>
<meta charset="utf-8">
<title>{title}</title>
<style>
body {{ font-family: system-ui, sans-serif; margin: 1.5rem auto; max-width: 1200px; color: #222; }}
table {{ border-collapse: collapse; font-size: 0.85rem; margin-bottom: 1.5rem; }}
th, td {{ border-bottom: 1px solid #ddd; padding: 0.25rem 0.6rem; text-align: left; }}
td.num {{ text-align: right; font-variant-numeric: tabular-nums; }}
th {{ background: #f4f4f4; }}
.status-failed {{ color: #b00020; }} .status-completed {{ color: #1b7a1b; }} .status-incomplete {{ color: #a66b00; }}
section.figure {{ margin: 1rem 0 2rem; }}
nav a {{ margin-right: 1rem; }}
.note {{ color: #666; font-size: 0.85rem; }}
</style>
</head>
<body>
<h1>{title}</h1>
<p class="note">{n_runs} run(s); generated {generated} from {sources}. Self-contained: works offline.</p>
{table}
{nav}
{figures}
</body>
</html>
"""


def _html_table(comparison: Comparison) -> str:
    shown = _display_columns(comparison)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = []
    for r in comparison.records:
        cells = []
        for c in shown:
            css = "num" if c in _FORMATS else (f"status-{r.get('status')}" if c == "status" else "")
            title = f' title="{html.escape(str(r.get(c)))}"' if c in ("run", "error") and r.get(c) else ""
            cells.append(f'<td class="{css}"{title}>{html.escape(_display_cell(r, c, 60))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="compare"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def write_dashboard(paths: Sequence[str | Path], out: str | Path, title: str = "vrmoe runs",
                    sort: str | None = None, filters: Sequence[str] = ()) -> tuple[Path, int]:
    """Write the HTML report; return its path and the number of plots in it."""
    comparison = compare(paths, sort=sort, filters=filters)
    figures = dashboard_figures(comparison.runs)
    parts, nav = [], []
    for i, (kind, caption, fig) in enumerate(figures):
        anchor = f"fig{i}"
        nav.append(f'<a href="#{anchor}">{html.escape(caption)}</a>')
        # plotly.js goes inline once, with the first figure: the file then needs no network.
        parts.append(f'<section class="figure" id="{anchor}" data-kind="{kind}">'
                     f"{_figure_html(fig, include_plotlyjs=i == 0)}</section>")
    if not figures:
        parts.append('<p class="note">These runs have no curves or evaluation records to plot yet.</p>')
    page = _PAGE.format(title=html.escape(title), n_runs=len(comparison.records),
                        generated=datetime.now().strftime("%Y-%m-%d %H:%M"),
                        sources=html.escape(", ".join(str(p) for p in paths)),
                        table=_html_table(comparison), nav=f"<nav>{' '.join(nav)}</nav>" if nav else "",
                        figures="\n".join(parts))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(page, encoding="utf-8")
    return out, len(figures)


# ---------------------------------------------------------------------------
# Command lines
# ---------------------------------------------------------------------------

class _Parser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2) like the rest of vrmoe."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")


def _selection_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("dirs", nargs="+", help="run dirs or sweep dirs (searched recursively for summary.json)")
    parser.add_argument("--sort", metavar="KEY", help="sort by a column, e.g. val_loss or ece")
    parser.add_argument("--reverse", action="store_true", help="sort descending (blanks stay last)")
    parser.add_argument("--filter", metavar="KEY=VALUE", action="append", default=[],
                        help="keep runs whose column or config key equals VALUE (repeatable; all must match)")


def compare_main(argv: list[str]) -> None:
    parser = _Parser(prog="vrmoe compare", description="Runs side by side: the overrides that differ, final "
                     "losses, calibration, OOD AUROC, routing stability, throughput and status.")
    _selection_arguments(parser)
    parser.add_argument("--format", choices=("table", "markdown", "csv", "json"), default="table",
                        help="table (default, for a terminal), markdown, csv or json")
    args = parser.parse_args(argv)
    comparison = compare(args.dirs, sort=args.sort, filters=args.filter, reverse=args.reverse)
    if not comparison.records:
        log_line(f"no run matches {' '.join('--filter ' + f for f in args.filter)}")
    if args.format == "table":
        if comparison.records:
            print_table(comparison)
        return
    sys.stdout.write(render(comparison, args.format))


def dashboard_main(argv: list[str]) -> None:
    parser = _Parser(prog="vrmoe dashboard", description="One self-contained HTML report (opens offline, no "
                     "server): the compare table, loss curves, expert utilisation, routing entropy, reliability "
                     "diagrams, routing stability and OOD score histograms, each where the runs have the data.")
    _selection_arguments(parser)
    parser.add_argument("-o", "--output", default="report.html", help="the HTML file to write (report.html)")
    parser.add_argument("--title", default="vrmoe runs", help="the page title")
    args = parser.parse_args(argv)
    out, n_plots = write_dashboard(args.dirs, args.output, title=args.title, sort=args.sort, filters=args.filter)
    log_line(f"wrote {out} ({n_plots} plots, {out.stat().st_size / 1e6:.1f} MB)")


__all__ = ["compare", "compare_main", "dashboard_main", "find_runs", "load_runs", "render", "write_dashboard"]
