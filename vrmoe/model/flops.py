"""Counting rules for analytic FLOPs per token (one multiply-add = 2 FLOPs).

* matrix products everywhere: attention projections, the attention scores and
  their weighted sum over the causal context (on average (L + 1) / 2 positions
  for a window of L tokens), the experts (K of them per token in an MoE
  layer), dense feed-forwards and the output head; normalisations, rotary
  embeddings, activations and the embedding lookup are not counted;
* the router in full, element-wise work included, because that work *is* the
  cost of a Bayesian router: each router counts itself
  (``Router.flops_per_token``): its logit layer, every other linear layer it
  owns (its heads), and per routing sample the noise transform, the softmax
  (5 FLOPs per expert: max, subtract, exp, sum, divide) and the running
  average. Top-K selection is comparisons and is not counted; renormalising
  the K gates is.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

SOFTMAX_FLOPS_PER_CLASS = 5
# A Gumbel draw -log(-log u) and the division of the logits by T, per expert.
GUMBEL_FLOPS_PER_CLASS = 3


@dataclass
class FlopsBreakdown:
    attention: float
    experts: float
    router: float
    other: float  # dense feed-forward blocks and the output head

    @property
    def total(self) -> float:
        return self.attention + self.experts + self.router + self.other

    def as_dict(self) -> dict[str, float]:
        return {**asdict(self), "total": self.total}


def linear_flops(module: nn.Module) -> float:
    """2 FLOPs per weight (and 1 per bias) of every ``nn.Linear`` inside ``module``, applied once per token."""
    total = 0.0
    for layer in module.modules():
        if isinstance(layer, nn.Linear):
            total += 2 * layer.weight.numel() + (layer.bias.numel() if layer.bias is not None else 0)
    return total


def attention_flops(d_model: int, context: int) -> float:
    """Causal self-attention with ``d_model``-wide projections over windows of ``context`` tokens."""
    projections = 2 * d_model * 3 * d_model + 2 * d_model * d_model
    mean_context = (context + 1) / 2  # causal: token t attends to t positions
    return projections + 2 * 2 * d_model * mean_context  # q.k scores and the weighted sum of v


def swiglu_flops(d_model: int, hidden: int) -> float:
    return 3 * 2 * d_model * hidden
