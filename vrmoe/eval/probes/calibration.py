"""Calibration: accuracy, NLL, Brier, ECE (10 and 15 bins), MCE and reliability bins, for the
next token and for the 4-way multiple-choice task built from held-out text."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

from ... import metrics
from ...console import console
from ..schema import CALIBRATION_TASKS
from .base import Probe, fmt, register_probe

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext

_KIND = {"next_token": "lm", "mcq": "mcq"}
_TITLES = {"next_token": "Next-token prediction", "mcq": "4-way multiple choice"}


@register_probe
class CalibrationProbe(Probe):
    name = "calibration"
    order = 10

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:
        out = {}
        for task in CALIBRATION_TASKS:
            scored = ctx.scored("in", _KIND[task])
            out[task] = metrics.calibration_report(scored.probs_NC, scored.labels_N)
        return out

    def headline(self, block: dict[str, Any]) -> dict[str, Any]:
        return {f"calibration/{task}": {k: v for k, v in report.items() if k != "reliability"}
                for task, report in block.items()}

    def figures(self, block: dict[str, Any], run_dir: Path) -> dict[str, Callable[[], Path]]:
        from ... import plots

        jobs = {}
        for task, report in block.items():
            bins = report["reliability"]
            jobs[f"reliability_{task}"] = lambda b=bins, t=task: plots.reliability_diagram(
                b["bin_confidence"], b["bin_accuracy"], b["bin_count"], run_dir / f"reliability_{t}.png", _TITLES[t])
        return jobs

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title="calibration", title_justify="left")
        columns = ("accuracy", "nll", "brier", "ece_10", "ece_15", "mce")
        for column in ("task", *columns):
            table.add_column(column, justify="left" if column == "task" else "right")
        for task, report in block.items():
            table.add_row(task, *(fmt(report[k]) for k in columns))
        console.print(table)
