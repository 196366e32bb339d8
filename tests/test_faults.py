"""Faults injected into runs, sweeps and reports: two runs in one dir, a full disk anywhere, a
second Ctrl-C while the stop checkpoint is written. Each ends in one line, the record never
lies, and nothing already written is lost."""

from __future__ import annotations

import errno
import json
import os
import re
import shutil
import time
from pathlib import Path

import pytest
import torch
import yaml

from vrmoe.checkpoint import load_checkpoint
from vrmoe.train import train

from conftest import TINY, make_config, run_cli, run_in_process, run_injected


def _errors(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("error:")]


def _one_error_line(stderr: str) -> str:
    """The single `error:` line a fault ends in: the last line, and no traceback."""
    assert "Traceback" not in stderr, stderr
    errors = _errors(stderr)
    assert len(errors) == 1 and stderr.strip().splitlines()[-1] == errors[0], stderr
    return errors[0]


def _files(folder: Path) -> dict[str, bytes]:
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(folder.rglob("*")) if p.is_file()}


def _temporaries(folder: Path) -> list[str]:
    return [p.name for p in folder.rglob(".*.tmp*")]


def _full_disk(monkeypatch, *names: str) -> dict[str, bool]:
    """Writes of text files named ``names`` (their temporary files) fail with ENOSPC once
    ``state["full"]`` is set, after half their text is on disk."""
    state = {"full": False}
    write_text = Path.write_text

    def write(self, data, *args, **kwargs):
        if state["full"] and any(self.name.startswith(f".{name}.tmp") for name in names):
            write_text(self, data[: len(data) // 2], *args, **kwargs)
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(self))
        return write_text(self, data, *args, **kwargs)

    monkeypatch.setattr(Path, "write_text", write)
    return state


# --- The record never lies: one writer per run dir ------------------------------------------

@pytest.mark.slow  # two runs through the CLI, one after the other: 15-25 s on two cores
def test_a_run_started_into_a_dir_another_run_holds_writes_nothing_there(tmp_path):
    run = tmp_path / "run"
    go = tmp_path / "go"
    # The first run holds the dir (its lock, its Hydra record) and waits there until the second is done.
    first = run_injected("import time, vrmoe.train.loop as loop\n"
                         "make_logger = loop.make_logger\n"
                         "def waiting(*a, **k):\n"
                         f"    while not os.path.exists({str(go)!r}):\n"
                         "        time.sleep(0.05)\n"
                         "    return make_logger(*a, **k)\n"
                         "import os\n"
                         "loop.make_logger = waiting", "train", *TINY, "train.max_steps=2", "seed=0",
                         "hydra.run.dir=run", cwd=tmp_path, wait=False)
    try:
        deadline = time.monotonic() + 120
        while not (run / ".vrmoe.lock").exists() and first.poll() is None and time.monotonic() < deadline:
            time.sleep(0.05)
        assert (run / ".vrmoe.lock").exists(), first.communicate()[1]
        second = run_cli("train", *TINY, "train.max_steps=2", "seed=1", "hydra.run.dir=run", cwd=tmp_path, check=False)
    finally:
        go.touch()
        _, first_err = first.communicate(timeout=300)
    assert first.returncode == 0, first_err
    line = _one_error_line(second.stderr)
    assert second.returncode == 2 and f"the run dir {run.absolute()} is in use by another run (pid {first.pid}" in line
    summary = json.loads((run / "summary.json").read_text())
    record = yaml.safe_load((run / ".hydra" / "config.yaml").read_text())
    assert summary["status"] == "completed" and summary["config"]["seed"] == record["seed"] == 0
    assert "seed=0" in (run / ".hydra" / "overrides.yaml").read_text()
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2]


