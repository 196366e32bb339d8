"""``vrmoe dashboard``: the compare table and interactive plots of runs in one offline HTML file.

Each figure kind has its own function, taking the runs and their colours and
returning ``(kind, caption, plotly figure)`` for each figure the runs have data
for; :func:`dashboard_figures` concatenates them in page order. plotly.js is
inlined once, so the page opens without a network or a server.
"""

from __future__ import annotations

import html
import math
from datetime import datetime
from pathlib import Path
from typing import Any, Callable, Sequence

from ..config import ConfigError
from ..console import CommandParser, log_line
from ..tracking import atomic_write_text, unwritable_reason
from ..eval import schema
from .compare import (Comparison, add_selection_arguments, compare, display_cell, display_columns,
                      is_numeric_column)
from .runs import Run, differing_overrides

# (kind, caption, plotly figure): kind tags the page section, caption names it in the page's menu.
DashboardFigure = tuple[str, str, Any]
Colours = dict[str, str]  # run label -> line colour, the same in every figure

_DASHES = ["solid", "dash", "dot", "dashdot", "longdash", "longdashdot"]


def run_colours(runs: Sequence[Run]) -> Colours:
    from plotly.colors import qualitative

    palette = qualitative.Plotly
    return {run.label: palette[i % len(palette)] for i, run in enumerate(runs)}


def _layout(fig, title: str, x: str, y: str, height: int = 420, log_x: bool = False):
    fig.update_layout(title=title, height=height, template="plotly_white", margin=dict(l=60, r=20, t=50, b=50),
                      legend=dict(font=dict(size=10)))
    fig.update_xaxes(title_text=x, type="log" if log_x else None)
    fig.update_yaxes(title_text=y)
    return fig


def loss_figures(runs: Sequence[Run], colours: Colours) -> list[DashboardFigure]:
    """Loss curves: training on the left, validation on the right, one colour per run."""
    import plotly.graph_objects as go
    from plotly.subplots import make_subplots

    with_loss = [r for r in runs if any("train/loss" in row for row in r.rows)]
    if not with_loss:
        return []
    fig = make_subplots(rows=1, cols=2, subplot_titles=("train loss", "validation loss"))
    for run in with_loss:
        train_pts = [(row["step"], row["train/loss"]) for row in run.rows if row.get("train/loss") is not None]
        val_pts = [(row["step"], row["val/loss"]) for row in run.rows if row.get("val/loss") is not None]
        for col, pts, mode in ((1, train_pts, "lines"), (2, val_pts, "lines+markers")):
            if pts:
                xs, ys = zip(*pts)
                fig.add_trace(go.Scatter(x=xs, y=ys, mode=mode, name=run.label, legendgroup=run.label,
                                         showlegend=col == 1, line=dict(color=colours[run.label])),
                              row=1, col=col)
    return [("loss", "Loss curves", _layout(fig, "Loss (nats/token)", "step", "loss"))]


def utilisation_figures(runs: Sequence[Run], colours: Colours) -> list[DashboardFigure]:
    """Expert utilisation at the last logged step: one layer x expert heatmap per run,
    coloured around the uniform share 1/E so over- and under-used experts stand out."""
    import plotly.graph_objects as go

    from ..plots import last_utilisation

    figures: list[DashboardFigure] = []
    shares = [(run, util) for run in runs if (util := last_utilisation(run.rows)) is not None]
    # One colour scale for every run, so equal colours mean equal shares: centred on the uniform
    # share 1/E when the runs share E, from 0 to the largest share otherwise.
    uniforms = {1.0 / util_LE.shape[1] for _, (_, util_LE) in shares}
    if len(uniforms) == 1:
        uniform = uniforms.pop()
        spread = max([float(abs(util_LE - uniform).max()) for _, (_, util_LE) in shares] + [1e-6])
        zmin, zmax = uniform - spread, uniform + spread
    else:
        zmin, zmax = 0.0, max(float(util_LE.max()) for _, (_, util_LE) in shares)
    for run, (layers, util_LE) in shares:
        uniform = 1.0 / util_LE.shape[1]
        fig = go.Figure(go.Heatmap(z=util_LE.tolist(), x=[str(e) for e in range(util_LE.shape[1])], y=layers,
                                   colorscale="RdBu_r", zmin=zmin, zmax=zmax,
                                   colorbar=dict(title="share"), text=[[f"{v:.3f}" for v in row] for row in util_LE],
                                   texttemplate="%{text}", hovertemplate="%{y} expert %{x}: %{z:.4f}<extra></extra>"))
        fig.update_yaxes(autorange="reversed")  # first layer on top, as in the PNG
        step = next((row.get("step") for row in reversed(run.rows) if row.get("moe")), None)
        figures.append(("utilisation", f"Expert utilisation: {run.label}",
                        _layout(fig, f"Expert utilisation, {run.label} (step {step}; uniform {uniform:.3f})",
                                "expert", "layer", height=max(260, 60 * len(layers) + 160))))
    return figures


