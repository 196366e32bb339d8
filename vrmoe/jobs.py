"""The Hydra task function of ``vrmoe train``: validate, train, evaluate when asked, return the objective.

One job is one run. It is the job, not the training loop, that starts the evaluation
at the end (``eval.at_end=true``) and returns the run's objective to a sweeper
(``train.objective``: the final validation loss, or a metric of ``eval.json``), so the
Optuna sweeper can drive it. In a multirun sweep a failed job is recorded in its
``summary.json`` and the sweep goes on; :class:`SweepReport` counts the jobs at the end.
"""

from __future__ import annotations

import copy
import math
import re
import shutil
import sys
import traceback
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf, open_dict, read_write

from . import distributed
from .checkpoint import checkpoint_paths
from .compose import load_job_config, prepare_hydra
from .config import AppConfig, ConfigError
from .console import fail, log_line, out_of_memory_message
from .train.loop import RunDirTaken, UnrecordedCompletion, check_run_dir_free
from .train.step import Diverged
from .tracking import (EVAL_FILE, SUMMARY_FILE, atomic_write_text, read_json, read_summary, unwritable_reason,
                       write_json)

# `vrmoe train` ends its command line with this, so that Hydra writes no record (.hydra/) into the
# run dir before the run holds it: the job writes the record (record_files) once it holds the lock.
NO_HYDRA_RECORD = "hydra.output_subdir=null"


def train_job(cfg: DictConfig) -> float:
    """Train (and with eval.at_end, evaluate) one run in Hydra's output dir; return its objective."""
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    prepare_hydra()  # joblib and submitit workers import this module afresh
    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    multirun = hc.mode == RunMode.MULTIRUN
    group = run_name = None
    if multirun:
        # The job's own output dir locates the sweep: re-resolving hydra.sweep.dir (${now:...})
        # in a worker process could name another time.
        sweep_dir = run_dir.parents[len(Path(hc.sweep.subdir).parts) - 1]
        group, run_name = sweep_group(sweep_dir), sweep_run_name(sweep_dir, overrides)
    record = record_files(cfg)
    try:
        if multirun and not OmegaConf.select(cfg, "train.resume"):  # another sweep's job: refused before setup
            check_run_dir_free(run_dir, key="hydra.sweep.dir")
        if multirun:  # a multi-task job of a Slurm/submitit sweep runs data-parallel
            distributed.start_in_job()
        value = run_job(load_job_config(cfg, overrides), run_dir, overrides, group=group, run_name=run_name,
                        record=record)
        distributed.finish()
        return value
    except RunDirTaken as exc:  # another run's dir: nothing is written there, not even this failure
        if multirun:
            SweepReport.refused.append(run_dir)
            log_line(f"[red]job {hc.job.num} refused:[/] {exc}")
            return math.nan
        fail(str(exc))
    except ConfigError as exc:
        if multirun:  # record it and let the rest of the sweep run
            record_failed_job(run_dir, overrides, str(exc), hc.job.num, record=record)
            return math.nan
        _drop_empty_run_dir(run_dir, cfg)
        fail(str(exc))
    except KeyboardInterrupt:
        fail(interrupted_message(run_dir, cfg), code=130)
    except OSError as exc:  # a full disk or a vanished directory while the run writes
        message = write_failure_message(exc, run_dir)
        if multirun:
            record_failed_job(run_dir, overrides, message, hc.job.num)
            return math.nan
        fail(message, code=1)
    except Diverged as exc:  # recorded in summary.json as diverged
        if multirun:
            log_line(f"[red]job {hc.job.num} diverged:[/] {exc}")
            return math.nan
        fail(str(exc), code=3)
    except Exception as exc:
        out_of_memory = out_of_memory_message("vrmoe train", exc)
        if not multirun:
            if out_of_memory:
                fail(out_of_memory, code=1)
            raise
        record_failed_job(run_dir, overrides, out_of_memory or f"{type(exc).__name__}: {exc}", hc.job.num,
                          traceback=None if out_of_memory else traceback.format_exc())
        return math.nan


