"""Where the letter format becomes a regime worth calibrating at CPU scale: a small grid.

    python experiments/letter_regime.py                       # every setting, seed 0
    python experiments/letter_regime.py --settings bpe_d128 --seeds 0 1
    python experiments/letter_regime.py --quick               # a smoke form (tiny models, a few steps)

Each setting runs the study's letter-format protocol (``experiments/paper_table.py``: a Top-K
language model, fine-tuned on letter-format items of the fine-tuning split, ``vrmoe eval`` on the
test split) with other levers: the tokenizer (``data.tokenizer=bpe``), the model's width and depth,
language-model steps, fine-tuning items and steps. Settings with the same language model share it. The regime the study needs: test accuracy at
least 0.45 (chance 0.25) and an over-confident model (test ECE at least 0.10).

The table (``--out``/table.md, and ``experiments/results/letter_regime.md`` when asked with
``--write-results``) gives each setting's test accuracy, ECE (10 bins), NLL, temperature-scaled
ECE and the CPU minutes of its runs: the process CPU time (``time.process_time``) of the training
and evaluation, single-threaded, which a shared machine does not inflate as it does wall time.
Re-running with the same ``--out`` skips what is done.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import paper_table  # noqa: E402  (the study's run and evaluation helpers)
from paper_table import Job, run_dir, run_job  # noqa: E402

from vrmoe.console import CommandParser, run_command  # noqa: E402
from vrmoe.eval import schema  # noqa: E402
from vrmoe.tracking import EVAL_FILE, read_json  # noqa: E402

ACCURACY_NEEDED, ECE_NEEDED = 0.45, 0.10
RESULTS = Path(__file__).resolve().parent / "results" / "letter_regime.md"
CPU_FILE = "cpu_seconds.json"  # per run dir: the process CPU time its training and evaluation took


@dataclass(frozen=True)
class Setting:
    key: str
    description: str
    model: tuple[str, ...]  # model and data overrides shared by both stages
    lm: tuple[str, ...]  # the language model's training
    finetune: tuple[str, ...]  # the letter-format fine-tuning
    lm_key: str = ""  # settings with the same language model share it (default: the setting's own)

    @property
    def lm_name(self) -> str:
        return f"{self.lm_key or self.key}_lm"


BPE = ("data.tokenizer=bpe", "data.vocab_size=4096")
D128 = ("model.d_model=128", "model.n_layers=4", "model.n_heads=4", "model.expert_hidden=256", "model.dense_hidden=512")
LM = ("train.batch_size=8", "train.lr=3e-3", "train.warmup_steps=50", "train.eval_every=500", "train.log_every=100",
      "train.eval_batches=4")
FINETUNE = ("task=mcq", "task.format=letter", "task.val_items=256", "train.batch_size=32", "train.lr=1e-3",
            "train.warmup_steps=20", "train.log_every=100")


def steps(n: int) -> tuple[str, ...]:
    return (f"train.max_steps={n}", f"train.eval_every={n}", f"train.ckpt_every={n}")


SETTINGS = {s.key: s for s in [
    # The study's letter setting (bytes, d=64, 2 layers, 1000 items): the reference, near chance.
    Setting("study", "bytes, d=64, 2 layers; LM 1500 steps; 1000 items, 300 steps", (*paper_table.SMALL,),
            (*LM, *steps(1500)), (*FINETUNE, "task.train_items=1000", "train.batch_size=16", *steps(300))),
    Setting("bpe_d128", "BPE 4096, d=128, 4 layers; LM 1000 steps; 8000 items, 1000 steps (4 epochs)",
            (*paper_table.SMALL, *D128, *BPE), (*LM, *steps(1000)),
            (*FINETUNE, "task.train_items=8000", *steps(1000))),
    Setting("bpe_d128_4k", "BPE 4096, d=128, 4 layers; LM 1000 steps; 4000 items, 1000 steps (8 epochs)",
            (*paper_table.SMALL, *D128, *BPE), (*LM, *steps(1000)),
            (*FINETUNE, "task.train_items=4000", *steps(1000)), lm_key="bpe_d128"),
    Setting("bpe_d128_16k", "BPE 4096, d=128, 4 layers; LM 1000 steps; 16000 items, 2000 steps (4 epochs)",
            (*paper_table.SMALL, *D128, *BPE), (*LM, *steps(1000)),
            (*FINETUNE, "task.train_items=16000", *steps(2000)), lm_key="bpe_d128"),
    Setting("bpe_d128_long", "BPE 4096, d=128, 4 layers; LM 2000 steps; 8000 items, 2000 steps (8 epochs)",
            (*paper_table.SMALL, *D128, *BPE), (*LM, *steps(2000)),
            (*FINETUNE, "task.train_items=8000", *steps(2000))),
    Setting("bpe_d64", "BPE 4096, d=64, 2 layers; LM 1500 steps; 8000 items, 1000 steps (4 epochs)",
            (*paper_table.SMALL, *BPE), (*LM, *steps(1500)), (*FINETUNE, "task.train_items=8000", *steps(1000))),
]}
QUICK = Setting("quick", "tiny model, a few steps (smoke form)",
                ("model=tiny", "model.seq_len=128", "K=2", "data.val_fraction=0.3", *BPE),
                (*LM, *steps(10)), (*FINETUNE, "task.train_items=64", "task.val_items=16", "train.batch_size=8",
                                    *steps(8)))
EVAL = ("eval.mcq_items=1000", "eval.calibration_items=1000", "eval.ood_task=lm", "eval.windows=8",
        "eval.stability_windows=2", "eval.batch_size=32", "eval.predictive=routing_mean")
QUICK_EVAL = ("eval.mcq_items=24", "eval.calibration_items=24", "eval.ood_task=lm", "eval.windows=4",
              "eval.stability_windows=1", "eval.batch_size=16", "eval.predictive=routing_mean")


def timed_job(job: Job) -> dict[str, Any]:
    """``paper_table.run_job`` with the CPU time of this process added to the run dir's record
    (one run per process call, single-threaded)."""
    started = time.process_time()
    result = run_job(job)
    cpu = time.process_time() - started
    record = Path(job.run_dir) / CPU_FILE
    before = json.loads(record.read_text()) if record.exists() else {}
    before["cpu_s"] = before.get("cpu_s", 0.0) + cpu
    record.write_text(json.dumps(before))
    return {**result, "cpu_s": cpu}


def lm_job(setting: Setting, seed: int, out: Path) -> Job:
    path = run_dir(out, setting.lm_name, seed)
    return Job(setting.lm_name, seed, [*setting.model, f"seed={seed}", "logger=none", "router=topk", *setting.lm],
               str(path), str(out / "logs" / f"{setting.lm_name}_seed{seed}.log"), 1, [])


def finetune_job(setting: Setting, seed: int, out: Path, eval_overrides: tuple[str, ...]) -> Job:
    lm_dir = run_dir(out, setting.lm_name, seed)
    return Job(f"{setting.key}_letter", seed, [*setting.model, f"seed={seed}", "logger=none", "router=topk",
                                              *setting.finetune, *eval_overrides, f"train.init_from={lm_dir}"],
               str(run_dir(out, f"{setting.key}_letter", seed)), str(out / "logs" / f"{setting.key}_letter_seed{seed}.log"),
               1, [(EVAL_FILE, [])])


def done(job: Job) -> bool:
    from vrmoe.tracking import read_summary

    return (read_summary(Path(job.run_dir)) or {}).get("status") == "completed" and all(
        (Path(job.run_dir) / name).exists() for name, _ in job.evals)


def run_jobs(jobs: list[Job], workers: int) -> None:
    """The jobs not done yet, ``workers`` at a time in spawned processes (each single-threaded)."""
    todo = [job for job in jobs if not done(job)]
    if workers <= 1 or len(todo) <= 1:
        for job in todo:
            timed_job(job)
        return
    import multiprocessing

    with ProcessPoolExecutor(max_workers=workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        list(pool.map(timed_job, todo))


def cpu_minutes(*dirs: Path) -> float | None:
    total = 0.0
    for path in dirs:
        record = read_json(path / CPU_FILE)
        if not isinstance(record, dict) or "cpu_s" not in record:
            return None
        total += float(record["cpu_s"])
    return total / 60


def row(setting: Setting, seed: int, out: Path) -> dict[str, Any] | None:
    lm_dir, ft_dir = run_dir(out, setting.lm_name, seed), run_dir(out, f"{setting.key}_letter", seed)
    result = read_json(ft_dir / EVAL_FILE)
    if result is None:
        return None
    read = lambda key, predictive="routing_mean": schema.calibration_number(result, "mcq", key, predictive)  # noqa: E731
    accuracy, ece = read("accuracy"), read("ece_10")
    return {"setting": setting.key, "description": setting.description, "seed": seed, "accuracy": accuracy,
            "ece_10": ece, "nll": read("nll"), "ece_10_ts": read("ece_10", "ts"),
            "items": schema.item_counts(result).get("in", {}).get("items"),
            "cpu_min": cpu_minutes(lm_dir, ft_dir),
            "meets": accuracy is not None and ece is not None and accuracy >= ACCURACY_NEEDED and ece >= ECE_NEEDED}


def table(rows: list[dict[str, Any]], command: str) -> list[str]:
    fmt = lambda v: "-" if v is None else f"{v:.3f}"  # noqa: E731
    minutes = lambda v: "-" if v is None else f"{v:.1f}"  # noqa: E731
    lines = ["# The letter-format regime at CPU scale", "",
             f"Command: `{command}`. Test split of the study's protocol (Top-K fine-tuned in the letter format "
             f"on the fine-tuning split, `vrmoe eval` on {rows[0]['items'] if rows else '-'} test items; chance "
             f"accuracy 0.25). Needed: accuracy >= {ACCURACY_NEEDED} and ECE >= {ECE_NEEDED} (over-confident). "
             "CPU minutes: the process CPU time of the language model's and the fine-tuning's training and "
             "the evaluation, single-threaded (time.process_time; a shared machine inflates wall time, not "
             "this).", "",
             "| setting | seed | what | test accuracy | ECE (10 bins) | NLL | ECE after temperature scaling "
             "| CPU minutes | meets both |",
             "|---|---:|---|---:|---:|---:|---:|---:|---|"]
    for r in rows:
        lines.append(f"| {r['setting']} | {r['seed']} | {r['description']} | {fmt(r['accuracy'])} | {fmt(r['ece_10'])} "
                     f"| {fmt(r['nll'])} | {fmt(r['ece_10_ts'])} | {minutes(r['cpu_min'])} "
                     f"| {'yes' if r['meets'] else 'no'} |")
    return lines + [""]


def main(argv: list[str] | None = None) -> int:
    parser = CommandParser(prog="experiments/letter_regime.py", description=__doc__.split("\n\n")[0],
                           formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--settings", nargs="+", default=None, choices=sorted(SETTINGS),
                        help="which settings (default: every one)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0], help="seeds (default 0)")
    parser.add_argument("--quick", action="store_true", help="a smoke form: a tiny model, a few steps")
    parser.add_argument("--jobs", type=int, default=1, help="runs in parallel (each single-threaded)")
    parser.add_argument("--out", type=Path, default=None, help="output folder (default outputs/letter_regime/<time>)")
    parser.add_argument("--write-results", action="store_true", help=f"also write {RESULTS.relative_to(RESULTS.parents[2])}")
    args = parser.parse_args(argv)
    if args.jobs < 1:
        parser.error(f"--jobs {args.jobs}: must be at least 1")
    if args.quick and args.settings:
        parser.error("--quick runs its own tiny setting; leave --settings out")
    chosen = [QUICK] if args.quick else [SETTINGS[k] for k in (args.settings or SETTINGS)]
    eval_overrides = QUICK_EVAL if args.quick else EVAL
    out = args.out or Path("outputs") / "letter_regime" / datetime.now().strftime("%Y-%m-%d_%H-%M-%S")
    out.mkdir(parents=True, exist_ok=True)
    lms = {job.run_dir: job for s in chosen for seed in args.seeds if (job := lm_job(s, seed, out))}
    finetunes = [finetune_job(s, seed, out, eval_overrides) for s in chosen for seed in args.seeds]
    print(f"letter regime: {len(lms)} language models, {len(finetunes)} fine-tunings, {args.jobs} in parallel -> {out}",
          flush=True)
    run_jobs(list(lms.values()), args.jobs)
    run_jobs(finetunes, args.jobs)
    rows = [r for s in chosen for seed in args.seeds if (r := row(s, seed, out)) is not None]
    command = "python experiments/letter_regime.py" + (" --quick" if args.quick else "") + (
        f" --settings {' '.join(args.settings)}" if args.settings else "") + f" --seeds {' '.join(map(str, args.seeds))}"
    body = table(rows, command)  # the title, then what wrote it, then the table
    lines = [*body[:2], paper_table.provenance(command), "", *body[2:]]
    (out / "table.md").write_text("\n".join(lines), encoding="utf-8")
    (out / "results.json").write_text(json.dumps(rows, indent=1), encoding="utf-8")
    if args.write_results:
        RESULTS.write_text("\n".join(lines), encoding="utf-8")
    print("\n".join(lines), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(run_command("experiments/letter_regime.py", main))
