"""The paper's comparison at small scale, designed as a reviewer would ask, in one command.

    python experiments/paper_table.py            # the default study (wall time in its table.md)
    python experiments/paper_table.py --sweep    # plus the sweeps: S, beta, sigma_init, layers, a larger model
    python experiments/paper_table.py --quick    # a CI-sized smoke version of both
    python experiments/paper_table.py --gpu      # the same protocol at gpt_small size on a CUDA GPU

Design (see docs/results.md, "What holds and what does not"):

* **Three disjoint item splits** (``task=mcq``): fine-tuning items from the training text;
  calibration and test items from the two halves of the validation text, which neither the
  language model nor fine-tuning ever trained on. The base is fine-tuned on its split until
  over-confident; post-hoc heads and temperature scaling fit on the calibration split; every
  number of the table is measured on the test split (and OOD sets made from other text).
* **Two formats**: ``cloze`` (softmax over the four filled-in sentences' log-likelihoods) and
  ``letter`` (the options lettered in the prompt, softmax over the four letters' logits at the
  answer position: the paper's predictive).
* **Baselines that calibrate**: temperature scaling of the Top-K model (one scalar fit by NLL on
  the calibration split, by ``vrmoe eval``) and the deep ensemble of the Top-K seeds.
* **Two predictives** for sampling routers: routing averaged over S samples before Top-K (one
  pass, the paper's) and the Bayesian model average of S single-sample passes (BMA).
* **Statistics**: per-item paired bootstrap 95% intervals (2000 resamples) of every difference
  against Top-K, pooled over seeds (the same item resample for every seed and both methods); an
  effect is called only when its interval excludes 0.

Stages, each a set of independent runs in parallel worker processes, each run evaluated when it
finishes: ``lm`` (the Top-K language model per seed, one per format's regime), ``finetune`` (Top-K,
MC-dropout and SWAG fine-tuned on the fine-tuning split, per format), ``posthoc`` (the fine-tuned
Top-K frozen, new heads fit on the calibration split: variational mean-field and full covariance,
VTSR). ``--sweep`` adds, in each format of ``--sweep-formats`` (default both) on the first three
seeds: S at evaluation, beta, sigma_init, the router on each MoE layer alone, and a larger model
through the same protocol. Re-running with the same ``--out`` skips the runs
(and evaluations) already done and continues a run an earlier invocation left unfinished from
its last checkpoint.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from concurrent.futures.process import BrokenProcessPool
from dataclasses import asdict, dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Callable

import torch

from vrmoe import stats
from vrmoe.config import ConfigError
from vrmoe.console import CommandParser, fail, run_command
from vrmoe.eval import schema
from vrmoe.tracking import EVAL_FILE, atomic_write_text, read_json

FORMATS = ("cloze", "letter")
SCRIPT = "experiments/paper_table.py"
INVOCATIONS_FILE = "invocations.json"
INVOCATIONS_LOCK = ".invocations.lock"
# The sweeps run on the first seeds only, in each format asked for (--sweep-formats, default both).
SWEEP_SEEDS = 3


@dataclass(frozen=True)
class Method:
    key: str  # unique: the run dir's name
    label: str
    stage: str  # lm | finetune | posthoc
    overrides: tuple[str, ...]
    fmt: str | None = None  # the multiple-choice format (None for the language model)
    parent: str | None = None  # the key of the run this one starts from (same seed)
    model: str = "small"  # which model size
    evals: tuple[tuple[str, tuple[str, ...]], ...] = ()  # extra evaluations: (file name, eval overrides)
    sweep: bool = False
    eval_overrides: tuple[str, ...] = ()  # for eval.json (the sweeps: SWEEP_EVAL)
    regime: str = ""  # "letter": the letter format's own language model and fine-tuning (Size.letter_*)


@dataclass
class Size:
    models: dict[str, list[str]]
    lm: list[str]
    finetune: list[str]
    posthoc: list[str]
    eval: list[str]
    seeds: list[int]
    sweep_S: list[int]
    sweep_beta: list[float]
    sweep_sigma: list[float]
    resamples: int = 2000
    large_lm: list[str] = field(default_factory=list)  # the larger model's language-model stage, beyond lm
    # The letter format's regime (experiments/letter_regime.py): its model, language model and fine-tuning,
    # and what the sweep's larger model changes in that model.
    letter_model: list[str] = field(default_factory=list)
    letter_lm: list[str] = field(default_factory=list)
    letter_finetune: list[str] = field(default_factory=list)
    letter_large: list[str] = field(default_factory=list)

    def stage_overrides(self, method: "Method") -> list[str]:
        """The model and stage overrides of one method's runs."""
        if method.regime == "letter":
            stage = {"lm": self.letter_lm, "finetune": self.letter_finetune}.get(method.stage, self.posthoc)
            larger = self.letter_large if method.model == "large" else []
            return [*self.letter_model, *larger, *stage]
        return [*self.models[method.model], *getattr(self, method.stage)]

    def moe_layers(self, fmt: str) -> int:
        """How many MoE layers the model of one format's regime has (the sweep puts the router on each alone)."""
        from vrmoe.compose import compose_config

        model = compose_config(self.letter_model if fmt == "letter" else self.models["small"]).model
        return len([i for i in range(model.n_layers) if model.moe_every > 0 and (i + 1) % model.moe_every == 0])


SMALL = ["model=tiny", "model.d_model=64", "model.n_layers=2", "model.n_heads=2", "model.seq_len=128",
         "model.n_experts=8", "model.expert_hidden=128", "model.dense_hidden=256", "K=2", "data.val_fraction=0.3"]
# The letter format's setting (experiments/letter_regime.py, bpe_d128_16k): subword tokens, a wider
# and deeper model, 16000 fine-tuning items; test accuracy 0.455 and ECE 0.146 on one seed
# (experiments/results/letter_regime.md), where the d=64 byte model stays near chance.
BPE = ["data.tokenizer=bpe", "data.vocab_size=4096"]
LETTER_MODEL = [*SMALL, "model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.expert_hidden=256",
                "model.dense_hidden=512", *BPE]
LETTER_LM = ["train.max_steps=1000", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=50",
             "train.eval_every=500", "train.log_every=100", "train.eval_batches=4", "train.ckpt_every=1000"]
LETTER_FINETUNE = ["task=mcq", "task.train_items=16000", "task.val_items=256", "train.max_steps=2000",
                   "train.batch_size=32", "train.lr=1e-3", "train.warmup_steps=20", "train.eval_every=2000",
                   "train.log_every=100", "train.ckpt_every=2000"]
