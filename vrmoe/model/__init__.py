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



def _native(app: "AppConfig", training: bool) -> Backbone:
    return MoETransformer(app.model, app.router)


def load_dtype(app: "AppConfig", training: bool) -> torch.dtype:
    """The dtype pretrained weights are loaded in. Weights that train stay fp32 master weights
    under train.precision=bf16 (autocast computes in bf16): an AdamW step of lr 1e-5 on a weight
    of 1e-2 is below half a bf16 ulp and would round away. Weights that only run forward (frozen
    under train.freeze=backbone, or at evaluation) are loaded in bf16."""
    trains_backbone = training and app.train.freeze == "none"
    return torch.bfloat16 if app.train.precision == "bf16" and not trains_backbone else torch.float32


def _hf(app: "AppConfig", training: bool) -> Backbone:
    from .hf import HFBackbone

    return HFBackbone(app.model, app.router, dtype=load_dtype(app, training))


# model.backbone -> how the model is built from the config (for training, or to run forward only).
BACKBONES: dict[str, Callable[["AppConfig", bool], Backbone]] = {"native": _native, "hf": _hf}


def build_tokenizer(app: "AppConfig") -> Tokenizer:
    """The backbone's tokenizer: bytes for the native model, the checkpoint's own for model=hf."""
    if app.model.backbone == "hf":
        return HFTokenizer(app.model.hf_name or "")
    return ByteTokenizer()


def build_model(app: "AppConfig", training: bool = False) -> Backbone:
    """The model a config describes, freshly initialised from ``app.seed`` (on the CPU);
    ``training``: built for ``vrmoe train`` (weights that will train are kept in fp32)."""
    try:
        cls = BACKBONES[app.model.backbone]
    except KeyError:
        raise ConfigError(f"model.backbone={app.model.backbone!r} is unknown; choose one of "
                          f"{', '.join(BACKBONES)}") from None
    torch.manual_seed(app.seed)
    return cls(app, training)


__all__ = ["Backbone", "BACKBONES", "ModelOutput", "build_model", "build_tokenizer", "MoELayer", "MoEOutput", "MoETransformer",
           "Router", "Routing", "build_router"]
