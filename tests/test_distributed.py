"""Data parallelism through the real CLI under torchrun, two gloo ranks of the tiny model on CPU."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import TINY

TORCHRUN = shutil.which("torchrun") or str(Path(sys.executable).with_name("torchrun"))
RUN = [*TINY, "train.batch_size=8", "train.eval_every=3", "train.eval_batches=2"]
# Losses of 1 and 2 ranks agree to float rounding (the global batch is summed in another order).
LOSS_TOLERANCE = 1e-5


def torchrun(*args: str, cwd: Path, nproc: int = 2, script: str = "-m vrmoe", timeout: int = 180,
             env: dict | None = None):
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", **(env or {})}
    cmd = [TORCHRUN, "--standalone", f"--nproc_per_node={nproc}", *script.split(), *args]
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)


def single(*args: str, cwd: Path):
    exe = Path(sys.executable).with_name("vrmoe")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([str(exe), *args], cwd=cwd, capture_output=True, text=True, timeout=180, env=env)


def rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def assert_same_run(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b]
    for ra, rb in zip(a, b):
        for key in ("train/loss", "train/aux_loss", "val/loss"):
            if key in ra:
                assert rb[key] == pytest.approx(ra[key], abs=LOSS_TOLERANCE), (ra["step"], key)
        for layer, stats in ra["moe"].items():  # statistics of the global batch, not of rank 0's half
            for name in ("utilisation", "load_cv", "entropy"):
                assert rb["moe"][layer][name] == pytest.approx(stats[name], abs=1e-4), (ra["step"], layer, name)


@pytest.fixture(scope="module")
def one_process_run(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("one")
    proc = single("train", *RUN, "train.max_steps=6", "train.ckpt_every=3", "hydra.run.dir=one", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "one"


@pytest.mark.slow
def test_two_ranks_match_one_process(tmp_path, one_process_run):
    proc = torchrun("train", *RUN, "train.max_steps=6", "train.ckpt_every=3", "hydra.run.dir=two", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    run = tmp_path / "two"
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["world_size"] == 2
    # Only rank 0 wrote: one Hydra record, no stray files beside the run's own.
    assert sorted(p.name for p in (run / ".hydra").iterdir()) == ["config.yaml", "hydra.yaml", "overrides.yaml"]
    assert {p.name for p in run.iterdir()} == {p.name for p in one_process_run.iterdir()}
    assert_same_run(rows(one_process_run), rows(run))


@pytest.mark.slow
def test_a_failing_rank_brings_the_run_down_and_one_process_resumes_it(tmp_path, one_process_run):
    script = str(Path(__file__).parent / "scripts" / "fail_on_rank1.py")
    start = time.monotonic()
    proc = torchrun("train", *RUN, "train.max_steps=6", "train.ckpt_every=3", "hydra.run.dir=run", cwd=tmp_path,
                    script=script, env={"FAIL_AT_STEP": "4"})
    assert proc.returncode != 0 and time.monotonic() - start < 150
    assert "rank 1 fails on purpose" in proc.stderr
    run = tmp_path / "run"
    assert json.loads((run / "summary.json").read_text())["status"] in ("failed", "interrupted")
    # The 2-rank checkpoint (step 3) resumes in one process and continues the same data order.
    resumed = single("train", *RUN, "train.max_steps=6", "train.ckpt_every=3", f"train.resume={run}", cwd=tmp_path)
    assert resumed.returncode == 0, resumed.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    assert_same_run(rows(one_process_run), rows(run))


@pytest.mark.slow
def test_a_sweep_job_of_two_tasks_trains_data_parallel(tmp_path):
    proc = single("train", "-m", "hydra/launcher=submitit_local", "hydra.launcher.tasks_per_node=2", *RUN,
                  "train.max_steps=2", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    [summary] = [json.loads(p.read_text()) for p in (tmp_path / "sweep").rglob("summary.json")]
    assert summary["status"] == "completed" and summary["world_size"] == 2


def test_a_global_batch_that_does_not_divide_over_the_ranks_is_one_line(tmp_path):
    proc = torchrun("train", *TINY, "train.batch_size=5", "train.max_steps=2", cwd=tmp_path, timeout=120)
    err = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode != 0 and err and "train.batch_size=5" in err[0] and "multiple of 2" in err[0]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


@pytest.mark.slow
def test_evaluation_sharded_over_two_ranks_gives_the_one_process_numbers(tmp_path, one_process_run):
    shutil.copytree(one_process_run, tmp_path / "a")
    shutil.copytree(one_process_run, tmp_path / "b")
    args = ["eval.windows=8", "eval.mcq_items=12", "eval.batch_size=4", "eval.stability_windows=3",
            "eval.gammas=[0,0.01,0.05]"]
    one = single("eval", f"run={tmp_path / 'a'}", *args, cwd=tmp_path)
    two = torchrun("eval", f"run={tmp_path / 'b'}", *args, cwd=tmp_path)
    assert one.returncode == 0 and two.returncode == 0, two.stderr
    a, b = (json.loads((tmp_path / d / "eval.json").read_text()) for d in ("a", "b"))
    for task in ("next_token", "mcq"):
        for key in ("accuracy", "nll", "ece_10", "ece_15"):
            assert b["calibration"][task][key] == pytest.approx(a["calibration"][task][key], abs=1e-6), (task, key)
    assert b["ood"]["far"]["auroc"] == pytest.approx(a["ood"]["far"]["auroc"], abs=1e-9)
    assert len(b["ood"]["scores"]["in"]["predictive_entropy"]) == len(a["ood"]["scores"]["in"]["predictive_entropy"])
    assert b["stability"]["jaccard"]["mean"] == pytest.approx(a["stability"]["jaccard"]["mean"], abs=1e-6)


# `vrmoe train` that receives SIGINT (Ctrl-C) as the training step INTERRUPT_AT_STEP (0-based) begins,
# on rank 0 (or the one process): that step finishes, is checkpointed, and the run stops.
INTERRUPT_SCRIPT = """
import os, signal, sys
from vrmoe.cli import main
from vrmoe.train import step as step_module

