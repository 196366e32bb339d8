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
from typing import TYPE_CHECKING, Iterable

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .console import fail, log_line

if TYPE_CHECKING:
    from .config import AppConfig

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


# Hydra's mutually exclusive modes, as its own parser names them.
_HYDRA_MODES = {"run": "--run", "multirun": "-m/--multirun", "cfg": "--cfg", "info": "--info",
                "shell_completion": "--shell-completion"}


def split_hydra_args(argv: list[str]) -> list[str]:
    """Check ``vrmoe train``'s command line the way Hydra will read it and return its overrides.

    Hydra reports a bad flag combination with a traceback and a malformed override with a
    multi-line message and exit code 1; here each is one ConfigError line instead."""
    from hydra._internal.utils import get_args_parser

    parser = get_args_parser()

    def refuse(message: str) -> None:
        raise ConfigError(f"vrmoe train: {message} (see vrmoe train --help)")

    parser.error = refuse  # type: ignore[method-assign]  # argparse would print its usage and exit
    args = parser.parse_args(argv)
    modes = [flag for name, flag in _HYDRA_MODES.items() if getattr(args, name)]
    if len(modes) > 1:
        raise ConfigError(f"vrmoe train: {' and '.join(modes)} cannot be combined; use one of them "
                          "(e.g. vrmoe train -m K=1,2, or vrmoe train K=1 --cfg job)")
    return list(args.overrides)


def _schema_keys() -> set[str]:
    """Every dotted key of the typed config (``K``, ``router.k``, ``eval.gammas``, ...)."""
    import dataclasses

    from .config import AppConfig

    keys: set[str] = set()

    def walk(cls: type, prefix: str) -> None:
        for f in dataclasses.fields(cls):
            keys.add(prefix + f.name)
            default = f.default_factory() if f.default_factory is not dataclasses.MISSING else None
            if dataclasses.is_dataclass(default):
                walk(type(default), f"{prefix}{f.name}.")

    walk(AppConfig, "")
    return keys


def check_overrides(overrides: list[str]) -> None:
    """Refuse, before Hydra makes a run dir: malformed overrides, keys the config does not have,
    unknown config-group choices (``router=foo``) and a ``train.resume`` with nothing to resume."""
    import difflib

    from hydra.core.override_parser.overrides_parser import OverridesParser
    from hydra.errors import OverrideParseException

    from .tracking import CHECKPOINT_FILE

    parser = OverridesParser.create()
    schema = _schema_keys()
    for item in overrides:
        try:
            parsed = parser.parse_overrides([item])[0]
        except OverrideParseException as exc:
            detail = next((line for line in str(exc).splitlines() if not line.startswith(("Error parsing", "See "))),
                          "not an override")
            raise ConfigError(f"{item!r}: {detail}; overrides are key=value, e.g. K=2 or router=variational") from None
        key = parsed.key_or_group
        if key.startswith("hydra") or parsed.is_delete() or "=" not in item:
            continue
        value = item.split("=", 1)[1]
        if key in CONFIG_GROUPS:
            options = group_options(key)
            for choice in value.split(","):  # a multirun sweep lists several
                if choice and choice != "null" and choice not in options:
                    raise ConfigError(f"{key}={choice!r} is unknown; choose one of {', '.join(options)}")
            continue
        if key not in schema:
            close = difflib.get_close_matches(key, sorted(schema), n=1)
            hint = f"did you mean {close[0]}?" if close else "vrmoe train --cfg job lists every key"
            raise ConfigError(f"{key}={value}: {key} is not a config key; {hint}")
        _check_type(parsed, key)
        if key == "train.resume" and value not in ("", "null"):
            if not (Path(value).expanduser() / CHECKPOINT_FILE).exists():
                raise ConfigError(f"train.resume={value}: no {CHECKPOINT_FILE} there; "
                                  "point it at the run dir of an interrupted run")


def _check_type(parsed, key: str) -> None:
    """A value of the wrong type (``train.max_steps=abc``), each value of a sweep checked."""
    from omegaconf.errors import OmegaConfBaseException

    from .config import AppConfig

    values = list(parsed.sweep_string_iterator()) if parsed.is_sweep_override() \
        else [parsed.get_value_element_as_str()]
    for value in values:
        if "${" in value:  # an interpolation is checked once resolved
            continue
        try:
            OmegaConf.merge(OmegaConf.structured(AppConfig), OmegaConf.from_dotlist([f"{key}={value}"]))
        except OmegaConfBaseException as exc:
            reason = str(exc).strip().splitlines()[0]
            raise ConfigError(f"{key}={value}: {reason}") from None


