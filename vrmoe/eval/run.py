"""``vrmoe eval run=<dir>``: every probe on a run's checkpoint, written to ``<run>/eval.json``.

The probes (calibration, OOD detection, routing stability, cost; ``vrmoe.eval.probes``)
share one :class:`~vrmoe.eval.context.EvalContext`; each returns its block of
``eval.json`` (schema in ``vrmoe.eval.schema``), its headline numbers and its
figures. Every number comes from the run's checkpoint with the router in evaluation
mode: routers that sample average their S routing distributions before Top-K
(``S=8`` sets S), so the predictions scored are the model's own. The numbers are
written before any figure is drawn, and a figure that fails is reported and skipped.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

from .. import distributed
from ..checkpoint import load_checkpoint
from ..compose import compose_over_saved
from ..config import AppConfig, ConfigError, to_dict
from ..console import log_line
from ..device import resolve_device
from ..knobs import ignored_knobs, ignored_message
from ..tracking import EVAL_FILE, make_logger, read_summary, unwritable_reason, write_json
from .context import EvalContext
from .probes import ordered_probes

USAGE = """\
usage: vrmoe eval run=<run dir> [key=value ...]

Calibration (next token, and 4-way multiple choice on the test split: the routing-mean pass,
the mean of S single-sample passes (BMA) and temperature scaling fit on the calibration split),
OOD detection (near: the validation prose with words shuffled in each sentence; far: Python
source; plus eval.ood_text files and eval.ood_mcq datasets), routing stability under embedding
noise, the routing posterior's diagnostics and FLOPs of a trained run. Writes <run>/eval.json
and PNG plots there. Every key defaults to the run's own value.

keys (default: the run's):
  S=<n>                  routing samples at evaluation (averaged before Top-K; MI and the BMA
                         use S passes); the run's, by default 8 for a router that averages them
  T=<t>                  routing temperature (router=temperature, variational, mc_dropout, swag)
  router.eval_mode=...   sample | topk (router=temperature, vtsr)
  seed=<n>               evaluation randomness
  model=<preset>         must match the checkpoint's model shape
  logger=none            skip the W&B mirror
  train.device=<cpu|cuda>
  eval.<key>=value       windows (64), mcq_items (items per set; null: all), calibration_items
                         (temperature scaling's fit; null: all), predictive (both:
                         routing_mean|bma|both), batch_size (16), ood_task (auto|lm|mcq),
                         ood_text=[a.txt,b.txt], ood_mcq=[arc_easy,medmcqa:test] (data=mcq; a
                         split after the colon), gammas (the paper's six), stability_windows (16),
                         stability_unmatched (true)
e.g. vrmoe eval run=outputs/<date>/<time>_variational S=32
"""

# What `vrmoe eval` may change in a run's saved config (keys, and prefixes ending in ".").
EVAL_SETTINGS = ("S", "T", "seed", "router.eval_mode", "router.samples", "router.temperature", "model",
                 "model.dispatch", "logger", "logger.mode", "train.device", "eval.")


def main(argv: list[str]) -> None:
    if any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE, end="")
        return
    if not argv:  # a run to evaluate is needed: the usage, on stderr, as for any bad command line
        print(USAGE, end="", file=sys.stderr)
        sys.exit(2)
    run, overrides = parse_args(argv)
    distributed.start()  # under torchrun the ranks share the sets; rank 0 writes
    state = load_checkpoint(run, "run")
    app = compose_over_saved(state["config"], overrides, allowed=EVAL_SETTINGS, what="an evaluation setting")
    if ignored := ignored_knobs(app.router, overrides):
        log_line(f"[yellow]note:[/] {ignored_message(app.router, ignored, mention_strict=False)}")
    evaluate_run(Path(run), app, state=state)
    distributed.finish()


def parse_args(argv: list[str]) -> tuple[str, list[str]]:
    run, overrides = None, []
    for item in argv:
        if "=" not in item:
            raise ConfigError(f"{item!r}: arguments are key=value; e.g. vrmoe eval run=outputs/<date>/<time>_topk S=8")
        key, value = item.split("=", 1)
        if key == "run":
            run = value
        else:
            overrides.append(item)
    if not run:
        raise ConfigError("run=<dir> is required: the run dir to evaluate, e.g. vrmoe eval run=outputs/<date>/<time>_topk")
    return run, overrides


def evaluate_run(run_dir: Path, app: AppConfig, state: dict[str, Any] | None = None,
                 output: str = EVAL_FILE) -> dict[str, Any]:
    """Evaluate ``run_dir``'s checkpoint under ``app``; write the results to ``<run_dir>/<output>``
    (eval.json; another name keeps several evaluations of one run, e.g. a sweep over S) and the plots
    into the run dir; return the results."""
    run_dir = Path(run_dir)
    if (read_summary(run_dir) or {}).get("status") == "diverged":
        raise ConfigError(f"run={run_dir} diverged ({read_summary(run_dir).get('error', 'non-finite steps')}); "
                          "a diverged run is not scored: train it again with a lower train.lr")
    state = state if state is not None else load_checkpoint(run_dir, "run")
    if distributed.env().is_main and (reason := unwritable_reason(run_dir)):  # before any work
        raise ConfigError(f"run={run_dir}: eval.json cannot be written there ({reason}); copy the run dir "
                          "somewhere writable and evaluate the copy")
    t_start = time.perf_counter()
    ctx = EvalContext.build(run_dir, app, state, resolve_device(app.train.device))
    probes = ordered_probes()
    result: dict[str, Any] = {
        "run": str(run_dir), "router": app.router.name, "router_config": to_dict(app)["router"],
        "S": app.router.samples, "K": app.router.k, "task": app.task.name, "ood_task": ctx.unit,
        "step": int(state.get("step", 0)), "seed": app.seed,
    }
    for probe in probes:
        result[probe.name] = probe.measure(ctx)
    result["wall_time_s"] = time.perf_counter() - t_start
    if not distributed.env().is_main:  # every rank has the numbers; rank 0 writes and shows them
        return result
    write_json(run_dir / output, result)
    images = draw_figures(probes, result, run_dir)
    headline = {"S": result["S"]}
    for probe in probes:
        headline.update(probe.headline(result[probe.name]))
    mirror_to_wandb(run_dir, app, headline, images, result["step"])
    log_line(f"[bold]{result['router']}[/] router, S={result['S']}, step {result['step']}: {result['run']}")
    for probe in probes:
        probe.show(result[probe.name], result)
    return result


def draw_figures(probes, result: dict[str, Any], run_dir: Path) -> dict[str, Path]:
    """Every probe's figures; one that fails is reported and skipped (eval.json is already written)."""
    images: dict[str, Path] = {}
    for probe in probes:
        for name, draw in probe.figures(result[probe.name], run_dir).items():
            try:
                images[name] = draw()
            except Exception as exc:  # a plotting problem must not lose the numbers
                log_line(f"[yellow]warning:[/] plot {name} not drawn ({type(exc).__name__}: {exc})")
    return images


def mirror_to_wandb(run_dir: Path, app: AppConfig, headline: dict[str, Any], images: dict[str, Path],
                    step: int) -> None:
    if app.logger.name != "wandb" or app.logger.mode == "disabled":
        return
    logger = make_logger(app.logger.name, run_dir, to_dict(app), app.logger.project, app.logger.mode,
                         app.logger.entity, app.logger.group, f"eval {run_dir.name}", [*app.logger.tags, "eval"], app.logger.init_timeout)
    try:
        logger.summary({"eval": headline})
        if images:
            logger.log_images({f"eval/{k}": v for k, v in images.items()}, step=step)
    finally:
        logger.finish()
