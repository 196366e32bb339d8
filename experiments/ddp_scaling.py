"""Tokens/s of the default model in one process and in 2 torchrun ranks, one CPU thread per process.

    python experiments/ddp_scaling.py [--steps 60]

Each run trains `model=small` (the default) for --steps steps with validation and checkpoints
out of the way; the figure is the run's own tokens/s from summary.json (the whole loop,
first steps included). Run it on an otherwise idle machine.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

from vrmoe.console import CommandParser, run_command


def run(cmd: list[str], cwd: Path) -> float:
    env = {**os.environ, "OMP_NUM_THREADS": "1", "OMP_WAIT_POLICY": "PASSIVE"}
    subprocess.run(cmd, cwd=cwd, check=True, env=env, capture_output=True, text=True)
    return json.loads((cwd / "run" / "summary.json").read_text())["tokens_per_s"]


def main() -> None:
    parser = CommandParser(prog="experiments/ddp_scaling.py", description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=60)
    args = parser.parse_args()
    if args.steps < 1:
        parser.error(f"--steps {args.steps}: must be at least 1")
    overrides = ["logger=none", f"train.max_steps={args.steps}", f"train.eval_every={args.steps}",
                 f"train.ckpt_every={args.steps}", "train.eval_batches=1", "hydra.run.dir=run"]
    vrmoe = str(Path(sys.executable).with_name("vrmoe"))
    torchrun = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
    results = {}
    for name, cmd in (("1 process", [vrmoe, "train", *overrides]),
                      ("2 ranks (torchrun, gloo)", [torchrun, "--standalone", "--nproc_per_node=2", "-m", "vrmoe",
                                                    "train", *overrides])):
        with tempfile.TemporaryDirectory() as tmp:
            results[name] = run(cmd, Path(tmp))
    base = results["1 process"]
    print(f"| model=small, {args.steps} steps of 32 x 128 tokens, 1 thread per process | tokens/s | speed-up |")
    print("|---|---:|---:|")
    for name, tps in results.items():
        print(f"| {name} | {tps:,.0f} | {tps / base:.2f}x |")


if __name__ == "__main__":
    run_command("experiments/ddp_scaling.py", main)