def prepare_hydra() -> None:
    """Register what the configs need before Hydra composes them (in every process that composes)."""
    if not OmegaConf.has_resolver("vrmoe_run_dir"):
        # A resumed run continues in its own directory instead of a new one.
        OmegaConf.register_new_resolver("vrmoe_run_dir", lambda resume, default: resume or default)
    from hydra.core.config_store import ConfigStore

    from .config import AppConfig

    # The typed schema is the base of config.yaml: every key of every group exists (with its
    # default) whichever option a group takes, so `router=topk router.sigma_init=0.2` needs no `+`.
    ConfigStore.instance().store(name="vrmoe_schema", node=AppConfig)


def compose_config(overrides: Iterable[str]) -> "AppConfig":
    """The validated config that ``vrmoe train`` would build from these overrides."""
    from hydra import compose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from .config import load_config

    overrides = list(overrides)
    check_overrides(overrides)
    prepare_hydra()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="vrmoe.conf", version_base="1.3"):
        cfg = compose(config_name="config", overrides=overrides)
    return load_config(cfg)




def _train_job(cfg: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from .config import load_config

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
        fail(interrupted_message(run_dir, cfg), code=130)
    except Exception as exc:
        if not multirun:
            raise
        import traceback

        _record_failed_job(run_dir, overrides, f"{type(exc).__name__}: {exc}", hc.job.num,
                           traceback=traceback.format_exc())


def _record_failed_job(run_dir: Path, overrides: list[str], error: str, job_num: int,
                       traceback: str | None = None) -> None:
    """Mark a sweep job failed in its summary.json (keeping what train() already recorded there)."""
    from .tracking import SUMMARY_FILE, read_summary, write_json

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
        from .tracking import SUMMARY_FILE, read_summary

        sweep_dir = Path(str(config.hydra.sweep.dir))
        statuses = [(read_summary(p.parent) or {}).get("status", "unknown") for p in sweep_dir.rglob(SUMMARY_FILE)]
        counts = {s: statuses.count(s) for s in sorted(set(statuses))}
        log_line(f"sweep: {', '.join(f'{n} {s}' for s, n in counts.items()) or 'no jobs'} -> {sweep_dir} "
                 f"(vrmoe compare {sweep_dir})")
        if counts.get("failed"):
            sys.exit(1)


def interrupted_message(run_dir: Path, cfg: DictConfig) -> str:
    """What Ctrl-C leaves: a checkpoint to resume from, or (stopped before the first one) nothing,
    in which case the empty run dir goes too."""
    from .tracking import CHECKPOINT_FILE

    if (run_dir / CHECKPOINT_FILE).exists():
        return f"interrupted; resume with: vrmoe train train.resume={run_dir}"
    _drop_empty_run_dir(run_dir, cfg)
    return "interrupted before the first checkpoint; nothing to resume"


def _drop_empty_run_dir(run_dir: Path, cfg: DictConfig) -> None:
    """A run refused at validation leaves no directory behind (only a fresh one, never a resumed one)."""
    if OmegaConf.select(cfg, "train.resume"):
        return
    if run_dir.is_dir() and {p.name for p in run_dir.iterdir()} <= {".hydra"}:
        shutil.rmtree(run_dir, ignore_errors=True)


def train_main(argv: list[str]) -> None:
    import hydra

    try:
        check_overrides(split_hydra_args(argv))
    except ConfigError as exc:
        fail(str(exc))
    prepare_hydra()
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

        try:
            func = getattr(importlib.import_module(module_name), func_name)
        except ImportError as exc:  # a missing optional dependency, or a command not installed
            fail(f"vrmoe {command} is unavailable here ({exc})")
        try:
            func(rest)
        except ConfigError as exc:
            fail(str(exc))
        except KeyboardInterrupt:
            fail(f"vrmoe {command} interrupted", code=130)
        return
    fail(f"unknown command {command!r}; choose one of train, {', '.join(SUBCOMMANDS)} (vrmoe --help)")


__all__ = ["main", "SUBCOMMANDS"]
