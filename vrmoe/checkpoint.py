"""Checkpoints: save and load, shape checks, weights from another run (``init_from``), freezing.

A checkpoint is one ``checkpoint.pt`` in the run dir, written atomically, holding the
model and optimiser state, the step, the RNG state, the resolved config, the names of
frozen parameters, the wall time so far and a SHA-256 ``checksum`` of all of it, checked on
every load (a checkpoint written before checksums has none and loads unchecked). Every
problem a user can cause (a missing, corrupt, altered or foreign file, another model shape
or router) is a one-line ConfigError.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import time
from pathlib import Path
from typing import Any, Callable

import torch

from .config import AppConfig, ConfigError, ModelConfig, dotted_keys, to_dict
from .console import log_line
from .model.routers import ROUTERS, Router
from .tracking import CHECKPOINT_FILE, atomic_write

# 2: each router keeps only its own keys; the model section names its backbone.
CHECKPOINT_VERSION = 2
# Model fields that change no parameter shape: a checkpoint loads across them.
_SHAPE_FREE_FIELDS = {"name", "dropout", "dispatch", "seq_len"}


def save_checkpoint(path: Path, state: dict[str, Any], before_replace: Callable[[], Any] | None = None) -> None:
    """Atomic: a run killed mid-save, or whose disk fills, keeps its previous checkpoint intact.
    The state's checksum goes in with it, so a later change of its bytes (a disk or a copy that
    flips them while torch still reads the file) is caught on load. ``before_replace`` runs once
    the new file is complete (see :func:`~vrmoe.tracking.atomic_write`)."""
    state = {**state, "checksum": state_checksum(state)}

    def write(tmp: Path) -> None:
        # Through a Python file, so a full disk is an OSError naming its cause (torch's own writer
        # reports it as a RuntimeError about zip positions).
        with open(tmp, "wb") as f:
            torch.save(state, f)

    atomic_write(path, write, before_replace=before_replace)


def state_checksum(state: dict[str, Any]) -> str:
    """SHA-256 of a checkpoint's content (every tensor's dtype, shape and bytes, every other value),
    its own ``checksum`` entry left out. Computed on the loaded objects rather than the file's
    bytes, so it can be stored inside the file it covers."""
    digest = hashlib.sha256()
    _feed(digest, {k: v for k, v in state.items() if k != "checksum"})
    return digest.hexdigest()


def _feed(digest: Any, value: Any) -> None:
    if isinstance(value, torch.Tensor):
        t = value.detach().cpu().contiguous()
        digest.update(f"T{t.dtype}{tuple(t.shape)}".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy())  # the raw bytes of any dtype (bf16 included)
    elif isinstance(value, dict):
        digest.update(b"{%d" % len(value))
        for key, item in value.items():
            _feed(digest, key)
            _feed(digest, item)
    elif isinstance(value, (list, tuple)):
        digest.update(b"[%d" % len(value))
        for item in value:
            _feed(digest, item)
    elif isinstance(value, (set, frozenset)):  # iteration order differs between processes
        digest.update(b"<" + ",".join(sorted(repr(v) for v in value)).encode() + b">")
    elif value is None or isinstance(value, (str, bytes, int, float, bool)):
        digest.update(repr(value).encode() + b";")
    else:  # another object: its repr may hold an address that differs on every load
        digest.update(f"<{type(value).__qualname__}>".encode())


CHECKSUM_MISMATCH = "does not match its checksum (its bytes changed after it was saved)"


def checkpoint_paths(run_dir: Path) -> list[Path]:
    """A run's checkpoints, newest first: checkpoint.pt, then the older ones kept beside it."""
    run_dir = Path(run_dir)
    older = sorted(run_dir.glob("checkpoint.*.pt"), key=lambda p: int(p.name.split(".")[1])
                   if p.name.split(".")[1].isdigit() else 1 << 30)
    return [p for p in [run_dir / CHECKPOINT_FILE, *older] if p.is_file()]


def load_checkpoint(run_dir: str | Path, key: str) -> dict[str, Any]:
    """Read a run's newest readable checkpoint (falling back to an older one, with a warning, when
    the newest is unreadable); ``key`` is the config key that named the run (for the message).
    A checkpoint that does not match its checksum is refused: weights other than those saved
    would be evaluated or built on."""
    return read_newest_checkpoint(run_dir, key)[0]