# Every evaluation's extra OOD set: other packages' docstrings, near OOD for the stdlib prose.
NEAR_OOD = "eval.ood_text=[thirdparty_docs]"
DEFAULT = Size(
    models={"small": SMALL,
            "large": [*SMALL, "model.d_model=96", "model.n_layers=4", "model.n_heads=4", "model.n_experts=16",
                      "model.expert_hidden=192", "model.dense_hidden=384"]},
    lm=["train.max_steps=1500", "train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=50",
        "train.eval_every=500", "train.log_every=500", "train.ckpt_every=1500"],
    finetune=["task=mcq", "task.train_items=1000", "task.val_items=256", "train.max_steps=300", "train.batch_size=16",
              "train.lr=1e-3", "train.warmup_steps=20", "train.eval_every=300", "train.log_every=100",
              "train.ckpt_every=300"],
    posthoc=["task=mcq", "task.fit_split=calibration", "task.train_items=1000", "task.val_items=256",
             "train.max_steps=150", "train.batch_size=16", "train.lr=1e-2", "train.warmup_steps=10",
             "train.eval_every=150", "train.log_every=50", "train.ckpt_every=150", "train.freeze=backbone"],
    eval=["S=8", "eval.windows=64", "eval.mcq_items=1000", "eval.calibration_items=1000",
          "eval.stability_windows=16", "eval.batch_size=32", NEAR_OOD],
    seeds=[0, 1, 2, 3, 4],
    sweep_S=[1, 4, 16, 64],
    sweep_beta=[0.0001, 0.001, 0.1, 1.0],
    sweep_sigma=[0.5, 1.0],
    large_lm=["train.max_steps=1000"],
    letter_model=LETTER_MODEL,
    letter_lm=LETTER_LM,
    letter_finetune=LETTER_FINETUNE,
    # Deeper and with twice the experts at the same width (a wider model costs the letter regime's
    # 16,000-item fine-tuning more than the sweep's budget).
    letter_large=["model.n_layers=6", "model.n_experts=16"],
)
QUICK = Size(
    models={"small": ["model=tiny", "model.seq_len=128", "K=2", "data.val_fraction=0.3"],
            "large": ["model=tiny", "model.seq_len=128", "K=2", "data.val_fraction=0.3", "model.d_model=48",
                      "model.n_layers=3"]},
    lm=["train.max_steps=30", "train.batch_size=8", "train.warmup_steps=5", "train.eval_every=30",
        "train.log_every=30", "train.eval_batches=1"],
    finetune=["task=mcq", "task.train_items=48", "task.val_items=16", "train.max_steps=12", "train.batch_size=8",
              "train.warmup_steps=2", "train.eval_every=12", "train.log_every=12"],
    posthoc=["task=mcq", "task.fit_split=calibration", "task.train_items=48", "task.val_items=16",
             "train.max_steps=6", "train.batch_size=8", "train.warmup_steps=1", "train.eval_every=6",
             "train.log_every=6", "train.freeze=backbone"],
    eval=["S=2", "eval.windows=8", "eval.mcq_items=24", "eval.calibration_items=24", "eval.stability_windows=2",
          "eval.batch_size=16", f"eval.gammas=[0.001,{schema.JACCARD_GAMMA},0.05]", NEAR_OOD],
    seeds=[0, 1],
    sweep_S=[1, 4],
    sweep_beta=[0.1],
    sweep_sigma=[1.0],
    resamples=200,
    letter_model=["model=tiny", "model.seq_len=128", "K=2", "data.val_fraction=0.3", *BPE],
    letter_large=["model.n_layers=3"],
)

# The same protocol on a CUDA GPU at gpt_small size (d=768, 12 layers) with 16 experts; the large
# model of the sweep doubles the experts. Ready to run (--gpu); not run on a CPU-only machine.
GPU_MODEL = ["model=gpt_small", "model.seq_len=256", "model.n_experts=16", "model.expert_hidden=1024", "K=2",
             "data.val_fraction=0.3", "train.device=cuda", "train.precision=bf16"]
GPU = Size(
    models={"small": GPU_MODEL, "large": [*GPU_MODEL, "model.n_experts=32"]},
    lm=["train.max_steps=4000", "train.batch_size=32", "train.lr=6e-4", "train.warmup_steps=200",
        "train.eval_every=1000", "train.log_every=100", "train.ckpt_every=1000"],
    finetune=[*DEFAULT.finetune[:3], "train.max_steps=300", "train.batch_size=16", "train.lr=1e-4",
              "train.warmup_steps=20", "train.eval_every=300", "train.log_every=50", "train.ckpt_every=300"],
    posthoc=DEFAULT.posthoc,
    eval=[*DEFAULT.eval[:-2], "eval.batch_size=64", NEAR_OOD],
    seeds=DEFAULT.seeds,
    sweep_S=DEFAULT.sweep_S,
    sweep_beta=DEFAULT.sweep_beta,
    sweep_sigma=DEFAULT.sweep_sigma,
)
GPU.letter_model, GPU.letter_lm, GPU.letter_finetune = [*GPU_MODEL, *BPE], GPU.lm, GPU.finetune
GPU.letter_large = ["model.n_experts=32"]
QUICK.letter_lm, QUICK.letter_finetune = QUICK.lm, QUICK.finetune

# The sweeps report the test split's calibration only (sweep_report), as the main table reports it; their
# evaluations leave out what they would not report: the OOD item sets (a few text windows instead), the
# near-OOD corpus and most of the routing-stability curve. Each scored set draws its own sampling noise
# (EvalContext.scored), and with both predictives the test split takes its S single-sample passes
# whatever eval.ood_task is, so the test split's numbers are those a full evaluation gives.
SWEEP_EVAL = ("eval.ood_task=lm", "eval.ood_text=[]", "eval.windows=8", "eval.stability_windows=1",
              "eval.stability_unmatched=false", f"eval.gammas=[{schema.JACCARD_GAMMA}]")

DIAG = ("router=variational", "router.covariance=diag")
FULL = ("router=variational", "router.covariance=full")


# The routers compared with Top-K in each format, in the table's order.
ROUTER_KEYS = ("mc_dropout", "swag", "vtsr", "diag", "full")


