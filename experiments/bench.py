"""The long form of ``vrmoe bench``: more repeats, thread counts, a real training run.

    python experiments/bench.py                      # about twice vrmoe bench's time, plus training
    python experiments/bench.py --threads 1 2        # the CPU rows once per thread count
    python experiments/bench.py --skip-train         # without the 60-step training run
    python experiments/bench.py --record experiments/results/bench --label long   # also a dated record

Writes ``<out>/bench.md`` (the tables, for docs/performance.md) and ``<out>/bench.json`` (every
number), default ``outputs/bench/<date>_<time>``; with ``--record DIR``, ``bench.md`` is also kept
as a dated record, as ``vrmoe bench --record`` keeps one. On top of the quick bench it measures:

* every ``vrmoe bench`` section (the router overheads at E = 8, 16 and 64 included, and the
  opt-in width section: the variational router against Top-K at D = 256 to 2048) with 41
  interleaved rounds instead of 21, once per thread count asked for;
* the tokens/s of the default ``vrmoe train`` (model=small, router=topk) over a 60-step
  run: the median of its logged intervals (the first, warm-up interval left out) and the
  whole run's figure from summary.json (which includes the closing validation and checkpoint).

On CUDA the GPU section (three bf16 layer shapes, MFU of model=gpt_small, graph breaks)
runs as in ``vrmoe bench``.
"""

from __future__ import annotations

import dataclasses
import json
import os
import statistics
import subprocess
import sys
from datetime import datetime
from pathlib import Path

import torch

from vrmoe.bench import (QUICK, SECTIONS, Row, device_name, render_markdown, render_rich, run_benchmarks,
                         shared_cpu_warning, start_record)
from vrmoe.console import CommandParser, log_line, run_command
from vrmoe.device import resolve_device
from vrmoe.tracking import read_metrics, read_summary

LONG = dataclasses.replace(QUICK, repeats=41, warmup=3)


def train_throughput(out: Path, steps: int) -> list[Row]:
    """Tokens/s of the default ``vrmoe train`` over ``steps`` steps, run as a user runs it."""
    run_dir = out / "train_small"
    script = Path(sys.executable).with_name("vrmoe")  # the console script, as a user runs it
    command = [str(script) if script.exists() else "vrmoe", "train", "logger=none", f"train.max_steps={steps}",
               f"train.log_every={max(1, steps // 6)}", f"hydra.run.dir={run_dir}"]
    log_line(f"bench: vrmoe {' '.join(command[1:])}")
    subprocess.run(command, check=True, env={**os.environ, "PYTHONUNBUFFERED": "1"})
    summary = read_summary(run_dir)
    if summary is None:
        raise SystemExit(f"{run_dir}: the training run left no readable summary.json")
    logged, _ = read_metrics(run_dir)
    intervals = [row["tokens_per_s"] for row in logged if "tokens_per_s" in row][1:]
    section = f"vrmoe train logger=none train.max_steps={steps} (model=small, router=topk, batch 32x128)"
    rows = [Row(section, "whole run (summary.json)", note=f"{summary['tokens_per_s']:,.0f} tokens/s over "
                                                          f"{summary['wall_time_s']:.0f}s")]
    if intervals:
        rows.append(Row(section, "median logged interval", note=f"{statistics.median(intervals):,.0f} tokens/s "
                                                                f"({len(intervals)} intervals after the first)"))
    return rows


def main(argv: list[str] | None = None) -> None:
    parser = CommandParser(prog="experiments/bench.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("outputs/bench") / datetime.now().strftime("%Y-%m-%d_%H-%M-%S"))
    parser.add_argument("--threads", type=int, nargs="+", default=[torch.get_num_threads()],
                        help="torch CPU thread counts to measure the CPU rows with")
    parser.add_argument("--repeats", type=int, default=LONG.repeats)
    parser.add_argument("--train-steps", type=int, default=60)
    parser.add_argument("--skip-train", action="store_true")
    parser.add_argument("--record", type=Path, default=None, metavar="DIR",
                        help="also keep bench.md as DIR/<date>_<device>_<commit>[_<label>].md (docs/performance.md)")
    parser.add_argument("--label", default=None, help="a word that ends the record's file name (with --record)")
    args = parser.parse_args(argv)
    for option, value in (("--repeats", args.repeats), ("--threads", min(args.threads)),
                          ("--train-steps", args.train_steps)):
        if value < 1:
            parser.error(f"{option} {value}: must be at least 1")
    if args.label is not None and args.record is None:
        parser.error("--label names a record's file: add --record DIR")
    device = resolve_device("auto")
    command = ["python", "experiments/bench.py", *(sys.argv[1:] if argv is None else argv)]
    record = start_record(args.record, device, command, args.label) if args.record else None
    sizes = dataclasses.replace(LONG, repeats=args.repeats)
    args.out.mkdir(parents=True, exist_ok=True)

    rows: list[Row] = []
    for threads in args.threads if device.type == "cpu" else [torch.get_num_threads()]:
        torch.set_num_threads(threads)
        warning = shared_cpu_warning(device)
        if warning:
            log_line(f"[yellow]note:[/] {warning}")
        tag = f" [{device_name(device)}]"
        new = run_benchmarks(sizes, device, SECTIONS, progress=lambda s: log_line(f"bench ({threads} threads): {s}"))
        rows += [dataclasses.replace(r, section=r.section + tag) for r in new]
    if not args.skip_train:
        rows += train_throughput(args.out, args.train_steps)

    title = f"vrmoe bench, long form; medians of {sizes.repeats} interleaved rounds"
    render_rich(rows, title)
    (args.out / "bench.md").write_text(render_markdown(rows, title) + "\n", encoding="utf-8")
    if record is not None:
        record.write(render_markdown(rows, title))
        log_line(f"wrote {record.path}")
    (args.out / "bench.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1) + "\n",
                                         encoding="utf-8")
    log_line(f"wrote {args.out / 'bench.md'} and {args.out / 'bench.json'}")


if __name__ == "__main__":
    run_command("experiments/bench.py", main)
