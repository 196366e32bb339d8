"""The paper's comparison at small scale, in one command.

    python experiments/paper_table.py            # about 40 minutes on 2 CPU cores
    python experiments/paper_table.py --quick    # a 2-minute smoke version (CI)

Three stages, each a set of independent runs trained in parallel worker
processes, each run evaluated (``vrmoe eval``) when it finishes:

1. **Language model** (task=lm) on the stdlib prose: the deterministic Top-K
   base model, and the variational router (mean-field and full covariance)
   trained *from scratch*. Their next-token numbers are the "easy regime".
2. **Multiple-choice fine-tuning** (task=mcq, several epochs over items made
   from the training split) from each stage-1 model: the deterministic
   baseline becomes over-confident here (the paper's regime). Routers without
   parameters of their own (temperature sampling over a T sweep, MC dropout)
   are fine-tuned the same way from the Top-K base LM, with their routing on.
3. **Post-hoc** (the paper's protocol): the fine-tuned Top-K model frozen
   (``train.freeze=backbone``), only the new heads trained on the same items:
   variational mean-field and full covariance, and VTSR.

Every (method, seed) is a run dir under ``<out>/runs``; ``<out>/table.md`` has
the mean +- std over seeds, ``<out>/results.json`` every number, and the PNGs
the reliability diagrams and Jaccard-vs-gamma curves. Re-running with the same
``--out`` skips the runs that already have an eval.json.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import statistics
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

from vrmoe.eval import schema
from vrmoe.tracking import EVAL_FILE, read_json

SCORES = ("predictive_entropy", "mutual_information", "gate_entropy", "own")
SCORE_LABELS = {"predictive_entropy": "PE", "mutual_information": "MI", "gate_entropy": "GE",
                "own": "LV/T"}  # own: the router's uncertainty (logit variance, or VTSR's temperature)
OWN_SCORES = ("logit_variance", "temperature")
STABILITY_GAMMA = schema.JACCARD_GAMMA
# One entry per invocation with the same --out (a resumed experiment has several).
INVOCATIONS_FILE = "invocations.json"


@dataclass(frozen=True)
class Method:
    label: str
    stage: str  # lm | mcq | posthoc
    router: tuple[str, ...]  # router overrides
    parent: str | None = None  # the label whose same-seed run this starts from (previous stage)


@dataclass
class Size:
    model: list[str]
    lm: list[str]
    mcq: list[str]
    posthoc: list[str]
    eval: list[str]
    seeds: list[int]
    temperatures: list[float]


DEFAULT = Size(
    model=["model=tiny", "model.d_model=64", "model.seq_len=64", "model.n_experts=8", "model.expert_hidden=128",
           "model.dense_hidden=256", "K=2"],
    lm=["train.max_steps=1500", "train.batch_size=16", "train.lr=3e-3", "train.warmup_steps=50",
        "train.eval_every=500", "train.log_every=500", "train.ckpt_every=1500"],
    mcq=["task=mcq", "task.train_items=1000", "task.val_items=256", "train.max_steps=400", "train.batch_size=16",
         "train.lr=1e-3", "train.warmup_steps=20", "train.eval_every=200", "train.log_every=200",
         "train.ckpt_every=400"],
    posthoc=["task=mcq", "task.train_items=1000", "task.val_items=256", "train.max_steps=200",
             "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=10", "train.eval_every=200",
             "train.log_every=200", "train.ckpt_every=200", "train.freeze=backbone"],
    eval=["S=8", "eval.windows=64", "eval.mcq_items=256", "eval.stability_windows=16", "eval.batch_size=32"],
    seeds=[0, 1, 2],
    temperatures=[0.5, 1.0, 2.0],
)

QUICK = Size(
    model=["model=tiny", "K=2"],
    lm=["train.max_steps=30", "train.batch_size=8", "train.warmup_steps=5", "train.eval_every=30",
        "train.log_every=30", "train.eval_batches=1"],
    mcq=["task=mcq", "task.train_items=48", "task.val_items=16", "train.max_steps=12", "train.batch_size=8",
         "train.warmup_steps=2", "train.eval_every=12", "train.log_every=12"],
    posthoc=["task=mcq", "task.train_items=48", "task.val_items=16", "train.max_steps=6", "train.batch_size=8",
             "train.warmup_steps=1", "train.eval_every=6", "train.log_every=6", "train.freeze=backbone"],
    eval=["S=2", "eval.windows=8", "eval.mcq_items=24", "eval.stability_windows=2", "eval.batch_size=16",
          f"eval.gammas=[0.001,{STABILITY_GAMMA},0.05]"],
    seeds=[0],
    temperatures=[1.0],
)


def methods(size: Size) -> list[Method]:
    diag = ("router=variational", "router.covariance=diag")
    full = ("router=variational", "router.covariance=full")
    out = [Method("topk", "lm", ("router=topk",)),
           Method("variational diag (scratch)", "lm", diag),
           Method("variational full (scratch)", "lm", full),
           Method("topk", "mcq", ("router=topk",), parent="topk"),
           Method("variational diag (scratch)", "mcq", diag, parent="variational diag (scratch)"),
           Method("variational full (scratch)", "mcq", full, parent="variational full (scratch)")]
    out += [Method(f"temperature T={t:g}", "mcq", ("router=temperature", f"T={t}"), parent="topk")
            for t in size.temperatures]
    out += [Method("mc_dropout", "mcq", ("router=mc_dropout",), parent="topk"),
            Method("vtsr (post-hoc)", "posthoc", ("router=vtsr",), parent="topk"),
            Method("variational diag (post-hoc)", "posthoc", diag, parent="topk"),
            Method("variational full (post-hoc)", "posthoc", full, parent="topk")]
    return out


def slug(label: str) -> str:
    return "".join(c if c.isalnum() or c in "._=" else "_" for c in label).strip("_")


def run_dir(out: Path, method: Method, seed: int) -> Path:
    return out / "runs" / method.stage / slug(method.label) / f"seed{seed}"


# ---------------------------------------------------------------------------
# One job: train a run and evaluate it (in a worker process)
# ---------------------------------------------------------------------------

@dataclass
class Job:
    label: str
    stage: str
    seed: int
    overrides: list[str]
    run_dir: str
    log: str
    threads: int


def run_job(job: Job) -> dict[str, Any]:
    """Train and evaluate one run; its console output goes to ``job.log``."""
    import torch

    torch.set_num_threads(job.threads)
    from vrmoe.compose import compose_config
    from vrmoe.eval.context import check_eval_inputs
    from vrmoe.eval.run import evaluate_run
    from vrmoe.train import train

    path = Path(job.run_dir)
    started = time.perf_counter()
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "w", encoding="utf-8") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        app = compose_config(job.overrides)
        check_eval_inputs(app)  # a bad eval setting fails now, not after the training
        summary = train(app, path)
        evaluate_run(path, app)  # the training loop does not evaluate; eval.json is written here
    return {"label": job.label, "stage": job.stage, "seed": job.seed, "run_dir": job.run_dir,
            "train_wall_s": summary["wall_time_s"], "job_wall_s": time.perf_counter() - started}


def record_invocation(out: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Append this invocation's timing to ``<out>/invocations.json``; return the whole history."""
    path = out / INVOCATIONS_FILE
    history = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
    history.append(entry)
    path.write_text(json.dumps(history, indent=2), encoding="utf-8")
    return history


