"""Calibration: accuracy, NLL, Brier, ECE (10 and 15 bins), MCE and reliability bins, for the
next token and for 4-way multiple choice on the test split, for each predictive asked for
(``eval.predictive``), plus the temperature-scaling baseline and the per-item predictions the
study's paired bootstrap and ensembles read.

Reports, by key: ``<task>`` the paper's predictive (one pass, routing averaged over S samples
before Top-K); ``<task>_bma`` the mean of S single-sample passes' predictions (Bayesian model
averaging); ``mcq_ts`` the routing-mean prediction with its option scores divided by one
temperature fit by NLL on the calibration split (the standard post-hoc baseline; the BMA's, and
both after temperature scaling on the OOD sets, are the ``temperature_scaling`` block's).

Every report and the per-item predictions cover the items with an answer only (``labelled()``):
an item its dataset publishes without one is an OOD-score sequence, never a calibration one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ... import metrics
from ...console import console, log_line
from ...stats import apply_temperature
from ..schema import CALIBRATION_TASKS, PREDICTIONS_KEY
from .base import Probe, fmt, per_item, register_probe

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext, ScoredSet

_KIND = {"next_token": "lm", "mcq": "mcq"}
_TITLES = {"next_token": "Next-token prediction", "mcq": "4-way multiple choice"}
_SUFFIX_TITLES = {"": "", "_bma": ", mean of S single-sample passes", "_ts": ", temperature-scaled"}


def _title(report_name: str) -> str:
    for task, title in _TITLES.items():
        if report_name.startswith(task):
            return title + _SUFFIX_TITLES.get(report_name[len(task):], "")
    return report_name


def _bma(scored: "ScoredSet"):
    """The BMA predictive; without single-sample passes (S = 1) the one pass is its own average."""
    return scored.probs_NC if scored.bma_probs_NC is None else scored.bma_probs_NC


@register_probe
class CalibrationProbe(Probe):
    name = "calibration"
    order = 10

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:
        out: dict[str, Any] = {}
        predictives = ctx.predictives
        for task in CALIBRATION_TASKS:
            scored = ctx.scored("in", _KIND[task]).labelled()
            if "routing_mean" in predictives:
                out[task] = metrics.calibration_report(scored.probs_NC, scored.labels_N)
            if "bma" in predictives:
                out[f"{task}_bma"] = metrics.calibration_report(_bma(scored), scored.labels_N)
        test = ctx.scored("in", "mcq").labelled()
        predictions = {"labels": test.labels_N.tolist(), "routing_mean": per_item(test.probs_NC)}
        fitted = ctx.temperature("routing_mean")
        if fitted is not None and bool(torch.isfinite(test.logits_NC).all()):
            temperature, fit_items = fitted
            scaled = apply_temperature(test.logits_NC, temperature)
            out["mcq_ts"] = {**metrics.calibration_report(scaled, test.labels_N), "temperature": temperature,
                             "fit_items": fit_items}
            predictions["ts"] = per_item(scaled)
        else:  # an option score of -inf (a token the model gives probability 0) has no finite temperature
            log_line("[yellow]warning:[/] temperature scaling skipped: some option scores are not finite")
        if "bma" in predictives:
            predictions["bma"] = per_item(_bma(test))
        out[PREDICTIONS_KEY] = {"mcq": predictions}
        return out

    def headline(self, block: dict[str, Any]) -> dict[str, Any]:
        return {f"calibration/{name}": {k: v for k, v in report.items() if k != "reliability"}
                for name, report in block.items() if name != PREDICTIONS_KEY}

    def figures(self, block: dict[str, Any], run_dir: Path) -> dict[str, Callable[[], Path]]:
        from ... import plots

        jobs = {}
        for name, report in block.items():
            if name == PREDICTIONS_KEY:
                continue
            bins = report["reliability"]
            jobs[f"reliability_{name}"] = lambda b=bins, n=name: plots.reliability_diagram(
                b["bin_confidence"], b["bin_accuracy"], b["bin_count"], run_dir / f"reliability_{n}.png", _title(n))
        return jobs

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title="calibration (test split)", title_justify="left")
        columns = ("accuracy", "nll", "brier", "ece_10", "ece_15", "mce")
        for column in ("predictive", *columns):
            table.add_column(column, justify="left" if column == "predictive" else "right")
        for name, report in block.items():
            if name != PREDICTIONS_KEY:
                table.add_row(name, *(fmt(report[k]) for k in columns))
        console.print(table)
        if "mcq_ts" in block:
            console.print(f"temperature scaling: T = {block['mcq_ts']['temperature']:.3f}, fit on "
                          f"{block['mcq_ts']['fit_items']} calibration-split items")