@pytest.mark.slow  # two sweeps through the CLI: 10-30 s on two cores
def test_a_second_identical_sweep_into_a_finished_sweep_dir_changes_none_of_its_records(tmp_path):
    args = ["train", "-m", *TINY, "train.max_steps=2", "K=2,9", "hydra.sweep.dir=sweep"]
    first = run_cli(*args, cwd=tmp_path, check=False)
    assert first.returncode == 1 and "sweep: 1 completed, 1 failed" in first.stderr, first.stderr
    jobs = sorted(p.parent for p in (tmp_path / "sweep").rglob("summary.json"))
    records = {job: _files(job) for job in jobs}
    assert len(jobs) == 2 and all(".hydra/config.yaml" in files for files in records.values())

    again = run_cli(*args, cwd=tmp_path, check=False)
    assert "Traceback" not in again.stderr and again.returncode == 1
    refused = [line for line in again.stderr.splitlines() if "refused:" in line]
    assert len(refused) == 2 and all("already holds a run" in line for line in refused), again.stderr
    assert again.stderr.strip().splitlines()[-1].startswith("sweep: 2 refused -> ")
    assert {job: _files(job) for job in jobs} == records


@pytest.mark.slow  # two sweeps through the CLI: 10-30 s on two cores
def test_a_different_sweep_into_a_sweep_dir_keeps_the_earlier_sweeps_multirun_record(tmp_path):
    """Hydra rewrites multirun.yaml at each sweep's start; the earlier sweep's command line stays
    beside it (multirun.1.yaml), and an identical sweep adds no copy."""
    first = ["train", "-m", *TINY, "train.max_steps=2", "seed=3,4", "hydra.sweep.dir=sweep"]
    run_cli(*first, cwd=tmp_path)
    run_cli(*first[:-2], "seed=5", "hydra.sweep.dir=sweep", cwd=tmp_path)
    sweep = tmp_path / "sweep"
    task = lambda name: yaml.safe_load((sweep / name).read_text())["hydra"]["overrides"]["task"]  # noqa: E731
    assert "seed=3,4" in task("multirun.1.yaml") and "seed=5" in task("multirun.yaml")
    again = run_cli(*first[:-2], "seed=5", "hydra.sweep.dir=sweep", cwd=tmp_path, check=False)
    assert again.returncode == 1 and "Traceback" not in again.stderr  # refused: its job's dir holds a run
    assert sorted(p.name for p in sweep.glob("multirun*.yaml")) == ["multirun.1.yaml", "multirun.yaml"]
    assert len(list(sweep.rglob("summary.json"))) == 3


def test_an_earlier_sweeps_record_is_kept_once_whatever_the_sweeper(tmp_path):
    """Another config or other overrides keep the earlier record; a sweeper that writes none
    (Optuna's) leaves the record in place, and it is not copied again."""
    from omegaconf import OmegaConf

    from vrmoe.jobs import keep_earlier_sweep_record

    sweep = lambda name, *task: OmegaConf.create(  # noqa: E731
        {"hydra": {"job": {"config_name": name}, "overrides": {"task": list(task), "hydra": []}}})
    keep_earlier_sweep_record(tmp_path, sweep("config", "seed=1,2"))  # no record yet
    assert not list(tmp_path.iterdir())
    OmegaConf.save(sweep("config", "seed=1,2"), tmp_path / "multirun.yaml")
    keep_earlier_sweep_record(tmp_path, sweep("config", "seed=1,2"))  # the same sweep again
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun.yaml"]
    for other in (sweep("other", "seed=1,2"), sweep("config", "seed=3"), sweep("config", "K=1,2")):
        keep_earlier_sweep_record(tmp_path, other)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["multirun.1.yaml", "multirun.yaml"]
    assert (tmp_path / "multirun.1.yaml").read_text() == (tmp_path / "multirun.yaml").read_text()


@pytest.mark.slow  # two sweeps through the CLI at once: 15-40 s on two cores
def test_two_identical_sweeps_at_once_run_each_job_once_and_refuse_it_once(tmp_path):
    """Whichever sweep reaches a job's dir first runs it (the other finds the dir held or already
    holding a run); each job trains once and its record is that of the run that trained."""
    args = ["train", "-m", *TINY, "train.max_steps=2", "seed=3,4", "hydra.sweep.dir=sweep"]
    sweeps = [run_injected("", *args, cwd=tmp_path, wait=False) for _ in range(2)]
    errs = [sweep.communicate(timeout=600)[1] for sweep in sweeps]
    for err in errs:
        assert "Traceback" not in err, err
    closing = [err.strip().splitlines()[-1] for err in errs]
    refused = [line for err in errs for line in err.splitlines() if "refused:" in line]
    completed = sum(int(m.group(1)) for line in closing if (m := re.search(r"(\d+) completed", line)))
    assert completed == 2 and len(refused) == 2, errs
    jobs = sorted(p.parent for p in (tmp_path / "sweep").rglob("summary.json"))
    assert len(jobs) == 2
    for job in jobs:
        summary = json.loads((job / "summary.json").read_text())
        record = yaml.safe_load((job / ".hydra" / "config.yaml").read_text())
        assert summary["status"] == "completed" and summary["config"]["seed"] == record["seed"]
        assert [json.loads(r)["step"] for r in (job / "metrics.jsonl").read_text().splitlines()] == [1, 2]