def run_stage(jobs: list[Job], workers: int) -> list[dict[str, Any]]:
    if workers <= 1:
        return [run_job(job) for job in jobs]
    import multiprocessing

    # spawn: a forked child would inherit the parent's torch thread pool state.
    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        return list(pool.map(run_job, jobs))


# ---------------------------------------------------------------------------
# Aggregation
# ---------------------------------------------------------------------------

def own_score_auroc(result: dict[str, Any], ood_set: str) -> float | None:
    """The AUROC of the router's own uncertainty score, whichever of OWN_SCORES it offers."""
    return next((value for s in OWN_SCORES if (value := schema.auroc(result, ood_set, s)) is not None), None)


def jaccard_near(result: dict[str, Any], gamma: float, key: str = "jaccard") -> float | None:
    """Mean-over-layers Jaccard at the evaluated noise scale closest to ``gamma``."""
    gammas, curves = schema.jaccard_curve(result, key)
    mean = curves.get("mean")
    if not gammas or not isinstance(mean, list):
        return None
    at = min(range(len(gammas)), key=lambda i: abs(gammas[i] - gamma))
    return schema.number(mean[at]) if at < len(mean) else None


def row_numbers(result: dict[str, Any], regime: str) -> dict[str, float | None]:
    """The table's numbers of one evaluated run: regime "mcq" (hard) or "next_token" (easy)."""
    numbers: dict[str, float | None] = {
        name: schema.calibration_number(result, regime, key)
        for name, key in (("acc", "accuracy"), ("nll", "nll"), ("ece", "ece_10"), ("ece_15", "ece_15"),
                          ("mce", "mce"))}
    for ood_set in ("near", "far"):
        for score in SCORES:
            numbers[f"auroc_{ood_set}_{score}"] = (own_score_auroc(result, ood_set) if score == "own"
                                                   else schema.auroc(result, ood_set, score))
    numbers["jaccard"] = jaccard_near(result, STABILITY_GAMMA)
    fresh = jaccard_near(result, STABILITY_GAMMA, "jaccard_unmatched")
    numbers["jaccard_fresh"] = numbers["jaccard"] if fresh is None else fresh
    numbers["flops_overhead"] = schema.cost_number(result, "router_overhead_vs_topk")
    numbers["router_share"] = schema.cost_number(result, "router_share")
    return numbers


