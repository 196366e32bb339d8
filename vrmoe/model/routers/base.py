"""The router contract, the registry and the helpers every router shares.

A router maps token states ``u_TD`` to a :class:`Routing`; the MoE layer and the
training loop only read :class:`Routing` and never ask which router produced it.
A router's own loss terms arrive already weighted in ``Routing.aux_loss`` and its
diagnostics in ``Routing.stats`` (detached tensors, turned into numbers only when
the loop logs). All randomness comes from torch's global generator, which
checkpoints save and resume restores.

A router is one class (registered with :func:`register_router`) plus, optionally,
one YAML file in ``conf/router/``. The class owns everything about itself:

* ``Config``: a dataclass extending :class:`~vrmoe.config.RouterConfig` with the
  router's own keys, and ``Config.check(model)`` with their range checks;
* ``flops_per_token(samples)``: its FLOPs at evaluation, S and its heads counted;
* ``uncertainty_signal``: the name of its own per-token uncertainty
  (``Routing.uncertainty_T``) as an OOD score, or None;
* ``Config.samples_at_eval()``: whether evaluation averages S routing samples;
* ``bench_variants``: the configurations ``vrmoe bench`` measures.

Shape suffixes: T tokens, D model width, E experts, K experts per token,
S Monte-Carlo samples, P packed lower-triangle entries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn

from ...config import ConfigError, RouterConfig
from ...distributed import sum_over_ranks, world_size
from ..flops import SOFTMAX_FLOPS_PER_CLASS, linear_flops


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # long, the selected experts
    gates_TK: torch.Tensor  # the selected experts' weights, summing to 1 per token
    probs_TE: torch.Tensor  # the routing distribution selection was made from (S-averaged at evaluation)
    aux_loss: torch.Tensor  # scalar, weighted: load balance + z-loss + the router's own terms
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached diagnostics
    # Per-sample routing distributions at evaluation, for mutual information (None when S = 1).
    sample_probs_STE: torch.Tensor | None = None
    # The router's own per-token uncertainty signal for OOD scores (None if it has none):
    # tr(Sigma_post) for the variational router, the mean temperature for vtsr.
    uncertainty_T: torch.Tensor | None = None


class Router(nn.Module):
    """Base: holds the deterministic logit layer ``gate`` (NN_det in the paper).

    Every router keeps the name ``gate`` for it so a Top-K checkpoint loads into
    any router (the post-hoc protocol uses it as the frozen mean base).
    """

    name: ClassVar[str]
    Config: ClassVar[type[RouterConfig]] = RouterConfig
    #: The OOD-score name of ``Routing.uncertainty_T`` (None: the router reports none).
    uncertainty_signal: ClassVar[str | None] = None
    #: What ``vrmoe bench`` measures: label -> router overrides (beyond ``router=<name>``).
    bench_variants: ClassVar[dict[str, list[str]] | None] = None

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig):
        super().__init__()
        self.n_experts, self.k, self.cfg = n_experts, cfg.k, cfg
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model ** -0.5 * 0.1)

    def balance_terms(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        # In training every rank routes its slice of one global batch in step; evaluation is per rank.
        loss = self.cfg.load_balance_weight * load_balance_loss(probs_TE, ids_TK, over_ranks=self.training)
        if self.cfg.z_loss_weight > 0:
            loss = loss + self.cfg.z_loss_weight * z_loss(logits_TE)
        return loss

    def forward(self, u_TD: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def topk_flops_per_token(self) -> float:
        """What deterministic Top-K on the same gate costs: the logit layer, the softmax and the
        renormalisation of the K gates (Top-K selection is comparisons and is not counted)."""
        return linear_flops(self.gate) + SOFTMAX_FLOPS_PER_CLASS * self.n_experts + 2 * self.k

    def head_flops_per_token(self) -> float:
        """Every linear layer the router owns besides the gate (its heads), once per token."""
        return linear_flops(self) - linear_flops(self.gate)

    def flops_per_token(self, samples: int) -> float:
        """FLOPs per token at evaluation with ``samples`` routing samples (see ``vrmoe.model.flops``)."""
        return self.topk_flops_per_token() + self.head_flops_per_token()


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make ``router=<cls.name>`` selectable. The class's ``Config`` must name
    the router by default (``name: str = "<cls.name>"``)."""
    default_name = next(f.default for f in dataclasses.fields(cls.Config) if f.name == "name")
    if default_name != cls.name:
        raise TypeError(f"{cls.__name__}.Config.name defaults to {default_name!r}, not {cls.name!r}")
    ROUTERS[cls.name] = cls
    return cls


