"""Models: the backbone contract, the one factory, the native transformer, MoE layers, routers."""

from __future__ import annotations

from typing import TYPE_CHECKING, Callable

import torch

from ..config import ConfigError
from ..data.tokenizers import ByteTokenizer, HFTokenizer, Tokenizer
from .backbone import Backbone, ModelOutput
from .moe import MoELayer, MoEOutput
from .native import MoETransformer
from .routers import Router, Routing, build_router

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AppConfig



def _native(app: "AppConfig") -> Backbone:
    return MoETransformer(app.model, app.router)


def _hf(app: "AppConfig") -> Backbone:
    from .hf import HFBackbone

    dtype = torch.bfloat16 if app.train.precision == "bf16" else torch.float32
    return HFBackbone(app.model, app.router, dtype=dtype)


# model.backbone -> how the model is built from the config.
BACKBONES: dict[str, Callable[["AppConfig"], Backbone]] = {"native": _native, "hf": _hf}


def build_tokenizer(app: "AppConfig") -> Tokenizer:
    """The backbone's tokenizer: bytes for the native model, the checkpoint's own for model=hf."""
    if app.model.backbone == "hf":
        return HFTokenizer(app.model.hf_name or "")
    return ByteTokenizer()


def build_model(app: "AppConfig") -> Backbone:
    """The model a config describes, freshly initialised from ``app.seed`` (on the CPU)."""
    try:
        cls = BACKBONES[app.model.backbone]
    except KeyError:
        raise ConfigError(f"model.backbone={app.model.backbone!r} is unknown; choose one of "
                          f"{', '.join(BACKBONES)}") from None
    torch.manual_seed(app.seed)
    return cls(app)


__all__ = ["Backbone", "BACKBONES", "ModelOutput", "build_model", "build_tokenizer", "MoELayer", "MoEOutput", "MoETransformer",
           "Router", "Routing", "build_router"]
