"""Devices and precision: which device a run uses and the autocast it computes under."""

from __future__ import annotations

import contextlib

import torch

from .config import ConfigError


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ConfigError(f"train.device={name} but no CUDA device is available; use train.device=cpu or auto")
    return torch.device(name)


def autocast(device: torch.device, precision: str):
    """bf16 autocast for ``train.precision=bf16``; full precision otherwise."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (timings include it); nothing to wait for on CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
