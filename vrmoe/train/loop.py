"""The training loop: set up a run, then step, meter, validate and checkpoint until done.

The loop knows no router, task or backbone: the task gives batches and its loss, the
model's output carries the routers' weighted auxiliary loss and per-layer diagnostics,
and the loop adds, logs and records them. Diagnostics are summed on device and read
back only every ``train.log_every`` steps, so a step has no host sync (beyond the CPU
expert loop's counts; see ``model/moe.py``).
"""

from __future__ import annotations

import signal
import threading
import time
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from ..checkpoint import (Checkpointer, check_resumable, checkpoint_paths, freeze_loaded, keep_trained_in_fp32,
                          load_run_weights, load_weights_from_run, read_newest_checkpoint, restore_rng,
                          set_aside_unreadable)
from ..compose import saved_run_config
from ..config import AppConfig, ConfigError, to_dict
from ..console import console, log_line
from ..data.corpora import Corpus, load_corpus
from .. import distributed
from ..data.batches import derived_seed
from ..device import resolve_device
from ..distributed import DistEnv
from ..knobs import check_knobs, ignored_message, unread_settings
from ..model import build_model, build_tokenizer
from ..model.backbone import Backbone
from ..model.routers import Router
from ..plots import log_utilisation_image, write_run_plots
from ..tasks import Task, build_task
from ..tracking import (CHECKPOINT_FILE, METRICS_FILE, SUMMARY_FILE, NullRecorder, RunLock, RunRecorder,
                        atomic_write_text, make_logger, read_summary, remove_stale_temporaries, software_versions)
from .memory import memory_line, training_memory
from .meter import IntervalMeter
from .step import Diverged, TrainStep, make_optimizer


def reloadable_from_base(model: Backbone, frozen: set[str], trained: set[str], freeze: str) -> set[str]:
    """What a post-hoc checkpoint need not copy: frozen weights, which reload from the base
    (model.hf_name, train.init_from). A router's buffers are stored all the same: a router may
    update its own (SWAG's moments) while everything else is frozen."""
    if freeze != "backbone":
        return set()
    router_buffers = {f"{name}.{buffer}" for name, module in model.named_modules() if isinstance(module, Router)
                      for buffer, _ in module.named_buffers()}
    return frozen - trained - router_buffers


def train(app: AppConfig, run_dir: Path, overrides: list[str] | None = None,
          group: str | None = None, run_name: str | None = None,
          record: dict[str, str] | None = None) -> dict[str, Any]:
    """Train one run into ``run_dir``; return its summary (also written to summary.json).

    ``group`` and ``run_name`` name the W&B run (a sweep passes its group and the overrides it
    varies); by default the run is named by all its overrides. ``record``: files (a path relative
    to the run dir -> its text) that a fresh run writes once it holds the run dir (Hydra's record)."""
    run = TrainingRun.start(app, Path(run_dir), overrides or [], group, run_name, record)
    train_step = TrainStep(run.model, run.optimizer, app.train, run.device)
    forward_model = distributed.wrap(run.model, run.dist, run.device)
    forward_model = torch.compile(forward_model) if app.train.compile else forward_model
    meter = IntervalMeter(run.device, run.model.moe_layer_names, run.task.tokens_per_step, run.interval_state)
    step, max_steps, status = run.start_step, app.train.max_steps, "failed"
    stop = StopRequest(run.dist)
    try:
        with run.progress, stop:
            while step < max_steps:
                batch = run.task.train_batch(step, run.device)
                out = train_step(step, lambda: run.task.forward(forward_model, batch))
                step += 1
                if train_step.last_ok:
                    meter.add(out)
                else:
                    meter.skip()
                validate = step % app.train.eval_every == 0 or step == max_steps
                if step % app.train.log_every == 0 or validate:
                    row = {**meter.pop(step), "lr": train_step.lr}
                    if validate:
                        row.update(run.task.validate(run.model, run.device))
                    run.record(row, validated=validate)
                stopping = stop.agreed()  # Ctrl-C or SIGTERM during the step: it finished, save it and stop
                if step % app.train.ckpt_every == 0 or step == max_steps or stopping:
                    with stop.saving():
                        run.save_checkpoint(step, meter)
                if stopping:
                    raise KeyboardInterrupt
        status = "completed"
    except KeyboardInterrupt:  # a second Ctrl-C aborts at once: the last checkpoint stands
        status = "interrupted"
        raise
    except OSError as exc:  # a full disk: the last checkpoint stands, and the summary says why the run stopped
        run.summary["error"] = f"cannot write {exc.filename or run.run_dir}: {exc.strerror or exc}"
        raise
    except Diverged as exc:
        status = "diverged"
        saved = checkpoint_paths(run.run_dir)  # weights are only ever updated by finite steps
        exc.args = (f"{exc}; " + (f"{saved[0].name} holds the last finite weights" if saved
                                  else "it diverged before its first checkpoint"),)
        run.summary["error"] = str(exc)
        raise
    finally:
        run.summary["skipped_steps"] = train_step.skipped
        run.finish(status, step)
    return run.summary


