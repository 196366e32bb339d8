"""Routers: every router maps token states ``u_TD`` to a :class:`Routing`.

The MoE layer and the training loop only read :class:`Routing`; they never ask
which router produced it. A router's own loss terms arrive already weighted in
``Routing.aux_loss`` and its diagnostics in ``Routing.stats`` (detached tensors,
turned into numbers only when the loop logs).

The routers (``router=<name>``): ``topk`` (deterministic, the MAP baseline),
``variational`` (Gaussian posterior over the logits, mean-field or full
covariance), ``temperature`` (Gumbel-top-K at a fixed T), ``vtsr`` (a learned
per-token temperature) and ``mc_dropout`` (dropout on the router input kept on
at evaluation). Monte-Carlo routers average S softmaxes *before* Top-K, so S
multiplies router work only, never expert work. All randomness comes from
torch's global generator, which checkpoints save and resume restores.

Shape suffixes: T tokens, D model width, E experts, K experts per token,
S Monte-Carlo samples, P packed lower-triangle entries.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import RouterConfig


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


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor) -> torch.Tensor:
    """Switch Transformer balance loss ``E * sum_e f_e P_e``: 1 when the load is uniform."""
    n_experts = probs_TE.shape[-1]
    counts_E = torch.zeros(n_experts, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), torch.ones_like(expert_ids_TK, dtype=probs_TE.dtype).reshape(-1))
    fraction_E = counts_E / expert_ids_TK.numel()
    return n_experts * (fraction_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: keeps logits small so the softmax stays well conditioned."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def renormalised_topk(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of a probability vector, the selected entries renormalised to sum to 1."""
    top_TK, ids_TK = scores_TE.topk(k, dim=-1)
    return ids_TK, top_TK / top_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(top_TK.dtype).tiny)


