"""``vrmoe eval run=<dir>``: calibration, OOD detection, routing stability and cost of a run.

Writes ``<run>/eval.json``, reliability diagrams, the Jaccard-vs-gamma plot and
OOD score histograms into the run dir, mirrors the headline numbers to W&B
when the run logged there, and prints them as a table. Every number comes from
the run's checkpoint with the router in evaluation mode: routers that sample
average their S routing distributions before Top-K (``S=8`` on the command
line sets S), so the predictions scored for calibration are the model's own.

Choices worth knowing:

* **Mutual information.** BALD needs S *predictive* distributions, one per
  routing sample, while a router's ``sample_probs_STE`` are routing
  distributions that the model never turns into S predictions (the experts run
  once on the averaged selection). So the model is run S more times with a
  copy whose routers draw a single sample (``router.samples=1``), giving
  ``p_1 .. p_S``; ``MI = H[mean_s p_s] - mean_s H[p_s]``. A deterministic
  router gives S identical passes, hence exactly 0. With S = 1 the score is
  left out (one sample has no disagreement to measure).
* **Per-sequence scores.** ``eval.ood_task=lm``: a sequence is a window of
  text and each score is averaged over its tokens (next-token predictive
  entropy and MI). ``mcq``: a sequence is a multiple-choice item and the
  predictive distribution is over its four options; router scores (gate
  entropy, logit variance, temperature) are averaged over the tokens of its
  four filled-in sentences and over MoE layers. ``auto`` follows the run's task.
* **Routing stability.** The embedding noise and the routers' sampling noise
  come from two separately seeded streams (the generator is re-seeded when the
  first block starts), and the clean and the noisy pass share the routers'
  stream, so a sampling router sees the same sampling noise in both and the
  Jaccard measures the input noise alone; gamma = 0 gives exactly 1.
  ``stability.jaccard_unmatched`` repeats each noisy pass with fresh sampling
  noise, which adds the router's own variability (the number a user of a
  sampling router experiences).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any, Callable

import torch

from . import metrics
from .config import AppConfig, ConfigError, DataConfig, from_dict, to_dict
from .console import console, log_line
from .data import bytes_to_text, derived_seed, eval_batches, load_corpus, text_to_bytes
from .flops import cost_summary
from .mcq import (MCQTensors, item_len, items_from_text, make_batch, option_scores,
                  shuffle_words_within_sentences)
from .model import MoETransformer
from .model.routers import Routing
from .model.transformer import moe_layer_indices
from .tracking import EVAL_FILE, write_json

JACCARD_PNG = "jaccard_vs_gamma.png"
# The name of a router's own uncertainty signal (Routing.uncertainty_T) as an OOD score.
UNCERTAINTY_SCORE = {"variational": "logit_variance", "vtsr": "temperature"}
BUILTIN_OOD = ("near", "far")

USAGE = """\
usage: vrmoe eval run=<run dir> [key=value ...]

Calibration (next token and 4-way multiple choice), OOD detection (near: the validation
prose with words shuffled in each sentence; far: Python source; plus eval.ood_text files),
routing stability under embedding noise and FLOPs of a trained run. Writes <run>/eval.json
and PNG plots there.

keys:
  S=8                    routing samples at evaluation (averaged before Top-K; MI uses S passes)
  T=0.7                  sampling temperature (router=temperature)
  router.eval_mode=topk  sample | topk
  seed=0                 evaluation randomness
  model=tiny             must match the checkpoint's model shape
  logger=none            skip the W&B mirror
  train.device=cpu
  eval.<key>=value       windows, mcq_items, batch_size, ood_task (auto|lm|mcq),
                         ood_text=[a.txt,b.txt], gammas=[0.001,0.01], stability_windows,
                         stability_unmatched
