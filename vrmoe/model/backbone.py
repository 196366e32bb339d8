"""The backbone contract: what the training loop, the tasks and the probes rely on.

A backbone is a causal language model whose feed-forward blocks (some or all)
are MoE layers with swappable routers. Everything downstream reads only this
contract, never a backbone's internals:

* ``forward(idx_BL, targets_BL=None, perturb_embeddings=None) -> ModelOutput``:
  the logits, the next-token loss when targets are given, the routers'
  weighted auxiliary loss and every MoE layer's routing and diagnostics;
  ``perturb_embeddings`` (a function of the embedding output ``x_BLD``) is the
  hook the routing-stability probe adds its noise with;
* ``embeddings(idx_BL)``: the embedding output the perturbation applies to;
* ``moe_layers`` (each with its ``router`` and ``n_experts``) and
  ``moe_layer_names`` (``layer<block index>``, the keys of every record);
* ``parameter_counts()`` and ``flops_per_token(samples, context)``.

``vrmoe.model.build_model(app)`` is the one factory; ``model.backbone`` picks
the implementation.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Protocol

import torch

from .routers import Routing

if TYPE_CHECKING:  # pragma: no cover
    from .flops import FlopsBreakdown
    from .moe import MoELayer


@dataclass
class ModelOutput:
    logits_BLV: torch.Tensor
    loss: torch.Tensor | None  # the task loss (next-token cross-entropy), when targets are given
    aux_loss: torch.Tensor  # sum over MoE layers of the routers' weighted terms
    routings: list[Routing]  # one per MoE layer, in depth order
    layer_stats: list[dict[str, torch.Tensor]]  # one per MoE layer, detached


PerturbEmbeddings = Callable[[torch.Tensor], torch.Tensor]


class Backbone(Protocol):
    moe_layers: list["MoELayer"]
    moe_layer_names: list[str]

    def __call__(self, idx_BL: torch.Tensor, targets_BL: torch.Tensor | None = None,
                 perturb_embeddings: PerturbEmbeddings | None = None) -> ModelOutput: ...
    def embeddings(self, idx_BL: torch.Tensor) -> torch.Tensor: ...
    def parameter_counts(self) -> dict[str, int]: ...
    def flops_per_token(self, samples: int, context: int | None = None) -> "FlopsBreakdown": ...