def methods(size: Size, sweep_formats: tuple[str, ...] = ()) -> list[Method]:
    """Every run of the study: the main comparison in both formats, then the sweeps in each of
    ``sweep_formats``."""
    out = [Method("lm_topk", "Top-K language model", "lm", ("router=topk",)),
           Method("letter_lm_topk", "Top-K language model (letter regime)", "lm", ("router=topk",), regime="letter")]
    for fmt in FORMATS:
        fmt_task = (f"task.format={fmt}",)
        regime = "letter" if fmt == "letter" else ""
        lm = "letter_lm_topk" if regime else "lm_topk"
        out += [
            Method(f"{fmt}_topk", "Top-K", "finetune", ("router=topk", *fmt_task), fmt, lm, regime=regime),
            Method(f"{fmt}_mc_dropout", "MC-dropout", "finetune", ("router=mc_dropout", *fmt_task), fmt, lm,
                   regime=regime),
            # SWAG collects the gate's iterates over the second half of the fine-tuning (swag_start: run_job's).
            Method(f"{fmt}_swag", "SWAG", "finetune", ("router=swag", *fmt_task), fmt, lm, regime=regime),
            Method(f"{fmt}_vtsr", "VTSR (post-hoc)", "posthoc", ("router=vtsr", *fmt_task), fmt, f"{fmt}_topk",
                   regime=regime),
            Method(f"{fmt}_diag", "variational diag (post-hoc)", "posthoc", (*DIAG, *fmt_task), fmt, f"{fmt}_topk",
                   evals=tuple((f"eval_S{s}.json", (f"S={s}", *SWEEP_EVAL)) for s in size.sweep_S)
                   if fmt in sweep_formats else (), regime=regime),
            Method(f"{fmt}_full", "variational full (post-hoc)", "posthoc", (*FULL, *fmt_task), fmt, f"{fmt}_topk",
                   regime=regime),
        ]
    for fmt in sweep_formats:
        out += sweep_methods(size, fmt)
    return out


def sweep_methods(size: Size, fmt: str) -> list[Method]:
    """One format's sweeps of the mean-field router: beta, sigma_init, each MoE layer alone, and a
    larger model through the same protocol (S is swept at evaluation, by the main run's extra evals)."""
    fmt_task = (f"task.format={fmt}",)
    regime = "letter" if fmt == "letter" else ""
    parent = f"{fmt}_topk"
    posthoc = lambda key, label, overrides: Method(  # noqa: E731
        key, label, "posthoc", (*DIAG, *overrides, *fmt_task), fmt, parent, sweep=True, eval_overrides=SWEEP_EVAL,
        regime=regime)
    out = [posthoc(f"{fmt}_diag_beta{b:g}", f"variational diag, beta={b:g}", (f"beta={b}",)) for b in size.sweep_beta]
    out += [posthoc(f"{fmt}_diag_sigma{s:g}", f"variational diag, sigma_init={s:g}", (f"router.sigma_init={s}",))
            for s in size.sweep_sigma]
    out += [posthoc(f"{fmt}_diag_layer{i}", f"variational diag, MoE layer {i} only", (f"router.layers=[{i}]",))
            for i in range(size.moe_layers(fmt))]
    large_lm = "large_lm_topk" if fmt == "cloze" else "large_letter_lm_topk"
    lm_overrides = ("router=topk", *size.large_lm) if fmt == "cloze" else ("router=topk",)
    out += [Method(large_lm, f"Top-K language model (large, {fmt} regime)", "lm", lm_overrides, model="large",
                   sweep=True, eval_overrides=(*SWEEP_EVAL, "eval.predictive=routing_mean"), regime=regime),
            Method(f"large_{fmt}_topk", "Top-K (large)", "finetune", ("router=topk", *fmt_task), fmt, large_lm,
                   model="large", sweep=True, eval_overrides=SWEEP_EVAL, regime=regime),
            Method(f"large_{fmt}_diag", "variational diag (post-hoc, large)", "posthoc", (*DIAG, *fmt_task), fmt,
                   f"large_{fmt}_topk", model="large", sweep=True, eval_overrides=SWEEP_EVAL, regime=regime)]
    return out


def swag_overrides(method: Method, size: Size) -> list[str]:
    """SWAG's warm-up: the first half of its fine-tuning (the other half's gates are collected)."""
    if "router=swag" not in method.overrides:
        return []
    steps = [int(o.split("=", 1)[1]) for o in size.stage_overrides(method) if o.startswith("train.max_steps=")]
    return [f"router.swag_start={max(1, steps[-1] // 2)}"] if steps else []


def method_seeds(method: Method, seeds: list[int]) -> list[int]:
    return seeds[:SWEEP_SEEDS] if method.sweep else seeds


def method_evals(method: Method, seed: int, seeds: list[int]) -> list[tuple[str, list[str]]]:
    """The evaluations of one run: the sweep's extra ones (on the sweep's seeds), then eval.json."""
    extra = [(name, list(overrides)) for name, overrides in method.evals] if seed in seeds[:SWEEP_SEEDS] else []
    return [*extra, (EVAL_FILE, [])]


def evaluations_on_disk(out: Path, method: Method, seed: int, seeds: list[int]) -> bool:
    """Whether every evaluation of one run (``method_evals``) is on disk and readable."""
    path = run_dir(out, method.key, seed)
    return all(read_json(path / name) is not None for name, _ in method_evals(method, seed, seeds))


def run_dir(out: Path, key: str, seed: int) -> Path:
    return out / "runs" / key / f"seed{seed}"


# ---------------------------------------------------------------------------
# One job: train a run (unless done) and evaluate it (in a worker process)
# ---------------------------------------------------------------------------

@dataclass
class Job:
    key: str
    seed: int
    overrides: list[str]
    run_dir: str
    log: str
    threads: int
    evals: list[tuple[str, list[str]]] = field(default_factory=list)  # (file name, extra overrides), eval.json last


def run_job(job: Job) -> dict[str, Any]:
    """Train (if not trained yet, or the rest of a run an earlier invocation left unfinished) and
    evaluate one run; its console output goes to ``job.log``."""
    torch.set_num_threads(job.threads)
    from vrmoe.compose import compose_config
    from vrmoe.eval.context import check_eval_inputs
    from vrmoe.eval.run import evaluate_run
    from vrmoe.tracking import read_summary
    from vrmoe.train import train

    path = Path(job.run_dir)
    started = time.perf_counter()
    Path(job.log).parent.mkdir(parents=True, exist_ok=True)
    with open(job.log, "a", encoding="utf-8") as log, contextlib.redirect_stderr(log), contextlib.redirect_stdout(log):
        app = compose_config(job.overrides)
        check_eval_inputs(app)  # a bad eval setting fails now, not after the training
        status = (read_summary(path) or {}).get("status")
        # A diverged run is left as it is (its evaluation says so), and so is one stopped after its
        # last step's checkpoint. One an earlier invocation left unfinished (stopped, killed) continues
        # from its last checkpoint, or starts again in place without one, as `vrmoe train
        # train.resume=` does.
        if status not in ("completed", "diverged") and not (status and saved_step(path) >= app.train.max_steps):
            train(compose_config([*job.overrides, f"train.resume={path}"]) if status else app, path)
        for name, extra in job.evals:
            if not (path / name).exists():
                evaluate_run(path, compose_config([*job.overrides, *extra]), output=name)
    return {"key": job.key, "seed": job.seed, "wall_s": time.perf_counter() - started}


