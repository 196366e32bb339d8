"""Analytic FLOPs per token of a forward pass at evaluation.

Counting rules (one multiply-add = 2 FLOPs):

* matrix products everywhere: attention projections, the attention scores and
  their weighted sum over the causal context (on average (L + 1) / 2 positions
  for a window of L tokens), the experts (K of them per token in an MoE
  layer), dense feed-forwards and the output head; normalisations, rotary
  embeddings, activations and the embedding lookup are not counted;
* the router in full, element-wise work included, because that work *is* the
  cost of a Bayesian router: its logit layer, every other linear layer it owns
  (the variational and temperature heads), and per routing sample the noise
  transform, the softmax (5 FLOPs per expert: max, subtract, exp, sum, divide)
  and the running average. Variational and MC-dropout routers draw S samples
  at evaluation (MC dropout re-runs its logit layer on each dropped input);
  temperature sampling draws one; VTSR evaluates deterministically. Top-K
  selection is comparisons and is not counted; renormalising the K gates is.
  The full-covariance noise ``L eps`` is counted as the triangular product it
  is (E(E+1)/2 multiply-adds per sample).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass

import torch.nn as nn

from .config import ModelConfig
from .model.routers import Router
from .model.transformer import MoETransformer, moe_layer_indices

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


def router_flops(router: Router, samples: int) -> float:
    """One router's FLOPs per token at evaluation with ``samples`` Monte-Carlo samples."""
    cfg, n_experts, k = router.cfg, router.n_experts, router.k
    gate = linear_flops(router.gate)
    heads = linear_flops(router) - gate  # every other linear layer the router owns
    softmax = SOFTMAX_FLOPS_PER_CLASS * n_experts
    renormalise = 2 * k
    name = cfg.name
    if name == "variational":
        if cfg.covariance == "full":
            # L eps with a lower-triangular L: E(E+1)/2 multiply-adds; exp of the diagonal; + mu.
            noise = n_experts * (n_experts + 1) + 2 * n_experts
        else:
            noise = 2 * n_experts  # mu + sigma * eps
        sigma = n_experts  # sigma (or the diagonal of L) from its log
        per_sample = noise + softmax + n_experts  # the running average of the S softmaxes
        return gate + heads + sigma + samples * per_sample + renormalise
    if name == "mc_dropout":
        dropout = router.gate.in_features  # mask multiply per input feature
        per_sample = dropout + gate + softmax + n_experts
        return heads + samples * per_sample + renormalise
    if name == "temperature":
        sampling = GUMBEL_FLOPS_PER_CLASS * n_experts if cfg.eval_mode == "sample" else n_experts
        return gate + sampling + softmax + renormalise
    if name == "vtsr":
        # Evaluation is one deterministic pass: the temperature head, softplus, and l / T.
        return gate + heads + 2 * n_experts + softmax + renormalise
    return gate + heads + softmax + renormalise  # deterministic Top-K


def attention_flops(cfg: ModelConfig, context: int) -> float:
    d = cfg.d_model
    projections = 2 * d * 3 * d + 2 * d * d
    mean_context = (context + 1) / 2  # causal: token t attends to t positions
    return projections + 2 * 2 * d * mean_context  # q.k scores and the weighted sum of v


def flops_per_token(model: MoETransformer, samples: int, context: int | None = None) -> FlopsBreakdown:
    """FLOPs per token of ``model`` at evaluation, over windows of ``context`` tokens (default seq_len)."""
    cfg = model.cfg
    context = cfg.seq_len if context is None else context
    moe_at = set(moe_layer_indices(cfg))
    routers = iter(layer.router for layer in model.moe_layers)
    attention = experts = router = other = 0.0
    for i in range(cfg.n_layers):
        attention += attention_flops(cfg, context)
        if i in moe_at:
            layer_router = next(routers)
            experts += layer_router.k * 3 * 2 * cfg.d_model * cfg.expert_hidden + 2 * layer_router.k * cfg.d_model
            router += router_flops(layer_router, samples)
        else:
            other += 3 * 2 * cfg.d_model * cfg.dense_hidden
    other += 2 * cfg.d_model * cfg.vocab_size  # output head (tied to the embedding)
    return FlopsBreakdown(attention, experts, router, other)


def topk_router_flops(model: MoETransformer) -> float:
    """What the same model's routers would cost as deterministic Top-K (the baseline)."""
    total = 0.0
    for layer in model.moe_layers:
        n_experts, k = layer.router.n_experts, layer.router.k
        total += linear_flops(layer.router.gate) + SOFTMAX_FLOPS_PER_CLASS * n_experts + 2 * k
    return total


def cost_summary(model: MoETransformer, samples: int, context: int | None = None) -> dict:
    """The ``cost`` block of eval.json (without the measured throughput)."""
    flops = flops_per_token(model, samples, context)
    baseline_total = flops.total - flops.router + topk_router_flops(model)
    return {"flops_per_token": flops.as_dict(),
            "router_share": flops.router / flops.total,
            "router_overhead_vs_topk": flops.total / baseline_total - 1.0}


__all__ = ["FlopsBreakdown", "flops_per_token", "router_flops", "linear_flops", "attention_flops",
           "topk_router_flops", "cost_summary"]
