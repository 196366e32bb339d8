"""Variational logit router (VGLR): a Gaussian posterior over the router logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from ...config import ConfigError, ModelConfig, RouterConfig
from ..flops import SOFTMAX_FLOPS_PER_CLASS, linear_flops
from .base import Router, Routing, check_head_ratio, register_router, renormalised_topk, topk_overlap, zero_init_head

MAX_FULL_COVARIANCE_EXPERTS = 64


@dataclass
class VariationalConfig(RouterConfig):
    name: str = "variational"
    # beta: weight of the KL term.
    beta: float = 0.01
    # diag (mean-field, log-sigma head) or full (Cholesky head, E(E+1)/2 outputs).
    covariance: str = "diag"
    # The variance head's starting standard deviation.
    sigma_init: float = 0.1
    # Heads are MLPs D -> D*ratio -> outputs.
    head_hidden_ratio: float = 0.25

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if self.beta < 0:
            raise ConfigError(f"beta={self.beta} is out of range; it must be >= 0")
        if self.covariance not in ("diag", "full"):
            raise ConfigError(f"router.covariance={self.covariance!r} must be diag or full")
        if self.covariance == "full" and model.n_experts > MAX_FULL_COVARIANCE_EXPERTS:
            raise ConfigError(f"router.covariance=full needs model.n_experts <= {MAX_FULL_COVARIANCE_EXPERTS} "
                              f"(got {model.n_experts}); use router.covariance=diag")
        if not self.sigma_init > 0:
            raise ConfigError(f"router.sigma_init={self.sigma_init} must be > 0")
        check_head_ratio(self.head_hidden_ratio)

    def samples_at_eval(self) -> bool:
        return True


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


@register_router
class VariationalRouter(Router):
    """Gaussian posterior over the logits; S samples averaged after the softmax and before Top-K.

    Mean = the deterministic gate + a residual head (starts at 0); covariance mean-field
    (``log sigma`` head) or full (Cholesky head, positive diagonal); prior ``N(gate(u), I)``.
    Training draws one reparameterised sample; evaluation draws ``cfg.samples`` and routes on the
    mean of their softmaxes, so S multiplies router work only. ``aux_loss`` adds ``beta * KL``
    (summed over experts, averaged over tokens) to the balance terms.
    """

    name = "variational"
    Config = VariationalConfig
    uncertainty_signal = "logit_variance"
    bench_variants = {"variational diag": ["router.covariance=diag"], "variational full": ["router.covariance=full"]}

    def __init__(self, d_model: int, n_experts: int, cfg: VariationalConfig):
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

    def flops_per_token(self, samples: int) -> float:
        e = self.n_experts
        if self.full_covariance:
            # L eps with a lower-triangular L: E(E+1)/2 multiply-adds; exp of the diagonal; + mu.
            noise = e * (e + 1) + 2 * e
        else:
            noise = 2 * e  # mu + sigma * eps
        sigma = e  # sigma (or the diagonal of L) from its log
        per_sample = noise + SOFTMAX_FLOPS_PER_CLASS * e + e  # + the running average of the S softmaxes
        return linear_flops(self.gate) + self.head_flops_per_token() + sigma + samples * per_sample + 2 * self.k
