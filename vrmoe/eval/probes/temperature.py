"""Temperature scaling of every predictive: does a router add anything on top of it?

One scalar T per predictive, fit by NLL on the calibration split's labelled items
(:meth:`~vrmoe.eval.context.EvalContext.temperature`):

* the routing-mean pass: ``softmax(z / T)`` of its option scores ``z`` (its report and
  per-item predictions are the calibration block's ``mcq_ts``, written there first);
* the BMA: ``softmax(log p_bma / T)``, the mean of the S single-sample passes' distributions
  scaled as one (pool, then calibrate), fit on the calibration split's items scored with the same
  S single-sample passes. A router that does not sample (S = 1) is its own BMA.

The block (``temperature_scaling``) holds each predictive's T, the BMA's report after scaling
(``mcq_bma``) and its per-item test predictions, and, for multiple-choice OOD sets
(``eval.ood_task=mcq``), the entropy of each temperature-scaled predictive per item of every set
("in" the test split) with its AUROC: the OOD score temperature scaling changes. Study scripts
compare "router + TS" with "Top-K + TS" from these per-item numbers.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ... import metrics
from ...console import console
from ...stats import apply_temperature
from ..schema import PREDICTIONS_KEY, SCORES_KEY, TS_OOD_KEY
from .base import Probe, fmt, per_item, register_probe

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext


@register_probe
class TemperatureScalingProbe(Probe):
    name = "temperature_scaling"
    order = 50  # last: the probes before it draw exactly the numbers they drew without it

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:
        out: dict[str, Any] = {"temperatures": {}, "fit_items": None}
        fitted = {}
        for predictive in ctx.predictives:
            result = ctx.temperature(predictive)
            out["temperatures"][predictive] = None if result is None else result[0]
            if result is not None:
                fitted[predictive] = result[0]
                out["fit_items"] = result[1]
        test = ctx.scored("in", "mcq").labelled()
        if "bma" in fitted and bool(torch.isfinite(test.scores_of("bma")).all()):
            scaled = apply_temperature(test.scores_of("bma"), fitted["bma"])
            out["mcq_bma"] = metrics.calibration_report(scaled, test.labels_N)
            out[PREDICTIONS_KEY] = {"bma": per_item(scaled)}
        if ctx.unit == "mcq" and fitted:
            scores: dict[str, dict[str, list[float]]] = {}
            for name in ctx.set_names():
                scored = ctx.scored(name, "mcq")
                scores[name] = {p: metrics.entropy(apply_temperature(scored.scores_of(p), t)).tolist()
                                for p, t in fitted.items() if bool(torch.isfinite(scored.scores_of(p)).all())}
            ood = {}
            for name, per_predictive in scores.items():
                if name == "in":
                    continue
                ood[name] = {}
                for predictive, values in per_predictive.items():
                    if predictive in scores["in"]:
                        ood[name][predictive] = metrics.ood_auroc(torch.tensor(scores["in"][predictive]),
                                                                  torch.tensor(values))
            out[TS_OOD_KEY] = ood
            out[SCORES_KEY] = scores
        return out

    def headline(self, block: dict[str, Any]) -> dict[str, Any]:
        head: dict[str, Any] = {"temperature_scaling/temperatures": block["temperatures"]}
        if "mcq_bma" in block:
            head["temperature_scaling/mcq_bma"] = {k: v for k, v in block["mcq_bma"].items() if k != "reliability"}
        if TS_OOD_KEY in block:
            head["temperature_scaling/ood_auroc"] = block[TS_OOD_KEY]
        return head

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        temperatures = ", ".join(f"{p} T = {fmt(t)}" for p, t in block["temperatures"].items())
        line = f"temperature scaling of each predictive: {temperatures} (fit on {block['fit_items']} items)"
        if "mcq_bma" in block:
            report = block["mcq_bma"]
            line += f"; BMA scaled: accuracy {fmt(report['accuracy'])}, NLL {fmt(report['nll'])}, ECE {fmt(report['ece_10'])}"
        console.print(line)
        for name, per_predictive in block.get(TS_OOD_KEY, {}).items():
            console.print(f"  OOD AUROC of the scaled entropy, {name}: "
                          + ", ".join(f"{p} {fmt(v)}" for p, v in per_predictive.items()))
