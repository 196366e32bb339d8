"""The training loop: optimiser, schedule, validation, checkpoints, resume.

The loop knows nothing about routers: the model's output carries the task loss,
the routers' weighted auxiliary loss and per-layer diagnostics, and the loop
adds, logs and records them. Diagnostics are summed on device and read back
only every ``train.log_every`` steps, so the step itself has no host sync
(beyond the CPU expert loop's counts; see ``model/moe.py``).
"""

from __future__ import annotations

import contextlib
import math
import os
import time
from pathlib import Path
from typing import Any

import torch

from .config import AppConfig, ConfigError, ModelConfig, from_dict, to_dict
from .data import Corpus, eval_batches, load_corpus, train_batch
from .model import MoETransformer
from .model.transformer import moe_layer_indices
from .tracking import CHECKPOINT_FILE, RunRecorder, atomic_write, make_logger
from .console import console, log_line
from .mcq import MCQTask
from .plots import log_utilisation_image, write_run_plots

CHECKPOINT_VERSION = 1
# Model fields that change no parameter shape: a checkpoint loads across them.
_SHAPE_FREE_FIELDS = {"name", "dropout", "dispatch", "seq_len"}


# ---------------------------------------------------------------------------
# Devices, models, checkpoints
# ---------------------------------------------------------------------------

def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def build_model(app: AppConfig) -> MoETransformer:
    torch.manual_seed(app.seed)
    return MoETransformer(app.model, app.router)


def save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    """Atomic: a run killed mid-save keeps its previous checkpoint intact."""
    atomic_write(path, lambda tmp: torch.save(state, tmp))


def load_checkpoint(run_dir: str | Path, key: str) -> dict[str, Any]:
    """Read ``<run_dir>/checkpoint.pt``; ``key`` is the config key that named the run
    (for the error message)."""
    path = Path(run_dir).expanduser()
    if path.is_dir():
        path = path / CHECKPOINT_FILE
    if not path.exists():
        raise ConfigError(f"{key}={run_dir}: no {CHECKPOINT_FILE} there; point it at a run dir that finished "
                          "at least one checkpoint")
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as exc:  # pickle, zip and torch errors all mean the same to a user
        raise ConfigError(f"{key}={run_dir}: {path.name} is corrupt or unreadable "
                          f"({type(exc).__name__}); re-run the training that wrote it") from None
    if not isinstance(state, dict) or "model" not in state or "config" not in state:
        raise ConfigError(f"{key}={run_dir}: {path.name} is not a vrmoe checkpoint")
    return state


def shape_mismatch(saved: dict[str, Any], current: ModelConfig) -> list[str]:
    """Model fields that differ in a way that changes parameter shapes."""
    now = to_dict(AppConfig(model=current))["model"]
    return [f"model.{k}: {saved.get(k)} there, {now[k]} here" for k in now
            if k not in _SHAPE_FREE_FIELDS and saved.get(k) != now[k]]


def load_weights_from_run(model: MoETransformer, run_dir: str, key: str) -> set[str]:
    """Load another run's weights into ``model``; return the names that were loaded.

    Parameters the checkpoint lacks (a new router's heads) keep their fresh
    initialisation; those the model lacks are ignored."""
    state = load_checkpoint(run_dir, key)
    diff = shape_mismatch(state["config"]["model"], model.cfg)
    if diff:
        raise ConfigError(f"{key}={run_dir} holds another model shape ({'; '.join(diff)}); "
                          "use the same model=... as that run")
    own = model.state_dict()
    loadable = {k: v for k, v in state["model"].items() if k in own and own[k].shape == v.shape}
    bad = [k for k, v in state["model"].items() if k in own and own[k].shape != v.shape]
    if bad:
        raise ConfigError(f"{key}={run_dir}: parameter {bad[0]} has shape {tuple(state['model'][bad[0]].shape)} "
                          f"there, {tuple(own[bad[0]].shape)} here")
    model.load_state_dict(loadable, strict=False)
    return set(loadable)


