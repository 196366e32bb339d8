"""One rich console for the whole tool (stderr, so piped stdout stays data)."""

from __future__ import annotations

import argparse
import errno
import sys
from typing import Any, Callable, NoReturn

from rich.console import Console
from rich.markup import escape

from .config import ConfigError

console = Console(stderr=True, highlight=False)


def log_line(message: str) -> None:
    """A progress or status line: rich markup on a terminal, plain text in logs."""
    console.print(message, soft_wrap=True)


def fail(message: str, code: int = 2) -> NoReturn:
    """Print one clear error line and exit without a traceback."""
    console.print(f"[bold red]error:[/] {escape(message)}", soft_wrap=True, markup=True, highlight=False)
    sys.exit(code)


def run_command(name: str, func: Callable[..., Any], *args: Any) -> Any:
    """Run a command's entry point: bad input (:class:`ConfigError`) ends in one error line and
    exit code 2, running out of memory or a file that cannot be written (a full disk) in one line
    and exit code 1, Ctrl-C in one line and exit code 130."""
    try:
        return func(*args)
    except ConfigError as exc:
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"{name} interrupted", code=130)
    except OSError as exc:  # files are written whole (atomically): what was there before is still there
        where = f" {exc.filename}:" if exc.filename else ""
        full = exc.errno in (errno.ENOSPC, getattr(errno, "EDQUOT", errno.ENOSPC))  # a full disk, or a quota
        fix = "free some space, then run it again" if full else "check the path and its permissions, then run it again"
        fail(f"{name}:{where} {exc.strerror or exc}; {fix}", code=1)
    except (MemoryError, RuntimeError) as exc:
        message = out_of_memory_message(name, exc)
        if message is None:
            raise
        fail(message, code=1)


def out_of_memory_message(name: str, exc: BaseException) -> str | None:
    """One line for an allocation that failed (torch's OutOfMemoryError, a RuntimeError, its CPU
    allocator's RuntimeError, or Python's MemoryError); None for any other error."""
    if not (isinstance(exc, MemoryError) or type(exc).__name__ == "OutOfMemoryError"
            or "can't allocate memory" in str(exc)):
        return None
    detail = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return (f"{name} ran out of memory ({detail}); lower S or the batch size (train.batch_size, "
            "eval.batch_size), or use a smaller model")


class CommandParser(argparse.ArgumentParser):
    """argparse that reports a usage error as one line (exit 2) like the rest of vrmoe."""

    def error(self, message: str) -> None:  # type: ignore[override]
        raise ConfigError(f"{self.prog}: {message} (see {self.prog} --help)")