def read_newest_checkpoint(run_dir: str | Path, key: str,
                           resuming: bool = False) -> tuple[dict[str, Any], list[Path]]:
    """:func:`load_checkpoint`, and the newer checkpoints it had to pass over as unreadable.
    ``resuming``: a checkpoint that does not match its checksum is passed over like an unreadable
    one (the run continues from the one before), not refused."""
    path = Path(run_dir).expanduser()
    if path.is_file():
        if path.suffix != ".pt":
            raise ConfigError(f"{key}={run_dir}: is a file, not a run dir; give the directory a training wrote")
        candidates = [path]
    elif path.is_dir():
        candidates = checkpoint_paths(path)
    else:
        raise ConfigError(f"{key}={run_dir}: no such directory; point it at a run dir")
    if not candidates:
        raise ConfigError(f"{key}={run_dir}: no {CHECKPOINT_FILE} there; point it at a run dir that finished "
                          "at least one checkpoint")
    problems, unreadable = [], []
    for candidate in candidates:
        try:
            state = torch.load(candidate, map_location="cpu", weights_only=False)
        except Exception as exc:  # pickle, zip and torch errors all mean the same to a user
            problems.append(f"{candidate.name} is corrupt or unreadable ({type(exc).__name__})")
            unreadable.append(candidate)
            continue
        if not isinstance(state, dict) or "model" not in state or "config" not in state:
            problems.append(f"{candidate.name} is not a vrmoe checkpoint")
            unreadable.append(candidate)
            continue
        if "checksum" in state and state_checksum(state) != state["checksum"]:
            if not resuming:
                raise ConfigError(f"{key}={run_dir}: {candidate} {CHECKSUM_MISMATCH}; restore it from a copy, "
                                  "or re-run the training that wrote it")
            problems.append(f"{candidate.name} {CHECKSUM_MISMATCH}")
            unreadable.append(candidate)
            continue
        if problems:
            log_line(f"[yellow]warning:[/] {'; '.join(problems)}; using {candidate.name} (step {state.get('step')})")
        break
    else:
        raise ConfigError(f"{key}={run_dir}: {'; '.join(problems)}; re-run the training that wrote it")
    if int(state.get("version", 1)) < 2:
        state["config"] = config_from_v1(state["config"])
    return state, unreadable


def set_aside_unreadable(paths: list[Path]) -> None:
    """Rename checkpoints a resume passed over to ``<name>.unreadable``. Left in place, the next
    save would move the unreadable checkpoint.pt over checkpoint.1.pt, the readable one the run
    resumed from; renamed, they are kept for a look and no longer count as checkpoints."""
    for path in paths:
        aside = path.with_name(f"{path.name}.unreadable")
        os.replace(path, aside)
        log_line(f"[yellow]warning:[/] moved the unreadable {path.name} aside to {aside.name}")


def config_from_v1(config: dict[str, Any]) -> dict[str, Any]:
    """Version 1 kept every router's keys in every router section (keep the router's own) and
    knew one backbone (the native one)."""
    router = dict(config.get("router", {}))
    cls = ROUTERS.get(str(router.get("name", "topk")))
    if cls is not None:
        own = {f.name for f in dataclasses.fields(cls.Config)}
        router = {k: v for k, v in router.items() if k in own}
    return {**config, "router": router, "model": {"backbone": "native", **config.get("model", {})}}


def shape_mismatch(saved: dict[str, Any], current: ModelConfig) -> list[str]:
    """Model fields that differ in a way that changes parameter shapes."""
    now = to_dict(AppConfig(model=current))["model"]
    # A key a record lacks is newer than the record: its default is what that run was built with.
    default = to_dict(AppConfig())["model"]
    return [f"model.{k}: {saved.get(k, default[k])} there, {now[k]} here" for k in now
            if k not in _SHAPE_FREE_FIELDS and saved.get(k, default[k]) != now[k]]