def saved_step(path: Path) -> int:
    """The step of a run dir's newest readable checkpoint (0 without one)."""
    from vrmoe.checkpoint import checkpoint_paths, read_newest_checkpoint

    if not checkpoint_paths(path):
        return 0
    try:
        return int(read_newest_checkpoint(path, "run", resuming=True)[0].get("step", 0))
    except ConfigError:  # none readable: the resume says so in its own line
        return 0


def run_stage(jobs: list[Job], workers: int, after_each: Callable[[], Any] = lambda: None) -> list[dict[str, Any]]:
    """Run a stage's jobs, ``workers`` at a time, with a line for each one that finishes (and
    ``after_each`` called); returns their results in the order they finished."""
    done: list[dict[str, Any]] = []

    def finished(result: dict[str, Any]) -> None:
        done.append(result)
        print(f"  {result['key']} seed {result['seed']}: {result['wall_s']:.0f}s ({len(done)}/{len(jobs)})", flush=True)
        after_each()

    if workers <= 1 or len(jobs) <= 1:
        for job in jobs:
            finished(run_job(job))
        return done
    import multiprocessing

    # spawn: a forked child would inherit the parent's torch thread pool state.
    try:
        with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            futures = [pool.submit(run_job, job) for job in jobs]
            try:
                for future in as_completed(futures):
                    finished(future.result())
            except BaseException:
                # A run that fails ends the stage now: the runs not started yet are dropped rather
                # than waited for (the pool's exit still lets the runs in progress finish).
                pool.shutdown(cancel_futures=True)
                raise
        return done
    except BrokenProcessPool:
        # One worker died (the kernel's out-of-memory killer, most often) and the pool stopped the
        # others' runs with it. Trainings continue from their checkpoints and finished evaluations
        # are skipped, so the same command continues the study.
        fail(f"{SCRIPT}: a run's process died ({min(workers, len(jobs))} runs in parallel; killed for memory, "
             "most often: see dmesg), which stopped the runs beside it; what finished is kept: run the same "
             "command again, with fewer --jobs, to continue", code=1)


def provenance(command: str, device: str = "cpu") -> str:
    """What wrote an output (date, commit, device, versions, command), one ``- key: value`` line
    each, as ``vrmoe bench --record`` heads its records."""
    from vrmoe.bench import device_name, record_header
    from vrmoe.tracking import software_versions

    return record_header(datetime.now(timezone.utc), software_versions(), device_name(torch.device(device)), command)


def record_invocation(out: Path, entry: dict[str, Any]) -> list[dict[str, Any]]:
    """Write this invocation's timing into ``<out>/invocations.json``: appended the first time,
    replaced (matched by its ``id``) after that, so that an invocation recording itself after each
    run still counts, when it is killed, up to its last finished run. Returns the whole history."""
    import fcntl

    path = out / INVOCATIONS_FILE
    # Another invocation with this --out may be recording itself too: the read, change and write
    # happen under an exclusive lock, so neither drops the other's entry.
    with open(out / INVOCATIONS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            history = json.loads(path.read_text(encoding="utf-8")) if path.exists() else []
        except (OSError, ValueError):
            history = None
        if not isinstance(history, list):  # unreadable: the runs are on disk, only earlier timings are lost
            print(f"note: {path} is unreadable; the wall time counts this invocation only", flush=True)
            history = []
        mine = [i for i, e in enumerate(history) if isinstance(e, dict) and "id" in entry and e.get("id") == entry["id"]]
        if mine:
            history[mine[0]] = dict(entry)
        else:
            history.append(dict(entry))
        atomic_write_text(path, json.dumps(history, indent=2))
    return history


# ---------------------------------------------------------------------------
# Per-item data of the evaluated runs
# ---------------------------------------------------------------------------

@dataclass
class Predictions:
    """One row of the table: per-seed predictions on the test items and per-seed OOD scores."""

    probs_SNC: torch.Tensor
    labels_N: torch.Tensor
    ood: dict[str, tuple[torch.Tensor, torch.Tensor]]  # set -> (in scores S x N, OOD scores S x M)
    score_name: str  # the OOD score used for ood
    evaluations: list[dict[str, Any]]


def evaluated(out: Path, key: str, seeds: list[int]) -> bool:
    """Whether every seed's run of ``key`` has its eval.json (a method left out with --skip has none)."""
    return all((run_dir(out, key, seed) / EVAL_FILE).exists() for seed in seeds)


def load_rows(out: Path, key: str, seeds: list[int], name: str = EVAL_FILE) -> list[dict[str, Any]]:
    rows = []
    for seed in seeds:
        path = run_dir(out, key, seed) / name
        result = read_json(path)
        if result is None or schema.item_predictions(result) is None:
            what = "is missing or unreadable" if result is None else "has no per-item predictions (an older vrmoe eval)"
            raise ConfigError(f"{path} {what}; delete it and re-run with --out {out} to evaluate it again")
        rows.append(result)
    return rows


# The OOD sets of the table: other packages' docstrings (near OOD), the word-shuffled test text (a
# control that keeps the vocabulary) and Python source (far OOD).
OOD_SETS = ("thirdparty_docs", "near", "far")


def predictions(results: list[dict[str, Any]], predictive: str, score: str) -> Predictions | None:
    """The per-item predictions of one predictive and the per-item OOD score ``score`` over seeds;
    for a temperature-scaled predictive (ts, bma_ts) with score "scaled", the entropy of the scaled
    prediction."""
    probs, labels = [], None
    for result in results:
        recorded = schema.item_predictions(result)
        if recorded is None or predictive not in recorded[1]:
            return None
        if labels is not None and not torch.equal(labels, torch.tensor(recorded[0])):
            raise ConfigError(f"{result.get('run')}: its test items differ from the other seeds' (labels differ); "
                              "every seed must be evaluated on the same items to be paired")
        labels = torch.tensor(recorded[0])
        probs.append(torch.tensor(recorded[1][predictive], dtype=torch.float64))
    ood: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}
    for ood_set in OOD_SETS:
        if score == "scaled":
            per_seed = [{name: {score: v[predictive]} for name, v in schema.scaled_ood_scores(r).items()
                         if predictive in v} for r in results]
        else:
            per_seed = [schema.ood_scores(r) for r in results]
        if all(score in s.get("in", {}) and score in s.get(ood_set, {}) for s in per_seed):
            ood[ood_set] = (torch.tensor([s["in"][score] for s in per_seed], dtype=torch.float64),
                            torch.tensor([s[ood_set][score] for s in per_seed], dtype=torch.float64))
    return Predictions(torch.stack(probs), labels, ood, score, results)


