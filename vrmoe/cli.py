"""The ``vrmoe`` command: parses the command line and dispatches, nothing else.

``train`` is a Hydra app (its task function is :func:`vrmoe.jobs.train_job`); the other
subcommands are plain CLIs. Every user-facing error ends in one line on stderr and exit
code 2: bad values are :class:`~vrmoe.config.ConfigError`, and a ``vrmoe train`` command
line is checked (``vrmoe.compose.check_overrides``) before Hydra creates a run dir.
"""

from __future__ import annotations

import importlib
import sys

from .config import ConfigError
from .console import fail, run_command

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

# Subcommands besides `train`: name -> ("module:function", one-line help). Each function takes argv.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("vrmoe.eval.run:main", "uncertainty metrics of a run: vrmoe eval run=<dir> [S=8]"),
    "compare": ("vrmoe.report.compare:main", "runs side by side: vrmoe compare <run or sweep dirs...>"),
    "dashboard": ("vrmoe.report.dashboard:main", "offline HTML report: vrmoe dashboard <dirs...> -o report.html"),
    "bench": ("vrmoe.bench:main", "performance ratios on this device: vrmoe bench"),
    "routers": ("vrmoe.model.routers.listing:main", "the registered routers, their keys and signals"),
}


def train_main(argv: list[str]) -> None:
    import hydra

    from . import distributed
    from .compose import check_overrides, prepare_hydra, split_hydra_args
    from .jobs import train_job

    try:
        check_overrides(split_hydra_args(argv))
        here = distributed.start()
    except ConfigError as exc:
        fail(str(exc))
    if any(a.startswith("train.resume=") and a.split("=", 1)[1] not in ("", "null") for a in argv):
        argv = [*argv, "hydra.output_subdir=null"]  # the resumed run keeps its own Hydra record
    if here.enabled:
        if any(a in ("-m", "--multirun") for a in argv):
            fail("vrmoe train -m cannot run under torchrun; launch each multi-process job of a sweep "
                 "with hydra/launcher=slurm (see README, Clusters)")
        if not here.is_main:  # one writer: only rank 0 records Hydra's config
            argv = [*argv, "hydra.output_subdir=null"]
    prepare_hydra()
    app = hydra.main(version_base="1.3", config_path="conf", config_name="config")(train_job)
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
    if command not in SUBCOMMANDS:
        fail(f"unknown command {command!r}; choose one of train, {', '.join(SUBCOMMANDS)} (vrmoe --help)")
    module_name, func_name = SUBCOMMANDS[command][0].split(":")
    try:
        func = getattr(importlib.import_module(module_name), func_name)
    except ImportError as exc:  # a missing optional dependency, or a command not installed
        fail(f"vrmoe {command} is unavailable here ({exc})")
    run_command(f"vrmoe {command}", func, rest)


__all__ = ["main", "SUBCOMMANDS"]
