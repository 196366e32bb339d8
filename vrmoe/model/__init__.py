"""Models: the backbone contract, the one factory, the native transformer, MoE layers, routers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..config import ConfigError
from .backbone import Backbone, ModelOutput
from .moe import MoELayer, MoEOutput
from .native import MoETransformer
from .routers import Router, Routing, build_router

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AppConfig

# model.backbone -> the class built from (ModelConfig, RouterConfig).
BACKBONES: dict[str, Callable[..., Backbone]] = {"native": MoETransformer}


def build_model(app: "AppConfig") -> Backbone:
    """The model a config describes, freshly initialised from ``app.seed`` (on the CPU)."""
    try:
        cls = BACKBONES[app.model.backbone]
    except KeyError:
        raise ConfigError(f"model.backbone={app.model.backbone!r} is unknown; choose one of "
                          f"{', '.join(BACKBONES)}") from None
    torch.manual_seed(app.seed)
    return cls(app.model, app.router)


__all__ = ["Backbone", "BACKBONES", "ModelOutput", "build_model", "MoELayer", "MoEOutput", "MoETransformer",
           "Router", "Routing", "build_router"]