def run_job(app: AppConfig, run_dir: Path, overrides: list[str] | None = None, group: str | None = None,
            run_name: str | None = None, record: dict[str, str] | None = None) -> float:
    """One run: train it, evaluate it when ``eval.at_end`` asks, and return its objective. Every
    input the evaluation needs is checked before the training starts; ``record`` is Hydra's record
    of the job (:func:`record_files`)."""
    from .eval.context import check_eval_inputs
    from .eval.run import evaluate_run
    from .train import train

    check_objective(app)
    if app.eval.at_end:
        check_eval_inputs(app)  # a missing OOD file fails now, not after the training
    summary = train(app, run_dir, overrides, group=group, run_name=run_name, record=record)
    evaluation = evaluate_run(run_dir, app) if app.eval.at_end else None  # under torchrun, sharded over ranks
    return objective(app.train.objective, summary, evaluation)


def check_objective(app: AppConfig) -> None:
    from .eval.schema import OBJECTIVES

    name = app.train.objective
    if name == "val_loss":
        return
    if name not in OBJECTIVES:
        raise ConfigError(f"train.objective={name!r} is unknown; choose val_loss or one of {', '.join(OBJECTIVES)}")
    if not app.eval.at_end:
        raise ConfigError(f"train.objective={name} is a metric of vrmoe eval; "
                          "add eval.at_end=true so the job evaluates the run")


def objective(name: str, summary: dict, evaluation: dict | None) -> float:
    """The number a sweeper optimises: ``val_loss`` or an eval.json metric; NaN when absent."""
    from .eval.schema import METRICS, number

    value = summary.get("final_val_loss") if name == "val_loss" else METRICS[name](evaluation)
    value = number(value)
    return math.nan if value is None else value


def run_objective(run_dir: Path, name: str) -> float:
    """A finished run's objective, read back from its records."""
    return objective(name, read_summary(run_dir) or {}, read_json(Path(run_dir) / EVAL_FILE))


