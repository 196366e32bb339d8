"""Faults injected into runs and their records: each is caught in one line and loses nothing
already written (altered checkpoints, unmeasured losses, ownerless locks, runs stopped before
their first checkpoint, damaged logs, binary inputs, refused commands)."""

from __future__ import annotations

import json
import shlex
import socket
import struct
import zipfile
from datetime import datetime
from pathlib import Path

import pytest
import torch

from vrmoe.checkpoint import load_checkpoint, state_checksum
from vrmoe.config import ConfigError
from vrmoe.train import train

from conftest import TINY, interrupt_after_first_checkpoint, make_config, run_cli, run_injected


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def _rows_without_time(run_dir: Path) -> list[dict]:
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in _rows(run_dir)]


def _lines(text: str, words: str) -> list[str]:
    return [line for line in text.splitlines() if words in line]


def _flip_tensor_bytes(path: Path) -> None:
    """Flip bytes in the middle of the checkpoint's largest tensor: the file stays a zip that torch
    loads (it checks no CRC), only the numbers change."""
    data = bytearray(path.read_bytes())
    with zipfile.ZipFile(path) as archive:
        record = max((i for i in archive.infolist() if "/data/" in i.filename), key=lambda i: i.file_size)
    name_len, extra_len = struct.unpack("<HH", data[record.header_offset + 26:record.header_offset + 30])
    middle = record.header_offset + 30 + name_len + extra_len + record.file_size // 2
    data[middle:middle + 4] = bytes(b ^ 0x5A for b in data[middle:middle + 4])
    path.write_bytes(bytes(data))


# --- 1. Checkpoints are verified -------------------------------------------------------------

def test_a_checkpoint_whose_bytes_changed_is_refused_by_eval_and_init_from_and_passed_over_by_resume(
        tmp_path, capsys):
    run = tmp_path / "run"
    train(make_config(*TINY, "train.max_steps=4", "train.ckpt_every=2"), run)
    newest = run / "checkpoint.pt"
    before = torch.load(newest, weights_only=False)
    _flip_tensor_bytes(newest)
    flipped = newest.read_bytes()
    after = torch.load(newest, weights_only=False)  # torch still loads it: only a checksum can tell
    assert after["step"] == 4 and after["checksum"] == before["checksum"] == state_checksum(before)
    assert state_checksum(after) != before["checksum"]

    evaluation = run_cli("eval", f"run={run}", cwd=tmp_path, check=False)
    err = evaluation.stderr.strip()
    assert evaluation.returncode == 2 and len(err.splitlines()) == 1 and "Traceback" not in err, err
    assert f"{newest} does not match its checksum" in err and not (run / "eval.json").exists()
    with pytest.raises(ConfigError, match=f"train.init_from={run}: {newest} does not match its checksum"):
        train(make_config(*TINY, "train.max_steps=2", f"train.init_from={run}"), tmp_path / "warm")
    assert not (tmp_path / "warm" / "metrics.jsonl").exists()

    capsys.readouterr()
    summary = train(make_config(*TINY, "train.max_steps=6", "train.ckpt_every=100", f"train.resume={run}"), run)
    warnings = _lines(capsys.readouterr().err, "checksum")
    assert warnings == ["warning: checkpoint.pt does not match its checksum (its bytes changed after it was "
                        "saved); using checkpoint.1.pt (step 2)"]
    assert summary["status"] == "completed" and summary["step"] == 6
    assert [r["step"] for r in _rows(run)] == [1, 2, 3, 4, 5, 6]
    assert (run / "checkpoint.pt.unreadable").read_bytes() == flipped  # kept for a look, as it was
    assert torch.load(run / "checkpoint.1.pt", weights_only=False)["step"] == 2


def test_a_checkpoint_written_before_checksums_still_loads(tmp_path):
    train(make_config(*TINY, "train.max_steps=2"), tmp_path)
    state = torch.load(tmp_path / "checkpoint.pt", weights_only=False)
    del state["checksum"]
    state["model"] = {k: torch.zeros_like(v) for k, v in state["model"].items()}  # unchecked, taken as is
    torch.save(state, tmp_path / "checkpoint.pt")
    loaded = load_checkpoint(tmp_path, "run")
    assert loaded["step"] == 2 and all(not v.any() for v in loaded["model"].values())


# --- 3. A lock without a live owner is taken over ---------------------------------------------

