"""Finding run dirs and reading their records, and the settings a run was trained with.

A run dir is any directory holding a ``summary.json``; sweep dirs are searched
recursively. A run is read from ``summary.json``, ``metrics.jsonl`` and, when
``vrmoe eval`` has run, ``eval.json`` (read through ``vrmoe.eval.schema``).
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

from ..config import ConfigError, dotted_keys
from ..console import log_line
from ..tracking import RunLock, EVAL_FILE, METRICS_FILE, SUMMARY_FILE, read_json, read_metrics

# Overrides that say where or how a run was recorded, not what it is: never a compare column.
RECORDING_KEYS = ("hydra", "train.resume", "logger")


@dataclass
class Run:
    path: Path
    summary: dict[str, Any]
    evaluation: dict[str, Any] | None
    rows: list[dict[str, Any]] = field(default_factory=list)
    metrics_truncated: bool = False
    label: str = ""

    @property
    def status(self) -> str:
        # A truncated metrics.jsonl means the process died mid-write, whatever summary.json last said.
        if self.metrics_truncated:
            return "incomplete"
        status = str(self.summary.get("status") or "unknown")
        # "running" with no live writer holding the dir: the process was killed.
        if status == "running" and not RunLock(self.path).held_by_a_live_process():
            return "killed"
        return status


def _natural_key(path: Path) -> list[Any]:
    """Sort job dirs 2_..., 10_... by number, not as text."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", str(path))]


def find_runs(paths: Sequence[str | Path]) -> list[Path]:
    """Run dirs (those with a summary.json) at or below each path, in a stable order."""
    found: dict[Path, None] = {}
    for raw in paths:
        path = Path(raw).expanduser()
        if not path.is_dir():
            raise ConfigError(f"{raw}: no such directory; give run dirs or sweep dirs (e.g. outputs/multirun/...)")
        if (path / SUMMARY_FILE).is_file():
            found[path.resolve()] = None
            continue
        below = [p.parent for p in path.rglob(SUMMARY_FILE)
                 if not any(part.startswith(".") for part in p.relative_to(path).parts[:-1])]
        for run_dir in sorted(below, key=_natural_key):
            found[run_dir.resolve()] = None
    if not found:
        raise ConfigError(f"no runs found under {', '.join(str(p) for p in paths)} (no {SUMMARY_FILE} there); "
                          "give a run dir or a sweep dir")
    return list(found)


def read_record(path: Path) -> dict[str, Any] | None:
    """A run's JSON record (summary.json, eval.json), or None when it is absent; one that is
    present but unreadable (a run killed mid-write) is ignored with a warning."""
    data = read_json(path)
    if data is None and path.exists():
        log_line(f"[yellow]warning:[/] {path} is unreadable (not a JSON object); ignored")
    return data


def load_run(path: Path) -> Run:
    rows, complete = read_metrics(path)
    summary = read_record(path / SUMMARY_FILE) or {"status": "unreadable"}
    return Run(path=path, summary=summary, evaluation=read_record(path / EVAL_FILE), rows=rows,
               metrics_truncated=not complete and (path / METRICS_FILE).exists())


def load_runs(paths: Sequence[str | Path]) -> list[Run]:
    """The runs at or below ``paths``, each labelled by its path relative to their common parent."""
    runs = [load_run(p) for p in find_runs(paths)]
    # Labels relative to the runs' common parent: short, and unique because the paths are.
    root = Path(os.path.commonpath([r.path for r in runs])) if len(runs) > 1 else runs[0].path.parent
    labels = [str(run.path.relative_to(root)) or run.path.name for run in runs]
    # A sweep job dir is named <job number>_<its overrides>; the override columns already say the
    # rest, so the number alone labels it (unless that would make two labels equal).
    short = [str(Path(label).parent / job.group(1)) if (job := re.match(r"(\d+)_.", run.path.name))
             and run.summary.get("overrides") else label for label, run in zip(labels, runs)]
    if len(runs) > 1 and len(set(short)) == len(short):
        labels = short
    for run, label in zip(runs, labels):
        run.label = label
    return runs


# ---------------------------------------------------------------------------
# What a run was trained with
# ---------------------------------------------------------------------------

def differing_overrides(runs: Sequence[Run]) -> list[str]:
    """Each run's overrides whose values differ between the runs (a key some runs lack counts),
    as ``key=value, ...`` in the order the runs give them; "" for a run with none of them."""
    values = [override_values(run) for run in runs]
    keys: list[str] = []
    for run_values in values:
        keys += [key for key in run_values if key not in keys]
    differing = [key for key in keys if len({run_values.get(key) for run_values in values}) > 1]
    return [", ".join(f"{key}={run_values[key]}" for key in differing if key in run_values) for run_values in values]


def override_values(run: Run) -> dict[str, str]:
    """The run's command-line overrides as key -> value text (``+key`` counts as ``key``)."""
    values: dict[str, str] = {}
    for item in run.summary.get("overrides") or []:
        if not isinstance(item, str) or "=" not in item or item.startswith("~"):
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if not key.startswith(RECORDING_KEYS):
            values[key] = value
    return values


def config_value(run: Run, key: str) -> Any:
    """A key's value in the run's recorded config: ``seed`` or ``train.lr``, and for a config
    group such as ``model`` the chosen option's name; None when the config lacks it."""
    config = run.summary.get("config")
    if not isinstance(config, dict):
        return None
    flat = dotted_keys(config)
    if key in flat:
        value = flat[key]
        return value if isinstance(value, (int, float, str, bool)) or value is None else str(value)
    name = config.get(key)
    return name.get("name") if isinstance(name, dict) else None


def typed_value(text: str) -> Any:
    """An override's text as the value it spells (1, 0.5, true, null), else the text itself."""
    if text == "null":
        return None
    for parse in (int, float):
        try:
            return parse(text)
        except ValueError:
            pass
    return {"true": True, "false": False}.get(text.lower(), text)


def setting(run: Run, key: str) -> Any:
    """What the run used for ``key``: its override when given, else its recorded config value
    (so ``T=1`` and the default T of 1.0 are the same setting)."""
    overrides = override_values(run)
    return typed_value(overrides[key]) if key in overrides else config_value(run, key)


def varied_override_keys(runs: Sequence[Run]) -> list[str]:
    """Override keys whose setting is not the same in every run."""
    keys: list[str] = []
    for run in runs:
        keys += [k for k in override_values(run) if k not in keys]
    return [key for key in keys if len({setting(run, key) for run in runs}) > 1]


__all__ = ["Run", "RECORDING_KEYS", "find_runs", "read_record", "load_run", "load_runs", "override_values",
           "config_value", "typed_value", "setting", "varied_override_keys"]