def load_weights_from_run(model: torch.nn.Module, model_cfg: ModelConfig, run_dir: str, key: str) -> set[str]:
    """Load another run's weights into ``model`` (``train.init_from``); return the names loaded.

    Parameters the checkpoint lacks (a new router's heads) keep their fresh
    initialisation; those the model lacks are ignored."""
    state = load_checkpoint(run_dir, key)
    diff = shape_mismatch(state["config"]["model"], model_cfg)
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


def load_run_weights(model: torch.nn.Module, state: dict[str, Any], key: str, run: str | Path,
                     app: AppConfig | None = None) -> None:
    """A run's checkpoint into a model built from its config (``app``: the config it is loaded
    under, checked for shape). Every parameter must fit. A checkpoint leaves out the frozen
    weights it started from: the model reloads them from its pretrained source
    (``pretrained_parameters``) and from the run named by ``train.init_from``, loaded first."""
    if app is not None:
        diff = shape_mismatch(state["config"]["model"], app.model)
        if diff:
            raise ConfigError(f"{key}={run}: the checkpoint holds another model shape ({'; '.join(diff)}); "
                              "use it with its own model=...")
    supplied = set(getattr(model, "pretrained_parameters", ())) | _load_base(model, state, key)
    try:
        result = model.load_state_dict(state["model"], strict=False)
    except RuntimeError as exc:
        first = next((ln.strip() for ln in str(exc).splitlines() if "size mismatch" in ln), str(exc).splitlines()[0])
        raise ConfigError(f"{key}={run}: checkpoint.pt does not fit its config ({first}); re-run the training") from None
    missing = [name for name in result.missing_keys if name not in supplied]
    if missing or result.unexpected_keys:
        name = (missing or result.unexpected_keys)[0]
        router = app.router.name if app is not None else state["config"]["router"].get("name")
        raise ConfigError(f"{key}={run}: checkpoint.pt does not fit router={router} "
                          f"(parameter {name} {'missing' if missing else 'unexpected'}); "
                          "use the run with the router it was trained with")


def _load_base(model: torch.nn.Module, state: dict[str, Any], key: str) -> set[str]:
    """The weights of the run this one started from (``train.init_from``, and its own base in turn)
    loaded into ``model``; returns their names."""
    base = (state["config"].get("train") or {}).get("init_from")
    if not base:
        return set()
    base_state = load_checkpoint(base, f"{key}'s train.init_from")
    supplied = _load_base(model, base_state, key)
    own = model.state_dict()
    loadable = {k: v for k, v in base_state["model"].items() if k in own and own[k].shape == v.shape}
    model.load_state_dict(loadable, strict=False)
    return supplied | set(loadable)


# What a resume may change: where and how it runs and records, not what it trains.
_RESUME_FREE = {"train.resume", "train.max_steps", "train.device", "train.compile", "train.resume_override",
                "train.log_every", "train.eval_every", "train.ckpt_every", "train.eval_batches", "train.objective",
                "data.cache_dir", "model.dispatch"}


def resume_differences(saved: dict[str, Any], app: AppConfig) -> list[str]:
    """Training keys whose value differs from the checkpoint's (the seed, the schedule, the data,
    the task, the model and the router with its keys); logging and evaluation settings may change."""
    now = dotted_keys({k: v for k, v in to_dict(app).items() if k not in ("logger", "eval")})
    before = dotted_keys({k: v for k, v in saved.items() if k not in ("logger", "eval")})
    return [f"{key}: {before.get(key)} there, {now[key]} here" for key in now
            if key not in _RESUME_FREE and key in before and before[key] != now[key]]


def check_resumable(state: dict[str, Any], app: AppConfig) -> list[str]:
    """``train.resume`` continues the same run: the same model and router, the same training keys
    (unless ``train.resume_override=true``; the differences are returned to be recorded), and
    steps left to take (only ``train.max_steps`` may grow)."""
    saved = state["config"]
    diff = shape_mismatch(saved["model"], app.model)
    saved_router = saved.get("router", {}).get("name")
    if diff or saved_router != app.router.name:
        raise ConfigError(f"train.resume={app.train.resume}: the run was made with another model or router "
                          f"({'; '.join(diff) or f'router={saved_router}'}); resume with its own config")
    if int(state["step"]) >= app.train.max_steps:
        raise ConfigError(f"train.resume={app.train.resume}: the run already reached step {state['step']} "
                          f"of train.max_steps={app.train.max_steps}; raise train.max_steps to train it further")
    changed = resume_differences(saved, app)
    if changed and not app.train.resume_override:
        raise ConfigError(f"train.resume={app.train.resume}: the run was trained with other settings "
                          f"({'; '.join(changed)}); resume with its own, or add train.resume_override=true")
    return changed