@pytest.mark.parametrize("lock, reason", [
    (b"", "its .vrmoe.lock was empty"),
    (b"\x00\xff{pid", "its .vrmoe.lock was unreadable"),
    (json.dumps({"pid": 2**22 + 17, "host": socket.gethostname()}).encode(), f"its process (pid {2**22 + 17}) is gone"),
])
def test_a_lock_without_a_live_owner_is_taken_over_in_one_line(tmp_path, capsys, lock, reason):
    run = tmp_path / "run"
    run.mkdir()
    (run / ".vrmoe.lock").write_bytes(lock)
    assert train(make_config(*TINY, "train.max_steps=2"), run)["status"] == "completed"
    assert _lines(capsys.readouterr().err, "took over") == [
        f"note: took over the run dir {run} from a run that no longer holds it ({reason})"]
    assert not (run / ".vrmoe.lock").exists() and [r["step"] for r in _rows(run)] == [1, 2]


def test_a_lock_held_on_another_host_is_not_taken_over(tmp_path):
    from vrmoe.tracking import RunLock

    (tmp_path / ".vrmoe.lock").write_text(json.dumps({"pid": 1, "host": "another-host.invalid"}))
    assert not RunLock(tmp_path).acquire()
    with pytest.raises(ConfigError, match="in use by another run \\(pid 1 on another-host.invalid\\)"):
        train(make_config(*TINY, "train.max_steps=2"), tmp_path)


# --- 4. A run stopped before its first checkpoint starts again; the printed resume runs -------

def test_a_kill_during_the_first_checkpoint_write_starts_the_run_again_bit_identical(tmp_path):
    args = [*TINY, "train.max_steps=6", "train.ckpt_every=4"]
    # kill -9 while the first checkpoint is being written: half a file under its temporary name.
    killed = run_injected("import os, signal, torch\n"
                         "def torn(state, f, *a, **k):\n"
                         "    f.write(b'PK\\x03\\x04 half a checkpoint')\n"
                         "    f.flush()\n"
                         "    os.kill(os.getpid(), signal.SIGKILL)\n"
                         "torch.save = torn", "train", *args, "hydra.run.dir=run", cwd=tmp_path)
    run = tmp_path / "run"
    assert killed.returncode == -9 and not (run / "checkpoint.pt").exists()
    assert [p.name for p in run.glob(".checkpoint.pt.tmp*")] and [r["step"] for r in _rows(run)] == [1, 2, 3, 4]
    resumed = run_cli("train", "train.resume=run", cwd=tmp_path)
    assert _lines(resumed.stderr, "starting the run again") == [
        f"note: {run.absolute()} holds no checkpoint (the run stopped before its first one was written); "
        "starting the run again from step 0"]
    assert not list(run.glob(".*.tmp*")) and json.loads((run / "summary.json").read_text())["status"] == "completed"
    train(make_config(*args), tmp_path / "full")
    assert _rows_without_time(run) == _rows_without_time(tmp_path / "full")


def test_a_finished_run_without_checkpoints_is_not_started_again(tmp_path):
    train(make_config(*TINY, "train.max_steps=2"), tmp_path)
    (tmp_path / "checkpoint.pt").unlink()
    records = {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()}
    with pytest.raises(ConfigError, match="no checkpoint.pt there"):
        train(make_config(*TINY, "train.max_steps=4", f"train.resume={tmp_path}"), tmp_path)
    assert {p.name: p.read_bytes() for p in tmp_path.iterdir() if p.is_file()} == records


