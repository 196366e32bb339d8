"""Sweeps through the installed CLI: `vrmoe train -m`, failed jobs, launchers, W&B grouping."""

from __future__ import annotations

import json
import struct
from pathlib import Path

import pytest

from omegaconf import OmegaConf

from vrmoe.jobs import record_failed_job, run_objective, sweep_group, sweep_run_name

from conftest import TINY, run_cli

STEPS = ["train.max_steps=2"]


def job_dirs(sweep_dir: Path) -> dict[str, Path]:
    """Job dirs of a sweep by their job number."""
    return {p.name.split("_", 1)[0]: p for p in sweep_dir.iterdir() if p.is_dir() and p.name[0].isdigit()}


def summary(run_dir: Path) -> dict:
    return json.loads((run_dir / "summary.json").read_text())


def wandb_records(run_dir: Path) -> list:
    """The records of a run's offline W&B log (a LevelDB-style log of protobuf records)."""
    from wandb.proto import wandb_internal_pb2 as pb

    (path,) = run_dir.glob("wandb/offline-run-*/run-*.wandb")
    data = path.read_bytes()
    assert data[:4] == b":W&B"
    block, pos, pending, records = 32768, 7, b"", []
    while pos + 7 <= len(data):
        if block - pos % block < 7:  # a block's tail too short for a header is padding
            pos += block - pos % block
            continue
        _crc, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        if kind == 0:
            pos += block - pos % block
            continue
        chunk, pos = data[pos + 7:pos + 7 + length], pos + 7 + length
        pending = chunk if kind in (1, 2) else pending + chunk  # full/first start, middle/last continue
        if kind in (1, 4):
            record = pb.Record()
            record.ParseFromString(pending)
            records.append(record)
    return records


@pytest.mark.slow  # four jobs with W&B: about 20 s on two cores
def test_a_2x2_sweep_with_failing_jobs_completes_and_compare_reads_it(tmp_path):
    sweep_dir = tmp_path / "sweep"
    # K=9 > 4 experts of model=tiny: those two jobs fail validation, the other two must still train.
    proc = run_cli("train", "-m", *TINY, "logger=wandb", *STEPS, "K=2,9", "seed=0,1",
                   f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path, check=False)
    assert "Traceback" not in proc.stderr
    # The sweep finishes every job, then reports the failures with a non-zero exit.
    assert proc.returncode == 1 and "2 completed, 2 failed" in proc.stderr
    jobs = job_dirs(sweep_dir)
    assert sorted(jobs) == ["0", "1", "2", "3"]
    by_overrides = {(o["K"], o["seed"]): d for d in jobs.values()
                    for o in [dict(x.split("=", 1) for x in summary(d)["overrides"])]}
    for seed in ("0", "1"):
        done, failed = summary(by_overrides[("2", seed)]), summary(by_overrides[("9", seed)])
        assert done["status"] == "completed" and done["step"] == 2
        assert failed["status"] == "failed" and "K=9 is out of range" in failed["error"]
        ok_dir = by_overrides[("2", seed)]
        # The run's figures, drawn at the end of training.
        assert (ok_dir / "utilisation.png").stat().st_size > 0 and (ok_dir / "routing_entropy.png").exists()

        # W&B: one group for the sweep, the run named by what the sweep varies, curves on the
        # training step, per-expert utilisation scalars, a heatmap image, and a closed run.
        records = wandb_records(ok_dir)
        run = next(r.run for r in records if r.WhichOneof("record_type") == "run")
        assert run.run_group == "sweep" and run.display_name == f"K=2,seed={seed}"
        metrics = {(r.metric.glob_name or r.metric.name): r.metric.step_metric
                   for r in records if r.WhichOneof("record_type") == "metric"}
        assert metrics.get("*") == "step"
        keys = {item.key or "/".join(item.nested_key) for r in records if r.WhichOneof("record_type") == "history"
                for item in r.history.item}
        assert {"train/loss", "val/loss", "moe/layer0/utilisation/3", "moe/layer1/entropy", "step"} <= keys
        assert any(k.startswith("moe/utilisation_heatmap") for k in keys)
        exits = [r.exit.exit_code for r in records if r.WhichOneof("record_type") == "exit"]
        assert exits == [0]

    rows = json.loads(run_cli("compare", str(sweep_dir), "--format", "json", cwd=tmp_path).stdout)
    assert [(r["K"], r["seed"], r["status"]) for r in rows] == [(2, 0, "completed"), (2, 1, "completed"),
                                                                 (9, 0, "failed"), (9, 1, "failed")]
    for row in rows:
        s = summary(Path(row["path"]))
        assert row["val_loss"] == s.get("final_val_loss") and row["tokens_per_s"] == s.get("tokens_per_s")
        assert row["error"] == s.get("error")
    table = run_cli("compare", str(sweep_dir), cwd=tmp_path).stdout
    assert table.count("failed") == 2 and table.count("completed") == 2