def ensemble(results: list[dict[str, Any]]) -> Predictions:
    """The deep ensemble of the seeds: the mean of their predictions, on test and OOD items; its OOD
    score is the predictive entropy of that mean."""
    from vrmoe import metrics

    labels, _ = schema.item_predictions(results[0])
    mean_NC = torch.stack([torch.tensor(schema.item_predictions(r)[1]["routing_mean"], dtype=torch.float64)
                           for r in results]).mean(0)
    ood = {}
    for ood_set in OOD_SETS:
        sets = [schema.ood_predictions(r).get(ood_set) for r in results]
        if all(s is not None for s in sets):
            ood_mean = torch.stack([torch.tensor(s, dtype=torch.float64) for s in sets]).mean(0)
            ood[ood_set] = (metrics.entropy(mean_NC)[None], metrics.entropy(ood_mean)[None])
    return Predictions(mean_NC[None], torch.tensor(labels), ood, "predictive_entropy", results)


# ---------------------------------------------------------------------------
# Statistics and the table
# ---------------------------------------------------------------------------

METRIC_COLUMNS = (("acc", "accuracy"), ("nll", "nll"), ("ece", "ece_10"), ("ece_15", "ece_15"), ("brier", "brier"))
DIFF_METRICS = ("ece_10", "nll", "accuracy")


def row_stats(row: Predictions, base: Predictions, resamples: int) -> dict[str, Any]:
    """Every number of one row: the metrics (mean over seeds, with single-model intervals), the
    differences against Top-K (paired intervals) and AUROC (with the paired difference)."""
    numbers: dict[str, Any] = {"seeds": int(row.probs_SNC.shape[0]), "items": int(row.labels_N.numel()),
                               "ood_score": row.score_name}
    for name, metric in METRIC_COLUMNS:
        numbers[name] = stats.single_interval(metric, row.probs_SNC, row.labels_N, resamples).as_dict()
    for metric in DIFF_METRICS:
        numbers[f"d_{metric}"] = stats.paired_difference(metric, row.probs_SNC, base.probs_SNC, row.labels_N,
                                                         resamples).as_dict()
    if row.probs_SNC.shape[0] == base.probs_SNC.shape[0] > 1:
        # The intervals resample items, not trainings: each seed's own ΔECE shows the spread between seeds.
        numbers["d_ece_10_by_seed"] = [
            stats.seed_mean_metric("ece_10", r_NC, row.labels_N) - stats.seed_mean_metric("ece_10", b_NC, row.labels_N)
            for r_NC, b_NC in zip(row.probs_SNC, base.probs_SNC)]
    for ood_set, (in_SN, ood_SM) in row.ood.items():
        numbers[f"auroc_{ood_set}"] = stats.single_auroc_interval(in_SN, ood_SM, resamples).as_dict()
        if ood_set in base.ood:
            numbers[f"d_auroc_{ood_set}"] = stats.paired_auroc_difference(
                in_SN, ood_SM, *base.ood[ood_set], resamples).as_dict()
    return numbers


def mean_over(results: list[dict[str, Any]], read) -> float | None:
    values = [v for r in results if (v := read(r)) is not None]
    return sum(values) / len(values) if values else None


def fmt_interval(iv: dict[str, Any] | None, signed: bool = False) -> str:
    if iv is None:
        return "-"
    sign = "+" if signed else ""
    text = f"{iv['estimate']:{sign}.3f} [{iv['low']:{sign}.3f}, {iv['high']:{sign}.3f}]"
    return f"**{text}**" if signed and iv["excludes_zero"] else text