def entropy_figures(runs: Sequence[Run], colours: Colours) -> list[DashboardFigure]:
    """Routing entropy over training: one colour per run, one dash per layer."""
    import plotly.graph_objects as go

    from ..plots import moe_series

    traces = []
    for run in runs:
        steps, series = moe_series(run.rows, "entropy")
        for i, (layer, values) in enumerate(series.items()):
            traces.append(go.Scatter(x=steps, y=values, mode="lines", name=f"{run.label} {layer}",
                                     legendgroup=run.label,
                                     line=dict(color=colours[run.label], dash=_DASHES[i % len(_DASHES)])))
    if not traces:
        return []
    return [("entropy", "Routing entropy", _layout(go.Figure(traces), "Routing entropy per layer", "step", "nats"))]


def reliability_figures(runs: Sequence[Run], colours: Colours) -> list[DashboardFigure]:
    """Reliability diagrams: every run's bins on one diagonal, one figure per calibration task."""
    import plotly.graph_objects as go

    figures: list[DashboardFigure] = []
    for task in schema.CALIBRATION_TASKS:
        bins_by_run = [(run, bins) for run in runs if (bins := schema.reliability_bins(run.evaluation, task))]
        if not bins_by_run:
            continue
        fig = go.Figure(go.Scatter(x=[0, 1], y=[0, 1], mode="lines", name="perfect calibration",
                                   line=dict(color="grey", dash="dash")))
        for run, bins in bins_by_run:
            filled = [(c, a, n) for c, a, n in zip(*bins) if n and c is not None and a is not None]
            if not filled:
                continue
            conf, acc, count = zip(*filled)
            ece = schema.calibration_number(run.evaluation, task, "ece_10")
            name = run.label + (f" (ECE {ece:.3f})" if ece is not None else "")
            fig.add_trace(go.Scatter(x=conf, y=acc, mode="lines+markers", name=name, customdata=count,
                                     hovertemplate="confidence %{x:.3f}<br>accuracy %{y:.3f}<br>n=%{customdata}",
                                     line=dict(color=colours[run.label])))
        fig.update_xaxes(range=[0, 1])
        fig.update_yaxes(range=[0, 1])
        figures.append(("reliability", f"Reliability: {task}",
                        _layout(fig, f"Reliability diagram ({task.replace('_', ' ')})", "confidence", "accuracy")))
    return figures


def stability_figures(runs: Sequence[Run], colours: Colours) -> list[DashboardFigure]:
    """Routing stability: mean Jaccard of the Top-K sets against the embedding-noise scale."""
    import plotly.graph_objects as go

    curves = []
    for run in runs:
        gammas, jaccard = schema.jaccard_curve(run.evaluation)
        if isinstance(jaccard.get("mean"), list):
            curves.append((run, gammas, jaccard["mean"]))
    if not curves:
        return []
    fig = go.Figure()
    for run, gammas, mean in curves:
        fig.add_trace(go.Scatter(x=gammas, y=mean, mode="lines+markers", name=run.label,
                                 line=dict(color=colours[run.label])))
    fig.update_yaxes(range=[0, 1.02])
    return [("jaccard", "Routing stability",
             _layout(fig, "Jaccard of Top-K sets under embedding noise (mean over layers)", "gamma", "Jaccard",
                     log_x=True))]


def _finite_scores_by_score(evaluation: dict[str, Any] | None) -> dict[str, dict[str, list[float]]]:
    """eval.json's OOD scores ({set: {score: values}}, the in-distribution set being ``in``)
    turned around to {score: {set: finite values}}: one figure per score compares the sets."""
    out: dict[str, dict[str, list[float]]] = {}
    for ood_set, by_score in schema.ood_scores(evaluation).items():
        for score, values in (by_score.items() if isinstance(by_score, dict) else ()):
            finite = [v for v in map(schema.number, values or []) if v is not None and math.isfinite(v)]
            if finite:
                out.setdefault(score, {})[ood_set] = finite
    return out


def ood_figures(runs: Sequence[Run], colours: Colours) -> list[DashboardFigure]:
    """OOD scores: per run, histograms of each set for one score; a menu switches the score."""
    import plotly.graph_objects as go

    figures: list[DashboardFigure] = []
    for run in runs:
        scores = _finite_scores_by_score(run.evaluation)
        if not scores:
            continue
        fig = go.Figure()
        owners = []
        for s_i, (score, by_set) in enumerate(scores.items()):
            # One set of bin edges per score, so the overlaid sets compare bin by bin.
            lo = min(min(v) for v in by_set.values())
            hi = max(max(v) for v in by_set.values())
            xbins = dict(start=lo, end=hi, size=(hi - lo) / 30 if hi > lo else 1.0)
            for ood_set, values in by_set.items():
                fig.add_trace(go.Histogram(x=values, name=ood_set, opacity=0.55, histnorm="probability density",
                                           xbins=xbins, visible=s_i == 0, legendgroup=ood_set))
                owners.append(score)
        names = list(scores)
        if len(names) > 1:
            fig.update_layout(updatemenus=[dict(buttons=[
                dict(label=name, method="update", args=[{"visible": [o == name for o in owners]},
                                                        {"xaxis.title.text": name}])
                for name in names], x=0.5, xanchor="center", y=1.12, yanchor="bottom")])
        fig.update_layout(barmode="overlay")
        figures.append(("ood", f"OOD scores: {run.label}", _layout(fig, f"OOD scores, {run.label}", names[0],
                                                                     "density")))
    return figures