def freeze_loaded(model: torch.nn.Module, loaded: set[str]) -> None:
    """train.freeze=backbone: everything that came from the base run is frozen,
    the base router's logit layer included (it is the variational prior's mean), except the
    loaded weights a router's post-hoc method trains (``Router.posthoc_trained_parameters``:
    SWAG's gate). Decided by module, so the native and the Hugging Face backbones agree."""
    trained = {id(p) for module in model.modules() if isinstance(module, Router)
               for p in module.posthoc_trained_parameters()}
    for name, p in model.named_parameters():
        if name in loaded and id(p) not in trained:
            p.requires_grad_(False)
    if not any(p.requires_grad for p in model.parameters()):
        raise ConfigError("train.freeze=backbone leaves nothing to train: the router adds no new parameters "
                          "(choose router=variational, vtsr, swag, or another router that trains post hoc)")


def keep_trained_in_fp32(model: torch.nn.Module) -> None:
    """Parameters that train are fp32 master weights with fp32 gradients and optimiser state,
    whatever dtype the frozen rest was loaded in (bf16 updates of small steps round away)."""
    for p in model.parameters():
        if p.requires_grad and p.dtype != torch.float32:
            p.data = p.data.float()


def restore_rng(state: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(state["rng"]["cpu"])
    if device.type == "cuda" and state["rng"].get("cuda") is not None:
        torch.cuda.set_rng_state(state["rng"]["cuda"])


class Checkpointer:
    """Writes the run's checkpoint: everything a resume needs to continue bit for bit."""

    def __init__(self, run_dir: Path, app: AppConfig, frozen: set[str], wall_before: float, device: torch.device,
                 reloadable: set[str] = frozenset()):
        self.path = Path(run_dir) / CHECKPOINT_FILE
        self.keep = app.train.keep_checkpoints
        # Frozen weights are not copied: they are reloaded from where they came from (model.hf_name,
        # train.init_from) when the checkpoint is loaded (load_run_weights).
        self.reloadable = set(reloadable)
        self.config = to_dict(app)
        self.frozen = sorted(frozen)
        self.wall_before = wall_before
        self.device = device
        self.started = time.perf_counter()

    def wall_time(self) -> float:
        return self.wall_before + time.perf_counter() - self.started

    def save(self, step: int, model: torch.nn.Module, optimizer: torch.optim.Optimizer,
             interval: dict[str, Any] | None = None) -> None:
        """``interval``: the log interval's partial sums, so a resume logs the interval it was in.
        The previous ``keep - 1`` checkpoints move aside (checkpoint.1.pt is the one before) once the
        new one is completely written: a write that fails (a full disk) leaves them all in place."""

        def move_aside() -> None:
            for i in range(self.keep - 1, 0, -1):
                source = self.path if i == 1 else self.path.with_name(f"checkpoint.{i - 1}.pt")
                if source.exists():
                    os.replace(source, self.path.with_name(f"checkpoint.{i}.pt"))

        state = {
            "interval": interval,
            "version": CHECKPOINT_VERSION, "step": step, "config": self.config,
            "model": {k: v for k, v in model.state_dict().items() if k not in self.reloadable},
            "optimizer": optimizer.state_dict(),
            "rng": {"cpu": torch.get_rng_state(),
                    "cuda": torch.cuda.get_rng_state() if self.device.type == "cuda" else None},
            "frozen": self.frozen,
            "wall_time_s": self.wall_time(),
        }
        if self.path.exists() and self.keep > 1:
            save_checkpoint(self.path, state, before_replace=move_aside)
        else:
            save_checkpoint(self.path, state)


__all__ = ["CHECKPOINT_VERSION", "save_checkpoint", "load_checkpoint", "read_newest_checkpoint",
           "set_aside_unreadable", "state_checksum", "shape_mismatch", "load_weights_from_run",
           "load_run_weights", "check_resumable", "freeze_loaded", "restore_rng", "Checkpointer"]