@pytest.mark.parametrize("launcher", [["hydra/launcher=joblib", "hydra.launcher.n_jobs=2"],
                                      ["hydra/launcher=submitit_local"]], ids=["joblib", "submitit_local"])
def test_parallel_launchers_run_the_job_function_in_worker_processes(tmp_path, launcher):
    sweep_dir = tmp_path / "sweep"
    proc = run_cli("train", "-m", *launcher, *TINY, *STEPS, "K=1,9", f"hydra.sweep.dir={sweep_dir}", cwd=tmp_path,
                   check=False)
    assert proc.returncode == 1 and "1 completed, 1 failed" in proc.stderr
    statuses = {n: summary(d)["status"] for n, d in job_dirs(sweep_dir).items()}
    assert statuses == {"0": "completed", "1": "failed"}
    assert "out of range" in summary(job_dirs(sweep_dir)["1"])["error"]


def test_the_slurm_preset_composes_with_one_gpu_per_job(tmp_path):
    out = run_cli("train", "hydra/launcher=slurm", "model=tiny", "--cfg", "hydra", cwd=tmp_path).stdout
    launcher = out[out.index("  launcher:"):out.index("  sweeper:")]
    assert "SlurmLauncher" in launcher and "gpus_per_node: 1" in launcher and "timeout_min: 720" in launcher


def test_a_failed_job_keeps_what_training_recorded(tmp_path):
    run_dir = tmp_path / "job"
    run_dir.mkdir()
    (run_dir / "summary.json").write_text(json.dumps({"status": "failed", "step": 3, "overrides": ["K=1"]}))
    record_failed_job(run_dir, ["K=1"], "RuntimeError: boom", 0, traceback="Traceback ...\nRuntimeError: boom")
    s = summary(run_dir)
    assert s["status"] == "failed" and s["step"] == 3 and s["error"] == "RuntimeError: boom"
    assert s["traceback"].endswith("boom")
    # A job that failed before training started has only the failure to record.
    record_failed_job(tmp_path / "early", ["K=2"], "ValueError: early", 1)
    assert summary(tmp_path / "early") == {"overrides": ["K=2"], "status": "failed", "error": "ValueError: early"}


def test_sweep_groups_and_run_names(tmp_path):
    assert sweep_group(Path("outputs/multirun/2026-01-02/10-11-12")) == "2026-01-02_10-11-12"
    assert sweep_group(tmp_path / "my_sweep") == "my_sweep"
    sweep_dir = tmp_path / "sweep"
    sweep_dir.mkdir()
    (sweep_dir / "multirun.yaml").write_text(
        "hydra:\n  overrides:\n    task:\n    - model=tiny\n    - router=topk,temperature\n    - seed=range(0,3)\n"
        "    - T=0.5\n")
    job = ["model=tiny", "router=temperature", "seed=2", "T=0.5"]
    assert sweep_run_name(sweep_dir, job) == "router=temperature,seed=2"
    # Without the sweep's record, all the job's overrides name it.
    assert sweep_run_name(tmp_path, job) == "model=tiny,router=temperature,seed=2,T=0.5"


@pytest.mark.slow
def test_the_optuna_preset_minimises_the_runs_own_objective(tmp_path):
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    proc = run_cli("train", "-m", "hparams_search=variational_ece", *TINY, "train.max_steps=3",
                   "hydra.sweeper.n_trials=2", "eval.windows=4", "eval.mcq_items=8", "eval.stability_windows=1",
                   "eval.gammas=[0.01]", "hydra.sweep.dir=sweep", cwd=tmp_path)
    assert "Traceback" not in proc.stderr
    runs = sorted(p.parent for p in (tmp_path / "sweep").rglob("summary.json"))
    assert len(runs) == 2
    objectives = [run_objective(run, "mcq_ece") for run in runs]
    assert all(0 <= value <= 1 for value in objectives)
    best = OmegaConf.load(tmp_path / "sweep" / "optimization_results.yaml")
    assert best.best_value == pytest.approx(min(objectives))
    assert set(best.best_params) == {"beta", "router.sigma_init"}