"""

_GROUP_KEYS = ("model", "logger")
_SETTABLE = ("seed", "router.eval_mode", "router.samples", "router.temperature", "model.dispatch",
             "train.device", "logger.mode")


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    if not argv or any(a in ("-h", "--help", "help") for a in argv):
        print(USAGE, end="")
        return
    from .train import load_checkpoint

    run, overrides = parse_args(argv)
    state = load_checkpoint(run, "run")
    app = apply_overrides(state["config"], overrides)
    evaluate_run(Path(run), app, state=state)


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


def apply_overrides(saved: dict[str, Any], overrides: list[str]) -> AppConfig:
    """The run's own config with the evaluation overrides applied and validated."""
    from omegaconf import OmegaConf

    from .cli import config_dir, group_options

    cfg = OmegaConf.create(saved)
    for item in overrides:
        key, value = item.split("=", 1)
        if key in _GROUP_KEYS:
            options = group_options(key)
            if value not in options:
                raise ConfigError(f"{key}={value!r} is unknown; choose one of {', '.join(options)}")
            cfg[key] = OmegaConf.load(config_dir() / key / f"{value}.yaml")
            continue
        try:
            parsed = OmegaConf.from_dotlist([item])
        except Exception as exc:  # omegaconf/yaml parse errors
            raise ConfigError(f"{item}: cannot parse the value ({str(exc).splitlines()[0]})") from None
        # The top-level knobs are interpolated into the router group at training time;
        # the checkpoint holds the resolved values, so both are set here.
        if key == "S":
            OmegaConf.update(cfg, "router.samples", parsed.S)
        elif key == "T":
            OmegaConf.update(cfg, "router.temperature", parsed.T)
        elif not (key in _SETTABLE or key.startswith("eval.")):
            raise ConfigError(f"{key}={value}: not an evaluation setting; vrmoe eval takes run=<dir>, S, T, seed, "
                              "router.eval_mode, model=..., logger=..., train.device and eval.<key> (vrmoe eval --help)")
        cfg = OmegaConf.merge(cfg, parsed)
    return from_dict(OmegaConf.to_container(cfg))


def check_eval_inputs(app: AppConfig) -> None:
    """Refuse missing or empty OOD files before any work (and before training, with eval.at_end)."""
    for path_str in app.eval.ood_text:
        path = Path(path_str).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.ood_text: {path_str} is not a file; give text files, "
                              "e.g. eval.ood_text=[notes.txt]")
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"eval.ood_text: cannot read {path_str}: {exc.strerror}") from None
        if not text.strip():
            raise ConfigError(f"eval.ood_text: {path_str} is empty; give a file with text in it")


# ---------------------------------------------------------------------------
# Model loading
# ---------------------------------------------------------------------------

def load_model(state: dict[str, Any], app: AppConfig, run: str | Path, device: torch.device) -> MoETransformer:
    """The checkpoint's weights in a model built from ``app`` (strict: every parameter must fit)."""
    from .train import shape_mismatch

    diff = shape_mismatch(state["config"]["model"], app.model)
    if diff:
        raise ConfigError(f"run={run}: the checkpoint holds another model shape ({'; '.join(diff)}); "
                          "evaluate it with its own model=...")
    model = MoETransformer(app.model, app.router)
    try:
        result = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise ConfigError(f"run={run}: checkpoint.pt does not fit its config ({first}); re-run the training") from None
    if result.missing_keys or result.unexpected_keys:
        name = (result.missing_keys or result.unexpected_keys)[0]
        raise ConfigError(f"run={run}: checkpoint.pt does not fit router={app.router.name} "
                          f"(parameter {name} {'missing' if result.missing_keys else 'unexpected'}); "
                          "evaluate the run with the router it was trained with")
    return model.to(device).eval()


def single_sample_copy(model: MoETransformer, app: AppConfig) -> MoETransformer:
    """The same weights with routers that draw one routing sample per pass (for MI)."""
    copy = MoETransformer(app.model, replace(app.router, samples=1))
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).device).eval()


# ---------------------------------------------------------------------------
# Scoring sequences
# ---------------------------------------------------------------------------

@dataclass
class ScoredSet:
    """Predictive distributions for calibration and per-sequence OOD scores of one text set."""

    probs_NC: torch.Tensor
    labels_N: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n_sequences,)
    tokens: int = 0
    seconds: float = 0.0


def router_token_scores(routings: list[Routing], uncertainty_name: str) -> dict[str, torch.Tensor]:
    """Per-token router scores averaged over MoE layers: gate entropy, and the router's own
    uncertainty over the layers that report one (none for a dense model)."""
    if not routings:
        return {}
    out = {"gate_entropy": torch.stack([metrics.entropy(r.probs_TE) for r in routings]).mean(0)}
    own = [r.uncertainty_T.double() for r in routings if r.uncertainty_T is not None]
    if own:
        out[uncertainty_name] = torch.stack(own).mean(0)
    return out


def _timed(model: MoETransformer, x: torch.Tensor):
    if x.is_cuda:
        torch.cuda.synchronize()
    start = time.perf_counter()
    out = model(x)
    if x.is_cuda:
        torch.cuda.synchronize()
    return out, time.perf_counter() - start


