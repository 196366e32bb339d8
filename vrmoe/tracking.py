"""Run records: ``metrics.jsonl`` and ``summary.json`` in the run dir, mirrored to W&B.

The files are the source of truth (``vrmoe compare`` and the dashboard read
them); W&B is a mirror that never fails a run: if it cannot start, the run
goes on with a warning.
"""

from __future__ import annotations

import json
import math
import os
import re
import socket
from pathlib import Path
from typing import Any, Callable, Protocol

METRICS_FILE = "metrics.jsonl"
SUMMARY_FILE = "summary.json"
CHECKPOINT_FILE = "checkpoint.pt"
EVAL_FILE = "eval.json"


LOCK_FILE = ".vrmoe.lock"
TMP_MARK = ".tmp"


def atomic_write(path: Path, write: Callable[[Path], Any], before_replace: Callable[[], Any] | None = None) -> None:
    """``write(tmp)``, fsync, then rename over ``path`` and fsync the directory: a crash, a power
    loss or a full disk mid-write never leaves half a file or an empty one, and the previous version
    survives until the new one is complete. ``before_replace`` runs once the new version is complete
    (a checkpoint moves its predecessors aside then, not before). A failed write names ``path``, not
    its temporary file."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}{TMP_MARK}{os.getpid()}")
    try:
        try:
            write(tmp)
            with open(tmp, "rb+") as f:
                os.fsync(f.fileno())
        except OSError as exc:
            raise OSError(exc.errno, exc.strerror or str(exc), str(path)) from exc
        if before_replace is not None:
            before_replace()
        os.replace(tmp, path)
        _fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def _fsync_dir(folder: Path) -> None:
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:  # a platform without directory handles
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def unwritable_reason(folder: Path) -> str | None:
    """Why files cannot be written in ``folder`` (created if missing), or None when they can: the
    real test, a file created and removed, so a read-only filesystem is caught even for root."""
    folder = Path(folder)
    ancestor = folder
    while not ancestor.exists() and ancestor != ancestor.parent:
        ancestor = ancestor.parent
    if ancestor.exists() and not ancestor.is_dir():
        return f"{ancestor} is a file, not a directory"
    try:
        folder.mkdir(parents=True, exist_ok=True)
        probe = folder / f".write-test{TMP_MARK}{os.getpid()}"
        probe.write_bytes(b"")
        probe.unlink()
    except OSError as exc:
        return exc.strerror or str(exc)
    return None


def holds_run_records(run_dir: Path) -> bool:
    """Whether a run started in ``run_dir`` (its summary.json, or Hydra's record of its config),
    checkpoint or not."""
    run_dir = Path(run_dir)
    return (run_dir / SUMMARY_FILE).is_file() or (run_dir / ".hydra" / "config.yaml").is_file()


def remove_stale_temporaries(run_dir: Path) -> list[Path]:
    """Temporary files that writers killed mid-write left in ``run_dir`` (their process is gone)."""
    removed = []
    for tmp in Path(run_dir).glob(f".*{TMP_MARK}*"):
        pid = tmp.name.rsplit(TMP_MARK, 1)[-1]
        if pid.isdigit() and not pid_alive(int(pid)):
            tmp.unlink(missing_ok=True)
            removed.append(tmp)
    return removed


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # alive, another user's
        return True
    return True


class RunLock:
    """One writer per run dir: ``.vrmoe.lock`` holds the writer's pid and host. A second writer is
    refused; a lock without a live owner (its process on this host is gone, or the file is empty
    or unreadable: a crash or a full disk while it was written) is taken over."""

    # How long an unreadable lock is given to become readable: another writer may be between
    # creating it and writing its owner (older versions created it empty, then wrote).
    SETTLE_S = 1.0

    def __init__(self, run_dir: Path):
        self.path = Path(run_dir) / LOCK_FILE
        self.held = False
        self.took_over: str | None = None

    def owner(self) -> dict[str, Any] | None:
        return read_json(self.path)

    def held_by_a_live_process(self) -> bool:
        owner = self.owner()
        return owner is not None and (owner.get("host") != socket.gethostname() or not self.stale())

    def stale(self) -> bool:
        owner = self.owner() or {}
        return owner.get("host") == socket.gethostname() and not pid_alive(int(owner.get("pid", 0) or 0))

    def stale_reason(self) -> str | None:
        """Why the lock has no live owner (it may be taken over), or None when it has one or when it
        is held on another host (whose processes cannot be seen from here)."""
        import time

        deadline = time.monotonic() + self.SETTLE_S
        owner = self.owner()
        while owner is None and self.path.exists() and time.monotonic() < deadline:
            time.sleep(0.05)
            owner = self.owner()
        if owner is None:
            try:
                empty = self.path.stat().st_size == 0
            except OSError:  # removed meanwhile: free to take
                return "it was removed"
            return f"its {LOCK_FILE} was {'empty' if empty else 'unreadable'}"
        pid = owner.get("pid")
        if not isinstance(pid, int) or isinstance(pid, bool) or pid <= 0:
            return f"its {LOCK_FILE} names no process"
        if owner.get("host") == socket.gethostname() and not pid_alive(pid):
            return f"its process (pid {pid}) is gone"
        return None

    def acquire(self) -> bool:
        """Take the lock; False when another live process holds it. True also means a lock without
        a live owner was taken over (``self.took_over`` says why)."""
        self.took_over = None
        for _ in range(2):
            try:
                self._create()
            except FileExistsError:
                reason = self.stale_reason()
                if reason is None:
                    return False
                self.path.unlink(missing_ok=True)
                self.took_over = reason
                continue
            self.held = True
            return True
        return False

    def _create(self) -> None:
        """Create the lock with its owner already written (a hard link of a complete file), so no
        other writer ever reads it empty; where links are not supported, create it, then write."""
        owner = json.dumps({"pid": os.getpid(), "host": socket.gethostname()})
        tmp = self.path.with_name(f"{self.path.name}{TMP_MARK}{os.getpid()}")
        try:
            tmp.write_text(owner, encoding="utf-8")
            try:
                os.link(tmp, self.path)
                return
            except FileExistsError:
                raise
            except OSError:  # a filesystem without hard links
                pass
        finally:
            tmp.unlink(missing_ok=True)
        fd = os.open(self.path, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
        with os.fdopen(fd, "w") as f:
            f.write(owner)

    def release(self) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def atomic_write_text(path: Path, text: str) -> None:
    atomic_write(path, lambda tmp: tmp.write_text(text, encoding="utf-8"))


def write_json(path: Path, data: dict[str, Any]) -> None:
    atomic_write_text(path, json.dumps(_jsonable(data), indent=2, sort_keys=False) + "\n")


def _jsonable(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return None if math.isnan(value) else str(value)
    if isinstance(value, dict):
        return {str(k): _jsonable(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_jsonable(v) for v in value]
    if hasattr(value, "item") and getattr(value, "ndim", 1) == 0:
        return _jsonable(value.item())
    if hasattr(value, "tolist"):
        return _jsonable(value.tolist())
    return value


def read_json(path: Path) -> dict[str, Any] | None:
    """A JSON object from ``path``, or None when it is missing or unreadable (a run killed mid-write)."""
    try:
        data = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None


def software_versions() -> dict[str, str | None]:
    """What made a run, for its summary.json: the versions of vrmoe, Python, torch and
    transformers (None where not installed), and the git commit of vrmoe's source tree when it is
    a checkout (``+dirty`` when it has uncommitted changes)."""
    import platform
    import subprocess
    from importlib import metadata

    def version(package: str) -> str | None:
        try:
            return metadata.version(package)
        except metadata.PackageNotFoundError:
            return None

    commit = None
    source = Path(__file__).resolve().parent.parent
    if (source / ".git").exists():
        try:
            run = lambda *args: subprocess.run(["git", *args], cwd=source, capture_output=True, text=True,  # noqa: E731
                                               timeout=5)
            head = run("rev-parse", "HEAD")
            if head.returncode == 0:
                dirty = run("status", "--porcelain", "--untracked-files=no").stdout.strip()
                commit = head.stdout.strip() + ("+dirty" if dirty else "")
        except (OSError, subprocess.SubprocessError):  # no git here: the versions still say a lot
            commit = None
    return {"vrmoe": version("vrmoe"), "python": platform.python_version(), "torch": version("torch"),
            "transformers": version("transformers"), "git_commit": commit}


def read_summary(run_dir: Path) -> dict[str, Any] | None:
    """A run's summary.json, or None when it is missing or unreadable."""
    return read_json(Path(run_dir) / SUMMARY_FILE)


def read_metrics(run_dir: Path) -> tuple[list[dict[str, Any]], bool]:
    """Rows of a run's metrics.jsonl, and whether it was complete (a killed run may
    leave a truncated last line, which is skipped rather than fatal)."""
    path = Path(run_dir) / METRICS_FILE
    rows, complete = [], True
    if not path.exists():
        return rows, False
    for line in path.read_text(encoding="utf-8").splitlines():
        if not line.strip():
            continue
        try:
            rows.append(json.loads(line))
        except json.JSONDecodeError:
            complete = False
    return rows, complete


def metrics_rows(run_dir: Path, up_to_step: int) -> tuple[list[dict[str, Any]], list[str]]:
    """Rows of a run's metrics.jsonl, and where the damaged lines at or before ``up_to_step`` were
    ("step 3", or "after step 2" when the line's own step cannot be read). A damaged line after
    that step (the one a kill cut short) is left out without a word: the run logs it again."""
    path = Path(run_dir) / METRICS_FILE
    rows: list[dict[str, Any]] = []
    damaged: list[str] = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError:
            row = None
        if isinstance(row, dict) and isinstance(row.get("step"), int):
            rows.append(row)
            continue
        # Rows are written step first: a line cut short usually still names its step.
        head = re.match(r'\s*\{\s*"step"\s*:\s*(\d+)\s*[,}]', line)
        before = rows[-1]["step"] if rows else 0
        if head is not None:
            if int(head.group(1)) <= up_to_step:
                damaged.append(f"step {int(head.group(1))}")
        elif before < up_to_step:
            damaged.append(f"after step {before}")
    return rows, damaged


class Logger(Protocol):
    # Whether log_images stores anything: figures are drawn for a logger only when it does.
    records_images: bool

    def log(self, row: dict[str, Any], step: int) -> None: ...
    def log_images(self, images: dict[str, Path], step: int) -> None: ...
    def summary(self, data: dict[str, Any]) -> None: ...
    def finish(self, failed: bool = False) -> None: ...


class NullLogger:
    """The logger for logger=none and for tests: does nothing."""

    records_images = False

    def log(self, row, step):
        pass

    def log_images(self, images, step):
        pass

    def summary(self, data):
        pass

    def finish(self, failed=False):
        pass


class WandbLogger:
    """Mirror to Weights & Biases; offline by default, so no account is needed."""

    records_images = True

    def __init__(self, run_dir: Path, config: dict[str, Any], project: str, mode: str,
                 entity: str | None, group: str | None, name: str | None, tags: list[str], init_timeout: float = 10.0):
        import wandb

        self._wandb = wandb
        self.run = wandb.init(project=project, entity=entity, mode=mode, dir=str(run_dir), config=config,
                              group=group, name=name, tags=tags or None, reinit="finish_previous",
                              settings=wandb.Settings(silent=True, console="off", init_timeout=init_timeout))
        self.run.define_metric("step")
        self.run.define_metric("*", step_metric="step")

    def log(self, row, step):
        self.run.log({**_flatten(row), "step": step})

    def log_images(self, images, step):
        self.run.log({k: self._wandb.Image(str(p)) for k, p in images.items()} | {"step": step})

    def summary(self, data):
        for key, value in _flatten(data).items():
            self.run.summary[key] = value

    def finish(self, failed=False):
        self.run.finish(exit_code=1 if failed else 0)


def _flatten(row: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """Nested dicts and per-expert lists become flat W&B keys (layer0/utilisation/3)."""
    out: dict[str, Any] = {}
    for key, value in row.items():
        name = f"{prefix}{key}"
        if isinstance(value, dict):
            out.update(_flatten(value, f"{name}/"))
        elif isinstance(value, list) and all(isinstance(v, (int, float)) for v in value):
            out.update({f"{name}/{i}": v for i, v in enumerate(value)})
        elif isinstance(value, (int, float, str, bool)) or value is None:
            out[name] = value
    return out


def make_logger(name: str, run_dir: Path, config: dict[str, Any], project: str = "vrmoe",
                mode: str = "offline", entity: str | None = None, group: str | None = None,
                run_name: str | None = None, tags: list[str] | None = None, init_timeout: float = 10.0) -> Logger:
    if name == "none" or mode == "disabled":
        return NullLogger()
    try:
        return WandbLogger(run_dir, config, project, mode, entity, group, run_name, tags or [], init_timeout)
    except Exception as exc:  # W&B unreachable, not installed, or misconfigured: keep training
        from .console import log_line

        reason = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        log_line(f"[yellow]W&B could not start[/] ({reason}); continuing with local records only")
        return NullLogger()


class NullRecorder:
    """What a process that does not write records (a rank other than 0) records: nothing."""

    logger: Logger = NullLogger()

    def log(self, row: dict[str, Any]) -> None:
        pass

    def write_summary(self, summary: dict[str, Any]) -> None:
        pass

    def close(self, failed: bool = False) -> None:
        pass


class RunRecorder:
    """Appends one JSON object per logged step to metrics.jsonl and writes summary.json."""

    def __init__(self, run_dir: Path, logger: Logger, resume_after_step: int | None = None):
        self.run_dir = Path(run_dir)
        self.run_dir.mkdir(parents=True, exist_ok=True)
        self.logger = logger
        path = self.run_dir / METRICS_FILE
        if resume_after_step is not None and path.exists():
            # Rows logged after the checkpoint will be produced again: drop them.
            rows, damaged = metrics_rows(self.run_dir, resume_after_step)
            kept = "".join(json.dumps(r) + "\n" for r in rows if r.get("step", 0) <= resume_after_step)
            atomic_write_text(path, kept)
            if damaged:  # they cannot be produced again: the log keeps a gap, and says so
                from .console import log_line

                log_line(f"[yellow]warning:[/] {METRICS_FILE} had {len(damaged)} damaged row(s) at or before the "
                         f"checkpoint's step {resume_after_step} ({', '.join(damaged)}); dropped them, the log "
                         "has a gap there")
        elif path.exists():
            path.unlink()
        self._file = open(path, "a", encoding="utf-8")

    def log(self, row: dict[str, Any]) -> None:
        row = _jsonable(row)
        self._file.write(json.dumps(row) + "\n")
        self._file.flush()
        self.logger.log(row, step=int(row.get("step", 0)))

    def write_summary(self, summary: dict[str, Any]) -> None:
        write_json(self.run_dir / SUMMARY_FILE, summary)
        self.logger.summary({k: v for k, v in summary.items() if k != "config"})

    def close(self, failed: bool = False) -> None:
        if not self._file.closed:
            self._file.close()
        self.logger.finish(failed=failed)