# Where each rank's routing-noise seeds start (far from the data order's per-step seeds).
RANK_STREAM = 1 << 30


@dataclass
class TrainingRun:
    """Everything one run holds while it trains, and what it records."""

    app: AppConfig
    run_dir: Path
    device: torch.device
    corpus: Corpus
    task: Task
    model: Backbone
    optimizer: torch.optim.Optimizer
    start_step: int
    checkpointer: Checkpointer
    recorder: RunRecorder
    summary: dict[str, Any]
    progress: Any
    dist: DistEnv
    interval_state: dict[str, Any] | None = None  # the log interval a resumed checkpoint was in
    lock: RunLock | None = None
    last_train: float | None = None
    last_val: float | None = None

    @classmethod
    def start(cls, app: AppConfig, run_dir: Path, overrides: list[str], group: str | None,
              run_name: str | None, record: dict[str, str] | None = None) -> "TrainingRun":
        """Resume checks, corpus and task, model (fresh, resumed or from another run, frozen as
        asked), optimiser, logger and the first summary: everything that can refuse the run is
        decided before anything is written."""
        here = distributed.env()
        device = distributed.device_for(here, resolve_device(app.train.device))
        distributed.check_batch(here, app.train.batch_size)
        # A run stopped before its first checkpoint (interrupted while it set up, or killed while it
        # wrote that checkpoint) starts again from step 0 in place: the same config, the same records.
        restart = bool(app.train.resume) and restarts_from_scratch(Path(app.train.resume).expanduser())
        resume, unreadable = (read_newest_checkpoint(app.train.resume, "train.resume", resuming=True)
                              if app.train.resume and not restart else (None, []))
        overridden = check_resumable(resume, app) if resume is not None else []
        if restart:
            overridden = check_resumable({"config": saved_run_config(app.train.resume), "step": 0}, app)
        corpus = load_corpus(app.data, min_tokens=app.model.seq_len + 2, tokenizer=build_tokenizer(app))
        if corpus.tokenizer.vocab_size > app.model.vocab_size:
            raise ConfigError(f"model.vocab_size={app.model.vocab_size} is smaller than the tokenizer's "
                              f"{corpus.tokenizer.vocab_size} tokens; set model.vocab_size={corpus.tokenizer.vocab_size}")
        ignored = check_knobs(app.router, overrides, app.train.strict_knobs)
        unread = unread_settings(app, overrides)
        task = build_task(app, corpus)
        model = build_model(app, training=True)
        # Parameter names that came from elsewhere (a pretrained checkpoint, another run): what
        # train.freeze=backbone freezes.
        frozen: set[str] = set(getattr(model, "pretrained_parameters", ()))
        if resume is not None:
            load_run_weights(model, resume, "train.resume", app.train.resume)
            frozen = set(resume.get("frozen", []))
        elif app.train.init_from:
            frozen |= load_weights_from_run(model, app.model, app.train.init_from, "train.init_from")
        if app.train.freeze == "backbone":
            freeze_loaded(model, frozen)
        keep_trained_in_fp32(model)
        model.to(device).train()
        optimizer = make_optimizer(model, app.train.lr, app.train.weight_decay)
        start_step = 0
        if resume is not None:
            optimizer.load_state_dict(resume["optimizer"])
            start_step = int(resume["step"])
            restore_rng(resume, device)
        if here.enabled:  # each rank draws its own routing noise, continued the same way on any resume
            torch.manual_seed(derived_seed(app.seed, RANK_STREAM + here.rank * app.train.max_steps + start_step))

        lock = claim_run_dir(run_dir, resuming=resume is not None or restart) if here.is_main else None
        try:
            if record and here.is_main and resume is None and not restart:  # a resumed run keeps its own
                for name, text in record.items():
                    (run_dir / name).parent.mkdir(parents=True, exist_ok=True)
                    atomic_write_text(run_dir / name, text)
            if restart and here.is_main:
                log_line(f"[yellow]note:[/] {run_dir} holds no checkpoint (the run stopped before its first one was "
                         "written); starting the run again from step 0")
            if here.is_main:  # before the first save, which would move them over the checkpoint resumed from
                set_aside_unreadable([path for path in unreadable if path.parent.resolve() == run_dir.resolve()])
            config = to_dict(app)
            logger = make_logger(app.logger.name, run_dir, config, app.logger.project, app.logger.mode,
                                 app.logger.entity, app.logger.group or group, run_name or run_name_from(overrides),
                                 app.logger.tags, app.logger.init_timeout)
            recorder = (RunRecorder(run_dir, logger, resume_after_step=start_step if resume else None) if here.is_main
                        else NullRecorder())
            counts = model.parameter_counts()
            memory = training_memory(model)
            summary: dict[str, Any] = {
                "status": "running", "step": start_step, "max_steps": app.train.max_steps,
                "router": app.router.name, "overrides": overrides,
                "params_total": counts["total"], "params_active": counts["active"],
                "params_trainable": memory["params_trainable"], "memory": memory,
                "unigram_entropy": corpus.unigram_entropy(), "device": str(device),
                "train_tokens": len(corpus.train), "val_tokens": len(corpus.val), "config": config,
                "versions": software_versions(),
            }
            if ignored:  # knobs the router does not read: on record, and said below
                summary["ignored_knobs"] = ignored
            if unread:  # other settings this run does not read: on record, and said below
                summary["unread_settings"] = unread
            recorder.write_summary(summary)
            if here.enabled:
                summary["world_size"] = here.world_size
            if overridden:  # train.resume_override=true: what changed, on record
                summary["resume_override"] = overridden
            (log_line if here.is_main else _quiet)(memory_line(memory, task.tokens_per_step))
            (log_line if here.is_main else _quiet)(
                f"[bold]{app.router.name}[/] router, {counts['total'] / 1e6:.2f}M params "
                f"({counts['active'] / 1e6:.2f}M active), {app.data.name}: {len(corpus.train) / 1e6:.2f}M train "
                f"tokens, unigram entropy {summary['unigram_entropy']:.3f} nats, device {device}, run dir {run_dir}")
            if ignored:
                (log_line if here.is_main else _quiet)(f"[yellow]note:[/] {ignored_message(app.router, ignored)}")
            for line in unread:
                (log_line if here.is_main else _quiet)(f"[yellow]note:[/] {line}")
            wall_before = float(resume.get("wall_time_s", 0.0)) if resume else 0.0
            trained = {name for name, p in model.named_parameters() if p.requires_grad}
            checkpointer = Checkpointer(run_dir, app, frozen, wall_before, device,
                                        reloadable=reloadable_from_base(model, frozen, trained, app.train.freeze))
            return cls(app, run_dir, device, corpus, task, model, optimizer, start_step, checkpointer, recorder,
                       summary, make_progress(app.train.max_steps, start_step, quiet=not here.is_main), here,
                       resume.get("interval") if resume is not None else None, lock)
        except BaseException:  # a full disk while the first records are written: the dir is free again
            if lock is not None:
                lock.release()
            raise

    def save_checkpoint(self, step: int, meter: IntervalMeter) -> None:
        interval = meter.state()  # every rank's partial sums of the log interval (gathered: all ranks call it)
        if self.dist.is_main:  # every rank holds the same weights: one writes them
            self.checkpointer.save(step, self.model, self.optimizer, interval=interval)

    def record(self, row: dict[str, Any], validated: bool) -> None:
        """One metrics.jsonl row, mirrored to the logger and shown as progress."""
        self.last_train = row["train/loss"]
        if validated:
            self.last_val = row["val/loss"]
        self.recorder.log(row)
        if not self.dist.is_main:
            return
        if validated:
            log_utilisation_image(self.recorder.logger, self.run_dir, row["moe"], row["step"])
        self.progress.update(self.progress.task_ids[0], completed=row["step"],
                             loss=float("nan") if self.last_train is None else self.last_train,
                             tps=row["tokens_per_s"])
        if self.progress.disable:
            val_part = f" val/loss {self.last_val:.4f}" if validated else ""
            train_part = "-" if self.last_train is None else f"{self.last_train:.4f}"  # every step skipped
            log_line(f"step {row['step']}/{self.app.train.max_steps} loss {train_part}{val_part} "
                     f"lr {row['lr']:.2e} {row['tokens_per_s']:.0f} tok/s")

    def finish(self, status: str, step: int) -> None:
        """The final summary, the run's figures, and the logger closed, whatever ended the run."""
        if not self.dist.is_main:
            return
        seconds = time.perf_counter() - self.checkpointer.started
        self.summary.update({
            "status": status, "step": step, "wall_time_s": self.checkpointer.wall_time(),
            "final_train_loss": self.last_train, "final_val_loss": self.last_val,
            "tokens_per_s": (step - self.start_step) * self.task.tokens_per_step / max(seconds, 1e-9)})
        try:
            self.recorder.write_summary(self.summary)
            write_run_plots(self.run_dir, n_experts=self.app.model.n_experts, logger=self.recorder.logger, step=step)
        except OSError as exc:  # a full disk
            if status == "completed":  # the records are what the run made: losing them is its error
                raise UnrecordedCompletion(exc.errno, exc.strerror or str(exc), exc.filename) from exc
            # A run that ended otherwise shows the error that ended it, whose line says whether its
            # summary.json could be updated.
        finally:
            self.recorder.close(failed=status == "failed")
            if self.lock is not None:
                self.lock.release()
        if status == "completed":
            log_line(f"done: val/loss {self.last_val:.4f} nats (unigram entropy {self.summary['unigram_entropy']:.4f}) "
                     f"in {self.summary['wall_time_s']:.0f}s -> {self.run_dir}")


