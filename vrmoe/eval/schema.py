"""The ``eval.json`` schema, defined once: its blocks, and how every reader takes numbers out.

``vrmoe eval`` writes one JSON object per run::

    {"run", "router", "router_config", "S", "K", "task", "ood_task", "step", "seed",
     "items": {"prompt_len": n, "sets": {SET: {"items", "unlabelled", "too_long"}}},  # "in", "calibration", OOD
               # (calibration also "skipped_trained_on": its first items, which post-hoc heads trained on)
     "calibration": {"next_token": REPORT, "mcq": REPORT,        # metrics.calibration_report: routing mean
                     "next_token_bma": REPORT, "mcq_bma": REPORT,  # mean of S single-sample passes
                     "mcq_ts": REPORT + {"temperature", "fit_items"},  # temperature scaling
                     "predictions": {"mcq": {"labels": [...], "routing_mean": [[p]], "bma": ..., "ts": ...}}},
     "ood": {SET: {"auroc": {SCORE: x}, "auprc": {SCORE: x}}, ..., "scores": {SET: {SCORE: [...]}},
             "predictions": {SET: [[p]]}},                  # multiple-choice runs: OOD items' predictions
     "stability": {"gammas": [...], "embedding_norm": x, "jaccard": {LAYER: [...], "mean": [...]},
                   "jaccard_unmatched": {...}},
     "posterior": {"tokens": n, "draws": d, "layers": {LAYER: {"flip_rate": x, "sample_jaccard": x,
                   "sigma_mean": x, "gap_mean": x, "sd_gap_mean": x, "z_median": x, "eval_vs_mean_flip": x,
                   "flip_rate_by_z": {"edges": [...], "flip_rate": [...], "count": [...]}}},
                   "deterministic_layers": [...], "note": "..."},  # variational-only keys: sigma_mean .. by_z
     "cost": {"flops_per_token": {...}, "router_share": x, "router_overhead_vs_topk": x, "tokens_per_s": x},
     "temperature_scaling": {"temperatures": {"routing_mean": T, "bma": T}, "fit_items": n,
                             "mcq_bma": REPORT, "predictions": {"bma": [[p]]},  # the BMA after scaling
                             "ood": {SET: {"routing_mean": auroc, "bma": auroc}},  # scaled entropy, mcq OOD sets
                             "scores": {SET: {"routing_mean": [...], "bma": [...]}}},  # "in" included
     "wall_time_s": x}

The routing mean after temperature scaling is ``calibration.mcq_ts`` (and ``predictions.mcq.ts``);
the ``temperature_scaling`` block adds the BMA's and the scaled OOD scores (absent from an
eval.json written before it existed: every reader below returns None or {} then).

Each block is written by the probe of the same name (``vrmoe.eval.probes``). ``vrmoe
compare``, the dashboard, the W&B mirror, the sweep objective and ``experiments/`` read
the file through the functions below, never by spelling the keys themselves.
"""

from __future__ import annotations

import math
from typing import Any, Callable

# The noise scale the paper quotes routing stability at.
JACCARD_GAMMA = 0.01
CALIBRATION_TASKS = ("next_token", "mcq")
SCORES_KEY = "scores"  # inside the ood block: per-sequence scores of every set
PREDICTIONS_KEY = "predictions"  # inside the calibration block: per-item test-split predictions
PREDICTIVES = {"routing_mean": "", "bma": "_bma", "ts": "_ts"}  # predictive -> calibration report suffix
TS_KEY = "temperature_scaling"  # the block of temperature scaling beyond calibration.mcq_ts
TS_OOD_KEY = "ood"  # inside it: AUROC of each scaled predictive's entropy per OOD set
# The temperature-scaled predictives: name -> (predictive scaled, where its numbers are)
SCALED = {"ts": "routing_mean", "bma_ts": "bma"}
ITEM_SETS_KEY = "sets"  # inside the items block: per multiple-choice set, its counts


def dig(data: Any, *keys: str) -> Any:
    for key in keys:
        if not isinstance(data, dict) or key not in data:
            return None
        data = data[key]
    return data


def number(value: Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) and not isinstance(value, bool) else None