# --- A full disk anywhere --------------------------------------------------------------------

@pytest.mark.parametrize("full", ["checkpoint", "checkpoint and summary"])
def test_a_full_disk_at_the_second_checkpoint_keeps_the_first_and_ends_in_one_line(tmp_path, capsys, monkeypatch,
                                                                                   full):
    disk = _full_disk(monkeypatch, "summary.json")
    save, saves = torch.save, []

    def save_until_full(obj, f, *args, **kwargs):
        saves.append(obj["step"])
        if len(saves) == 2:  # half the checkpoint is written, then the disk is full
            f.write(b"PK\x03\x04 half a checkpoint")
            disk["full"] = full == "checkpoint and summary"
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return save(obj, f, *args, **kwargs)

    monkeypatch.setattr(torch, "save", save_until_full)
    code, err = run_in_process("train", *TINY, "train.max_steps=6", "train.ckpt_every=2", "hydra.run.dir=run",
                               cwd=tmp_path, capsys=capsys, monkeypatch=monkeypatch)
    monkeypatch.undo()
    run = (tmp_path / "run").absolute()
    line = _one_error_line(err)
    assert code == 1 and line.startswith(f"error: cannot write {run / 'checkpoint.pt'}: No space left on device")
    assert line.endswith(f"free some space, then resume with: vrmoe train train.resume={run}")
    assert sorted(p.name for p in run.glob("checkpoint*")) == ["checkpoint.pt"] and not _temporaries(run)
    assert load_checkpoint(run, "run")["step"] == 2 and not (run / ".vrmoe.lock").exists()
    summary = json.loads((run / "summary.json").read_text())
    if full == "checkpoint":
        assert summary["status"] == "failed" and "No space left on device" in summary["error"]
    else:  # summary.json could not say so: the line does
        assert summary["status"] == "running" and "its summary.json could not be updated and still says running" in line
    code, err = run_in_process(*line.split("with: vrmoe ", 1)[1].split(), cwd=tmp_path, capsys=capsys,
                               monkeypatch=monkeypatch)
    assert code == 0 and json.loads((run / "summary.json").read_text())["status"] == "completed", err
    assert [json.loads(r)["step"] for r in (run / "metrics.jsonl").read_text().splitlines()] == [1, 2, 3, 4, 5, 6]


def test_a_completed_run_whose_summary_cannot_be_written_says_so_in_one_line(tmp_path, capsys, monkeypatch):
    disk = _full_disk(monkeypatch, "summary.json")
    save = torch.save

    def save_then_fill(obj, f, *args, **kwargs):
        save(obj, f, *args, **kwargs)
        disk["full"] = obj["step"] == 2  # the last checkpoint is the last thing that fits

    monkeypatch.setattr(torch, "save", save_then_fill)
    code, err = run_in_process("train", *TINY, "train.max_steps=2", "hydra.run.dir=run", cwd=tmp_path, capsys=capsys,
                               monkeypatch=monkeypatch)
    run = (tmp_path / "run").absolute()
    line = _one_error_line(err)
    assert code == 1 and line == (f"error: the run completed, but cannot write {run / 'summary.json'}: No space left "
                                  "on device (its summary.json could not be updated and still says running); free "
                                  f"some space: {run / 'checkpoint.pt'} holds its final weights")
    assert load_checkpoint(run, "run")["step"] == 2 and not _temporaries(run)


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory, corpus_cache) -> Path:
    run = tmp_path_factory.mktemp("trained") / "run"
    train(make_config(*TINY, "train.max_steps=2"), run)
    return run