class UnrecordedCompletion(OSError):
    """A run that completed, but whose final records (summary.json, the figures) could not be
    written: its checkpoint holds the final weights."""


def restarts_from_scratch(run_dir: Path) -> bool:
    """Whether ``train.resume`` names a run that holds no checkpoint (at most the temporary file of
    one that a kill cut short) but has its records and config: such a run is started again. Not a
    run that ended (completed, or diverged), whose records would be written over."""
    if not run_dir.is_dir() or checkpoint_paths(run_dir):
        return False
    if (read_summary(run_dir) or {}).get("status") in ("completed", "diverged"):
        return False
    return saved_run_config(run_dir) is not None


class RunDirTaken(ConfigError):
    """The run dir is another run's (a live run holds its lock, or a fresh run finds another run's
    records there): refused, and nothing is written there."""


def _in_use(run_dir: Path, lock: RunLock, key: str = "hydra.run.dir") -> RunDirTaken:
    owner = lock.owner() or {}
    return RunDirTaken(f"the run dir {run_dir} is in use by another run (pid {owner.get('pid')} on "
                       f"{owner.get('host')}); wait for it, or choose another {key}")


def _check_no_other_run(run_dir: Path, key: str = "hydra.run.dir") -> None:
    held = [name for name in (SUMMARY_FILE, METRICS_FILE, CHECKPOINT_FILE) if (run_dir / name).exists()]
    if held:
        raise RunDirTaken(f"the run dir {run_dir} already holds a run ({', '.join(held)}); choose another "
                          f"{key}, or continue it with train.resume={run_dir}")


