"""Static PNG figures for a run dir (matplotlib, Agg backend: no display needed).

Every function takes plain numbers (lists or arrays), writes one PNG to ``path``
and returns that path, so the evaluation code, the end-of-training hook and the
W&B image logger all share the same figures.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import matplotlib

matplotlib.use("Agg")  # headless: runs on servers and inside test processes

import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

UTILISATION_PNG = "utilisation.png"
ENTROPY_PNG = "routing_entropy.png"
LOSS_PNG = "loss.png"


def _save(fig, path: str | Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)  # figures are never shown; closing keeps long sweeps from leaking memory
    return path


def reliability_diagram(bin_confidence: Sequence[float], bin_accuracy: Sequence[float],
                        bin_count: Sequence[float], path: str | Path, title: str = "Reliability") -> Path:
    """Accuracy against confidence per equal-width bin, the diagonal being perfect calibration.

    Empty bins (count 0) are left out rather than drawn at zero accuracy; the
    lower panel shows how many predictions each bin holds, since the ECE weighs
    each bin's gap by that share."""
    conf_B = np.asarray(bin_confidence, dtype=float)
    acc_B = np.asarray(bin_accuracy, dtype=float)
    count_B = np.asarray(bin_count, dtype=float)
    n_bins = len(count_B)
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    centres_B = (edges[:-1] + edges[1:]) / 2
    width = 1.0 / max(n_bins, 1)
    filled = count_B > 0
    share_B = count_B / max(count_B.sum(), 1.0)
    ece = float(np.sum(share_B[filled] * np.abs(acc_B[filled] - conf_B[filled])))

    fig, (ax, ax_count) = plt.subplots(2, 1, figsize=(4.5, 5.2), sharex=True,
                                       gridspec_kw={"height_ratios": [3, 1]})
    ax.plot([0, 1], [0, 1], "--", color="grey", lw=1, label="perfect calibration")
    ax.bar(centres_B[filled], acc_B[filled], width=width * 0.95, color="#4c72b0", edgecolor="white",
           label="accuracy")
    # The gap to each bin's mean confidence is what the ECE sums.
    ax.bar(centres_B[filled], conf_B[filled] - acc_B[filled], bottom=acc_B[filled], width=width * 0.95,
           color="#dd8452", alpha=0.45, edgecolor="#dd8452", label="gap to confidence")
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_title(f"{title} (ECE {ece:.3f})")
    ax.legend(loc="upper left", fontsize=8)
    ax_count.bar(centres_B, share_B, width=width * 0.95, color="#55a868")
    ax_count.set_xlabel("confidence")
    ax_count.set_ylabel("share")
    return _save(fig, path)


def jaccard_plot(gammas: Sequence[float], jaccard_by_layer: Mapping[str, Sequence[float]],
                 path: str | Path, title: str = "Routing stability under embedding noise") -> Path:
    """Jaccard index of the Top-K sets (clean vs noisy input) against the noise scale gamma.

    gamma spans decades (0.001 to 0.05), hence the log axis; the per-layer
    curves are thin and the layer mean, when given as ``mean``, is bold."""
    fig, ax = plt.subplots(figsize=(5, 3.6))
    for name, values in jaccard_by_layer.items():
        bold = name == "mean"
        ax.plot(list(gammas), list(values), marker="o", ms=4 if bold else 3, lw=2.2 if bold else 1,
                alpha=1.0 if bold else 0.7, label=name, color="black" if bold else None)
    ax.set_xscale("log")
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("gamma (noise std / mean embedding norm)")
    ax.set_ylabel("Jaccard of Top-K sets")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, ncol=2)
    return _save(fig, path)


def interval_curves(xs: Sequence[Any], series: Mapping[str, Sequence[tuple[float, float, float] | None]],
                    path: str | Path, title: str, xlabel: str, ylabel: str, log_x: bool = False) -> Path:
    """One line per series through its estimates, with its 95% intervals as error bars
    (``(estimate, low, high)`` per x; None leaves the point out). Categorical x values (strings)
    are spaced evenly; series are nudged sideways so their bars do not hide each other."""
    fig, ax = plt.subplots(figsize=(5.2, 3.6))
    categorical = any(isinstance(x, str) for x in xs)
    positions = list(range(len(xs))) if categorical else [float(x) for x in xs]
    for i, (name, points) in enumerate(series.items()):
        kept = [(x, p) for x, p in zip(positions, points) if p is not None]
        if not kept:
            continue
        shift = (i - (len(series) - 1) / 2) * 0.06
        x = [(xv * (1 + shift) if log_x else xv + shift) for xv, _ in kept]
        est = [p[0] for _, p in kept]
        # An interval need not contain its estimate (a skewed resampling distribution), so a bar may
        # only reach the point.
        err = [[max(0.0, p[0] - p[1]) for _, p in kept], [max(0.0, p[2] - p[0]) for _, p in kept]]
        ax.errorbar(x, est, yerr=err, marker="o", ms=4, capsize=3, lw=1.4, label=name)
    if log_x:
        ax.set_xscale("log")
    if categorical:
        ax.set_xticks(positions, [str(x) for x in xs])
    elif not log_x:
        ax.set_xticks(positions)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def difference_forest(panels: Mapping[str, Sequence[tuple[str, tuple[float, float, float] | None]]],
                      path: str | Path, title: str, xlabel: str) -> Path:
    """Paired differences with their 95% intervals, one row per method and one panel per
    comparison (``title -> [(row label, (estimate, low, high) or None)]``); a dotted line at 0,
    filled markers where the interval excludes it."""
    ncols = min(2, len(panels))
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, squeeze=False,
                             figsize=(5.6 * ncols, nrows * (0.28 * max(map(len, panels.values())) + 1.1) + 0.5))
    for ax, (name, rows) in zip(axes.flat, panels.items()):
        labels = [label for label, _ in rows]
        for y, (_, point) in enumerate(rows):
            if point is None:
                continue
            est, low, high = point
            effect = low > 0 or high < 0
            ax.errorbar([est], [y], xerr=[[max(0.0, est - low)], [max(0.0, high - est)]], fmt="o", ms=4,
                        capsize=3, color="C3" if effect and est > 0 else "C2" if effect else "0.45",
                        mfc=None if effect else "white")
        ax.axvline(0.0, color="0.3", lw=0.8, ls=":")
        ax.set_yticks(range(len(rows)), labels, fontsize=7)
        ax.invert_yaxis()
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(xlabel)
        ax.grid(alpha=0.3, axis="x")
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    fig.suptitle(title, fontsize=10)
    return _save(fig, path)


