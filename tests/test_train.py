"""The training loop through its public entry points: records, reproducibility, resume."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch

from vrmoe.checkpoint import load_checkpoint
from vrmoe.config import ConfigError
from vrmoe.model import build_model
from vrmoe.train import lr_at, train

from conftest import TINY, make_config, only_run_dir, run_cli


def _rows(run_dir: Path) -> list[dict]:
    return [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]


def test_two_step_training_through_the_installed_cli(tmp_path):
    proc = run_cli("train", *TINY, "train.max_steps=2", cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    assert run_dir.parent.parent == tmp_path / "outputs"  # outputs/<date>/<time>_<router>
    assert "Traceback" not in proc.stderr
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["status"] == "completed" and summary["step"] == 2
    assert summary["params_active"] < summary["params_total"]
    assert summary["config"]["model"]["name"] == "tiny"
    assert math.isfinite(summary["final_val_loss"]) and 2.0 < summary["unigram_entropy"] < 4.5
    assert (run_dir / "checkpoint.pt").exists() and (run_dir / ".hydra" / "config.yaml").exists()


def test_metrics_schema_and_values(tmp_path):
    cfg = make_config(*TINY, "train.max_steps=4")
    train(cfg, tmp_path)
    rows = _rows(tmp_path)
    assert [r["step"] for r in rows] == [1, 2, 3, 4]
    assert all("val/loss" in r for r in rows if r["step"] % 2 == 0)
    n_experts = cfg.model.n_experts
    for row in rows:
        assert {"train/loss", "lr", "tokens_per_s", "moe"} <= set(row)
        assert set(row["moe"]) == {"layer0", "layer1"}
        for layer in row["moe"].values():
            assert len(layer["utilisation"]) == n_experts
            assert sum(layer["utilisation"]) == pytest.approx(1.0, abs=1e-5)
            assert 0.0 <= layer["entropy"] <= math.log(n_experts) + 1e-6
            assert layer["load_cv"] >= 0.0


def test_the_default_training_beats_the_unigram_entropy_quickly(tmp_path):
    # A real learning signal in seconds: 60 steps of the tiny model already model bigrams.
    cfg = make_config("model=tiny", "logger=none", "train.max_steps=60", "train.eval_every=60",
                      "train.batch_size=16", "train.warmup_steps=10")
    summary = train(cfg, tmp_path)
    assert summary["final_val_loss"] < summary["unigram_entropy"]


def test_same_seed_same_losses_other_seed_other_losses(tmp_path):
    runs = {}
    for name, seed in (("a", 0), ("b", 0), ("c", 1)):
        train(make_config(*TINY, "train.max_steps=3", f"seed={seed}"), tmp_path / name)
        runs[name] = [r["train/loss"] for r in _rows(tmp_path / name)]
    assert runs["a"] == runs["b"]
    assert runs["a"] != runs["c"]


def test_resume_continues_from_the_saved_step_and_optimizer_state(tmp_path):
    full, part = tmp_path / "full", tmp_path / "part"
    train(make_config(*TINY, "train.max_steps=6", "train.ckpt_every=3"), full)
    # Interrupted after step 3 (simulated: a 3-step run of the same schedule length is not the same
    # schedule, so train 6 steps but stop by raising once step 3's checkpoint exists).
    cfg = make_config(*TINY, "train.max_steps=6", "train.ckpt_every=3")
    import vrmoe.checkpoint as train_module

    original = train_module.save_checkpoint
    calls = []

    def save_then_die(path, state):
        original(path, state)
        calls.append(state["step"])
        raise KeyboardInterrupt

    train_module.save_checkpoint = save_then_die
    try:
        with pytest.raises(KeyboardInterrupt):
            train(cfg, part)
    finally:
        train_module.save_checkpoint = original
    assert load_checkpoint(part, "train.resume")["step"] == 3
    assert len(load_checkpoint(part, "train.resume")["optimizer"]["state"]) > 0
    summary = train(make_config(*TINY, "train.max_steps=6", "train.ckpt_every=3", f"train.resume={part}"), part)
    assert summary["status"] == "completed" and summary["step"] == 6
    resumed = [(r["step"], r["train/loss"]) for r in _rows(part)]
    assert [s for s, _ in resumed] == [1, 2, 3, 4, 5, 6]
    assert resumed == [(r["step"], r["train/loss"]) for r in _rows(full)]


def test_resume_through_the_cli_continues_in_the_same_dir(tmp_path):
    run_cli("train", *TINY, "train.max_steps=2", cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    run_cli("train", *TINY, "train.max_steps=4", f"train.resume={run_dir}", cwd=tmp_path)
    assert only_run_dir(tmp_path) == run_dir
    assert [r["step"] for r in _rows(run_dir)] == [1, 2, 3, 4]


def test_learning_rate_schedule():
    assert lr_at(0, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(9, 100, 10, 0.1) == pytest.approx(1.0)
    assert lr_at(100, 100, 10, 0.1) == pytest.approx(0.1)
    assert lr_at(55, 100, 10, 0.1) == pytest.approx(0.55)


def test_model_is_causal_and_counts_parameters():
    cfg = make_config("model=tiny")
    model = build_model(cfg).eval()
    x = torch.randint(0, 256, (2, 16))
    x2 = x.clone()
    x2[:, 10:] = torch.randint(0, 256, (2, 6))
    with torch.no_grad():
        a, b = model(x).logits_BLV, model(x2).logits_BLV
    assert torch.allclose(a[:, :10], b[:, :10], atol=1e-5) and not torch.allclose(a[:, 10:], b[:, 10:])
    counts = model.parameter_counts()
    per_layer = 3 * cfg.model.d_model * cfg.model.expert_hidden
    inactive = (cfg.model.n_experts - cfg.router.k) * per_layer * cfg.model.n_layers
    assert counts["total"] - counts["active"] == inactive


@pytest.mark.parametrize("args, words", [
    (["K=9"], ["K=9", "[1, 4]"]),
    (["router=bogus"], ["router='bogus'", "topk"]),
    (["model=huge"], ["model='huge'", "tiny"]),
    (["data=text", "data.path=/nonexistent/corpus.txt"], ["data.path", "does not exist"]),
    (["train.max_steps=0"], ["train.max_steps=0"]),
    (["train.lr=-1"], ["train.lr=-1"]),
    (["train.resume=/nonexistent/run"], ["train.resume", "checkpoint.pt"]),
])
def test_bad_input_is_one_line_with_no_traceback_and_no_run_dir(tmp_path, args, words):
    proc = run_cli("train", *TINY, "train.max_steps=2", *args, cwd=tmp_path, check=False)
    assert proc.returncode == 2
    err = proc.stderr.strip()
    assert "Traceback" not in err and len(err.splitlines()) == 1, err
    for word in words:
        assert word in err
    # No run dir is left behind: neither records nor Hydra's own .hydra folder, nor outputs/<date>/.
    assert not list(tmp_path.rglob("summary.json")) and not list(tmp_path.rglob(".hydra"))
    assert not (tmp_path / "outputs").exists()


def test_empty_data_file_is_refused(tmp_path):
    (tmp_path / "empty.txt").write_text("  \n")
    proc = run_cli("train", *TINY, "data=text", f"data.path={tmp_path / 'empty.txt'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "no text" in proc.stderr and "Traceback" not in proc.stderr


def test_a_refused_resume_leaves_the_existing_run_untouched(tmp_path):
    run_cli("train", *TINY, "train.max_steps=2", cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    before = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    proc = run_cli("train", *TINY, "train.max_steps=4", "K=9", f"train.resume={run_dir}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "K=9" in proc.stderr
    after = {p: p.read_bytes() for p in run_dir.rglob("*") if p.is_file() and ".hydra" not in p.parts}
    assert before == after


def test_corrupt_checkpoint_is_a_clear_error(tmp_path):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoint.pt").write_bytes(b"not a checkpoint")
    proc = run_cli("train", *TINY, f"train.resume={run_dir}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "corrupt" in proc.stderr and "Traceback" not in proc.stderr


def test_wandb_offline_logger_writes_a_local_run(tmp_path):
    cfg = make_config("model=tiny", "logger=wandb", "train.max_steps=2", "train.batch_size=2")
    train(cfg, tmp_path)
    assert list((tmp_path / "wandb").glob("offline-run-*"))


def test_resuming_a_finished_run_is_refused_and_keeps_its_record(tmp_path):
    run_cli("train", *TINY, "train.max_steps=2", cwd=tmp_path)
    run_dir = only_run_dir(tmp_path)
    before = (run_dir / "summary.json").read_text()
    proc = run_cli("train", *TINY, "train.max_steps=2", f"train.resume={run_dir}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "raise train.max_steps" in proc.stderr and "Traceback" not in proc.stderr
    assert (run_dir / "summary.json").read_text() == before


def test_a_diverging_run_stops_as_diverged_with_a_finite_checkpoint(tmp_path):
    proc = run_cli("train", *TINY, "train.max_steps=40", "train.lr=1e6", "train.grad_clip=0", "train.ckpt_every=2",
                   "hydra.run.dir=run", cwd=tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 3 and "Traceback" not in proc.stderr
    assert err[-1].startswith("error: training diverged at step") and "train.lr" in err[-1]
    assert err[-1].endswith("checkpoint.pt holds the last finite weights") and "Warning" not in proc.stderr
    summary = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert summary["status"] == "diverged" and summary["skipped_steps"] == 3 and summary["step"] < 40
    state = load_checkpoint(tmp_path / "run", "run")
    assert all(torch.isfinite(v).all() for v in state["model"].values() if v.is_floating_point())
    rows = _rows(tmp_path / "run")
    # Skipped steps are counted, not averaged in; an interval of skipped steps only measured no loss:
    # null, never 0.0, in the log and in the summary, and a blank in vrmoe compare.
    assert [(r["step"], r.get("skipped_steps")) for r in rows] == [(1, None), (2, None), (3, 1), (4, 1)]
    assert all(math.isfinite(r["train/loss"]) and r["train/loss"] > 1 for r in rows[:2])
    assert [(r["train/loss"], r["train/aux_loss"]) for r in rows[2:]] == [(None, None), (None, None)]
    assert summary["final_train_loss"] is None and summary["final_val_loss"] == rows[1]["val/loss"]
    from vrmoe.report.compare import compare, render

    train(make_config(*TINY, "train.max_steps=2"), tmp_path / "healthy")
    import csv

    table = csv.DictReader(render(compare([tmp_path / "run", tmp_path / "healthy"]), "csv").splitlines())
    assert {Path(r["path"]).name: r["train_loss"] for r in table} == {
        "run": "", "healthy": str(_rows(tmp_path / "healthy")[-1]["train/loss"])}
    evaluation = run_cli("eval", f"run={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert evaluation.returncode == 2 and "diverged" in evaluation.stderr and not (tmp_path / "run" / "eval.json").exists()


def test_a_resume_with_other_training_settings_is_refused_unless_overridden(tmp_path):
    train(make_config(*TINY, "train.max_steps=2"), tmp_path)
    with pytest.raises(ConfigError) as info:
        train(make_config(*TINY, "train.max_steps=4", "seed=5", "train.lr=0.1", f"train.resume={tmp_path}"), tmp_path)
    assert "seed: 0 there, 5 here" in str(info.value) and "train.lr: 0.003 there, 0.1 here" in str(info.value)
    assert "train.resume_override=true" in str(info.value)
    summary = train(make_config(*TINY, "train.max_steps=4", "train.lr=0.1", "train.log_every=2",
                                "train.resume_override=true", f"train.resume={tmp_path}"), tmp_path)
    assert summary["status"] == "completed" and summary["resume_override"] == ["train.lr: 0.003 there, 0.1 here"]


def test_sigint_inside_the_optimizer_step_stops_after_it_and_resumes_bit_identical(tmp_path, monkeypatch):
    import os
    import signal

    args = [*TINY, "train.max_steps=8", "train.log_every=3", "train.eval_every=4", "train.ckpt_every=100"]
    full = tmp_path / "full"
    train(make_config(*args), full)
    calls = {"n": 0}
    original = torch.optim.AdamW.step

    def step_with_a_signal(self, *a, **k):
        calls["n"] += 1
        if calls["n"] == 4:  # Ctrl-C arrives while the 4th update is being applied
            os.kill(os.getpid(), signal.SIGINT)
        return original(self, *a, **k)

    monkeypatch.setattr(torch.optim.AdamW, "step", step_with_a_signal)
    part = tmp_path / "part"
    with pytest.raises(KeyboardInterrupt):
        train(make_config(*args), part)
    monkeypatch.setattr(torch.optim.AdamW, "step", original)
    state = load_checkpoint(part, "train.resume")
    assert state["step"] == 4 and json.loads((part / "summary.json").read_text())["status"] == "interrupted"
    assert {int(s["step"]) for s in state["optimizer"]["state"].values()} == {4}  # the 4th update is whole
    train(make_config(*args, f"train.resume={part}"), part)
    # Bit-identical, the logged interval that spans the interrupt (steps 4-6) included.
    assert _rows_without_time(part) == _rows_without_time(full)


def _rows_without_time(run_dir):
    return [{k: v for k, v in row.items() if k != "tokens_per_s"} for row in _rows(run_dir)]


def test_a_second_writer_is_refused_and_the_first_run_intact(tmp_path):
    from vrmoe.tracking import RunLock

    first = RunLock(tmp_path / "run")
    (tmp_path / "run").mkdir()
    assert first.acquire()  # a live run holds the dir (this process)
    with pytest.raises(ConfigError, match="in use by another run"):
        train(make_config(*TINY, "train.max_steps=2"), tmp_path / "run")
    first.release()
    train(make_config(*TINY, "train.max_steps=2"), tmp_path / "run")
    before = (tmp_path / "run" / "metrics.jsonl").read_bytes()
    with pytest.raises(ConfigError, match="already holds a run"):  # a fresh run never writes over one
        train(make_config(*TINY, "train.max_steps=2"), tmp_path / "run")
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before
    proc = run_cli("train", *TINY, "train.max_steps=2", f"hydra.run.dir={tmp_path / 'run'}", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and "already holds a run" in proc.stderr
    assert (tmp_path / "run" / "metrics.jsonl").read_bytes() == before


def test_a_stale_lock_of_a_killed_run_is_taken_over(tmp_path):
    (tmp_path / "run").mkdir()
    import socket

    (tmp_path / "run" / ".vrmoe.lock").write_text(json.dumps({"pid": 2**22 + 17, "host": socket.gethostname()}))
    (tmp_path / "run" / ".checkpoint.pt.tmp4194321").write_bytes(b"half")  # left by a killed write
    assert train(make_config(*TINY, "train.max_steps=2"), tmp_path / "run")["status"] == "completed"
    assert not (tmp_path / "run" / ".vrmoe.lock").exists() and not list((tmp_path / "run").glob(".*.tmp*"))


def test_a_refused_resume_leaves_hydras_record_byte_identical(tmp_path):
    run_cli("train", *TINY, "train.max_steps=2", "hydra.run.dir=run", cwd=tmp_path)
    record = {p.name: p.read_bytes() for p in (tmp_path / "run" / ".hydra").iterdir()}
    for bad in (["router=variational"], ["train.max_steps=2"], ["seed=3", "train.max_steps=4"]):
        proc = run_cli("train", *TINY, *bad, "train.resume=run", cwd=tmp_path, check=False)
        assert proc.returncode == 2, proc.stderr
        assert {p.name: p.read_bytes() for p in (tmp_path / "run" / ".hydra").iterdir()} == record


def test_a_corrupt_newest_checkpoint_falls_back_to_the_previous_one(tmp_path):
    train(make_config(*TINY, "train.max_steps=4", "train.ckpt_every=2"), tmp_path)
    assert load_checkpoint(tmp_path, "run")["step"] == 4 and (tmp_path / "checkpoint.1.pt").exists()
    (tmp_path / "checkpoint.pt").write_bytes(b"torn")
    assert load_checkpoint(tmp_path, "train.resume")["step"] == 2
    # One save after the resume: the torn file must not be rotated over the checkpoint resumed from.
    summary = train(make_config(*TINY, "train.max_steps=6", "train.ckpt_every=100", f"train.resume={tmp_path}"),
                    tmp_path)
    assert summary["status"] == "completed" and summary["step"] == 6
    assert (tmp_path / "checkpoint.pt.unreadable").read_bytes() == b"torn"
    assert torch.load(tmp_path / "checkpoint.1.pt", weights_only=False)["step"] == 2
    assert load_checkpoint(tmp_path, "run")["step"] == 6


@pytest.mark.slow
def test_kill_9_at_random_moments_then_resume_is_bit_identical(tmp_path):
    import os
    import random
    import signal
    import subprocess
    import sys
    import time

    args = [*TINY, "train.max_steps=200", "train.ckpt_every=5", "train.eval_every=50", "train.log_every=1"]
    run_cli("train", *args, "hydra.run.dir=full", cwd=tmp_path)
    exe = str(Path(sys.executable).with_name("vrmoe"))
    rng = random.Random(0)
    killed_at = []
    for target in sorted(rng.sample(range(8, 190), 3)):  # kill -9 as the run passes a random step
        resume = ["train.resume=run"] if (tmp_path / "run" / "checkpoint.pt").exists() else ["hydra.run.dir=run"]
        proc = subprocess.Popen([exe, "train", *args, *resume], cwd=tmp_path, stdout=subprocess.DEVNULL,
                                stderr=subprocess.DEVNULL, env={**os.environ, "OMP_NUM_THREADS": "1"})
        deadline = time.monotonic() + 120
        while proc.poll() is None and time.monotonic() < deadline:
            rows = (tmp_path / "run" / "metrics.jsonl")
            lines = rows.read_text().splitlines() if rows.exists() else []
            if lines and lines[-1].startswith('{"step": ') and int(lines[-1][9:].split(",")[0]) >= target:
                break
            time.sleep(0.005)
        proc.send_signal(signal.SIGKILL)
        proc.wait()
        killed_at.append(load_checkpoint(tmp_path / "run", "run")["step"])
    assert all(0 < step < 200 for step in killed_at)  # every kill landed mid-run
    run_cli("train", *args, "train.resume=run", cwd=tmp_path)
    assert _rows_without_time(tmp_path / "run") == _rows_without_time(tmp_path / "full")
    assert json.loads((tmp_path / "run" / "summary.json").read_text())["status"] == "completed"


def test_two_runs_started_together_get_their_own_dirs(tmp_path):
    import subprocess
    import sys

    exe = str(Path(sys.executable).with_name("vrmoe"))
    env = {**__import__("os").environ, "OMP_NUM_THREADS": "1"}
    procs = [subprocess.Popen([exe, "train", *TINY, "train.max_steps=2"], cwd=tmp_path, env=env,
                              stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True) for _ in range(2)]
    assert all(p.wait(timeout=120) == 0 for p in procs)
    summaries = sorted((tmp_path / "outputs").rglob("summary.json"))
    assert len(summaries) == 2 and summaries[0].parent != summaries[1].parent