def calibration(result: dict[str, Any] | None, task: str) -> dict[str, Any] | None:
    """One calibration report (accuracy, nll, brier, ece_10, ece_15, mce, reliability)."""
    return dig(result, "calibration", task)


def calibration_number(result: dict[str, Any] | None, task: str, key: str,
                       predictive: str = "routing_mean") -> float | None:
    """One number of a calibration report: accuracy, nll, brier, ece_10, ece_15 or mce, of one
    predictive (routing_mean, bma, ts = routing mean after temperature scaling, bma_ts = the BMA
    after temperature scaling)."""
    if predictive == "bma_ts":
        return number(dig(result, TS_KEY, f"{task}_bma", key))
    return number(dig(calibration(result, task + PREDICTIVES[predictive]), key))


def temperature(result: dict[str, Any] | None, predictive: str = "routing_mean") -> float | None:
    """The temperature fit on the calibration split for ``predictive`` (routing_mean or bma)."""
    if predictive == "routing_mean" and (t := number(dig(calibration(result, "mcq_ts"), "temperature"))) is not None:
        return t
    return number(dig(result, TS_KEY, "temperatures", predictive))


def scaled_ood_scores(result: dict[str, Any] | None) -> dict[str, dict[str, list[float]]]:
    """Per-item entropy of each temperature-scaled predictive: set -> ts | bma_ts -> values ("in" is
    the test split); empty without multiple-choice OOD sets or for an older eval.json."""
    block = dig(result, TS_KEY, SCORES_KEY)
    if not isinstance(block, dict):
        return {}
    names = {source: name for name, source in SCALED.items()}
    return {name: {names[p]: v for p, v in values.items() if p in names and isinstance(v, list)}
            for name, values in block.items() if isinstance(values, dict)}


def item_predictions(result: dict[str, Any] | None, task: str = "mcq") -> tuple[list[int], dict[str, list]] | None:
    """(labels, predictive -> per-item probabilities) of the test split, or None when not recorded.
    Predictives: routing_mean, bma, ts and bma_ts (see calibration_number), those recorded."""
    block = dig(result, "calibration", PREDICTIONS_KEY, task)
    if not isinstance(block, dict) or not isinstance(block.get("labels"), list):
        return None
    out = {k: v for k, v in block.items() if k in PREDICTIVES and isinstance(v, list)}
    scaled_bma = dig(result, TS_KEY, PREDICTIONS_KEY, "bma") if task == "mcq" else None
    if isinstance(scaled_bma, list):
        out["bma_ts"] = scaled_bma
    return block["labels"], out


RELIABILITY_KEYS = ("bin_confidence", "bin_accuracy", "bin_count")


def item_counts(result: dict[str, Any] | None) -> dict[str, dict[str, int]]:
    """Per multiple-choice set ("in", "calibration" and the OOD sets): ``items`` scored,
    ``unlabelled`` of them without an answer (OOD scores only, never calibration or accuracy) and
    ``too_long`` prompts left out; empty for an eval.json written before the block existed."""
    block = dig(result, "items", ITEM_SETS_KEY)
    return block if isinstance(block, dict) else {}


def reliability_bins(result: dict[str, Any] | None, task: str) -> tuple[list, list, list] | None:
    """(confidence, accuracy, count) per bin of one calibration report (``ReliabilityBins.as_dict``);
    an empty bin's confidence and accuracy are None. None when the report has no bins."""
    bins = dig(calibration(result, task), "reliability")
    if not isinstance(bins, dict) or not all(isinstance(bins.get(k), list) for k in RELIABILITY_KEYS):
        return None
    return tuple([number(v) for v in bins[k]] for k in RELIABILITY_KEYS)  # type: ignore[return-value]


def ood_scores(result: dict[str, Any] | None) -> dict[str, dict[str, list[float]]]:
    """Per-sequence OOD scores: set -> score name -> values (the in-distribution set is "in")."""
    block = dig(result, "ood", SCORES_KEY)
    return block if isinstance(block, dict) else {}


def ood_predictions(result: dict[str, Any] | None) -> dict[str, list]:
    """Per-item routing-mean predictions of each multiple-choice OOD set (empty for lm runs)."""
    block = dig(result, "ood", PREDICTIONS_KEY)
    return block if isinstance(block, dict) else {}


