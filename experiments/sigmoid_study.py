"""Softmax against sigmoid-plus-bias routing (DeepSeek-V3 style), each with the variational router post hoc.

    python experiments/sigmoid_study.py --quick       # a CI-sized smoke version (minutes on a CPU)
    python experiments/sigmoid_study.py               # the study (native small models, 3 seeds)
    python experiments/sigmoid_study.py --bias-load   # only the bias-against-averaged-scores measurement

Per seed and per scoring, with the same model size, data and seed:

1. ``lm``: a native language model trained from scratch with deterministic Top-K routing, either
   the paper's softmax Top-K (Switch balance loss 0.01) or sigmoid scores with the
   auxiliary-loss-free selection bias (``router.bias_update_speed``, no balance loss);
2. ``finetune``: Top-K fine-tuned on cloze multiple-choice items until over-confident;
3. ``posthoc``: the variational router (mean field) post hoc on the frozen fine-tuned model, fit
   on the calibration split; under sigmoid it selects with the base's bias (not moved).

Each fine-tuned Top-K and each post-hoc run is evaluated (``vrmoe eval``: ECE, NLL, accuracy,
OOD AUROC near and far); the table gives the variational router's two predictives (routing mean,
BMA) against the Top-K of the same scoring, and sigmoid Top-K against softmax Top-K, with paired
95% bootstrap intervals over items (``vrmoe.stats``, pooled over seeds), and the load balance each
keeps at evaluation (the load CV over experts, mean over MoE layers, on validation windows). The
page goes to ``--out``/table.md, and to ``experiments/results/sigmoid_study.md`` with
``--write-results``.
``--bias-load`` measures how a bias balanced on the deterministic router meets the variational
router's averaged scores (docs/routers.md quotes it). Re-running with the same ``--out`` skips
the runs already done.
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

import torch

from vrmoe import stats
from vrmoe.checkpoint import load_checkpoint
from vrmoe.compose import compose_config, compose_over_saved
from vrmoe.console import CommandParser, run_command
from vrmoe.tracking import EVAL_FILE, read_json

sys.path.insert(0, str(Path(__file__).resolve().parent))
import paper_table  # noqa: E402  (the study's readers and formats)

SCORINGS = {
    "softmax": [],
    "sigmoid": ["router.scoring_func=sigmoid", "router.bias_update_speed=0.001", "router.load_balance_weight=0"],
}
# Post hoc the bias is the base's, kept as it is (the balance loss is off under train.freeze=backbone).
POSTHOC_SCORING = {"softmax": [], "sigmoid": ["router.scoring_func=sigmoid"]}
NEAR_OOD = "eval.ood_text=[thirdparty_docs]"
METRICS = (("acc", "accuracy"), ("nll", "nll"), ("ece", "ece_10"))

FULL = {
    "model": ["model=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=128",
              "model.n_experts=8", "model.expert_hidden=128", "model.dense_hidden=256", "K=2",
              "data.val_fraction=0.3"],
    "lm": ["train.max_steps=1500", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=50",
           "train.eval_every=500", "train.log_every=500", "train.ckpt_every=1500"],
    "finetune": ["task=mcq", "task.train_items=1000", "task.val_items=256", "train.max_steps=300",
                 "train.batch_size=16", "train.lr=1e-3", "train.warmup_steps=20", "train.eval_every=300",
                 "train.log_every=100", "train.ckpt_every=300"],
    "posthoc": ["router=variational", "task=mcq", "task.fit_split=calibration", "task.train_items=1000",
                "task.val_items=256", "train.max_steps=150", "train.batch_size=16", "train.lr=1e-2",
                "train.warmup_steps=10", "train.eval_every=150", "train.log_every=50", "train.ckpt_every=150",
                "train.freeze=backbone"],
    "eval": ["S=8", "eval.windows=64", "eval.mcq_items=1000", "eval.calibration_items=1000",
             "eval.stability_windows=8", "eval.batch_size=32", NEAR_OOD],
    "seeds": [0, 1, 2],
    "resamples": 2000,
    "load_windows": 64,
}
QUICK = {
    "model": ["model=tiny", "model.seq_len=128", "model.n_experts=8", "K=2", "data.val_fraction=0.3"],
    "lm": ["train.max_steps=30", "train.batch_size=8", "train.warmup_steps=5", "train.eval_every=30",
           "train.log_every=30", "train.eval_batches=1"],
    "finetune": ["task=mcq", "task.train_items=48", "task.val_items=16", "train.max_steps=12", "train.batch_size=8",
                 "train.warmup_steps=2", "train.eval_every=12", "train.log_every=12"],
    "posthoc": ["router=variational", "task=mcq", "task.fit_split=calibration", "task.train_items=48",
                "task.val_items=16", "train.max_steps=6", "train.batch_size=8", "train.warmup_steps=1",
                "train.eval_every=6", "train.log_every=6", "train.freeze=backbone"],
    "eval": ["S=2", "eval.windows=8", "eval.mcq_items=24", "eval.calibration_items=24", "eval.stability_windows=2",
             "eval.batch_size=16", "eval.gammas=[0.01]", NEAR_OOD],
    "seeds": [0],
    "resamples": 200,
    "load_windows": 8,
}


def run(run_dir: Path, overrides: list[str], evaluate: bool, eval_overrides: list[str]) -> None:
    """Train one run (skipped when its summary says it completed) and evaluate it (unless done)."""
    from vrmoe.eval.run import evaluate_run
    from vrmoe.train import train

    summary = run_dir / "summary.json"
    if not (summary.exists() and read_json(summary).get("status") == "completed"):
        print(f"train {run_dir.name}: {' '.join(overrides)}", flush=True)
        train(compose_config(["logger=none", *overrides]), run_dir)
    if evaluate and not (run_dir / EVAL_FILE).exists():
        evaluate_run(run_dir, compose_config(["logger=none", *overrides, *eval_overrides]))


def eval_load_cv(run_dir: Path, windows: int) -> float:
    """The load CV over experts at evaluation (the run's own routing, S-averaged where it averages),
    mean over MoE layers, on evenly spaced validation windows."""
    from vrmoe.data.batches import eval_batches
    from vrmoe.data.corpora import load_corpus
    from vrmoe.eval.context import load_model
    from vrmoe.model import build_tokenizer

    state = load_checkpoint(run_dir, "run")
    app = compose_over_saved(state["config"], [])
    model = load_model(state, app, run_dir, torch.device("cpu"))
    corpus = load_corpus(app.data, tokenizer=build_tokenizer(app))
    counts = None
    torch.manual_seed(0)
    with torch.no_grad():
        for x, _ in eval_batches(corpus.val, 8, app.model.seq_len, max(1, windows // 8)):
            loads = torch.stack([torch.bincount(r.expert_ids_TK.reshape(-1), minlength=app.model.n_experts).float()
                                 for r in model(x).routings])
            counts = loads if counts is None else counts + loads
    return float((counts.std(-1, unbiased=False) / counts.mean(-1)).mean())


def predictions(results: list[dict[str, Any]], predictive: str) -> tuple[torch.Tensor, torch.Tensor, dict]:
    """(probs S x N x C, labels N, OOD set -> (in S x N, ood S x M)) over seeds, as the study reads them
    (paper_table.predictions): predictive entropy for the routing mean, mutual information for the BMA."""
    rows = paper_table.predictions(results, predictive,
                                   "predictive_entropy" if predictive == "routing_mean" else "mutual_information")
    return rows.probs_SNC, rows.labels_N, rows.ood


fmt = paper_table.fmt_interval


# The rows of each scoring's table: (label, stage, predictive).
ROWS = (("Top-K", "finetune", "routing_mean"), ("variational, routing mean", "posthoc", "routing_mean"),
        ("variational, BMA", "posthoc", "bma"))


def table(out: Path, size: dict[str, Any]) -> tuple[str, dict[str, Any]]:
    """The study's table (markdown) and its numbers: each row against the Top-K of the same scoring,
    and sigmoid Top-K against softmax Top-K, with paired 95% bootstrap intervals pooled over seeds."""
    resamples = size["resamples"]
    header = ("| scoring | router | accuracy | Δaccuracy | NLL | ΔNLL | ECE | ΔECE | AUROC near: docstrings "
              "| ΔAUROC near | AUROC far | ΔAUROC far | load CV at eval |")
    lines = [header, "|---|---|" + "---:|" * 11]
    numbers: dict[str, Any] = {}
    topk_rows: dict[str, tuple] = {}
    for scoring in SCORINGS:
        dirs = {stage: [out / f"{stage}_{scoring}_s{seed}" for seed in size["seeds"]] for stage in ("finetune", "posthoc")}
        load_cv = {stage: sum(eval_load_cv(d, size["load_windows"]) for d in ds) / len(ds) for stage, ds in dirs.items()}
        base = None
        for label, stage, predictive in ROWS:
            probs, labels, ood = predictions([read_json(d / EVAL_FILE) for d in dirs[stage]], predictive)
            reference = base if base is not None else topk_rows.get("softmax") if scoring != "softmax" else None
            row = {name: stats.single_interval(metric, probs, labels, resamples).as_dict() for name, metric in METRICS}
            for ood_set in ("thirdparty_docs", "far"):
                if ood_set in ood:
                    row[f"auroc_{ood_set}"] = stats.single_auroc_interval(*ood[ood_set], resamples).as_dict()
            if reference is not None:
                ref_probs, _, ref_ood = reference
                for name, metric in METRICS:
                    row[f"d_{name}"] = stats.paired_difference(metric, probs, ref_probs, labels, resamples).as_dict()
                for ood_set in ("thirdparty_docs", "far"):
                    if ood_set in ood and ood_set in ref_ood:
                        row[f"d_auroc_{ood_set}"] = stats.paired_auroc_difference(
                            *ood[ood_set], *ref_ood[ood_set], resamples).as_dict()
            row["load_cv"] = load_cv[stage]
            row["against"] = ("-" if reference is None else "softmax Top-K" if base is None else f"{scoring} Top-K")
            numbers[f"{scoring}/{label}"] = row
            lines.append(f"| {scoring} | {label} | " + " | ".join([
                f"{row['acc']['estimate']:.3f}", fmt(row.get("d_acc"), True), f"{row['nll']['estimate']:.3f}",
                fmt(row.get("d_nll"), True), fmt(row["ece"]), fmt(row.get("d_ece"), True),
                fmt(row.get("auroc_thirdparty_docs")),
                fmt(row.get("d_auroc_thirdparty_docs"), True), fmt(row.get("auroc_far")),
                fmt(row.get("d_auroc_far"), True), f"{row['load_cv']:.3f}"]) + " |")
            if base is None:
                base = (probs, labels, ood)
                topk_rows[scoring] = base
    (out / "table.json").write_text(json.dumps(numbers, indent=1) + "\n")
    return "\n".join(lines), numbers


def bias_load() -> str:
    """A bias balanced on sigmoid Top-K (16 experts, K = 4, 4,096 tokens, four experts every token
    favours) against the variational router's averaged scores (S = 32) at several sigma, with the
    bias added to the averaged scores and without it: load CV and the favoured experts' share."""
    from vrmoe.model.routers import build_router, router_config

    d_model, n_experts, n_tokens, k = 32, 16, 4096, 4
    torch.manual_seed(0)
    u = torch.randn(n_tokens, d_model) + 0.5
    weight = torch.randn(n_experts, d_model) * d_model ** -0.5
    weight[:4] += 0.15

    def measure(router) -> str:
        load = torch.bincount(router(u).expert_ids_TK.reshape(-1), minlength=n_experts).float()
        return f"{float(load.std(unbiased=False) / load.mean()):.3f} | {float(load[:4].sum() / load.sum()):.2f}"

    lines = ["| router | load CV | favoured share (balanced: 0.25) |", "|---|---:|---:|"]
    det = build_router(d_model, n_experts, router_config("topk", k=k, scoring_func="sigmoid",
                                                          bias_update_speed=1e-3))
    with torch.no_grad():
        det.gate.weight.copy_(weight)
        lines.append(f"| Top-K, no bias | {measure(det.eval())} |")
        det.train()
        for _ in range(3000):
            det(u)
            det.settle_bias_update(apply=True)  # what the training step does after each update
        lines.append(f"| Top-K, balanced bias | {measure(det.eval())} |")
        for sigma in (0.1, 0.3, 1.0, 2.0, 4.0):
            torch.manual_seed(1)
            router = build_router(d_model, n_experts, router_config("variational", k=k, samples=32, sigma_init=sigma,
                                                                     scoring_func="sigmoid")).eval()
            router.gate.weight.copy_(weight)
            router.e_score_correction_bias.copy_(det.e_score_correction_bias)
            with_bias = measure(router)
            router.e_score_correction_bias.zero_()
            lines.append(f"| variational sigma={sigma}, with the bias | {with_bias} |")
            lines.append(f"| variational sigma={sigma}, without | {measure(router)} |")
    return "\n".join(lines)


RESULTS = Path(__file__).resolve().parent / "results" / "sigmoid_study.md"


def report(size: dict[str, Any], text: str, wall_s: float, command: str) -> str:
    """The study's page: what wrote it, the protocol in a paragraph, the table."""
    return "\n".join([
        "# Softmax against sigmoid-plus-bias routing, each with the variational router post hoc", "",
        paper_table.provenance(command), "",
        f"Command: `{command}`. Seeds {size['seeds']}; wall time {wall_s / 60:.1f} min. Per seed and scoring, one "
        "native model (" + " ".join(size["model"]) + ") trained from scratch as a language model with deterministic "
        "routing (softmax: Switch balance loss 0.01; sigmoid: the auxiliary-loss-free selection bias, "
        "`router.bias_update_speed=0.001`, no balance loss), fine-tuned with Top-K on cloze items until "
        "over-confident, then the mean-field variational router fit post hoc on the calibration split (under "
        "sigmoid it selects with the base's bias, not moved). Every number is on the test split (1000 items per "
        "seed at full size); intervals are 95% basic bootstrap over items, pooled over seeds; a Δ is paired "
        "by item: the variational rows against the Top-K of the same scoring, sigmoid Top-K against softmax "
        "Top-K; **bold** where its interval excludes 0. AUROC: predictive entropy (mutual information for BMA "
        "rows); near = other packages' docstrings, far = Python source. Load CV: the coefficient of variation of "
        "the experts' load at evaluation (0 = balanced), mean over MoE layers, on validation windows.", "",
        text, ""])


def main(argv: list[str]) -> None:
    parser = CommandParser(prog="experiments/sigmoid_study.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a CI-sized smoke version")
    parser.add_argument("--bias-load", action="store_true", help="only the bias-against-averaged-scores measurement")
    parser.add_argument("--out", default=None, help="output directory (outputs/sigmoid_study[_quick])")
    parser.add_argument("--write-results", action="store_true",
                        help=f"also write the page to {RESULTS.relative_to(RESULTS.parents[2])}")
    args = parser.parse_args(argv)
    torch.set_num_threads(1)
    if args.bias_load:
        print(bias_load())
        return
    size = QUICK if args.quick else FULL
    out = Path(args.out or ("outputs/sigmoid_study_quick" if args.quick else "outputs/sigmoid_study"))
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    for seed in size["seeds"]:
        for scoring, routing in SCORINGS.items():
            common = [*size["model"], f"seed={seed}"]
            lm, ft, ph = (out / f"{stage}_{scoring}_s{seed}" for stage in ("lm", "finetune", "posthoc"))
            run(lm, [*common, *routing, *size["lm"]], False, [])
            run(ft, [*common, *routing, *size["finetune"], f"train.init_from={lm}"], True, size["eval"])
            run(ph, [*common, *POSTHOC_SCORING[scoring], *size["posthoc"], f"train.init_from={ft}"], True,
                size["eval"])
    # The wall time of every invocation with this --out (a re-run that only rewrites the table adds little).
    timings = out / "wall_s.json"
    wall = (read_json(timings) or {}).get("wall_s", 0.0) + time.perf_counter() - start
    timings.write_text(json.dumps({"wall_s": wall}))
    text, _ = table(out, size)
    command = "python experiments/sigmoid_study.py" + (" --quick" if args.quick else "")
    page = report(size, text, wall, command)
    (out / "table.md").write_text(page)
    if args.write_results:
        RESULTS.write_text(page)
    print(page)


if __name__ == "__main__":
    sys.exit(run_command("experiments/sigmoid_study.py", main, sys.argv[1:]))