def freeze_loaded(model: MoETransformer, loaded: set[str]) -> None:
    """train.freeze=backbone: everything that came from the base run is frozen,
    the base router's logit layer included (it is the variational prior's mean)."""
    for name, p in model.named_parameters():
        if name in loaded:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("train.freeze=backbone leaves nothing to train: the router adds no new parameters "
                          "(choose router=variational, vtsr, or another router with heads)")


# ---------------------------------------------------------------------------
# Optimiser and schedule
# ---------------------------------------------------------------------------

def make_optimizer(model: torch.nn.Module, lr: float, weight_decay: float) -> torch.optim.AdamW:
    params = [p for p in model.parameters() if p.requires_grad]
    decay = [p for p in params if p.ndim >= 2]
    no_decay = [p for p in params if p.ndim < 2]
    return torch.optim.AdamW([{"params": decay, "weight_decay": weight_decay},
                              {"params": no_decay, "weight_decay": 0.0}], lr=lr, betas=(0.9, 0.95))


def lr_at(step: int, max_steps: int, warmup: int, min_ratio: float) -> float:
    """Multiplier on the base learning rate: linear warmup, then cosine to ``min_ratio``."""
    if step < warmup:
        return (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, max_steps - warmup))
    return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * progress))


# ---------------------------------------------------------------------------
# Evaluation of the loss
# ---------------------------------------------------------------------------

@torch.no_grad()
def validation_loss(model: MoETransformer, corpus: Corpus, app: AppConfig, device: torch.device) -> float:
    was_training = model.training
    model.eval()
    total, count = torch.zeros((), device=device), 0
    for x, y in eval_batches(corpus.val, app.train.batch_size, app.model.seq_len, app.train.eval_batches, device):
        with autocast(device, app.train.precision):
            out = model(x, y)
        total += out.loss.float() * x.numel()
        count += x.numel()
    model.train(was_training)
    return float(total / max(count, 1))


def autocast(device: torch.device, precision: str):
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


# ---------------------------------------------------------------------------
# Tasks: what a batch is, what loss it gives, how it is validated
# ---------------------------------------------------------------------------