def test_an_interrupt_before_the_first_checkpoint_prints_a_command_that_starts_it_again(tmp_path):
    args = [*TINY, "train.max_steps=4"]
    # Ctrl-C while the run sets up, after it wrote its first records.
    stopped = run_injected("import vrmoe.train.loop as loop\n"
                          "def interrupt(*a, **k):\n"
                          "    raise KeyboardInterrupt\n"
                          "loop.make_progress = interrupt", "train", *args, cwd=tmp_path)
    last = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode == 130 and last.startswith(
        "error: interrupted before the first checkpoint; start it again with: vrmoe train train.resume=")
    command = shlex.split(last.split("with: ", 1)[1])
    resumed = run_cli(*command[1:], cwd=tmp_path)  # as printed: none of the run's own overrides
    run = Path(command[2].split("=", 1)[1])
    assert "starting the run again from step 0" in resumed.stderr
    summary = json.loads((run / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["config"]["model"]["name"] == "tiny"
    train(make_config(*args), tmp_path / "full")
    assert _rows_without_time(run) == _rows_without_time(tmp_path / "full")


def test_the_resume_command_an_interrupted_run_prints_runs_as_printed(tmp_path):
    args = [*TINY, "train.max_steps=8", "train.log_every=3", "train.eval_every=4", "train.ckpt_every=100"]
    # Ctrl-C while the 4th update is applied: the step finishes, is checkpointed, and the run stops.
    stopped = run_injected("import os, signal, torch\n"
                          "step, calls = torch.optim.AdamW.step, []\n"
                          "def signalled(self, *a, **k):\n"
                          "    calls.append(1)\n"
                          "    if len(calls) == 4:\n"
                          "        os.kill(os.getpid(), signal.SIGINT)\n"
                          "    return step(self, *a, **k)\n"
                          "torch.optim.AdamW.step = signalled", "train", *args, cwd=tmp_path)
    last = stopped.stderr.strip().splitlines()[-1]
    assert stopped.returncode == 130 and last.startswith("error: interrupted; resume with: vrmoe train train.resume=")
    command = shlex.split(last.split("with: ", 1)[1])
    run = Path(command[2].split("=", 1)[1])
    assert load_checkpoint(run, "run")["step"] == 4
    # An override given is checked against the run's own config, as before.
    other = run_cli(*command[1:], "seed=3", cwd=tmp_path, check=False)
    assert other.returncode == 2 and "seed: 0 there, 3 here" in other.stderr
    run_cli(*command[1:], cwd=tmp_path)
    train(make_config(*args), tmp_path / "full")
    assert _rows_without_time(run) == _rows_without_time(tmp_path / "full")


# --- 5. Logs are not silently shortened ------------------------------------------------------

def test_a_damaged_row_before_the_checkpoint_is_dropped_with_one_line_naming_its_step(tmp_path, capsys,
                                                                                       monkeypatch):
    args = [*TINY, "train.max_steps=6", "train.ckpt_every=4"]
    interrupt_after_first_checkpoint(make_config(*args), tmp_path, monkeypatch)
    lines = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in lines] == [1, 2, 3, 4]
    damaged = [lines[0], lines[1][: len(lines[1]) // 2], *lines[2:], '{"step": 5, "train/lo']  # and a kill's torn tail
    (tmp_path / "metrics.jsonl").write_text("\n".join(damaged) + "\n")
    capsys.readouterr()
    train(make_config(*args, f"train.resume={tmp_path}"), tmp_path)
    assert _lines(capsys.readouterr().err, "damaged row") == [
        "warning: metrics.jsonl had 1 damaged row(s) at or before the checkpoint's step 4 (step 2); dropped them, "
        "the log has a gap there"]
    after = (tmp_path / "metrics.jsonl").read_text().splitlines()
    assert [json.loads(line)["step"] for line in after] == [1, 3, 4, 5, 6]
    assert [json.loads(line) for line in after[:3]] == [json.loads(line) for line in (lines[0], *lines[2:])]


# --- 6. Text inputs are text -----------------------------------------------------------------

@pytest.mark.parametrize("content", [b"plain text\x00 with a NUL byte\n" * 50, bytes(range(128, 256)) * 64])
def test_an_ood_text_file_that_is_not_text_is_refused_in_one_line(tmp_path, content):
    from vrmoe.eval.context import check_eval_inputs

    (tmp_path / "blob.txt").write_bytes(content)
    with pytest.raises(ConfigError) as info:
        check_eval_inputs(make_config(*TINY, f"eval.ood_text=[{tmp_path / 'blob.txt'}]"))
    assert str(info.value) == (f"eval.ood_text: {tmp_path / 'blob.txt'} is not UTF-8 text (it looks binary); "
                               "give a text file")
    (tmp_path / "notes.txt").write_bytes("a line of plain text with one café in it\n".encode("latin-1") * 100)
    check_eval_inputs(make_config(*TINY, f"eval.ood_text=[{tmp_path / 'notes.txt'}]"))  # a few odd bytes: text
    proc = run_cli("train", *TINY, "train.max_steps=2", "eval.at_end=true", f"eval.ood_text=[{tmp_path / 'blob.txt'}]",
                   cwd=tmp_path, check=False)
    err = proc.stderr.strip()
    assert proc.returncode == 2 and len(err.splitlines()) == 1 and "blob.txt is not UTF-8 text" in err, err
    assert not (tmp_path / "outputs").exists()


# --- 7. A refused command leaves nothing behind -----------------------------------------------

def test_a_refused_command_leaves_no_folder_it_created_and_keeps_those_that_were_there(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_cli("train", "K=9", cwd=tmp_path / "empty", check=False)
    assert proc.returncode == 2 and "K=9" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert list((tmp_path / "empty").iterdir()) == []
    day = tmp_path / "used" / "outputs" / datetime.now().strftime("%Y-%m-%d")
    day.mkdir(parents=True)  # an empty folder the command did not create stays
    proc = run_cli("train", "K=9", cwd=tmp_path / "used", check=False)
    assert proc.returncode == 2 and sorted((tmp_path / "used").rglob("*")) == [day.parent, day]