def _append(store: dict[str, list[torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        store.setdefault(name, []).append(value.detach().double().cpu())


@torch.no_grad()
def score_windows(model: MoETransformer, sampler: MoETransformer | None, windows: list[tuple[torch.Tensor, torch.Tensor]],
                  samples: int, uncertainty_name: str) -> ScoredSet:
    """Next-token predictions on text windows; a sequence is a window (scores are token means)."""
    probs, labels, scores = [], [], {}
    tokens, seconds = 0, 0.0
    for x, y in windows:
        out, dt = _timed(model, x)
        seconds += dt
        tokens += x.numel()
        p_BLV = out.logits_BLV.float().softmax(-1)
        probs.append(p_BLV.reshape(-1, p_BLV.shape[-1]).cpu())
        labels.append(y.reshape(-1).cpu())
        per_token = {"predictive_entropy": metrics.entropy(p_BLV)}
        per_token.update({k: v.reshape(x.shape) for k, v in router_token_scores(out.routings, uncertainty_name).items()})
        if sampler is not None:
            p_SBLV = torch.stack([sampler(x).logits_BLV.float().softmax(-1) for _ in range(samples)])
            per_token["mutual_information"] = metrics.mutual_information(p_SBLV)
        _append(scores, {k: v.mean(-1) for k, v in per_token.items()})
    return ScoredSet(torch.cat(probs), torch.cat(labels), {k: torch.cat(v) for k, v in scores.items()},
                     tokens, seconds)


@torch.no_grad()
def score_items(model: MoETransformer, sampler: MoETransformer | None, items: MCQTensors, batch_size: int,
                samples: int, uncertainty_name: str, device: torch.device) -> ScoredSet:
    """4-way multiple-choice predictions; a sequence is an item (router scores are averaged over
    the real tokens of its four filled-in sentences)."""
    probs, labels, scores = [], [], {}
    tokens, seconds = 0, 0.0
    for index in torch.arange(len(items)).split(batch_size):
        batch = make_batch(items, index, device)
        out, dt = _timed(model, batch.inputs_NL)
        seconds += dt
        mask = batch.token_mask_NL.reshape(batch.n_items, -1).double()
        tokens += int(mask.sum())
        p_BO = option_scores(out.logits_BLV, batch).softmax(-1)
        probs.append(p_BO.cpu())
        labels.append(batch.answers_B.cpu())
        per_item = {"predictive_entropy": metrics.entropy(p_BO)}
        for name, value_T in router_token_scores(out.routings, uncertainty_name).items():
            per_item[name] = (value_T.reshape(batch.n_items, -1) * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        if sampler is not None:
            p_SBO = torch.stack([option_scores(sampler(batch.inputs_NL).logits_BLV, batch).softmax(-1)
                                 for _ in range(samples)])
            per_item["mutual_information"] = metrics.mutual_information(p_SBO)
        _append(scores, per_item)
    return ScoredSet(torch.cat(probs), torch.cat(labels), {k: torch.cat(v) for k, v in scores.items()},
                     tokens, seconds)


# ---------------------------------------------------------------------------
# Routing stability
# ---------------------------------------------------------------------------

def _routings_with_noise(model: MoETransformer, x: torch.Tensor, sigma: float, noise_seed: int,
                         router_seed: int) -> list[Routing]:
    """One forward pass with two separate random streams: the embedding noise comes from
    ``noise_seed``, and the generator is re-seeded with ``router_seed`` when the first block
    starts, so the routers' sampling noise does not depend on whether (or how much) embedding
    noise was drawn."""
    def reseed(module, args) -> None:  # a pre-hook that returns something would replace the block's input
        torch.manual_seed(router_seed)

    handle = model.blocks[0].register_forward_pre_hook(reseed)
    try:
        torch.manual_seed(noise_seed)
        return model(x, embed_noise_std=sigma).routings
    finally:
        handle.remove()


@torch.no_grad()
def routing_stability(model: MoETransformer, windows: list[torch.Tensor], gammas: list[float], seed: int,
                      unmatched: bool) -> dict[str, Any]:
    """Jaccard of the Top-K sets with and without embedding noise, per MoE layer and gamma.

    The clean and noisy passes share the routers' sampling noise, so the Jaccard measures the
    input noise alone (gamma = 0 gives exactly 1); with ``unmatched`` the noisy pass is repeated
    with fresh sampling noise (same input noise), which adds the router's own variability."""
    embed_norm = torch.cat([model.embed(x).norm(dim=-1).reshape(-1) for x in windows]).mean()
    layer_names = [f"layer{b}" for b in moe_layer_indices(model.cfg)]
    n_experts = model.cfg.n_experts
    sums = {"matched": torch.zeros(len(gammas), len(layer_names), dtype=torch.float64),
            "unmatched": torch.zeros(len(gammas), len(layer_names), dtype=torch.float64)}
    n_tokens = 0
    for b, x in enumerate(windows):
        noise_seed, router_seed = derived_seed(seed, b), derived_seed(seed, b) + 500_000
        clean = _routings_with_noise(model, x, 0.0, noise_seed, router_seed)
        n_tokens += x.numel()
        for g, gamma in enumerate(gammas):
            sigma = float(gamma * embed_norm)
            runs = {"matched": router_seed}
            if unmatched:
                runs["unmatched"] = router_seed + 7_919 * (g + 1)  # another draw of the sampling noise
            for kind, pass_router_seed in runs.items():
                noisy = _routings_with_noise(model, x, sigma, noise_seed, pass_router_seed)
                for layer, (r_clean, r_noisy) in enumerate(zip(clean, noisy)):
                    sums[kind][g, layer] += metrics.topk_sets_jaccard(
                        r_clean.expert_ids_TK, r_noisy.expert_ids_TK, n_experts).sum().cpu()

    def table(total: torch.Tensor) -> dict[str, list[float]]:
        mean_GL = total / max(n_tokens, 1)
        out = {name: mean_GL[:, layer].tolist() for layer, name in enumerate(layer_names)}
        # A dense model has no routing to be stable or not: NaN (null in eval.json), not a perfect 1.
        out["mean"] = mean_GL.mean(1).tolist() if layer_names else [math.nan] * len(gammas)
        return out

    result = {"gammas": list(gammas), "embedding_norm": float(embed_norm), "jaccard": table(sums["matched"])}
    if unmatched:
        result["jaccard_unmatched"] = table(sums["unmatched"])
    return result


# ---------------------------------------------------------------------------
# Text sets
# ---------------------------------------------------------------------------

def ood_texts(app: AppConfig, val_text: str) -> dict[str, tuple[str, str]]:
    """name -> (config key for errors, text): near, far and the user's files."""
    far_name = "python_source" if app.data.name != "python_source" else "stdlib_docs"
    far = load_corpus(DataConfig(name=far_name, val_fraction=app.data.val_fraction, cache_dir=app.data.cache_dir))
    sets = {"near": ("near (word-shuffled validation text)", shuffle_words_within_sentences(val_text)),
            "far": (f"far ({far_name})", bytes_to_text(far.val))}
    for path_str in app.eval.ood_text:
        name = base = Path(path_str).stem or "ood"
        n = 2
        while name in sets or name in ("in", "scores"):
            name, n = f"{base}_{n}", n + 1
        sets[name] = (f"eval.ood_text: {path_str}",
                      Path(path_str).expanduser().read_text(encoding="utf-8", errors="replace"))
    return sets


def _windows(data: torch.Tensor, app: AppConfig, n_windows: int, key: str,
             device: torch.device) -> list[tuple[torch.Tensor, torch.Tensor]]:
    seq_len = app.model.seq_len
    if len(data) < seq_len + 1:
        raise ConfigError(f"{key} has {len(data)} bytes, fewer than one window of model.seq_len + 1 = "
                          f"{seq_len + 1}; give more text")
    x, y = next(eval_batches(data, n_windows, seq_len, 1, device))
    return list(zip(x.split(app.eval.batch_size), y.split(app.eval.batch_size)))


# ---------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------

def ood_unit(app: AppConfig) -> str:
    return app.task.name if app.eval.ood_task == "auto" else app.eval.ood_task


def evaluate_run(run_dir: Path, app: AppConfig, state: dict[str, Any] | None = None) -> dict[str, Any]:
    """Evaluate ``run_dir``'s checkpoint under ``app``; write eval.json and plots there; return the results."""
    from .train import load_checkpoint, resolve_device

    run_dir = Path(run_dir)
    check_eval_inputs(app)
    state = state if state is not None else load_checkpoint(run_dir, "run")
    device = resolve_device(app.train.device)
    model = load_model(state, app, run_dir, device)
    samples = app.router.samples
    sampler = single_sample_copy(model, app) if samples > 1 else None
    uncertainty_name = UNCERTAINTY_SCORE.get(app.router.name, "router_uncertainty")
    unit = ood_unit(app)
    t_start = time.perf_counter()

    # Everything that can refuse the input is built before anything is written.
    corpus = load_corpus(app.data, min_tokens=app.model.seq_len + 2)
    val_text = bytes_to_text(corpus.val)
    max_len = item_len(app)
    lm_sets = {"in": _windows(corpus.val, app, app.eval.windows, "the validation split", device)}
    mcq_sets = {"in": items_from_text(val_text, app.eval.mcq_items, max_len, "the validation split")}
    for name, (key, text) in ood_texts(app, val_text).items():
        if unit == "lm":
            lm_sets[name] = _windows(text_to_bytes(text), app, app.eval.windows, key, device)
        else:
            mcq_sets[name] = items_from_text(text, app.eval.mcq_items, max_len, key)

    def scored(name: str, kind: str) -> ScoredSet:
        torch.manual_seed(app.seed)  # each set's sampling noise is independent of the order of sets
        with_mi = sampler if kind == unit else None
        if kind == "lm":
            return score_windows(model, with_mi, lm_sets[name], samples, uncertainty_name)
        return score_items(model, with_mi, mcq_sets[name], app.eval.batch_size, samples, uncertainty_name, device)

    next_token = scored("in", "lm")
    mcq = scored("in", "mcq")
    results_by_set = {"in": next_token if unit == "lm" else mcq}
    for name in (lm_sets if unit == "lm" else mcq_sets):
        if name != "in":
            results_by_set[name] = scored(name, unit)

    ood: dict[str, Any] = {}
    in_scores = results_by_set["in"].scores
    for name, result in results_by_set.items():
        if name == "in":
            continue
        labels = torch.cat([torch.zeros(len(next(iter(in_scores.values())))),
                            torch.ones(len(next(iter(result.scores.values()))))])
        ood[name] = {"auroc": {}, "auprc": {}}
        for score in in_scores:
            values = torch.cat([in_scores[score], result.scores[score]])
            ood[name]["auroc"][score] = metrics.auroc(values, labels)
            ood[name]["auprc"][score] = metrics.auprc(values, labels)
    ood["scores"] = {name: {k: v.tolist() for k, v in r.scores.items()} for name, r in results_by_set.items()}

    stability_windows = [x for x, _ in _windows(corpus.val, app, app.eval.stability_windows,
                                                "the validation split", device)]
    stability = routing_stability(model, stability_windows, list(app.eval.gammas), app.seed,
                                  app.eval.stability_unmatched)

    cost = cost_summary(model, samples)
    cost["tokens_per_s"] = next_token.tokens / max(next_token.seconds, 1e-9)

    result: dict[str, Any] = {
        "run": str(run_dir), "router": app.router.name, "S": samples, "K": app.router.k,
        "eval_mode": app.router.eval_mode, "task": app.task.name, "ood_task": unit,
        "step": int(state.get("step", 0)), "seed": app.seed,
        "calibration": {"next_token": metrics.calibration_report(next_token.probs_NC, next_token.labels_N),
                        "mcq": metrics.calibration_report(mcq.probs_NC, mcq.labels_N)},
        "ood": ood, "stability": stability, "cost": cost,
        "wall_time_s": time.perf_counter() - t_start,
    }
    write_json(run_dir / EVAL_FILE, result)
    images = write_plots(run_dir, result)
    mirror_to_wandb(run_dir, app, result, images)
    print_table(result)
    return result


# ---------------------------------------------------------------------------
# Outputs
# ---------------------------------------------------------------------------

def write_plots(run_dir: Path, result: dict[str, Any]) -> dict[str, Path]:
    """Reliability diagrams, Jaccard vs gamma and OOD score histograms; a plot that fails is
    reported and skipped (eval.json is already written)."""
    from . import plots

    images: dict[str, Path] = {}
    jobs: list[tuple[str, Callable[[], Path]]] = []
    for name, report in result["calibration"].items():
        bins = report["reliability"]
        title = {"next_token": "Next-token prediction", "mcq": "4-way multiple choice"}[name]
        jobs.append((f"reliability_{name}", lambda b=bins, n=name, t=title: plots.reliability_diagram(
            b["bin_confidence"], b["bin_accuracy"], b["bin_count"], run_dir / f"reliability_{n}.png", t)))
    stab = result["stability"]
    positive = [i for i, g in enumerate(stab["gammas"]) if g > 0]  # the plot's gamma axis is logarithmic
    if positive:
        curves = {k: [v[i] for i in positive] for k, v in stab["jaccard"].items()}
        jobs.append(("jaccard_vs_gamma", lambda: plots.jaccard_plot(
            [stab["gammas"][i] for i in positive], curves, run_dir / JACCARD_PNG)))
    scores = result["ood"]["scores"]
    for score in scores["in"]:
        per_set = {name: values[score] for name, values in scores.items()}
        jobs.append((f"ood_{score}", lambda s=score, p=per_set: plots.score_histograms(
            p, run_dir / f"ood_{s}.png", f"OOD score: {s}")))
    for name, draw in jobs:
        try:
            images[name] = draw()
        except Exception as exc:  # a plotting problem must not lose the numbers
            log_line(f"[yellow]warning:[/] plot {name} not drawn ({type(exc).__name__}: {exc})")
    return images


def headline(result: dict[str, Any]) -> dict[str, Any]:
    """The numbers worth a glance (no per-sequence lists or bins)."""
    out: dict[str, Any] = {"S": result["S"]}
    for name, report in result["calibration"].items():
        out[f"calibration/{name}"] = {k: v for k, v in report.items() if k != "reliability"}
    for name, block in result["ood"].items():
        if name != "scores":
            out[f"ood/{name}"] = block
    stab = result["stability"]
    out["stability/jaccard_mean"] = dict(zip((f"gamma={g:g}" for g in stab["gammas"]), stab["jaccard"]["mean"]))
    out["cost"] = result["cost"]
    return out


def mirror_to_wandb(run_dir: Path, app: AppConfig, result: dict[str, Any], images: dict[str, Path]) -> None:
    if app.logger.name != "wandb" or app.logger.mode == "disabled":
        return
    from .tracking import make_logger

    logger = make_logger(app.logger.name, run_dir, to_dict(app), app.logger.project, app.logger.mode,
                         app.logger.entity, app.logger.group, f"eval {run_dir.name}", [*app.logger.tags, "eval"])
    try:
        logger.summary({"eval": headline(result)})
        if images:
            logger.log_images({f"eval/{k}": v for k, v in images.items()}, step=result["step"])
    finally:
        logger.finish()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "-"
    return f"{value:.{digits}f}"


def print_table(result: dict[str, Any]) -> None:
    """Calibration, OOD AUROC and stability as three small tables, then the cost line."""
    from rich.table import Table

    log_line(f"[bold]{result['router']}[/] router, S={result['S']}, step {result['step']}: {result['run']}")
    calibration = Table(title="calibration", title_justify="left")
    columns = ("accuracy", "nll", "brier", "ece_10", "ece_15", "mce")
    for column in ("task", *columns):
        calibration.add_column(column, justify="left" if column == "task" else "right")
    for name, report in result["calibration"].items():
        calibration.add_row(name, *(_fmt(report[k]) for k in columns))
    console.print(calibration)

    sets = [name for name in result["ood"] if name != "scores"]
    if sets:
        score_names = list(result["ood"][sets[0]]["auroc"])
        detection = Table(title=f"OOD AUROC (per {'window' if result['ood_task'] == 'lm' else 'item'})",
                          title_justify="left")
        for column in ("set", *score_names):
            detection.add_column(column, justify="left" if column == "set" else "right")
        for name in sets:
            detection.add_row(name, *(_fmt(result["ood"][name]["auroc"][s]) for s in score_names))
        console.print(detection)

    stab = result["stability"]
    stability = Table(title="Top-K Jaccard", title_justify="left")
    stability.add_column("gamma", justify="right")
    for layer in stab["jaccard"]:
        stability.add_column(layer, justify="right")
    for g, gamma in enumerate(stab["gammas"]):
        stability.add_row(f"{gamma:g}", *(_fmt(values[g]) for values in stab["jaccard"].values()))
    console.print(stability)

    cost = result["cost"]
    log_line(f"FLOPs/token {cost['flops_per_token']['total']:,.0f} (router {100 * cost['router_share']:.2f}%, "
             f"{100 * cost['router_overhead_vs_topk']:+.2f}% over Top-K), eval {cost['tokens_per_s']:,.0f} tokens/s")


__all__ = ["main", "evaluate_run", "check_eval_inputs", "apply_overrides", "routing_stability", "score_windows",
           "score_items", "load_model", "EVAL_FILE", "UNCERTAINTY_SCORE"]