def check_run_dir_free(run_dir: Path, key: str = "hydra.run.dir") -> None:
    """Before a fresh run sets up: refuse (:class:`RunDirTaken`) a run dir that a live run holds or
    that holds another run; ``key`` is the setting that chose the dir. :func:`claim_run_dir` checks
    again as it takes the lock."""
    lock = RunLock(run_dir)
    if lock.path.exists() and lock.stale_reason() is None:
        raise _in_use(run_dir, lock, key)
    _check_no_other_run(run_dir, key)


def claim_run_dir(run_dir: Path, resuming: bool) -> RunLock:
    """Make the run dir this process's alone before anything is written: it must be writable, no
    other live run may hold it, and a fresh run never writes over another run's records."""
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        lock = RunLock(run_dir)
        acquired = lock.acquire()
    except OSError as exc:
        raise ConfigError(f"cannot write to the run dir {run_dir}: {exc.strerror or exc}; "
                          "choose a writable hydra.run.dir") from None
    if not acquired:
        raise _in_use(run_dir, lock)
    if lock.took_over:
        log_line(f"[yellow]note:[/] took over the run dir {run_dir} from a run that no longer holds it "
                 f"({lock.took_over})")
    if not resuming:
        try:
            _check_no_other_run(run_dir)
        except RunDirTaken:
            lock.release()
            raise
    remove_stale_temporaries(run_dir)
    return lock


