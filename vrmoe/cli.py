"""The ``vrmoe`` command: ``train`` is a Hydra app; the other subcommands are plain CLIs.

Every user-facing error ends in one line on stderr and exit code 2: bad values
are caught by :mod:`vrmoe.config` as :class:`ConfigError`, unknown group
choices before Hydra starts (so no run dir is created for a typo).
"""

from __future__ import annotations

import shutil
import sys
from importlib import resources
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .console import fail, log_line

CONFIG_GROUPS = ("model", "router", "data", "train", "logger", "task", "eval", "experiment")

USAGE = """\
usage: vrmoe <command> [arguments]

Bayesian routing in Mixture-of-Experts language models: train, evaluate, compare.

commands:
  train [overrides]     train a run (Hydra app: `vrmoe train --help`, `--cfg job`, `-m` for sweeps)
                        e.g. vrmoe train router=variational S=8 T=0.7
                             vrmoe train -m router=topk,variational seed=0,1
{extra}
Top-level knobs: K (experts per token), S (routing samples at evaluation),
T (temperature), beta (KL weight), seed. Outputs go to outputs/<date>/<time>_<router>/.
"""

# Subcommands besides `train`, registered by the modules that implement them:
# name -> ("module:function", one-line help). Each function takes argv.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("vrmoe.evaluate:main", "uncertainty metrics of a run: vrmoe eval run=<dir> [S=8]"),
    "compare": ("vrmoe.report:compare_main", "runs side by side: vrmoe compare <run or sweep dirs...>"),
    "dashboard": ("vrmoe.report:dashboard_main", "offline HTML report: vrmoe dashboard <dirs...> -o report.html"),
    "bench": ("vrmoe.bench:main", "performance ratios on this device: vrmoe bench"),
}


def config_dir() -> Path:
    return Path(str(resources.files("vrmoe") / "conf"))


def group_options(group: str) -> list[str]:
    folder = config_dir() / group
    return sorted(p.stem for p in folder.glob("*.yaml")) if folder.is_dir() else []


def check_overrides(overrides: list[str]) -> None:
    """Refuse unknown config-group choices (``router=foo``) before Hydra makes a run dir,
    and a ``train.resume`` that has nothing to resume."""
    for item in overrides:
        if "=" not in item or item.startswith(("hydra", "+", "~", "-")):
            continue
        key, value = item.split("=", 1)
        key = key.lstrip("+")
        if key in CONFIG_GROUPS:
            options = group_options(key)
            for choice in value.split(","):  # a multirun sweep lists several
                if choice and choice != "null" and choice not in options:
                    raise ConfigError(f"{key}={choice!r} is unknown; choose one of {', '.join(options)}")
        if key == "train.resume" and value not in ("", "null"):
            ckpt = Path(value).expanduser() / "checkpoint.pt"
            if not ckpt.exists():
                raise ConfigError(f"train.resume={value}: no checkpoint.pt there; "
                                  "point it at the run dir of an interrupted run")


def _register_resolvers() -> None:
    if not OmegaConf.has_resolver("vrmoe_run_dir"):
        # A resumed run continues in its own directory instead of a new one.
        OmegaConf.register_new_resolver("vrmoe_run_dir", lambda resume, default: resume or default)


def _train_job(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config import load_config

    _register_resolvers()  # joblib and submitit workers import this module afresh
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
    try:
        app = load_config(cfg)
        from .train import train  # after validation: a refused config exits before torch loads

        train(app, run_dir, overrides, group=group, run_name=run_name)
    except ConfigError as exc:
        if multirun:  # record it and let the rest of the sweep run
            _record_failed_job(run_dir, overrides, str(exc), hc.job.num)
            return
        _drop_empty_run_dir(run_dir, cfg)
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; resume with: vrmoe train train.resume={run_dir}", code=130)
    except Exception as exc:
        if not multirun:
            raise
        import traceback

        _record_failed_job(run_dir, overrides, f"{type(exc).__name__}: {exc}", hc.job.num,
                           traceback=traceback.format_exc())


def _record_failed_job(run_dir: Path, overrides: list[str], error: str, job_num: int,
                       traceback: str | None = None) -> None:
    """Mark a sweep job failed in its summary.json (keeping what train() already recorded there)."""
    from .tracking import SUMMARY_FILE, write_json
    from .train import read_summary

    summary = read_summary(run_dir) or {"overrides": overrides}
    summary.update({"status": "failed", "error": error})
    if traceback:
        summary["traceback"] = traceback
    run_dir.mkdir(parents=True, exist_ok=True)
    write_json(run_dir / SUMMARY_FILE, summary)
    log_line(f"[red]job {job_num} failed:[/] {error}")


def sweep_group(sweep_dir: Path) -> str:
    """The W&B group of a sweep: its directory name, with the date when the name is only a time
    (the default outputs/multirun/<date>/<time>), so that sweeps on different days stay apart."""
    import re

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
    """At the end of a sweep: one line counting the jobs by status, and exit code 1 when any
    failed (the other jobs still ran), so scripts notice a partial sweep."""

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        from .train import read_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        statuses = [(read_summary(p.parent) or {}).get("status", "unknown") for p in sweep_dir.rglob("summary.json")]
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        log_line(f"sweep: {', '.join(f'{n} {s}' for s, n in counts.items()) or 'no jobs'} -> {sweep_dir} "
                 f"(vrmoe compare {sweep_dir})")
        if counts.get("failed"):
            sys.exit(1)


def _drop_empty_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """A run refused at validation leaves no directory behind (only a fresh one, never a resumed one)."""
    if OmegaConf.select(cfg, "train.resume"):
        return
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def train_main(argv: list[str]) -> None:
    import hydra

    try:
        check_overrides(argv)
    except ConfigError as exc:
        fail(str(exc))
    _register_resolvers()
    app = hydra.main(version_base="1.3", config_path="conf", config_name="config")(_train_job)
    sys.argv = ["vrmoe train", *argv]
    app()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = "".join(f"  {name:<20}  {helptext}\n" for name, (_, helptext) in SUBCOMMANDS.items())
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(USAGE.format(extra=extra), end="")
        return
    command, rest = argv[0], argv[1:]
    if command == "train":
        train_main(rest)
        return
    if command in SUBCOMMANDS:
        module_name, func_name = SUBCOMMANDS[command][0].split(":")
        import importlib

        func = getattr(importlib.import_module(module_name), func_name)
        try:
            func(rest)
        except ConfigError as exc:
            fail(str(exc))
        return
    fail(f"unknown command {command!r}; choose one of train, {', '.join(SUBCOMMANDS)} (vrmoe --help)")


__all__ = ["main", "SUBCOMMANDS"]
