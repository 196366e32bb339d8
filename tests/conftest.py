"""Shared test helpers: compose configs the way the CLI does, and run the installed CLI."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from vrmoe.compose import compose_config
from vrmoe.config import AppConfig

# Fast, deterministic CPU runs; one thread keeps two concurrent test runs from thrashing.
torch.set_num_threads(1)

TINY = ["model=tiny", "logger=none", "train.batch_size=4", "train.log_every=1", "train.eval_every=2",
        "train.eval_batches=1", "train.warmup_steps=1"]


def make_config(*overrides: str) -> AppConfig:
    """The validated config the CLI would build for these overrides."""
    return compose_config(overrides)


def run_cli(*args: str, cwd: Path, check: bool = True, timeout: int = 600) -> subprocess.CompletedProcess:
    """Run the installed `vrmoe` console script (the entry point users get)."""
    exe = Path(sys.executable).with_name("vrmoe")
    cmd = [str(exe) if exe.exists() else "vrmoe", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "WANDB_SILENT": "true", "PYTHONUNBUFFERED": "1"}
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=timeout, env=env)
    if check and proc.returncode != 0:
        raise AssertionError(f"{' '.join(cmd)} exited {proc.returncode}\nstdout:\n{proc.stdout}\nstderr:\n{proc.stderr}")
    return proc


def only_run_dir(root: Path) -> Path:
    """The single run dir that a command created under root/outputs."""
    dirs = [p.parent for p in (root / "outputs").rglob("summary.json")]
    assert len(dirs) == 1, dirs
    return dirs[0]


@pytest.fixture(scope="session")
def corpus_cache(tmp_path_factory) -> Path:
    """One prepared-corpus cache shared by every test (preparing it takes seconds)."""
    path = Path(os.environ.get("VRMOE_CACHE") or tmp_path_factory.mktemp("cache"))
    os.environ["VRMOE_CACHE"] = str(path)
    return path


@pytest.fixture(autouse=True)
def _use_cache(corpus_cache):
    yield


def interrupt_after_first_checkpoint(app, run_dir: Path, monkeypatch) -> None:
    """Train ``app`` into ``run_dir`` and stop it, as Ctrl-C would, right after its first checkpoint."""
    from vrmoe import checkpoint as checkpoint_module
    from vrmoe.train import train

    original = checkpoint_module.save_checkpoint

    def save_then_die(path, state):
        original(path, state)
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoint_module, "save_checkpoint", save_then_die)
    with pytest.raises(KeyboardInterrupt):
        train(app, run_dir)
    monkeypatch.setattr(checkpoint_module, "save_checkpoint", original)


def run_injected(code: str, *args: str, cwd: Path, wait: bool = True):
    """``vrmoe <args>`` in a fresh process with a fault injected by ``code`` (run before the command):
    the finished process, or with ``wait=False`` the running one (stdout and stderr to pipes)."""
    script = f"{code}\nfrom vrmoe.cli import main\nmain({list(args)!r})\n"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONUNBUFFERED": "1", "WANDB_SILENT": "true"}
    if wait:
        return subprocess.run([sys.executable, "-c", script], cwd=cwd, capture_output=True, text=True, env=env,
                              timeout=600)
    return subprocess.Popen([sys.executable, "-c", script], cwd=cwd, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, env=env)


def run_in_process(*args: str, cwd: Path, capsys, monkeypatch) -> tuple[int, str]:
    """``vrmoe <args>`` in this process (so a test can patch what it calls): its exit code and stderr."""
    from vrmoe.cli import main

    monkeypatch.chdir(cwd)
    monkeypatch.setattr(sys, "argv", list(sys.argv))  # `vrmoe train` hands Hydra its command line there
    capsys.readouterr()
    try:
        main(list(args))
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    return code, capsys.readouterr().err