class LMTask:
    """Next-token prediction on random windows of the training split (task=lm).

    A task gives the loop ``train_batch(step, device)``, ``forward(model, batch)`` (the
    model's output with ``loss`` set to this task's loss) and ``validate(model, device)``
    (a row of numbers with at least ``val/loss``); ``vrmoe.mcq.MCQTask`` is the other one."""

    def __init__(self, app: AppConfig, corpus: Corpus):
        self.app, self.corpus = app, corpus
        self.tokens_per_step = app.train.batch_size * app.model.seq_len

    def train_batch(self, step: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        return train_batch(self.corpus.train, self.app.train.batch_size, self.app.model.seq_len, self.app.seed,
                           step, device)

    def forward(self, model, batch: tuple[torch.Tensor, torch.Tensor]):
        x, y = batch
        return model(x, y)

    def validate(self, model: MoETransformer, device: torch.device) -> dict[str, float]:
        return {"val/loss": validation_loss(model, self.corpus, self.app, device)}


TASKS = {"lm": LMTask, "mcq": MCQTask}


# ---------------------------------------------------------------------------
# The loop
# ---------------------------------------------------------------------------

class _StatAccumulator:
    """Sums per-layer diagnostics on device between log steps."""

    def __init__(self):
        self.sums: list[dict[str, torch.Tensor]] | None = None
        self.n = 0

    def add(self, layer_stats: list[dict[str, torch.Tensor]]) -> None:
        if self.sums is None:
            self.sums = [{k: v.detach().float().clone() for k, v in s.items()} for s in layer_stats]
        else:
            for acc, s in zip(self.sums, layer_stats):
                for k, v in s.items():
                    acc[k] += v.detach().float()
        self.n += 1

    def pop(self, block_indices: list[int]) -> dict[str, Any]:
        if not self.sums:
            return {}
        out = {f"layer{b}": {k: (v / self.n).cpu().tolist() for k, v in s.items()}
               for b, s in zip(block_indices, self.sums)}
        self.sums, self.n = None, 0
        return out


def run_name_from(overrides: list[str] | None) -> str | None:
    keep = [o for o in (overrides or []) if not o.startswith(("hydra", "logger", "train.resume"))]
    return ",".join(keep) or None


def train(app: AppConfig, run_dir: Path, overrides: list[str] | None = None,
          group: str | None = None, run_name: str | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir``; return its summary (also written to summary.json).

    ``group`` and ``run_name`` name the W&B run (a sweep passes its group and the overrides it
    varies); by default the run is named by all its overrides."""
    run_dir = Path(run_dir)
    device = resolve_device(app.train.device)
    torch.manual_seed(app.seed)

    resume_state = None
    if app.train.resume:
        resume_state = load_checkpoint(app.train.resume, "train.resume")
        saved = from_dict(resume_state["config"])
        diff = shape_mismatch(resume_state["config"]["model"], app.model)
        if diff or saved.router.name != app.router.name:
            raise ConfigError(f"train.resume={app.train.resume}: the run was made with another model or router "
                              f"({'; '.join(diff) or 'router=' + saved.router.name}); resume with its own config")
        if int(resume_state["step"]) >= app.train.max_steps:
            raise ConfigError(f"train.resume={app.train.resume}: the run already reached step {resume_state['step']} "
                              f"of train.max_steps={app.train.max_steps}; raise train.max_steps to train it further")

    corpus = load_corpus(app.data, min_tokens=app.model.seq_len + 2)
    task = TASKS[app.task.name](app, corpus)
    if app.eval.at_end:
        from .evaluate import check_eval_inputs

        check_eval_inputs(app)  # a missing OOD file fails now, not after the training
    model = build_model(app)
    loaded: set[str] = set()  # parameter names that came from another run: frozen under freeze=backbone
    if resume_state is not None:
        model.load_state_dict(resume_state["model"])
        loaded = set(resume_state.get("frozen", []))
    elif app.train.init_from:
        loaded = load_weights_from_run(model, app.train.init_from, "train.init_from")
    if app.train.freeze == "backbone":
        freeze_loaded(model, loaded)
    model.to(device)
    model.train()
    optimizer = make_optimizer(model, app.train.lr, app.train.weight_decay)
    start_step = 0
    if resume_state is not None:
        optimizer.load_state_dict(resume_state["optimizer"])
        start_step = int(resume_state["step"])
        torch.set_rng_state(resume_state["rng"]["cpu"])
        if device.type == "cuda" and resume_state["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state(resume_state["rng"]["cuda"])
    step_fn = torch.compile(model) if app.train.compile else model

    config_dict = to_dict(app)
    logger = make_logger(app.logger.name, run_dir, config_dict, app.logger.project, app.logger.mode,
                         app.logger.entity, app.logger.group or group, run_name or run_name_from(overrides),
                         app.logger.tags)
    recorder = RunRecorder(run_dir, logger, resume_after_step=start_step if resume_state else None)
    counts = model.parameter_counts()
    moe_blocks = moe_layer_indices(app.model)
    summary: dict[str, Any] = {
        "status": "running", "step": start_step, "max_steps": app.train.max_steps,
        "router": app.router.name, "overrides": overrides or [],
        "params_total": counts["total"], "params_active": counts["active"],
        "params_trainable": sum(p.numel() for p in model.parameters() if p.requires_grad),
        "unigram_entropy": corpus.unigram_entropy(), "device": str(device),
        "train_tokens": len(corpus.train), "val_tokens": len(corpus.val), "config": config_dict,
    }
    recorder.write_summary(summary)
    log_line(f"[bold]{app.router.name}[/] router, {counts['total'] / 1e6:.2f}M params "
             f"({counts['active'] / 1e6:.2f}M active), {app.data.name}: {len(corpus.train) / 1e6:.2f}M train bytes, "
             f"unigram entropy {summary['unigram_entropy']:.3f} nats, device {device}, run dir {run_dir}")

    tokens_per_step = task.tokens_per_step
    stats = _StatAccumulator()
    loss_sum = torch.zeros((), device=device)
    aux_sum = torch.zeros((), device=device)
    n_in_interval = 0
    t_interval = time.perf_counter()
    t_start = time.perf_counter()
    wall_before = float(resume_state.get("wall_time_s", 0.0)) if resume_state else 0.0
    last_val: float | None = None
    last_train: float | None = None
    step = start_step
    failed = False
    progress = make_progress(app.train.max_steps, start_step)

    def checkpoint(at: int) -> None:
        save_checkpoint(run_dir / CHECKPOINT_FILE, {
            "version": CHECKPOINT_VERSION, "step": at, "config": config_dict,
            "model": model.state_dict(), "optimizer": optimizer.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if device.type == "cuda" else None},
            "frozen": sorted(loaded),
            "wall_time_s": wall_before + time.perf_counter() - t_start,
        })

    try:
        with progress:
            bar = progress.add_task("train", total=app.train.max_steps, completed=start_step, loss=float("nan"),
                                    tps=0.0)
            while step < app.train.max_steps:
                for group_ in optimizer.param_groups:
                    group_["lr"] = app.train.lr * lr_at(step, app.train.max_steps, app.train.warmup_steps,
                                                        app.train.min_lr_ratio)
                batch = task.train_batch(step, device)
                with autocast(device, app.train.precision):
                    out = task.forward(step_fn, batch)
                loss = out.loss + out.aux_loss
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                if app.train.grad_clip > 0:
                    torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad],
                                                   app.train.grad_clip)
                optimizer.step()
                step += 1
                loss_sum += out.loss.detach()
                aux_sum += out.aux_loss.detach()
                n_in_interval += 1
                stats.add(out.layer_stats)

                do_eval = step % app.train.eval_every == 0 or step == app.train.max_steps
                if step % app.train.log_every == 0 or do_eval:
                    elapsed = time.perf_counter() - t_interval
                    last_train = float(loss_sum / n_in_interval)
                    row: dict[str, Any] = {
                        "step": step, "train/loss": last_train, "train/aux_loss": float(aux_sum / n_in_interval),
                        "lr": optimizer.param_groups[0]["lr"],
                        "tokens_per_s": n_in_interval * tokens_per_step / max(elapsed, 1e-9),
                    }
                    if do_eval:
                        row.update(task.validate(model, device))
                        last_val = row["val/loss"]
                    row["moe"] = stats.pop(moe_blocks)
                    recorder.log(row)
                    if do_eval:
                        log_utilisation_image(recorder.logger, run_dir, row["moe"], step)
                    progress.update(bar, completed=step, loss=last_train, tps=row["tokens_per_s"])
                    if progress.disable:
                        val_part = f" val/loss {last_val:.4f}" if do_eval else ""
                        log_line(f"step {step}/{app.train.max_steps} loss {last_train:.4f}{val_part} "
                                 f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s")
                    loss_sum.zero_(), aux_sum.zero_()
                    n_in_interval = 0
                    t_interval = time.perf_counter()
                if step % app.train.ckpt_every == 0 or step == app.train.max_steps:
                    checkpoint(step)
        summary["status"] = "completed"
    except KeyboardInterrupt:
        summary["status"] = "interrupted"
        checkpoint(step)
        raise
    except BaseException:
        summary["status"] = "failed"
        failed = True
        raise
    finally:
        wall = wall_before + time.perf_counter() - t_start
        summary.update({"step": step, "wall_time_s": wall, "final_train_loss": last_train,
                        "final_val_loss": last_val,
                        "tokens_per_s": (step - start_step) * tokens_per_step / max(time.perf_counter() - t_start, 1e-9)})
        recorder.write_summary(summary)
        write_run_plots(run_dir, n_experts=app.model.n_experts, logger=recorder.logger, step=step)
        recorder.close(failed=failed)
    log_line(f"done: val/loss {last_val:.4f} nats (unigram entropy {summary['unigram_entropy']:.4f}) "
             f"in {summary['wall_time_s']:.0f}s -> {run_dir}")
    if app.eval.at_end:
        from .evaluate import evaluate_run

        evaluate_run(run_dir, app)
    return summary


def make_progress(total: int, start: int):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    return Progress(TextColumn("[bold blue]step {task.completed}/{task.total}"), BarColumn(),
                    TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                    TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                    console=console, disable=not console.is_terminal, transient=False)