def record_failed_job(run_dir: Path, overrides: list[str], error: str, job_num: int,
                      traceback: str | None = None, record: dict[str, str] | None = None) -> None:
    """Mark a sweep job failed in its summary.json (keeping what train() already recorded there),
    with Hydra's ``record`` of the job where a job refused before it trained has none yet."""
    summary = read_summary(run_dir) or {"overrides": overrides}
    summary.update({"status": "failed", "error": error})
    if traceback:
        summary["traceback"] = traceback
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        for name, text in (record or {}).items():
            if not (run_dir / name).exists():
                (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                atomic_write_text(run_dir / name, text)
        write_json(run_dir / SUMMARY_FILE, summary)
    except OSError as exc:  # a full disk: the failure is said here, and the sweep's count says it too
        error = f"{error} (not recorded: cannot write {exc.filename or run_dir}: {exc.strerror or exc})"
    log_line(f"[red]job {job_num} failed:[/] {error}")


def record_files(cfg: DictConfig) -> dict[str, str]:
    """Hydra's record of a job (config.yaml, hydra.yaml and overrides.yaml under
    ``hydra.output_subdir``, .hydra by default), as Hydra writes it; empty when the command line
    set hydra.output_subdir=null. The run writes it once it holds its run dir (see NO_HYDRA_RECORD)."""
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = copy.deepcopy(HydraConfig.instance().cfg)
    given = list(hydra_cfg.hydra.overrides.hydra)
    if NO_HYDRA_RECORD in given:  # vrmoe train's own (its last): the record keeps the command line's choice
        del given[len(given) - 1 - given[::-1].index(NO_HYDRA_RECORD)]
    subdirs = [item.split("=", 1)[1] for item in given if item.startswith("hydra.output_subdir=")]
    subdir = subdirs[-1] if subdirs else ".hydra"
    if subdir in ("null", ""):
        return {}
    with read_write(hydra_cfg.hydra), open_dict(hydra_cfg.hydra):
        hydra_cfg.hydra.output_subdir = subdir
        hydra_cfg.hydra.overrides.hydra = given
    return {f"{subdir}/config.yaml": OmegaConf.to_yaml(cfg), f"{subdir}/hydra.yaml": OmegaConf.to_yaml(hydra_cfg),
            f"{subdir}/overrides.yaml": OmegaConf.to_yaml(hydra_cfg.hydra.overrides.task)}


def write_failure_message(exc: OSError, run_dir: Path) -> str:
    """One line for a write that failed (a full disk): the file, the reason, whether summary.json
    could say so, and how to go on from what the run dir holds."""
    line = f"cannot write {exc.filename or run_dir}: {exc.strerror or exc}"
    if (read_summary(run_dir) or {}).get("status") == "running":
        line += " (its summary.json could not be updated and still says running)"
    if isinstance(exc, UnrecordedCompletion):
        return f"the run completed, but {line}; free some space: {checkpoint_paths(run_dir)[0]} holds its final weights"
    if checkpoint_paths(run_dir):
        return f"{line}; free some space, then resume with: vrmoe train train.resume={run_dir}"
    if (run_dir / SUMMARY_FILE).exists():
        return f"{line}; free some space, then start it again with: vrmoe train train.resume={run_dir}"
    return f"{line}; free some space, or choose another hydra.run.dir"


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of a sweep: its directory name, with the date when the name is only a time
    (the default outputs/multirun/<date>/<time>), so that sweeps on different days stay apart."""
    if re.fullmatch(r"\d{4}-\d{2}-\d{2}", sweep_dir.parent.name):
        return f"{sweep_dir.parent.name}_{sweep_dir.name}"
    return sweep_dir.name


def sweep_run_name(sweep_dir: Path, overrides: list[str]) -> str | None:
    """A sweep job's run name: only the overrides the sweep varies (K=1,seed=0), read against the
    sweep's command line that Hydra saves in multirun.yaml before it launches any job."""
    from hydra.core.override_parser.overrides_parser import OverridesParser

    from .train import run_name_from

    try:
        sweep_args = OmegaConf.load(sweep_dir / "multirun.yaml").hydra.overrides.task
        parser = OverridesParser.create()
        swept = {o.get_key_element() for o in parser.parse_overrides(list(sweep_args)) if o.is_sweep_override()}
        varied = [text for text, o in zip(overrides, parser.parse_overrides(overrides))
                  if o.get_key_element() in swept]
    except Exception:  # no or unreadable multirun.yaml (a custom sweeper): name the run by all overrides
        varied = []
    return run_name_from(varied or overrides)


class SweepReport(Callback):
    """At the end of a sweep: one line counting its jobs by status, and exit code 1 when any failed
    or was refused (the other jobs still ran), so scripts notice a partial sweep. Its jobs are those
    whose summary.json it wrote, and those refused because their run dir was another run's (in a
    launcher's worker process, a refused job says so in that job's output and is not counted)."""

    refused: list[Path] = []  # run dirs of this process's jobs refused as another run's

    def __init__(self) -> None:
        self.before: dict[Path, tuple[int, int]] = {}

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        """The records already in the sweep dir (another sweep's): not this sweep's to count."""
        SweepReport.refused = []
        sweep_dir = Path(str(config.hydra.sweep.dir))
        self.before = {p: _identity(p) for p in sweep_dir.rglob(SUMMARY_FILE)}
        keep_earlier_sweep_record(sweep_dir, config)

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(str(config.hydra.sweep.dir))
        refused = {p.absolute() for p in SweepReport.refused}
        statuses = [(read_summary(p.parent) or {}).get("status", "unknown") for p in sweep_dir.rglob(SUMMARY_FILE)
                    if p.parent.absolute() not in refused and self.before.get(p) != _identity(p)]
        statuses += ["refused"] * len(refused)
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        log_line(f"sweep: {', '.join(f'{n} {s}' for s, n in counts.items()) or 'no jobs'} -> {sweep_dir} "
                 f"(vrmoe compare {sweep_dir})")
        if counts.get("failed") or counts.get("refused"):
            sys.exit(1)


def keep_earlier_sweep_record(sweep_dir: Path, config: DictConfig) -> None:
    """Hydra's basic sweeper rewrites ``<sweep dir>/multirun.yaml`` when a sweep starts: the record
    of an earlier, different sweep into the same dir (another config or other overrides) is kept
    beside it as ``multirun.<n>.yaml``, so its jobs' command line is not lost. An identical sweep's
    record is the same, and a record kept once (a sweeper that writes none, e.g. Optuna's, leaves
    the earlier one in place) is not copied again."""
    record = sweep_dir / "multirun.yaml"
    if not record.is_file():
        return
    try:
        earlier = OmegaConf.load(record).hydra
        said = lambda hydra: (hydra.job.config_name, list(hydra.overrides.task), list(hydra.overrides.hydra))  # noqa: E731
        if said(earlier) == said(config.hydra):
            return
    except Exception:  # unreadable or not Hydra's: kept all the same
        pass
    kept = sorted(sweep_dir.glob("multirun.*.yaml"))
    try:
        text = record.read_bytes()
        if any(path.read_bytes() == text for path in kept):
            return
        n = 1
        while (sweep_dir / f"multirun.{n}.yaml").exists():
            n += 1
        shutil.copy2(record, sweep_dir / f"multirun.{n}.yaml")
    except OSError as exc:
        log_line(f"sweep: could not keep the earlier sweep's {record} beside it ({exc.strerror}); "
                 "Hydra replaces it with this sweep's")


def _identity(path: Path) -> tuple[int, int]:
    """Which version of a file is there (records are replaced whole, so a rewrite is a new inode)."""
    try:
        info = path.stat()
    except OSError:
        return (0, 0)
    return (info.st_ino, info.st_mtime_ns)


def interrupted_message(run_dir: Path, cfg: DictConfig) -> str:
    """What Ctrl-C leaves: a checkpoint to resume from; a run stopped before its first checkpoint,
    which the same command starts again in place; or (stopped before the run wrote anything)
    nothing, in which case the empty run dir goes too."""
    if checkpoint_paths(run_dir):
        return f"interrupted; resume with: vrmoe train train.resume={run_dir}"
    if (run_dir / SUMMARY_FILE).exists():
        return f"interrupted before the first checkpoint; start it again with: vrmoe train train.resume={run_dir}"
    _drop_empty_run_dir(run_dir, cfg)
    return "interrupted before the first checkpoint; nothing to resume"


def _drop_empty_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """A run refused at validation leaves no directory behind (only a fresh one, never a resumed one):
    neither its run dir nor the empty folders above it that its command created (outputs/<date>/)."""
    if OmegaConf.select(cfg, "train.resume"):
        return
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)
    existed = RunDirRecord.existed
    if existed is None or run_dir.exists():
        return
    folder = run_dir.absolute().parent
    while folder != existed and existed in folder.parents:
        try:
            folder.rmdir()  # only an empty one: a run started beside it keeps it
        except OSError:
            return
        folder = folder.parent