def auroc(result: dict[str, Any] | None, ood_set: str, score: str) -> float | None:
    return number(dig(result, "ood", ood_set, "auroc", score))


def best_auroc(result: dict[str, Any] | None, ood_set: str) -> tuple[float | None, str | None]:
    """The highest AUROC among the OOD scores a run has on one set, and that score's name.

    Routers offer different scores (a deterministic router has no mutual
    information), so each is credited with its best one and the name says which."""
    scores = dig(result, "ood", ood_set, "auroc")
    if not isinstance(scores, dict):
        return None, None
    valid = {name: float(v) for name, v in scores.items() if number(v) is not None and math.isfinite(v)}
    if not valid:
        return None, None
    name = max(valid, key=valid.get)
    return valid[name], name


def jaccard_curve(result: dict[str, Any] | None, key: str = "jaccard") -> tuple[list[float], dict[str, list[float]]]:
    """(gammas, layer -> Jaccard per gamma, "mean" included); empty when the run has none."""
    gammas = dig(result, "stability", "gammas")
    curves = dig(result, "stability", key)
    if not isinstance(gammas, list) or not isinstance(curves, dict):
        return [], {}
    return gammas, curves


def jaccard_at(result: dict[str, Any] | None, gamma: float = JACCARD_GAMMA, key: str = "jaccard") -> float | None:
    """Mean-over-layers Jaccard of the Top-K sets at one noise scale gamma."""
    gammas, curves = jaccard_curve(result, key)
    for g, value in zip(gammas, curves.get("mean", [])):
        if number(g) is not None and math.isclose(g, gamma, rel_tol=1e-6):
            return number(value)
    return None


def posterior_layers(result: dict[str, Any] | None) -> dict[str, dict[str, Any]]:
    """The routing-posterior diagnostics per MoE layer: layer -> {"flip_rate", "sample_jaccard", and for a
    router with a logit posterior "sigma_mean", "gap_mean", "sd_gap_mean", "z_median", "eval_vs_mean_flip",
    "flip_rate_by_z": {"edges" (lower edges; the last bin is open-ended), "flip_rate", "count"}}; empty
    when the run has none (a router that does not sample at evaluation, S = 1, or an older eval.json)."""
    layers = dig(result, "posterior", "layers")
    return layers if isinstance(layers, dict) else {}


def cost_number(result: dict[str, Any] | None, key: str) -> float | None:
    """One number of the cost block: router_share, router_overhead_vs_topk, tokens_per_s."""
    return number(dig(result, "cost", key))


# The headline numbers of a run, by the name compare shows and a sweep can optimise.
METRICS: dict[str, Callable[[dict[str, Any] | None], Any]] = {
    "ece": lambda r: number(dig(calibration(r, "next_token"), "ece_10")),
    "nll": lambda r: number(dig(calibration(r, "next_token"), "nll")),
    "mcq_ece": lambda r: number(dig(calibration(r, "mcq"), "ece_10")),
    "mcq_nll": lambda r: number(dig(calibration(r, "mcq"), "nll")),
    "mcq_accuracy": lambda r: number(dig(calibration(r, "mcq"), "accuracy")),
    "mcq_ece_bma": lambda r: number(dig(calibration(r, "mcq_bma"), "ece_10")),
    "mcq_ece_ts": lambda r: number(dig(calibration(r, "mcq_ts"), "ece_10")),
    "mcq_ece_bma_ts": lambda r: calibration_number(r, "mcq", "ece_10", "bma_ts"),
    "auroc_near": lambda r: best_auroc(r, "near")[0],
    "auroc_near_score": lambda r: best_auroc(r, "near")[1],
    "auroc_far": lambda r: best_auroc(r, "far")[0],
    "auroc_far_score": lambda r: best_auroc(r, "far")[1],
    f"jaccard@{JACCARD_GAMMA:g}": lambda r: jaccard_at(r),
    "router_overhead": lambda r: number(dig(r, "cost", "router_overhead_vs_topk")),
}
# Metrics a sweep may minimise (the *_score entries name a score, they are not numbers).
OBJECTIVES = tuple(name for name in METRICS if not name.endswith("_score"))

