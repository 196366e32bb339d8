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
  --version             print vrmoe's version
  train [overrides]     train a run (Hydra app: `vrmoe train --help`, `--cfg job`, `-m` for sweeps)
                        e.g. vrmoe train router=variational T=0.7 eval.at_end=true
                             vrmoe train -m router=topk,variational seed=0,1
{extra}
Top-level knobs: K (experts per token), S (routing samples at evaluation), T (routing
temperature), beta (KL weight), seed; a knob the chosen router does not read is said in one
line. Outputs go to outputs/<date>/<time>_<router>/.
"""

# Subcommands besides `train`: name -> ("module:function", one-line help). Each function takes argv.
SUBCOMMANDS: dict[str, tuple[str, str]] = {
    "eval": ("vrmoe.eval.run:main", "uncertainty metrics of a run: vrmoe eval run=<dir> [S=8]"),
    "compare": ("vrmoe.report.compare:main", "runs side by side: vrmoe compare <run or sweep dirs...>"),
    "dashboard": ("vrmoe.report.dashboard:main", "offline HTML report: vrmoe dashboard <dirs...> -o report.html"),
    "bench": ("vrmoe.bench:main", "performance ratios on this device: vrmoe bench"),
    "cost": ("vrmoe.cost:main", "routers' FLOPs over Top-K's at real models' shapes: vrmoe cost <config dirs>"),
    "routers": ("vrmoe.model.routers.listing:main", "the registered routers, their keys and signals"),
}


def say_duplicate_jobs(overrides: list[str]) -> None:
    """Before a sweep starts: which of its jobs are the same run (they differ only in a knob their
    router does not read), one line each."""
    from .console import log_line
    from .knobs import duplicate_jobs

    for jobs in duplicate_jobs(overrides):
        log_line(f"[yellow]note:[/] these {len(jobs)} jobs of the sweep are the same run (they differ only in knobs "
                 f"their router does not read): {' | '.join(jobs)}")


TRAIN_HELP = """\
usage: vrmoe train [overrides] [--cfg job] [-m] [--hydra-help]

Train a run: an MoE language model with the chosen router. Any key: key=value (the keys of this
configuration are listed below, each with what it sets); choose a group's option with
group=option; sweep with -m key=a,b. A router's own keys: vrmoe train router=<name> --help.
Print the composed config with --cfg job; Hydra's own flags: --hydra-help.

groups (group=option):
{groups}

examples:
  vrmoe train router=variational T=0.7 eval.at_end=true
  vrmoe train router=variational router.covariance=full S=32 eval.at_end=true
  vrmoe train -m router=temperature,variational T=0.5,1.0 seed=0,1

the configuration{chosen}:
{keys}
"""


def train_help(overrides: list[str]) -> str:
    """The reference ``vrmoe train --help`` prints: groups, examples, and every key of the
    configuration the given overrides compose, with its value and description."""
    from .compose import CONFIG_GROUPS, compose_config, group_options
    from .reference import reference

    app = compose_config(overrides)
    groups = "\n".join(f"  {group}: {', '.join(group_options(group))}" for group in CONFIG_GROUPS)
    chosen = f" ({' '.join(overrides)})" if overrides else ""
    return TRAIN_HELP.format(groups=groups, chosen=chosen, keys=reference(app))


def train_main(argv: list[str]) -> None:
    import hydra

    from . import distributed
    from .compose import check_overrides, prepare_hydra, split_hydra_args
    from .jobs import NO_HYDRA_RECORD, train_job

    try:
        overrides = split_hydra_args(argv)
        check_overrides(overrides)
        if any(a in ("-h", "--help") for a in argv):
            print(train_help(overrides), end="")
            return
        here = distributed.start()
    except ConfigError as exc:
        fail(str(exc))
    if any(a in ("-m", "--multirun") for a in argv):
        say_duplicate_jobs(overrides)
    if here.enabled and any(a in ("-m", "--multirun") for a in argv):
        fail("vrmoe train -m cannot run under torchrun; launch each multi-process job of a sweep "
             "with hydra/launcher=slurm_ddp (see docs/distributed.md)")
    if not any(a in ("-sc", "--shell-completion") for a in argv):
        # Hydra writes no record into the run dir: the run writes it once it holds the dir (a fresh
        # run on rank 0 only; a resumed run keeps its own). Placed after the last override (it
        # wins over a given hydra.output_subdir) and before any flag (argparse takes the overrides
        # in one piece).
        at = max((i + 1 for i, a in enumerate(argv) if a in overrides), default=0)
        argv = [*argv[:at], NO_HYDRA_RECORD, *argv[at:]]
    prepare_hydra()
    app = hydra.main(version_base="1.3", config_path="conf", config_name="config")(train_job)
    sys.argv = ["vrmoe train", *argv]
    app()


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else list(argv)
    extra = "".join(f"  {name:<20}  {helptext}\n" for name, (_, helptext) in SUBCOMMANDS.items())
    if argv[:1] in (["-h"], ["--help"], ["help"]):
        print(USAGE.format(extra=extra), end="")
        return
    if argv[:1] in (["-V"], ["--version"]):
        from importlib.metadata import version

        print(f"vrmoe {version('vrmoe')}")
        return
    if not argv:  # a command is needed: the usage, on stderr, as for any other bad command line
        print(USAGE.format(extra=extra), end="", file=sys.stderr)
        sys.exit(2)
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
