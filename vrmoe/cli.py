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

from omegaconf import DictConfig, OmegaConf

from .config import ConfigError
from .console import fail, log_line

CONFIG_GROUPS = ("model", "router", "data", "train", "logger", "eval", "experiment")

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
    from .tracking import SUMMARY_FILE, write_json
    from .train import train

    hc = HydraConfig.get()
    run_dir = Path(hc.runtime.output_dir)
    overrides = list(hc.overrides.task)
    multirun = hc.mode == RunMode.MULTIRUN
    group = Path(hc.sweep.dir).name if multirun else None
    try:
        app = load_config(cfg)
        train(app, run_dir, overrides, group=group)
    except ConfigError as exc:
        if multirun:  # record it and let the rest of the sweep run
            write_json(run_dir / SUMMARY_FILE, {"status": "failed", "error": str(exc), "overrides": overrides})
            log_line(f"[red]job {hc.job.num} failed:[/] {exc}")
            return
        _drop_empty_run_dir(run_dir, cfg)
        fail(str(exc))
    except KeyboardInterrupt:
        fail(f"interrupted; resume with: vrmoe train train.resume={run_dir}", code=130)
    except Exception as exc:
        if not multirun:
            raise
        log_line(f"[red]job {hc.job.num} failed:[/] {type(exc).__name__}: {exc}")


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