def mean_std(values: list[float | None]) -> tuple[float, float] | None:
    values = [v for v in values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if not values:
        return None
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


def cell(stat: tuple[float, float] | None, percent: bool = False) -> str:
    if stat is None:
        return "-"
    mean, std = stat
    if percent:
        return f"{100 * mean:+.2f}%"
    return f"{mean:.3f}±{std:.3f}"


COLUMNS = ([("Acc", "acc"), ("NLL", "nll"), ("ECE", "ece"), ("MCE", "mce")]
           + [(f"AUROC {s} {SCORE_LABELS[k]}", f"auroc_{s}_{k}") for s in ("near", "far") for k in SCORES]
           + [(f"Jaccard γ={STABILITY_GAMMA:g}", "jaccard"), ("Jaccard fresh", "jaccard_fresh"),
              ("FLOPs over Top-K", "flops_overhead")])


def markdown_table(rows: dict[str, dict[str, tuple[float, float] | None]]) -> str:
    header = "| Method | " + " | ".join(name for name, _ in COLUMNS) + " |"
    rule = "|---|" + "|".join("---:" for _ in COLUMNS) + "|"
    lines = [header, rule]
    for label, stats in rows.items():
        lines.append(f"| {label} | " + " | ".join(cell(stats.get(key), percent=key == "flops_overhead")
                                                 for _, key in COLUMNS) + " |")
    return "\n".join(lines)


def aggregate(results: dict[tuple[str, str, int], dict[str, Any]], regime: str,
              keys: list[tuple[str, str]]) -> dict[str, dict[str, tuple[float, float] | None]]:
    rows = {}
    for stage, label in keys:
        per_seed = [row_numbers(r, regime) for (st, lb, _), r in sorted(results.items()) if st == stage and lb == label]
        if per_seed:
            rows[label] = {k: mean_std([n[k] for n in per_seed]) for k in per_seed[0]}
    return rows


def write_plots(out: Path, results: dict[tuple[str, str, int], dict[str, Any]], hard_keys: list[tuple[str, str]]) -> None:
    from vrmoe import plots

    curves: dict[str, list[float]] = {}
    gammas_kept: list[float] = []
    for stage, label in hard_keys:
        runs = [r for (st, lb, _), r in sorted(results.items()) if st == stage and lb == label]
        if not runs:
            continue
        gammas, _ = schema.jaccard_curve(runs[0])
        keep = [i for i, g in enumerate(gammas) if g > 0]
        jaccard_means = [curve["mean"] for r in runs if "mean" in (curve := schema.jaccard_curve(r)[1])]
        if jaccard_means:
            curves[label] = [statistics.fmean(mean[i] for mean in jaccard_means) for i in keep]
            gammas_kept = [gammas[i] for i in keep]
        # Reliability bins pooled over seeds: counts add, bin means weighted by counts.
        per_run = [bins for r in runs if (bins := schema.reliability_bins(r, "mcq")) is not None]
        if not per_run:
            continue
        confidences, accuracies, counts = zip(*per_run)
        n_bins = len(counts[0])
        count = [sum(n[i] for n in counts) for i in range(n_bins)]

        def pooled(means: tuple[list[float | None], ...], i: int) -> float:
            total = sum(n[i] * m[i] for m, n in zip(means, counts) if n[i])
            return total / count[i] if count[i] else float("nan")

        plots.reliability_diagram([pooled(confidences, i) for i in range(n_bins)],
                                  [pooled(accuracies, i) for i in range(n_bins)], count,
                                  out / f"reliability_{slug(label)}.png", f"MCQ: {label}")
    if curves:
        plots.jaccard_plot(gammas_kept, curves, out / "jaccard_vs_gamma.png",
                           "Top-K Jaccard under noise (MCQ models)")


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="tiny models and a few steps (about 2 minutes)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default outputs/paper_table/<time>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0 1 2; --quick: 0)")
    parser.add_argument("--jobs", type=int, default=None,
                        help="parallel runs (default: one per CPU core, at most 2 with --quick)")
    args = parser.parse_args(argv)

    size = QUICK if args.quick else DEFAULT
    seeds = args.seeds or size.seeds
    cores = os.cpu_count() or 1
    workers = max(1, args.jobs or (min(cores, 2) if args.quick else cores))
    threads = max(1, cores // workers)
    out = args.out or Path("outputs") / "paper_table" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    all_methods = methods(size)
    by_key = {(m.stage, m.label): m for m in all_methods}
    parent_stage = {"mcq": "lm", "posthoc": "mcq"}
    started = time.perf_counter()
    started_at = datetime.now().isoformat(timespec="seconds")
    stage_wall: dict[str, float] = {}
    runs_trained = 0
    print(f"paper table: {len(all_methods)} methods x {len(seeds)} seeds, {workers} parallel runs of "
          f"{threads} thread(s) -> {out}", flush=True)

    completed = False
    try:
        for stage in ("lm", "mcq", "posthoc"):
            jobs = []
            for method in (m for m in all_methods if m.stage == stage):
                for seed in seeds:
                    path = run_dir(out, method, seed)
                    if (path / EVAL_FILE).exists():
                        continue  # finished by an earlier invocation with this --out
                    overrides = [*size.model, *(getattr(size, stage)), *method.router, *size.eval,
                                 f"seed={seed}", "logger=none"]
                    if method.parent is not None:
                        parent = by_key[(parent_stage[stage], method.parent)]
                        overrides.append(f"train.init_from={run_dir(out, parent, seed)}")
                    jobs.append(Job(method.label, stage, seed, overrides, str(path),
                                    str(out / "logs" / stage / f"{slug(method.label)}_seed{seed}.log"), threads))
            t0 = time.perf_counter()
            done = run_stage(jobs, workers)
            runs_trained += len(done)
            stage_wall[stage] = time.perf_counter() - t0
            print(f"stage {stage}: {len(done)} runs in {stage_wall[stage]:.0f}s", flush=True)
        completed = True
    finally:
        history = record_invocation(out, {"started": started_at, "wall_s": time.perf_counter() - started,
                                          "runs_trained": runs_trained, "stage_wall_s": stage_wall,
                                          "completed": completed, "cores": cores, "workers": workers})

    results: dict[tuple[str, str, int], dict[str, Any]] = {}
    for method in all_methods:
        for seed in seeds:
            path = run_dir(out, method, seed) / EVAL_FILE
            evaluation = read_json(path)
            if evaluation is None:
                raise SystemExit(f"{path} is missing or unreadable; re-run with --out {out} to evaluate it again")
            results[(method.stage, method.label, seed)] = evaluation

    easy_keys = [(m.stage, m.label) for m in all_methods if m.stage == "lm"]
    hard_keys = [(m.stage, m.label) for m in all_methods if m.stage != "lm"]
    easy = aggregate(results, "next_token", easy_keys)
    hard = aggregate(results, "mcq", hard_keys)
    write_plots(out, results, hard_keys)
    wall = sum(entry["wall_s"] for entry in history)
    if len(history) > 1:
        timing = (f"Wall time {wall / 60:.1f} min in {len(history)} invocations with this --out ("
                  + " + ".join(f"{e['wall_s'] / 60:.1f}" for e in history) + " min)")
    else:
        timing = f"Wall time {wall / 60:.1f} min"

    lines = [
        f"# Bayesian routing at small scale ({'quick' if args.quick else 'default'} size)", "",
        f"Seeds {seeds}; mean ± std over seeds. {timing} on {cores} CPU core(s), {workers} runs in parallel "
        f"({sum(e['runs_trained'] for e in history)} runs trained and evaluated).",
        "Command: `python experiments/paper_table.py" + (" --quick" if args.quick else "") + "`.", "",
        "## Hard regime: 4-way multiple choice after fine-tuning (the paper's setting)", "",
        "Calibration on held-out items (ECE: 10 equal-width bins); AUROC per item, in-distribution "
        "= held-out items, near = items from the word-shuffled validation prose, far = items from "
        "Python source. Scores: PE predictive entropy, MI mutual information over S routing "
        "samples, GE gate entropy, LV/T the router's own signal (logit variance tr Σ, or VTSR's "
        "temperature). Jaccard at γ=0.01 with the sampling noise shared between the clean and "
        "noisy pass; 'fresh' draws new sampling noise for the noisy pass.", "",
        markdown_table(hard), "",
        "## Easy regime: next-token prediction of the pretrained language models", "",
        "Calibration over validation tokens; AUROC per 64-byte window (near: word-shuffled prose, "
        "far: Python source).", "",
        markdown_table(easy), "",
    ]
    (out / "table.md").write_text("\n".join(lines), encoding="utf-8")
    serialisable = {"size": asdict(size), "seeds": seeds, "wall_time_s": wall, "invocations": history,
                    "workers": workers, "threads_per_worker": threads,
                    "rows": {"hard": hard, "easy": easy},
                    "runs": {f"{st}/{lb}/seed{sd}": {"run_dir": str(run_dir(out, by_key[(st, lb)], sd)),
                                                     "hard" if st != "lm" else "easy":
                                                         row_numbers(r, "mcq" if st != "lm" else "next_token")}
                             for (st, lb, sd), r in results.items()}}
    (out / "results.json").write_text(json.dumps(serialisable, indent=2), encoding="utf-8")
    print("\n".join(lines), flush=True)
    print(f"wrote {out / 'table.md'} ({timing.lower()})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