class Router(nn.Module):
    """Base: holds the deterministic logit layer ``gate`` (NN_det in the paper).

    Every router keeps the name ``gate`` for it so a Top-K checkpoint loads into
    any router (the post-hoc protocol uses it as the frozen mean base).
    """

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig):
        super().__init__()
        self.n_experts, self.k, self.cfg = n_experts, cfg.k, cfg
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model ** -0.5 * 0.1)

    def balance_terms(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        loss = self.cfg.load_balance_weight * load_balance_loss(probs_TE, ids_TK)
        if self.cfg.z_loss_weight > 0:
            loss = loss + self.cfg.z_loss_weight * z_loss(logits_TE)
        return loss

    def forward(self, u_TD: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError


class TopKRouter(Router):
    """Deterministic Top-K: gates are the softmax over the K selected logits."""

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        probs_TE = logits_TE.softmax(-1)
        ids_TK, gates_TK = renormalised_topk(probs_TE, self.k)
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE,
                       self.balance_terms(logits_TE, probs_TE, ids_TK))


# ---------------------------------------------------------------------------
# Helpers shared by the stochastic routers
# ---------------------------------------------------------------------------

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


# ---------------------------------------------------------------------------
# Variational logit router (VGLR)
# ---------------------------------------------------------------------------

@dataclass
class LogitPosterior:
    """``N(mean, Sigma)`` over a token's router logits, with ``mean = NN_det(u) + residual``.

    Mean-field: ``Sigma = diag(exp(2 log_scale))``. Full: ``Sigma = L L^T`` with ``chol_TEE = L``
    lower-triangular and ``log_scale_TE`` the log of its (positive) diagonal, so log det Sigma is
    exact even where an entry of L underflows."""

    mean_TE: torch.Tensor
    residual_TE: torch.Tensor
    log_scale_TE: torch.Tensor
    chol_TEE: torch.Tensor | None = None

    def sample(self, n_samples: int) -> torch.Tensor:
        """Reparameterised samples ``l_STE = mean + sigma * eps`` (or ``mean + L eps``), one
        vectorised draw for all S samples."""
        eps_STE = torch.randn((n_samples, *self.mean_TE.shape), device=self.mean_TE.device, dtype=self.mean_TE.dtype)
        if self.chol_TEE is None:
            noise_STE = eps_STE * self.log_scale_TE.exp()
        else:
            noise_STE = torch.einsum("tij,stj->sti", self.chol_TEE, eps_STE)
        return self.mean_TE + noise_STE

    def covariance_TEE(self) -> torch.Tensor:
        if self.chol_TEE is None:
            return torch.diag_embed((2 * self.log_scale_TE).exp())
        return self.chol_TEE @ self.chol_TEE.mT

    def trace_T(self) -> torch.Tensor:
        """tr(Sigma): the logit variance, the router's OOD signal."""
        if self.chol_TEE is None:
            return (2 * self.log_scale_TE).exp().sum(-1)
        return self.chol_TEE.square().sum((-2, -1))

    def kl_T(self) -> torch.Tensor:
        """KL to the prior ``N(NN_det(u), I)``: only the residual and Sigma enter,
        ``1/2 [tr Sigma + |dmu|^2 - E - log det Sigma]`` per token."""
        n_experts = self.mean_TE.shape[-1]
        log_det_T = 2 * self.log_scale_TE.sum(-1)
        return 0.5 * (self.trace_T() + self.residual_TE.square().sum(-1) - n_experts - log_det_T)


class VariationalRouter(Router):
    """Gaussian posterior over the logits; S samples averaged after the softmax and before Top-K.

    Training draws one reparameterised sample; evaluation draws ``cfg.samples`` and routes on the
    mean of their softmaxes, so S multiplies router work only. ``aux_loss`` adds ``beta * KL``
    (summed over experts, averaged over tokens) to the balance terms.
    """

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig):
        super().__init__(d_model, n_experts, cfg)
        self.full_covariance = cfg.covariance == "full"
        log_sigma_init = math.log(cfg.sigma_init)
        self.residual_head = zero_init_head(d_model, cfg.head_hidden_ratio, n_experts, 0.0)  # dmu_phi
        if self.full_covariance:
            rows, cols = torch.tril_indices(n_experts, n_experts)
            is_diag_P = rows == cols
            # The head's E(E+1)/2 outputs fill L row by row; the diagonal ones are log L_ii.
            self.register_buffer("tril_flat_P", rows * n_experts + cols, persistent=False)
            self.register_buffer("is_diag_P", is_diag_P, persistent=False)
            self.register_buffer("diag_positions_E", is_diag_P.nonzero().squeeze(-1), persistent=False)
            # L starts at sigma_init * I: diagonal bias log(sigma_init), strictly-lower bias 0.
            bias_P = torch.where(is_diag_P, log_sigma_init, 0.0)
            self.scale_head = zero_init_head(d_model, cfg.head_hidden_ratio, len(rows), bias_P)
        else:
            self.scale_head = zero_init_head(d_model, cfg.head_hidden_ratio, n_experts, log_sigma_init)  # log sigma

    def posterior(self, u_TD: torch.Tensor) -> LogitPosterior:
        base_TE = self.gate(u_TD).float()
        residual_TE = self.residual_head(u_TD).float()
        raw = self.scale_head(u_TD).float()
        if not self.full_covariance:
            return LogitPosterior(base_TE + residual_TE, residual_TE, raw)
        n_tokens, n_experts = base_TE.shape
        entries_TP = torch.where(self.is_diag_P, raw.exp(), raw)
        chol_TEE = raw.new_zeros(n_tokens, n_experts * n_experts).index_copy(1, self.tril_flat_P, entries_TP)
        return LogitPosterior(base_TE + residual_TE, residual_TE, raw[:, self.diag_positions_E],
                              chol_TEE.view(n_tokens, n_experts, n_experts))

    def forward(self, u_TD: torch.Tensor) -> Routing:
        post = self.posterior(u_TD)
        n_samples = 1 if self.training else self.cfg.samples
        sample_probs_STE = post.sample(n_samples).softmax(-1)
        probs_TE = sample_probs_STE.mean(0)
        ids_TK, gates_TK = renormalised_topk(probs_TE, self.k)
        kl = post.kl_T().mean()
        trace_T = post.trace_T().detach()
        stats = {"kl": kl.detach(), "trace_sigma": trace_T.mean(),
                 "residual_norm": post.residual_TE.detach().norm(dim=-1).mean(),
                 "topk_overlap": topk_overlap(ids_TK, post.mean_TE)}
        aux = self.balance_terms(post.mean_TE, probs_TE, ids_TK) + self.cfg.beta * kl
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, aux, stats,
                       sample_probs_STE if n_samples > 1 else None, trace_T)


# ---------------------------------------------------------------------------
# Temperature sampling: fixed T, and the learned per-token T of VTSR
# ---------------------------------------------------------------------------

class TemperatureRouter(Router):
    """Gumbel-top-K sampling of K experts from ``softmax(l / T)`` with a fixed ``T = cfg.temperature``.

    T < 1 sharpens towards Top-K, T > 1 flattens towards uniform. Sampling happens in training
    and, with ``router.eval_mode=sample``, at evaluation; ``eval_mode=topk`` evaluates
    deterministically. Gates are the softmax over the selected scaled logits.
    """

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        scaled_TE = logits_TE / self.cfg.temperature
        probs_TE = scaled_TE.softmax(-1)
        choose_from_TE = gumbel_perturbed(scaled_TE) if self.training or self.cfg.eval_mode == "sample" else scaled_TE
        ids_TK = choose_from_TE.topk(self.k, dim=-1).indices
        gates_TK = scaled_TE.gather(-1, ids_TK).softmax(-1)
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, self.balance_terms(logits_TE, probs_TE, ids_TK),
                       {"topk_overlap": topk_overlap(ids_TK, logits_TE)})