def utilisation_heatmap(util_LE: Any, layer_names: Sequence[str], path: str | Path,
                        title: str = "Expert utilisation") -> Path:
    """Share of token slots each expert received, one row per MoE layer.

    The colour scale is centred on the uniform share 1/E (white), so an
    overloaded expert reads red and a starved one blue at any expert count."""
    util = np.asarray(util_LE, dtype=float)
    if util.ndim == 1:
        util = util[None, :]
    n_layers, n_experts = util.shape
    uniform = 1.0 / max(n_experts, 1)
    spread = max(float(np.nanmax(np.abs(util - uniform))) if util.size else 0.0, 1e-6)
    fig, ax = plt.subplots(figsize=(max(3.5, 0.45 * n_experts + 2), max(2.2, 0.45 * n_layers + 1.4)))
    image = ax.imshow(util, cmap="RdBu_r", vmin=uniform - spread, vmax=uniform + spread, aspect="auto")
    ax.set_xticks(range(n_experts))
    ax.set_yticks(range(n_layers))
    ax.set_yticklabels(list(layer_names))
    ax.set_xlabel("expert")
    if n_experts * n_layers <= 128:  # annotate only while the numbers stay legible
        for i in range(n_layers):
            for j in range(n_experts):
                ax.text(j, i, f"{util[i, j]:.2f}", ha="center", va="center", fontsize=7)
    fig.colorbar(image, ax=ax, label=f"share (uniform {uniform:.3f})")
    ax.set_title(title)
    return _save(fig, path)


def entropy_curve(steps: Sequence[int], entropy_by_layer: Mapping[str, Sequence[float]], path: str | Path,
                  n_experts: int | None = None, title: str = "Routing entropy") -> Path:
    """Mean per-token entropy of the routing distribution over training, per layer.

    With ``n_experts`` the ceiling log(E) (a uniform router) is drawn for scale."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, values in entropy_by_layer.items():
        ax.plot(list(steps)[: len(values)], list(values), lw=1.4, label=name)
    if n_experts:
        ax.axhline(float(np.log(n_experts)), color="grey", ls="--", lw=1, label=f"log E = {np.log(n_experts):.2f}")
    ax.set_xlabel("step")
    ax.set_ylabel("entropy (nats)")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7)
    return _save(fig, path)


def loss_curves(curves: Mapping[str, tuple[Sequence[int], Sequence[float]]], path: str | Path,
                title: str = "Loss", reference: float | None = None, reference_label: str = "") -> Path:
    """Named (steps, values) curves on one axis, e.g. train and validation loss.

    ``reference`` draws a horizontal line such as the corpus's unigram entropy,
    the loss a model with no context would reach."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    for name, (steps, values) in curves.items():
        if len(values):
            ax.plot(list(steps), list(values), lw=1.4, marker="o" if len(values) <= 20 else None, ms=3,
                    label=name)
    if reference is not None:
        ax.axhline(reference, color="grey", ls="--", lw=1, label=reference_label or None)
    ax.set_xlabel("step")
    ax.set_ylabel("nats / token")
    ax.set_title(title)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return _save(fig, path)


def score_histograms(scores: Mapping[str, Sequence[float]], path: str | Path, title: str = "OOD scores") -> Path:
    """Overlaid histograms of one score on several datasets (in-distribution vs OOD)."""
    fig, ax = plt.subplots(figsize=(5, 3.4))
    finite = [np.asarray(v, dtype=float) for v in scores.values() if len(v)]
    finite = [v[np.isfinite(v)] for v in finite]
    all_values = np.concatenate(finite) if finite else np.zeros(1)
    bins = np.histogram_bin_edges(all_values, bins=30)  # shared edges so the histograms compare bin by bin
    for name, values in scores.items():
        values = np.asarray(values, dtype=float)
        ax.hist(values[np.isfinite(values)], bins=bins, alpha=0.5, density=True, label=name)
    ax.set_xlabel("score")
    ax.set_ylabel("density")
    ax.set_title(title)
    ax.legend(fontsize=8)
    return _save(fig, path)