def test_eval_with_no_room_for_eval_json_keeps_the_old_one(tmp_path, trained_run, capsys, monkeypatch):
    run = tmp_path / "run"
    shutil.copytree(trained_run, run)
    (run / "eval.json").write_text('{"S": 8, "from": "an earlier evaluation"}\n')
    before = _files(run)
    _full_disk(monkeypatch, "eval.json")["full"] = True
    code, err = run_in_process("eval", f"run={run}", "S=2", "eval.windows=4", "eval.mcq_items=8",
                               "eval.stability_windows=1", "eval.gammas=[0.01]", cwd=tmp_path, capsys=capsys,
                               monkeypatch=monkeypatch)
    assert code == 1 and _one_error_line(err) == (f"error: vrmoe eval: {run / 'eval.json'}: No space left on device; "
                                                  "free some space, then run it again")
    assert _files(run) == before and not _temporaries(run)


def test_a_dashboard_onto_a_full_disk_writes_nothing(tmp_path, trained_run, capsys, monkeypatch):
    _full_disk(monkeypatch, "report.html")["full"] = True
    out = tmp_path / "reports" / "report.html"
    code, err = run_in_process("dashboard", str(trained_run), "-o", str(out), cwd=tmp_path, capsys=capsys,
                               monkeypatch=monkeypatch)
    assert code == 1 and _one_error_line(err) == (f"error: vrmoe dashboard: {out}: No space left on device; "
                                                  "free some space, then run it again")
    assert list(out.parent.iterdir()) == []


@pytest.mark.parametrize("where", ["hydra.run.dir=afile", "hydra.run.dir=afile/run", "hydra.sweep.dir=afile/sweep"])
def test_a_run_or_sweep_dir_under_a_regular_file_is_one_line(tmp_path, capsys, monkeypatch, where):
    (tmp_path / "afile").write_text("a file, not a folder\n")
    sweep = ["-m", "seed=0,1"] if where.startswith("hydra.sweep") else []
    code, err = run_in_process("train", *sweep, *TINY, "train.max_steps=2", where, cwd=tmp_path, capsys=capsys,
                               monkeypatch=monkeypatch)
    assert code == 2 and _one_error_line(err) == (f"error: {where} cannot be written (afile is a file, not a "
                                                  "directory); choose a writable directory")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["afile"]


# --- Interrupts at any moment ----------------------------------------------------------------

def test_a_second_interrupt_while_the_stop_checkpoint_is_written_waits_for_it(tmp_path):
    # Ctrl-C during step 3, and again while its checkpoint (the stop checkpoint) is being written.
    stopped = run_injected("import os, signal, torch\n"
                           "import vrmoe.checkpoint as checkpoint\n"
                           "step, calls = torch.optim.AdamW.step, []\n"
                           "def signalled(self, *a, **k):\n"
                           "    calls.append(1)\n"
                           "    if len(calls) == 3:\n"
                           "        os.kill(os.getpid(), signal.SIGINT)\n"
                           "    return step(self, *a, **k)\n"
                           "torch.optim.AdamW.step = signalled\n"
                           "save = checkpoint.save_checkpoint\n"
                           "def interrupted(path, state, **kwargs):\n"
                           "    if state['step'] == 3:\n"
                           "        os.kill(os.getpid(), signal.SIGINT)\n"
                           "    return save(path, state, **kwargs)\n"
                           "checkpoint.save_checkpoint = interrupted",
                           "train", *TINY, "train.max_steps=8", "train.ckpt_every=2", "hydra.run.dir=run",
                           cwd=tmp_path)
    run = (tmp_path / "run").absolute()
    line = _one_error_line(stopped.stderr)
    assert stopped.returncode == 130 and line == f"error: interrupted; resume with: vrmoe train train.resume={run}"
    assert [ln for ln in stopped.stderr.splitlines() if "writing the checkpoint" in ln] == [
        "writing the checkpoint: the run stops as soon as it is written"]
    assert load_checkpoint(run, "run")["step"] == 3
    assert torch.load(run / "checkpoint.1.pt", weights_only=False)["step"] == 2 and not _temporaries(run)
    assert json.loads((run / "summary.json").read_text())["status"] == "interrupted"