# The page's figures, in page order.
FIGURE_MAKERS: tuple[Callable[[Sequence[Run], Colours], list[DashboardFigure]], ...] = (
    loss_figures, utilisation_figures, entropy_figures, reliability_figures, stability_figures, ood_figures)


def dashboard_figures(runs: Sequence[Run]) -> list[DashboardFigure]:
    """(kind, caption, plotly figure) for every plot the runs have data for."""
    colours = run_colours(runs)
    return [figure for make in FIGURE_MAKERS for figure in make(runs, colours)]


# ---------------------------------------------------------------------------
# The page
# ---------------------------------------------------------------------------

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


def html_table(comparison: Comparison) -> str:
    """The compare table as an HTML table (id="compare")."""
    shown = display_columns(comparison)
    head = "".join(f"<th>{html.escape(c)}</th>" for c in shown)
    body = []
    for r in comparison.records:
        cells = []
        for c in shown:
            css = "num" if is_numeric_column(c) else (f"status-{r.get('status')}" if c == "status" else "")
            title = f' title="{html.escape(str(r.get(c)))}"' if c in ("run", "error") and r.get(c) else ""
            cells.append(f'<td class="{css}"{title}>{html.escape(display_cell(r, c, 60))}</td>')
        body.append("<tr>" + "".join(cells) + "</tr>")
    return f'<table id="compare"><thead><tr>{head}</tr></thead><tbody>{"".join(body)}</tbody></table>'


def _figure_html(fig, include_plotlyjs: bool) -> str:
    import plotly.io as pio

    return pio.to_html(fig, full_html=False, include_plotlyjs=include_plotlyjs,
                       config={"displaylogo": False, "responsive": True})


def label_by_differences(comparison: Comparison) -> None:
    """Name each run, in the legends and the table, by the overrides that differ between the runs
    (``router=variational, beta=0.1``) when those tell every run apart; by its path otherwise."""
    labels = differing_overrides(comparison.runs)
    if len(labels) < 2 or not all(labels) or len(set(labels)) != len(labels):
        return
    for run, record, label in zip(comparison.runs, comparison.records, labels):
        run.label = record["run"] = label


def write_dashboard(paths: Sequence[str | Path], out: str | Path, title: str = "vrmoe runs",
                    sort: str | None = None, filters: Sequence[str] = ()) -> tuple[Path, int]:
    """Write the HTML report; return its path and the number of plots in it."""
    comparison = compare(paths, sort=sort, filters=filters)
    label_by_differences(comparison)
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
                        table=html_table(comparison), nav=f"<nav>{' '.join(nav)}</nav>" if nav else "",
                        figures="\n".join(parts))
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(out, page)
    return out, len(figures)


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="vrmoe dashboard", description="One self-contained HTML report (opens offline, no "
                           "server): the compare table, loss curves, expert utilisation, routing entropy, reliability "
                           "diagrams, routing stability and OOD score histograms, each where the runs have the data.")
    add_selection_arguments(parser)
    parser.add_argument("-o", "--output", default="report.html", help="the HTML file to write (report.html)")
    parser.add_argument("--title", default="vrmoe runs", help="the page title")
    args = parser.parse_args(argv)
    if Path(args.output).is_dir():
        raise ConfigError(f"-o {args.output} is a directory; give a file name, e.g. -o {Path(args.output) / 'report.html'}")
    if Path(args.output).suffix.lower() not in (".html", ".htm"):  # never a run's summary.json or checkpoint.pt
        raise ConfigError(f"-o {args.output}: the report is an HTML page; give a name ending in .html, "
                          f"e.g. -o {Path(args.output).with_suffix('.html')}")
    if reason := unwritable_reason(Path(args.output).expanduser().resolve().parent):
        raise ConfigError(f"-o {args.output} cannot be written ({reason}); choose a writable place")
    out, n_plots = write_dashboard(args.dirs, args.output, title=args.title, sort=args.sort, filters=args.filter)
    log_line(f"wrote {out} ({n_plots} plots, {out.stat().st_size / 1e6:.1f} MB)")


__all__ = ["DashboardFigure", "run_colours", "loss_figures", "utilisation_figures", "entropy_figures",
           "reliability_figures", "stability_figures", "ood_figures", "FIGURE_MAKERS", "dashboard_figures",
           "html_table", "write_dashboard", "main"]