class VTSRRouter(Router):
    """Variational temperature sampling: a head predicts ``T_phi(u) = softplus(.) + min_temperature``
    (one per token, or one per expert with ``router.per_expert_temperature=true``), starting at 1.

    Training samples K experts by Gumbel-top-K on ``l / T_phi``. The gates the experts see are the
    softmax over the selected scaled logits; their gradient is taken straight through from the
    relaxed sample ``softmax(l / T_phi + g)`` at the selected experts, which depends on T_phi
    through the selection probabilities too (so the head learns even with K = 1, where the hard
    gate is the constant 1). ``temperature_reg * mean(-log T_phi)`` keeps T from collapsing, and
    ``min_temperature`` is a hard floor.

    Evaluation is a single deterministic pass: Top-K on ``l / T_phi``, gates as in training. With
    one temperature per token this selects the same experts as Top-K on ``l`` and T_phi only
    reshapes the gates and the routing distribution; per-expert temperatures can change the
    selection. The learned temperature itself is the uncertainty signal (``uncertainty_T``).
    """

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig):
        super().__init__(d_model, n_experts, cfg)
        n_temperatures = n_experts if cfg.per_expert_temperature else 1
        # softplus(bias) + min_temperature = 1 at initialisation (or just above the floor if it is >= 1).
        bias = inverse_softplus(max(1.0 - cfg.min_temperature, 1e-2))
        self.temperature_head = zero_init_head(d_model, cfg.head_hidden_ratio, n_temperatures, bias)

    def temperature(self, u_TD: torch.Tensor) -> torch.Tensor:
        """``T_phi(u)``: shape (T, 1), or (T, E) with per-expert temperatures."""
        return F.softplus(self.temperature_head(u_TD).float()) + self.cfg.min_temperature

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        temperature_TX = self.temperature(u_TD)
        scaled_TE = logits_TE / temperature_TX
        probs_TE = scaled_TE.softmax(-1)
        if self.training:
            perturbed_TE = gumbel_perturbed(scaled_TE)
            ids_TK = perturbed_TE.topk(self.k, dim=-1).indices
            hard_TK = scaled_TE.gather(-1, ids_TK).softmax(-1)
            relaxed_TK = perturbed_TE.softmax(-1).gather(-1, ids_TK)
            gates_TK = hard_TK.detach() + (relaxed_TK - relaxed_TK.detach())  # value hard, gradient relaxed
        else:
            ids_TK = scaled_TE.topk(self.k, dim=-1).indices
            gates_TK = scaled_TE.gather(-1, ids_TK).softmax(-1)
        aux = (self.balance_terms(logits_TE, probs_TE, ids_TK)
               + self.cfg.temperature_reg * (-temperature_TX.log()).mean())
        temperature = temperature_TX.detach()
        stats = {"temperature_mean": temperature.mean(), "temperature_std": temperature.std(unbiased=False),
                 "temperature_min": temperature.min(), "topk_overlap": topk_overlap(ids_TK, logits_TE)}
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, aux, stats,
                       uncertainty_T=temperature.mean(-1))


# ---------------------------------------------------------------------------
# Weight-space baseline: MC dropout on the router input
# ---------------------------------------------------------------------------

class MCDropoutRouter(Router):
    """Dropout (p = ``router.dropout``) on the router input, kept on at evaluation.

    Training is one dropped-out pass; evaluation runs S passes as one batched matmul, averages
    their softmaxes and takes Top-K of the average (gates renormalised), like the variational
    router. ``topk_overlap`` compares the choice with the dropout-free Top-K.
    """

    def forward(self, u_TD: torch.Tensor) -> Routing:
        n_samples = 1 if self.training else self.cfg.samples
        # One independent dropout mask per sample: dropout over the expanded (S, T, D) tensor.
        u_STD = F.dropout(u_TD.expand(n_samples, *u_TD.shape), self.cfg.dropout, training=True)
        sample_probs_STE = self.gate(u_STD).float().softmax(-1)
        probs_TE = sample_probs_STE.mean(0)
        ids_TK, gates_TK = renormalised_topk(probs_TE, self.k)
        clean_logits_TE = self.gate(u_TD).float()
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE,
                       self.balance_terms(clean_logits_TE, probs_TE, ids_TK),
                       {"topk_overlap": topk_overlap(ids_TK, clean_logits_TE)},
                       sample_probs_STE if n_samples > 1 else None)


ROUTER_CLASSES: dict[str, Callable[..., Router]] = {
    "topk": TopKRouter,
    "variational": VariationalRouter,
    "temperature": TemperatureRouter,
    "vtsr": VTSRRouter,
    "mc_dropout": MCDropoutRouter,
}


def build_router(d_model: int, n_experts: int, cfg: RouterConfig) -> Router:
    try:
        cls = ROUTER_CLASSES[cfg.name]
    except KeyError:
        raise ValueError(f"router={cfg.name!r} is unknown; choose one of {', '.join(ROUTER_CLASSES)}") from None
    return cls(d_model, n_experts, cfg)