def router_class(name: str) -> type[Router]:
    try:
        return ROUTERS[name]
    except KeyError:
        raise ConfigError(f"router={name!r} is unknown; choose one of {', '.join(ROUTERS)}") from None


def router_config(name: str, **fields: Any) -> RouterConfig:
    """A router's config in code (tests, benchmarks): its own dataclass with these fields."""
    return router_class(name).Config(**fields)


def build_router(d_model: int, n_experts: int, cfg: RouterConfig) -> Router:
    return router_class(cfg.name)(d_model, n_experts, cfg)


# ---------------------------------------------------------------------------
# Helpers shared by the routers
# ---------------------------------------------------------------------------

def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, over_ranks: bool = False) -> torch.Tensor:
    """Switch Transformer balance loss ``E * sum_e f_e P_e``: 1 when the load is uniform."""
    n_experts = probs_TE.shape[-1]
    counts_E = torch.zeros(n_experts, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), torch.ones_like(expert_ids_TK, dtype=probs_TE.dtype).reshape(-1))
    # over_ranks (training under torchrun): the fractions are the global batch's, P_e stays this rank's,
    # so the ranks' averaged gradients are the gradient of the global loss.
    if over_ranks:
        fraction_E = sum_over_ranks(counts_E) / (expert_ids_TK.numel() * world_size())
    else:
        fraction_E = counts_E / expert_ids_TK.numel()
    return n_experts * (fraction_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: keeps logits small so the softmax stays well conditioned."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def renormalised_topk(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of a probability vector, the selected entries renormalised to sum to 1."""
    top_TK, ids_TK = scores_TE.topk(k, dim=-1)
    return ids_TK, top_TK / top_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(top_TK.dtype).tiny)


def zero_init_head(d_model: int, hidden_ratio: float, n_out: int, bias_init: float | torch.Tensor) -> nn.Sequential:
    """A small MLP ``D -> D*hidden_ratio -> n_out`` whose output starts at ``bias_init`` for
    every input: the last layer's weights are zero, so a head added to a trained router
    leaves its routing unchanged until training moves it."""
    hidden = max(1, round(d_model * hidden_ratio))
    head = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_out))
    nn.init.zeros_(head[-1].weight)
    with torch.no_grad():
        head[-1].bias.copy_(torch.as_tensor(bias_init, dtype=head[-1].bias.dtype).expand(n_out))
    return head


def gumbel_perturbed(scores_TE: torch.Tensor) -> torch.Tensor:
    """``scores + Gumbel(0, 1)`` noise: the Top-K of the result is a sample of K experts without
    replacement from ``softmax(scores)`` (Gumbel-top-K). The noise comes from torch's global
    generator, so a resumed run draws the same noise."""
    exp_TE = torch.empty_like(scores_TE).exponential_().clamp_min(torch.finfo(scores_TE.dtype).tiny)
    return scores_TE - exp_TE.log()  # -log(Exp(1)) ~ Gumbel(0, 1)


def topk_overlap(ids_TK: torch.Tensor, reference_TE: torch.Tensor) -> torch.Tensor:
    """Mean fraction of the chosen experts that are also in the Top-K of ``reference_TE``
    (1 = the router chose exactly what deterministic Top-K would have); detached."""
    k = ids_TK.shape[-1]
    in_reference_TE = torch.zeros_like(reference_TE).scatter_(-1, reference_TE.detach().topk(k, dim=-1).indices, 1.0)
    return in_reference_TE.gather(-1, ids_TK).mean()


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for large y


def check_head_ratio(ratio: float) -> None:
    if not ratio > 0:
        raise ConfigError(f"router.head_hidden_ratio={ratio} must be > 0 (heads are D -> D*ratio -> outputs)")