class StopRequest:
    """SIGINT (Ctrl-C) and SIGTERM (what Slurm and torchrun send before a kill) ask the loop to stop
    after the current optimiser step, which is then checkpointed; a second signal aborts at once,
    or, while a checkpoint is being written, as soon as it is written. Under torchrun the ranks
    agree on the step to stop after."""

    def __init__(self, here: DistEnv):
        self.here, self.requested, self._previous = here, False, {}
        self._saving = self._deferred = False

    def __enter__(self) -> "StopRequest":
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _handle(self, signum, frame) -> None:
        if self.requested and self._saving:  # the checkpoint being written is the one to resume from
            if not self._deferred:
                log_line("[yellow]writing the checkpoint[/]: the run stops as soon as it is written")
            self._deferred = True
            return
        if self.requested:
            raise KeyboardInterrupt
        self.requested = True
        log_line("[yellow]stopping after this step[/] (a checkpoint follows; interrupt again to abort at once)")

    @contextmanager
    def saving(self):
        """A checkpoint being written is not cut short by a second signal (it would leave the run
        with an older checkpoint, or none): the signal is said in one line, and the run stops once
        the checkpoint is written."""
        self._saving, self._deferred = True, False
        try:
            yield
        finally:
            self._saving = False
        if self._deferred:
            raise KeyboardInterrupt

    def agreed(self) -> bool:
        """Whether any rank was asked to stop (one small all-reduce a step under torchrun)."""
        if self.here.enabled:
            self.requested = bool(distributed.sum_over_ranks(torch.tensor(float(self.requested))) > 0)
        return self.requested


def run_name_from(overrides: list[str] | None) -> str | None:
    keep = [o for o in (overrides or []) if not o.startswith(("hydra", "logger", "train.resume"))]
    return ",".join(keep) or None


def _quiet(message: str) -> None:
    """What a rank other than 0 prints: nothing (rank 0 speaks for the run)."""


def make_progress(total: int, start: int, quiet: bool = False):
    from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

    progress = Progress(TextColumn("[bold blue]step {task.completed}/{task.total}"), BarColumn(),
                        TextColumn("loss {task.fields[loss]:.4f}"), TextColumn("{task.fields[tps]:,.0f} tok/s"),
                        TimeElapsedColumn(), TextColumn("ETA"), TimeRemainingColumn(),
                        console=console, disable=quiet or not console.is_terminal, transient=False)
    progress.add_task("train", total=total, completed=start, loss=float("nan"), tps=0.0)
    return progress
