"""OOD detection: AUROC and AUPRC per sequence score (in-distribution 0, OOD 1), for the
built-in near and far sets and the user's ``eval.ood_text`` files."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ... import metrics
from ...console import console
from ..schema import PREDICTIONS_KEY, SCORES_KEY
from .base import Probe, fmt, per_item, register_probe

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext


@register_probe
class OODProbe(Probe):
    name = "ood"
    order = 20

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:
        scored = {name: ctx.scored(name, ctx.unit) for name in ctx.set_names()}
        in_scores = scored["in"].scores
        ood: dict[str, Any] = {}
        for name, result in scored.items():
            if name == "in":
                continue
            labels = torch.cat([torch.zeros(len(next(iter(in_scores.values())))),
                                torch.ones(len(next(iter(result.scores.values()))))])
            ood[name] = {"auroc": {}, "auprc": {}}
            for score in in_scores:
                values = torch.cat([in_scores[score], result.scores[score]])
                ood[name]["auroc"][score] = metrics.auroc(values, labels)
                ood[name]["auprc"][score] = metrics.auprc(values, labels)
        ood[SCORES_KEY] = {name: {k: v.tolist() for k, v in r.scores.items()} for name, r in scored.items()}
        if ctx.unit == "mcq":  # per-item predictions of the OOD sets (ensembles are scored from them)
            ood[PREDICTIONS_KEY] = {name: per_item(r.probs_NC) for name, r in scored.items() if name != "in"}
        return ood

    def headline(self, block: dict[str, Any]) -> dict[str, Any]:
        return {f"ood/{name}": values for name, values in block.items() if name not in (SCORES_KEY, PREDICTIONS_KEY)}

    def figures(self, block: dict[str, Any], run_dir: Path) -> dict[str, Callable[[], Path]]:
        from ... import plots

        scores = block[SCORES_KEY]
        jobs = {}
        for score in scores["in"]:
            per_set = {name: values[score] for name, values in scores.items()}
            jobs[f"ood_{score}"] = lambda s=score, p=per_set: plots.score_histograms(
                p, run_dir / f"ood_{s}.png", f"OOD score: {s}")
        return jobs

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        from rich.table import Table

        sets = [name for name in block if name not in (SCORES_KEY, PREDICTIONS_KEY)]
        if not sets:
            return
        score_names = list(block[sets[0]]["auroc"])
        per = "window" if result.get("ood_task") == "lm" else "item"
        table = Table(title=f"OOD AUROC (per {per})", title_justify="left")
        for column in ("set", *score_names):
            table.add_column(column, justify="left" if column == "set" else "right")
        for name in sets:
            table.add_row(name, *(fmt(block[name]["auroc"][s]) for s in score_names))
        console.print(table)