# ---------------------------------------------------------------------------
# From a run's records
# ---------------------------------------------------------------------------

def moe_series(rows: Sequence[Mapping[str, Any]], stat: str) -> tuple[list[int], dict[str, list[float]]]:
    """Steps and, per MoE layer, the value of one router statistic at those steps.

    Every row that has the statistic for some layer gives a step; a layer
    without it in that row gets NaN there (a gap in the curve), so all curves
    share the steps."""
    layers = sorted({name for r in rows for name, s in (r.get("moe") or {}).items()
                     if isinstance(s, Mapping) and stat in s}, key=_layer_order)
    steps: list[int] = []
    series: dict[str, list[float]] = {name: [] for name in layers}
    for row in rows:
        moe = row.get("moe") or {}
        if not any(stat in (moe.get(name) or {}) for name in layers):
            continue
        steps.append(int(row.get("step", len(steps))))
        for name in layers:
            value = (moe.get(name) or {}).get(stat)
            series[name].append(float("nan") if value is None else float(value))
    return steps, series


def last_utilisation(rows: Sequence[Mapping[str, Any]]) -> tuple[list[str], np.ndarray] | None:
    """Per-layer utilisation from the last logged row that has it: (layer names, L x E array)."""
    for row in reversed(rows):
        moe = row.get("moe") or {}
        layers = sorted((n for n, s in moe.items() if isinstance(s, dict) and "utilisation" in s), key=_layer_order)
        if layers:
            return layers, np.asarray([moe[n]["utilisation"] for n in layers], dtype=float)
    return None


def _layer_order(name: str) -> tuple[int, str]:
    digits = "".join(ch for ch in name if ch.isdigit())
    return (int(digits) if digits else -1, name)


def write_run_plots(run_dir: str | Path, rows: Sequence[Mapping[str, Any]] | None = None,
                    n_experts: int | None = None, logger: Any = None, step: int | None = None) -> list[Path]:
    """The end-of-training figures of a run dir: utilisation heatmap, routing entropy, loss.

    Reads metrics.jsonl unless ``rows`` are given, writes the figures the
    records support and returns their paths; a logger that records images gets
    them too. A figure that cannot be drawn warns instead of failing the run
    whose records it summarises, and the others are still drawn."""
    from .tracking import read_metrics

    run_dir = Path(run_dir)
    if rows is None:
        rows, _ = read_metrics(run_dir)

    def utilisation() -> Path | None:
        util = last_utilisation(rows)
        if util is None:
            return None
        at = next((r.get("step") for r in reversed(rows) if r.get("moe")), None)
        return utilisation_heatmap(util[1], util[0], run_dir / UTILISATION_PNG,
                                   title=f"Expert utilisation (step {at})")

    def entropy() -> Path | None:
        steps, series = moe_series(rows, "entropy")
        return entropy_curve(steps, series, run_dir / ENTROPY_PNG, n_experts=n_experts) if steps else None

    def loss() -> Path | None:
        curves = {}
        for name, key in (("train", "train/loss"), ("validation", "val/loss")):
            points = [(r["step"], r[key]) for r in rows if r.get(key) is not None]
            if points:
                curves[name] = tuple(zip(*points))
        return loss_curves(curves, run_dir / LOSS_PNG) if curves else None

    written: list[Path] = []
    for draw in (utilisation, entropy, loss):
        try:
            path = draw()
        except Exception as exc:
            _warn_not_drawn(exc)
            continue
        if path is not None:
            written.append(path)
    if written and getattr(logger, "records_images", False):
        try:
            logger.log_images({f"plots/{p.stem}": p for p in written}, step=int(step or 0))
        except Exception as exc:
            _warn_not_drawn(exc)
    return written


def log_utilisation_image(logger: Any, run_dir: str | Path, moe_stats: Mapping[str, Mapping[str, Any]],
                          step: int) -> Path | None:
    """At an evaluation: the current layer x expert utilisation as an image for a logger
    that records images (W&B); nothing is drawn for one that does not."""
    if not getattr(logger, "records_images", False) or not moe_stats:
        return None
    try:
        util = last_utilisation([{"moe": moe_stats}])
        if util is None:
            return None
        layers, util_LE = util
        path = utilisation_heatmap(util_LE, layers, Path(run_dir) / UTILISATION_PNG,
                                   title=f"Expert utilisation (step {step})")
        logger.log_images({"moe/utilisation_heatmap": path}, step=step)
        return path
    except Exception as exc:
        _warn_not_drawn(exc)
        return None


def _warn_not_drawn(exc: Exception) -> None:
    import warnings

    warnings.warn(f"a figure could not be drawn ({type(exc).__name__}: {exc}); the run's records are intact",
                  stacklevel=3)