class RunDirRecord(Callback):
    """Before Hydra makes a run's dir (``hydra.run.dir``, with any missing folders above it): the
    deepest of those folders that exists already, so that a refused run removes only the folders
    its own command created. A run dir or sweep dir that cannot be made (a file in its path, a
    read-only or full disk) is one line, before Hydra tries."""

    existed: Path | None = None

    def on_run_start(self, config: DictConfig, **kwargs) -> None:
        try:
            run_dir = Path(str(config.hydra.run.dir))
        except Exception:  # a run dir that does not resolve is refused by Hydra itself
            return
        folder = run_dir.absolute()
        while not folder.exists() and folder != folder.parent:
            folder = folder.parent
        RunDirRecord.existed = folder
        if reason := unwritable_reason(run_dir):
            _drop_empty_run_dir(run_dir, config)
            fail(f"hydra.run.dir={run_dir} cannot be written ({reason}); choose a writable directory")

    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        RunDirRecord.existed = None  # a sweep's jobs record their failures; no folder is removed
        try:
            sweep_dir = Path(str(config.hydra.sweep.dir))
        except Exception:
            return
        if reason := unwritable_reason(sweep_dir):
            fail(f"hydra.sweep.dir={sweep_dir} cannot be written ({reason}); choose a writable directory")