original = step_module.TrainStep.__call__

def signalled(self, step, forward):
    if os.environ.get("RANK", "0") == "0" and step == int(os.environ["INTERRUPT_AT_STEP"]):
        os.kill(os.getpid(), signal.SIGINT)
    return original(self, step, forward)

step_module.TrainStep.__call__ = signalled
main(sys.argv[1:])
"""
# Rows at steps 3 and 6; the interrupt checkpoints step 4, so the row at 6 (steps 4-6) straddles it.
STRADDLE = [*RUN, "train.max_steps=6", "train.log_every=3", "train.eval_every=6", "train.ckpt_every=100"]
INTERRUPT_AT = {"INTERRUPT_AT_STEP": "3"}


def without_time(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in rows(run_dir)]


def interrupted(root: Path, name: str, nproc: int) -> Path:
    """A run of STRADDLE stopped by SIGINT after step 4, with ``nproc`` ranks (1: one process)."""
    script = root / "interrupt.py"
    script.write_text(INTERRUPT_SCRIPT)
    args = ["train", *STRADDLE, f"hydra.run.dir={name}"]
    if nproc > 1:
        proc = torchrun(*args, cwd=root, nproc=nproc, script=str(script), env=INTERRUPT_AT)
    else:
        proc = subprocess.run([sys.executable, str(script), *args], cwd=root, capture_output=True, text=True,
                              timeout=180, env={**os.environ, "OMP_NUM_THREADS": "1", **INTERRUPT_AT})
    assert proc.returncode != 0 and "interrupted" in proc.stderr, proc.stderr
    run = root / name
    assert [r["step"] for r in rows(run)] == [3]
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
    return run


@pytest.fixture(scope="module")
def two_rank_straddle(tmp_path_factory) -> tuple[Path, Path]:
    """The uninterrupted 2-rank run, and the same run interrupted mid-interval (its checkpoint at step 4)."""
    root = tmp_path_factory.mktemp("straddle")
    proc = torchrun("train", *STRADDLE, "hydra.run.dir=full", cwd=root)
    assert proc.returncode == 0, proc.stderr
    return root / "full", interrupted(root, "part", nproc=2)


def resume(run: Path, launch, cwd: Path) -> Path:
    """Resume ``run`` with ``launch`` (``torchrun`` or ``single``); it must complete."""
    proc = launch("train", f"train.resume={run}", cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    assert json.loads((run / "summary.json").read_text())["status"] == "completed"
    return run


@pytest.mark.slow
def test_resume_straddling_row_same_ranks(tmp_path, two_rank_straddle):
    full, part = two_rank_straddle
    run = resume(Path(shutil.copytree(part, tmp_path / "run")), torchrun, tmp_path)
    # Every row bit for bit, the row at step 6 whose interval the interrupt straddles included.
    assert without_time(run) == without_time(full)


@pytest.mark.slow
def test_resume_straddling_row_other_ranks(tmp_path, two_rank_straddle):
    full, part = two_rank_straddle
    # 2 ranks -> 1 process: the interval's mean over the 2 ranks continues in one process.
    assert_same_run(rows(full), rows(resume(Path(shutil.copytree(part, tmp_path / "one")), single, tmp_path)))
    # 1 process -> 2 ranks: each rank continues the one process's partial sums.
    assert_same_run(rows(full), rows(resume(interrupted(tmp_path, "two", nproc=1), torchrun, tmp_path)))