def fmt_number(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{100 * value:+.2f}%" if percent else f"{value:.3f}"


def table_header(reference: str) -> str:
    return (f"| Method | predictive | split fit on | Acc | NLL | ECE [95% CI] | ΔECE vs {reference} | ΔNLL vs {reference} "
            "| AUROC near: docstrings (score) | ΔAUROC near | AUROC shuffled (control) | ΔAUROC shuffled "
            "| AUROC far | ΔAUROC far | Jaccard γ=0.01 | FLOPs over Top-K |")


TABLE_RULE = "|---|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"


def table_line(label: str, predictive: str, fitted: str, numbers: dict[str, Any], extras: dict[str, Any],
               reference: bool = False) -> str:
    auroc_near = numbers.get("auroc_thirdparty_docs")
    near = "-" if auroc_near is None else f"{fmt_interval(auroc_near)} ({numbers['ood_score']})"
    diff = lambda key: "reference" if reference else fmt_interval(numbers.get(key), True)  # noqa: E731
    return (f"| {label} | {predictive} | {fitted} | {numbers['acc']['estimate']:.3f} | {numbers['nll']['estimate']:.3f} "
            f"| {fmt_interval(numbers['ece'])} | {diff('d_ece_10')} | {diff('d_nll')} | {near} "
            f"| {diff('d_auroc_thirdparty_docs')} | {fmt_interval(numbers.get('auroc_near'))} | {diff('d_auroc_near')} "
            f"| {fmt_interval(numbers.get('auroc_far'))} | {diff('d_auroc_far')} "
            f"| {fmt_number(extras.get('jaccard'))} | {fmt_number(extras.get('flops'), percent=True)} |")


OWN_SCORE = {"variational": "logit_variance", "vtsr": "temperature"}


def rows_for_format(out: Path, fmt: str, all_methods: list[Method], seeds: list[int],
                    resamples: int) -> tuple[list[str], dict[str, Any], list[str], dict[str, Any]]:
    """The table lines and numbers of one format's main comparison (against Top-K), then those of
    the comparison on top of temperature scaling (every predictive scaled, against Top-K + TS)."""
    by_key = {m.key: m for m in all_methods}
    topk_results = load_rows(out, f"{fmt}_topk", seeds)
    base = predictions(topk_results, "routing_mean", "predictive_entropy")
    # Top-K + TS: OOD scored by the entropy of its scaled prediction (the unscaled one for an older eval.json).
    base_ts = (predictions(topk_results, "ts", "scaled") if all(schema.scaled_ood_scores(r) for r in topk_results)
               else predictions(topk_results, "ts", "predictive_entropy"))
    lines, numbers, ts_lines, ts_numbers = [], {}, [], {}

    def add(name: str, label: str, predictive: str, fitted: str, row: Predictions | None,
            results: list[dict[str, Any]], reference: Predictions | None = None) -> None:
        if row is None:
            return
        against = base if reference is None else reference
        lines_, numbers_ = (lines, numbers) if reference is None else (ts_lines, ts_numbers)
        values = row_stats(row, against, resamples)
        extras = {"jaccard": mean_over(results, lambda r: schema.jaccard_at(r)),
                  "flops": mean_over(results, lambda r: schema.cost_number(r, "router_overhead_vs_topk"))}
        numbers_[name] = {**values, **extras, "label": label, "predictive": predictive, "fit_on": fitted}
        lines_.append(table_line(label, predictive, fitted, values, extras, reference=row is against))

    add("topk", "Top-K", "single pass", "finetune", base, topk_results)
    add("topk_ts", "Top-K + temperature scaling", "single pass", "finetune + calibration (T)", base_ts, topk_results)
    add("topk_ensemble", f"Top-K ensemble of {len(seeds)} seeds", "mean of seeds", "finetune",
        ensemble(topk_results), topk_results)
    add("topk_ts", "Top-K + temperature scaling", "single pass", "finetune + calibration (T)", base_ts, topk_results,
        base_ts)
    for key in (f"{fmt}_{router}" for router in ROUTER_KEYS):
        method = by_key[key]
        if not evaluated(out, key, seeds):
            lines.append(f"| {method.label} | not run in this study (--skip {key}) |" + " |" * 14)
            numbers[key] = {"label": method.label, "not_run": True}
            continue
        results = load_rows(out, key, seeds)
        fitted = "calibration" if method.stage == "posthoc" else "finetune"
        router = results[0]["router"]
        own = OWN_SCORE.get(router)
        # VTSR averages no routing samples: its single pass is one draw of its K experts (Sample-K).
        single_pass = "one Sample-K pass" if router == "vtsr" and results[0]["router_config"].get("eval_mode") != "topk" \
            else "routing mean"
        add(key, method.label, single_pass, fitted,
            predictions(results, "routing_mean", own or "predictive_entropy"), results)
        add(f"{key}_bma", method.label, "BMA", fitted,  # every router here samples at evaluation
            predictions(results, "bma", "mutual_information"), results)
        scaled = f"{fitted} + calibration (T)"
        add(f"{key}_ts", f"{method.label} + TS", single_pass, scaled, predictions(results, "ts", "scaled"),
            results, base_ts)
        add(f"{key}_bma_ts", f"{method.label} + TS", "BMA", scaled, predictions(results, "bma_ts", "scaled"),
            results, base_ts)
    return lines, numbers, ts_lines, ts_numbers


# ---------------------------------------------------------------------------
# Sweeps
# ---------------------------------------------------------------------------

def single(out: Path, key: str, seeds: list[int], predictive: str, resamples: int,
           name: str = EVAL_FILE) -> tuple[float, float, float] | None:
    rows = predictions(load_rows(out, key, seeds, name), predictive, "predictive_entropy")
    if rows is None:
        return None
    iv = stats.single_interval("ece_10", rows.probs_SNC, rows.labels_N, resamples)
    return iv.estimate, iv.low, iv.high


def sweeps_finished(out: Path, size: Size, fmt: str, seeds: list[int]) -> bool:
    """Whether everything one format's sweep report reads is on disk in ``out``: the sweeps' own
    runs, and on the sweeps' seeds the main Top-K and mean-field runs (the S evaluations included)."""
    main_runs = {f"{fmt}_topk", f"{fmt}_diag"}
    return all(evaluations_on_disk(out, method, seed, seeds)
               for method in methods(size, (fmt,)) if method.sweep or method.key in main_runs
               for seed in (method_seeds(method, seeds) if method.sweep else seeds[:SWEEP_SEEDS]))


def sweep_report(out: Path, size: Size, fmt: str, seeds: list[int],
                 resamples: int) -> tuple[list[str], dict[str, Any]]:
    """One format's sweeps: a table per swept setting and its plot (``ece_vs_<setting>_<format>.png``)."""
    from vrmoe import plots

    sweep_seeds = seeds[:SWEEP_SEEDS]
    ece = lambda key, predictive="routing_mean", name=EVAL_FILE: single(out, key, sweep_seeds, predictive,  # noqa: E731
                                                                        resamples, name)
    numbers: dict[str, Any] = {}
    topk, topk_ts = ece(f"{fmt}_topk"), ece(f"{fmt}_topk", "ts")

    def plot(name: str, xs: list, series: dict[str, list], xlabel: str, log_x: bool) -> None:
        numbers[name] = {"x": xs, "series": series}
        plots.interval_curves(xs, series, out / f"ece_vs_{name}_{fmt}.png", f"ECE against {name} ({fmt} format)",
                              xlabel, "ECE (10 bins), 95% CI", log_x)

    def curve(name: str, xs: list, keys: list[str], xlabel: str, log_x: bool, evals: list[str] | None = None) -> None:
        names = evals or [EVAL_FILE] * len(keys)
        plot(name, xs, {"variational diag, routing mean": [ece(k, "routing_mean", n) for k, n in zip(keys, names)],
                        "variational diag, BMA": [ece(k, "bma", n) for k, n in zip(keys, names)],
                        "Top-K": [topk] * len(xs), "Top-K + temperature scaling": [topk_ts] * len(xs)}, xlabel, log_x)

    curve("S", size.sweep_S, [f"{fmt}_diag"] * len(size.sweep_S), "S (routing samples at evaluation)", True,
          [f"eval_S{s}.json" for s in size.sweep_S])
    betas = sorted([0.01, *size.sweep_beta])
    curve("beta", betas, [f"{fmt}_diag" if b == 0.01 else f"{fmt}_diag_beta{b:g}" for b in betas], "beta", True)
    sigmas = sorted([0.1, *size.sweep_sigma])
    curve("sigma_init", sigmas, [f"{fmt}_diag" if s == 0.1 else f"{fmt}_diag_sigma{s:g}" for s in sigmas],
          "router.sigma_init", True)
    layers = list(range(size.moe_layers(fmt)))
    curve("layers", ["all", *(f"{i} only" for i in layers)], [f"{fmt}_diag", *(f"{fmt}_diag_layer{i}" for i in layers)],
          "MoE layers with the variational router", False)
    sizes = ["small", "large"]
    plot("model_size", sizes, {"Top-K": [topk, ece(f"large_{fmt}_topk")],
                               "Top-K + temperature scaling": [topk_ts, ece(f"large_{fmt}_topk", "ts")],
                               "variational diag, routing mean": [ece(f"{fmt}_diag"), ece(f"large_{fmt}_diag")],
                               "variational diag, BMA": [ece(f"{fmt}_diag", "bma"), ece(f"large_{fmt}_diag", "bma")]},
         "model (the small one, and the larger one of --sweep: " + " ".join(size.letter_large if fmt == "letter" else
         [o for o in size.models["large"] if o not in size.models["small"]]) + ")", False)

    def cell(p: tuple[float, float, float] | None) -> str:
        return "-" if p is None else f"{p[0]:.3f} [{p[1]:.3f}, {p[2]:.3f}]"

    lines = [f"## Sweeps ({fmt} format, seeds {sweep_seeds}; ECE of the test split, 95% CI pooled over seeds)", "",
             f"Top-K: {cell(topk)}; Top-K + temperature scaling: {cell(topk_ts)}.", ""]
    for name in ("S", "beta", "sigma_init", "layers", "model_size"):
        block = numbers[name]
        lines += [f"### {name} ({fmt} format)", "", "| series | " + " | ".join(str(x) for x in block["x"]) + " |",
                  "|---|" + "---:|" * len(block["x"])]
        lines += [f"| {series} | " + " | ".join(cell(p) for p in points) + " |"
                  for series, points in block["series"].items()]
        lines += [""]
    return lines, numbers


FOREST_FILE = "delta_ece.png"


def difference_forest(out: Path, formats: dict[str, dict[str, Any]]) -> Path:
    """The study at a glance: every method's ΔECE with its paired interval, against Top-K and on
    top of temperature scaling (against Top-K + TS), one panel each per format."""
    from vrmoe import plots

    def rows(numbers: dict[str, Any], skip: str) -> list[tuple[str, tuple[float, float, float] | None]]:
        out_rows = []
        for name, row in numbers.items():
            if name == skip or row.get("not_run"):
                continue
            iv = row["d_ece_10"]
            out_rows.append((f"{row['label']}, {row['predictive']}", (iv["estimate"], iv["low"], iv["high"])))
        return out_rows

    panels = {}
    for fmt in FORMATS:
        panels[f"{fmt}: against Top-K"] = rows(formats[fmt], "topk")
        panels[f"{fmt}: against Top-K + TS"] = rows(formats[f"{fmt}_on_ts"], "topk_ts")
    return plots.difference_forest(panels, out / FOREST_FILE, "ΔECE (10 bins) on the test split, paired 95% "
                                   "intervals pooled over seeds (filled: the interval excludes 0)", "ΔECE")


PER_ITEM_FILE = "per_item.json.gz"


def write_per_item(out: Path, all_methods: list[Method], seeds: list[int]) -> Path:
    """Every per-item number the main tables are computed from, for anyone to recompute them: per
    run of the main comparison and seed, the test split's labels and each predictive's probabilities,
    the OOD scores of every set (raw and after temperature scaling) and the ensemble's OOD predictions;
    to 4 significant digits (not decimals: a probability of 1e-7 stays one, so NLL can be recomputed
    to about 1e-4), gzipped JSON."""
    import gzip

    def rounded(value: Any) -> Any:
        if isinstance(value, float):
            return float(f"{value:.4g}")
        if isinstance(value, list):
            return [rounded(v) for v in value]
        if isinstance(value, dict):
            return {k: rounded(v) for k, v in value.items()}
        return value

    runs: dict[str, dict[str, Any]] = {}
    for method in (m for m in all_methods if m.fmt is not None and not m.sweep and evaluated(out, m.key, seeds)):
        for seed, result in zip(seeds, load_rows(out, method.key, seeds)):
            labels, by_predictive = schema.item_predictions(result)
            runs.setdefault(method.key, {})[f"seed{seed}"] = rounded({
                "labels": labels, "predictions": by_predictive, "ood_scores": schema.ood_scores(result),
                "scaled_ood_scores": schema.scaled_ood_scores(result),
                "ood_predictions": schema.ood_predictions(result)})
    path = out / PER_ITEM_FILE
    with gzip.open(path, "wt", encoding="utf-8") as f:
        json.dump({"seeds": seeds, "runs": runs}, f, separators=(",", ":"))
    return path


# ---------------------------------------------------------------------------
# Posterior diagnostics and the easy regime
# ---------------------------------------------------------------------------

def diagnostics_lines(out: Path, seeds: list[int]) -> list[str]:
    lines = ["## Posterior diagnostics at the end of training (mean over seeds, per MoE layer)", "",
             "flip: how often one routing sample changes the Top-K set of the evaluation selection; z: the gap "
             "between the K-th and the next mean logit over the standard deviation of their difference.", "",
             "| run | layer | flip rate | sigma mean | gap mean | z median |", "|---|---|---:|---:|---:|---:|"]
    for fmt in FORMATS:
        for key in (f"{fmt}_diag", f"{fmt}_full", f"{fmt}_mc_dropout"):
            if not evaluated(out, key, seeds):  # left out with --skip
                continue
            results = load_rows(out, key, seeds)
            layers = schema.posterior_layers(results[0])
            for layer in layers:
                read = lambda name, layer=layer: mean_over(  # noqa: E731
                    results, lambda r: schema.number(schema.posterior_layers(r).get(layer, {}).get(name)))
                lines.append(f"| {key} | {layer} | {fmt_number(read('flip_rate'))} | {fmt_number(read('sigma_mean'))} "
                             f"| {fmt_number(read('gap_mean'))} | {fmt_number(read('z_median'))} |")
    return lines + [""]


def easy_lines(out: Path, seeds: list[int]) -> list[str]:
    results = load_rows(out, "lm_topk", seeds)
    read = lambda key: mean_over(results, lambda r: schema.calibration_number(r, "next_token", key))  # noqa: E731
    return ["## Easy regime: next-token prediction of the Top-K language models", "",
            f"Accuracy {fmt_number(read('accuracy'))}, NLL {fmt_number(read('nll'))}, "
            f"ECE {fmt_number(read('ece_10'))} (mean over seeds, validation windows).", ""]


# ---------------------------------------------------------------------------
# Main
# ---------------------------------------------------------------------------

def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog=SCRIPT, description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    size_group = parser.add_mutually_exclusive_group()
    size_group.add_argument("--quick", action="store_true", help="tiny models and a few steps (a smoke run)")
    size_group.add_argument("--gpu", action="store_true", help="gpt_small-sized models with 16 experts on a CUDA GPU")
    parser.add_argument("--sweep", action="store_true", help="also the sweeps (S, beta, sigma_init, layers, model size)")
    parser.add_argument("--sweep-formats", nargs="+", choices=FORMATS, default=list(FORMATS), metavar="FORMAT",
                        help="the formats the sweeps run in (default: cloze letter)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default outputs/paper_table/<time>)")
    parser.add_argument("--seeds", type=int, nargs="+", default=None, help="seeds (default 0-4; --quick: 0 1)")
    parser.add_argument("--jobs", type=int, default=None, help="parallel runs (default: one per CPU core)")
    parser.add_argument("--skip", nargs="+", default=[], metavar="METHOD",
                        help="leave these methods (run dir names, e.g. letter_swag) out of this invocation; the "
                             "table marks a router left out as not run, and a later invocation with the same "
                             "--out and without --skip runs it")
    args = parser.parse_args(argv)
    if args.seeds is not None and len(set(args.seeds)) < len(args.seeds):
        parser.error(f"--seeds {' '.join(map(str, args.seeds))}: a seed is repeated; each seed is one run")
    if args.jobs is not None and args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")

    size = QUICK if args.quick else GPU if args.gpu else DEFAULT
    if args.gpu and not torch.cuda.is_available():
        raise ConfigError("--gpu needs a CUDA GPU (torch.cuda.is_available() is False); run without --gpu on a CPU")
    seeds = args.seeds or size.seeds
    cores = os.cpu_count() or 1
    workers = max(1, args.jobs or cores)
    threads = max(1, cores // workers)
    sweep_formats = tuple(f for f in FORMATS if f in args.sweep_formats) if args.sweep else ()
    all_methods = methods(size, sweep_formats)
    needed = {m.parent for m in all_methods} | {"cloze_topk", "letter_topk"}  # the table's reference rows
    unknown = sorted(set(args.skip) - {m.key for m in all_methods})
    if unknown or set(args.skip) & needed:
        bad = unknown or sorted(set(args.skip) & needed)
        parser.error(f"--skip {' '.join(bad)}: " + ("no such method" if unknown else "other runs start from it")
                     + "; name routers' runs, e.g. --skip letter_mc_dropout letter_swag")
    out = args.out or Path("outputs") / "paper_table" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot make the folder ({exc.strerror}); name a writable folder") from None
    started, started_at = time.perf_counter(), datetime.now().isoformat(timespec="seconds")
    stage_wall: dict[str, float] = {}
    print(f"study: {len(all_methods)} methods, seeds {seeds}, {workers} parallel runs of {threads} thread(s) -> {out}",
          flush=True)
    invocation = {"id": f"{started_at} pid {os.getpid()}", "started": started_at, "wall_s": 0.0,
                  "stage_wall_s": stage_wall, "completed": False, "cores": cores, "workers": workers,
                  "sweep": list(sweep_formats)}

    def record(**fields: Any) -> list[dict[str, Any]]:
        invocation.update(fields, wall_s=time.perf_counter() - started)
        return record_invocation(out, invocation)

    record()
    completed = False
    try:
        for stage in ("lm", "finetune", "posthoc"):
            jobs = []
            for method in (m for m in all_methods if m.stage == stage and m.key not in args.skip):
                for seed in method_seeds(method, seeds):
                    if evaluations_on_disk(out, method, seed, seeds):
                        continue  # done by an earlier invocation with this --out
                    path = run_dir(out, method.key, seed)
                    evals = method_evals(method, seed, seeds)
                    overrides = [*size.stage_overrides(method), *method.overrides, *size.eval,
                                 *method.eval_overrides, f"seed={seed}", "logger=none", *swag_overrides(method, size)]
                    if method.parent is not None:
                        overrides.append(f"train.init_from={run_dir(out, method.parent, seed)}")
                    jobs.append(Job(method.key, seed, overrides, str(path), str(out / "logs" / f"{method.key}_seed{seed}.log"),
                                    threads, evals))
            t0 = time.perf_counter()
            run_stage(jobs, workers, after_each=record)
            stage_wall[stage] = time.perf_counter() - t0
            print(f"stage {stage}: {len(jobs)} runs in {stage_wall[stage]:.0f}s", flush=True)
        completed = True
    finally:
        history = record(completed=completed)

    t_stats = time.perf_counter()
    wall = sum(entry["wall_s"] for entry in history)
    # With --sweep, a format's sweeps are reported when this invocation ran them or an earlier one
    # with this --out finished them: results.json holds every finished format whichever
    # --sweep-formats ran last.
    reported = tuple(f for f in FORMATS if args.sweep and (f in sweep_formats or sweeps_finished(out, size, f, seeds)))
    command = f"python {SCRIPT}" + "".join(
        f" --{flag}" for flag, on in (("quick", args.quick), ("gpu", args.gpu), ("sweep", args.sweep)) if on)
    if reported and reported != FORMATS:
        command += " --sweep-formats " + " ".join(reported)
    if args.seeds is not None:
        command += " --seeds " + " ".join(map(str, seeds))
    if args.skip:
        command += " --skip " + " ".join(args.skip)
    scale = "quick" if args.quick else "GPU" if args.gpu else "default"
    stamp = provenance(command, "cuda" if args.gpu else "cpu")
    lines = [f"# Bayesian routing at small scale ({scale} size)", "", stamp, "",
             f"Command: `{command}`. Seeds {seeds} ({SWEEP_SEEDS} for the sweeps); wall time {wall / 60:.1f} min "
             f"on {cores} CPU core(s), {workers} runs in parallel"
             + (f", summed over the {len(history)} invocations with this --out (which may have run at the same "
                "time)" if len(history) > 1 else "") + ".", "",
             "Every number is measured on the **test split** (items from text no model trained on). Intervals: "
             f"95% basic bootstrap over test items ({size.resamples} resamples), pooled over seeds; a Δ is "
             "against Top-K (routing mean, the same seeds), paired by item, and **bold** when its interval "
             "excludes 0. AUROC: per item, in-distribution = test items, near = items from other packages' "
             "docstrings (thirdparty_docs), shuffled = items from the word-shuffled test text (a control), far = "
             "items from Python source; the score is predictive entropy (pe) unless named: mutual "
             "information over S routing samples for BMA rows, the logit variance tr Σ for variational rows, "
             "VTSR's temperature. FLOPs: the router's extra work per token.", ""]
    results_json: dict[str, Any] = {"provenance": stamp, "size": asdict(size), "seeds": seeds, "wall_time_s": wall, "invocations": history,
                                    "formats": {}}
    for fmt in FORMATS:
        table, numbers, ts_table, ts_numbers = rows_for_format(out, fmt, all_methods, seeds, size.resamples)
        title = {"cloze": "cloze format (softmax over the four sentences' log-likelihoods)",
                 "letter": "letter format (softmax over the letters' logits at the answer: the paper's; its own "
                           "model: " + " ".join(o for o in size.letter_model if o not in size.models["small"]) + ")"}[fmt]
        lines += [f"## Hard regime, {title}", "", table_header("Top-K"), TABLE_RULE, *table, "",
                  f"### On top of temperature scaling ({fmt} format)", "",
                  "Every predictive scaled by its own T fit on the calibration split; Δ against Top-K + temperature "
                  "scaling, paired by item; AUROC from the entropy of each scaled prediction.", "",
                  table_header("Top-K + TS"), TABLE_RULE, *ts_table, ""]
        results_json["formats"][fmt] = numbers
        results_json["formats"][f"{fmt}_on_ts"] = ts_numbers
    lines += diagnostics_lines(out, seeds)
    lines += easy_lines(out, seeds)
    if reported:
        results_json["sweeps"] = {}
        for fmt in reported:
            sweep_lines, results_json["sweeps"][fmt] = sweep_report(out, size, fmt, seeds, size.resamples)
            lines += sweep_lines
    results_json["stats_wall_s"] = time.perf_counter() - t_stats
    (out / "table.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(results_json, indent=1), encoding="utf-8")
    forest = difference_forest(out, results_json["formats"])
    per_item = write_per_item(out, all_methods, seeds)
    print("\n".join(lines), flush=True)
    print(f"wrote {out / 'table.md'}, {out / 'results.json'}, {forest} and {per_item}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command(SCRIPT, main))
