"""Variational logit router (VGLR): a Gaussian posterior over the router logits."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ConfigError, ModelConfig
from ..flops import SOFTMAX_FLOPS_PER_CLASS, linear_flops
from .base import (Router, Routing, ScoreMean, Scoring, TemperedConfig, check_head_ratio, register_router, tempered,
                   token_chunks, zero_init_head)

MAX_FULL_COVARIANCE_EXPERTS = 64


@dataclass
class VariationalConfig(TemperedConfig):
    name: str = "variational"
    # beta: weight of the KL term.
    beta: float = 0.01
    # diag (mean-field, log-sigma head) or full (Cholesky head, E(E+1)/2 outputs).
    covariance: str = "diag"
    # The variance head's starting standard deviation.
    sigma_init: float = 0.1
    # Heads are MLPs D -> D*ratio -> outputs.
    head_hidden_ratio: float = 0.25
    # Both heads read one shared hidden layer (D -> D*ratio) instead of one each: half the heads'
    # matmuls, a smaller head. Off by default (the paper's separate heads; checkpoints keep loading).
    shared_hidden: bool = False
    # Under sigmoid scoring, how evaluation averages the scores: mc (the mean of S sampled sigmoids) or
    # probit (the closed form sigmoid(mu / sqrt(1 + pi sigma^2 / 8)) per expert, no sampling, whatever
    # S > 1 is; S = 1, as the BMA's single-sample passes set it, still draws one sample).
    sigmoid_mean: str = "mc"

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
        if self.sigmoid_mean not in ("mc", "probit"):
            raise ConfigError(f"router.sigmoid_mean={self.sigmoid_mean!r} must be mc or probit")

    def check_scoring(self) -> None:
        if self.sigmoid_mean == "probit" and self.scoring_func != "sigmoid":
            raise ConfigError(f"router.sigmoid_mean=probit averages sigmoid scores, but router.scoring_func="
                              f"{self.scoring_func}; set router.scoring_func=sigmoid, or drop router.sigmoid_mean")

    def samples_at_eval(self) -> bool:
        return True


@dataclass
class LogitPosterior:
    """``N(mean, Sigma)`` over a token's router logits, with ``mean = NN_det(u) + residual``.

    Mean-field: ``Sigma = diag(exp(2 log_scale))``. Full: ``Sigma = L L^T`` with ``chol_TEE = L``
    lower-triangular and ``log_scale_TE`` the log of its (positive) diagonal, so log det Sigma is
    exact even where an entry of L underflows; ``chol_packed_TP`` are L's lower-triangle entries
    (when given, tr Sigma is summed over them rather than over the E x E zeros and all)."""

    mean_TE: torch.Tensor
    residual_TE: torch.Tensor
    log_scale_TE: torch.Tensor
    chol_TEE: torch.Tensor | None = None
    chol_packed_TP: torch.Tensor | None = None

    def sample(self, n_samples: int) -> torch.Tensor:
        """Reparameterised samples ``l_STE = mean + sigma * eps`` (or ``mean + L eps``), one
        vectorised draw for all S samples: what training routes on (S = 1), and the reference
        that :meth:`mean_scores` computes in chunks."""
        eps_STE = torch.randn((n_samples, *self.mean_TE.shape), device=self.mean_TE.device, dtype=self.mean_TE.dtype)
        if self.chol_TEE is None:
            noise_STE = eps_STE * self.log_scale_TE.exp()
        else:  # (L eps)_i = sum_j L_ij eps_j, element-wise: E is small and a batch of E x E matvecs is not
            noise_STE = (self.chol_TEE * eps_STE.unsqueeze(-2)).sum(-1)
        return self.mean_TE + noise_STE

    def mean_scores(self, n_samples: int, keep: bool = False, temperature: float = 1.0,
                    scoring: Scoring = Scoring()) -> ScoreMean:
        """``mean_s scores(l_s / T)`` over S reparameterised samples, drawn and averaged a chunk of
        tokens at a time (see :class:`ScoreMean`): the same as ``sample(S).softmax(-1).mean(0)`` (or
        ``.sigmoid()``), without S x T x E numbers alive at once.

        Each chunk draws eps (X, E, S), the samples innermost: ``mean + sigma * eps`` broadcasts
        per token, ``mean + L eps`` is one batched matmul (each token's E x E factor times its S
        draws), and the scores over E and the mean over S read contiguous samples."""
        n_tokens, n_experts = self.mean_TE.shape
        acc = ScoreMean(n_samples, keep, temperature, scoring)
        track = torch.is_grad_enabled() and self.mean_TE.requires_grad
        mean_TE1 = self.mean_TE.unsqueeze(-1)
        scale_TE1 = self.log_scale_TE.exp().unsqueeze(-1) if self.chol_TEE is None else None
        for rows in token_chunks(n_tokens, n_experts * n_samples):
            eps_XES = torch.randn(rows.stop - rows.start, n_experts, n_samples, device=self.mean_TE.device,
                                  dtype=self.mean_TE.dtype)
            if self.chol_TEE is not None:
                logits_XES = torch.baddbmm(mean_TE1[rows], self.chol_TEE[rows], eps_XES)
            elif track:
                logits_XES = torch.addcmul(mean_TE1[rows], eps_XES, scale_TE1[rows])
            else:
                logits_XES = eps_XES.mul_(scale_TE1[rows]).add_(mean_TE1[rows])
            acc.add_tokens(logits_XES)
        return acc

    def marginal_variance_TE(self) -> torch.Tensor:
        """``diag(Sigma)``: each logit's own variance (all an element-wise score's mean depends on)."""
        if self.chol_TEE is None:
            return (2 * self.log_scale_TE).exp()
        return self.chol_TEE.square().sum(-1)

    def probit_mean_sigmoid(self, temperature: float = 1.0) -> torch.Tensor:
        """``E[sigmoid(l / T)] ~ sigmoid(mu / sqrt(1 + pi sigma^2 / 8))`` per expert, with ``mu`` and
        ``sigma^2`` the mean and marginal variance of ``l / T`` (MacKay's probit approximation:
        sigmoid(x) ~ Phi(x sqrt(pi / 8)), whose Gaussian expectation is closed). Exact at sigma = 0 and
        at mu = 0; within about 0.02 of the Monte Carlo mean elsewhere (tests/test_sigmoid_routing.py)."""
        mean_TE = tempered(self.mean_TE, temperature)
        variance_TE = self.marginal_variance_TE() / (temperature * temperature)
        return (mean_TE * torch.rsqrt(1.0 + (math.pi / 8.0) * variance_TE)).sigmoid()

    def covariance_TEE(self) -> torch.Tensor:
        if self.chol_TEE is None:
            return torch.diag_embed((2 * self.log_scale_TE).exp())
        return self.chol_TEE @ self.chol_TEE.mT

    def trace_T(self) -> torch.Tensor:
        """tr(Sigma): the logit variance, the router's OOD signal."""
        if self.chol_TEE is None:
            return (2 * self.log_scale_TE).exp().sum(-1)
        if self.chol_packed_TP is not None:
            return self.chol_packed_TP.square().sum(-1)
        return self.chol_TEE.square().sum((-2, -1))

    def kl_T(self, trace_T: torch.Tensor | None = None) -> torch.Tensor:
        """KL to the prior ``N(NN_det(u), I)``: only the residual and Sigma enter,
        ``1/2 [tr Sigma + |dmu|^2 - E - log det Sigma]`` per token (``trace_T``: tr Sigma, when
        the caller has it already)."""
        n_experts = self.mean_TE.shape[-1]
        log_det_T = 2 * self.log_scale_TE.sum(-1)
        trace_T = self.trace_T() if trace_T is None else trace_T
        return 0.5 * (trace_T + self.residual_TE.square().sum(-1) - n_experts - log_det_T)


def _zero_output_layer(n_in: int, n_out: int, bias_init: float | torch.Tensor) -> nn.Sequential:
    """A head's output layer alone (``zero_init_head``'s last layer): zero weights, output ``bias_init``."""
    layer = nn.Linear(n_in, n_out)
    nn.init.zeros_(layer.weight)
    with torch.no_grad():
        layer.bias.copy_(torch.as_tensor(bias_init, dtype=layer.bias.dtype).expand(n_out))
    return nn.Sequential(layer)


@register_router
class VariationalRouter(Router):
    """Gaussian posterior over the logits; S samples averaged after the softmax (or sigmoid) and before Top-K.

    Mean = the deterministic gate + a residual head (starts at 0); covariance mean-field
    (``log sigma`` head) or full (Cholesky head, positive diagonal); prior ``N(gate(u), I)``.
    Training draws one reparameterised sample; evaluation draws ``cfg.samples`` and routes on the
    mean of their softmaxes (accumulated in chunks, :meth:`LogitPosterior.mean_scores`), so S
    multiplies router work only. ``aux_loss`` adds ``beta * KL`` (summed over experts, averaged
    over tokens) to the balance terms.

    Under ``router.scoring_func=sigmoid`` every sample's scores are ``sigmoid(l_s / T)`` and
    evaluation averages them (or takes their probit approximation, ``router.sigmoid_mean=probit``);
    selection is Top-K of the averaged scores plus the selection bias, gates the averaged scores
    at the selected experts, normalised and scaled as the scoring says. A sigmoid acts on each
    logit alone, so the averaged scores depend on each logit's marginal only: full covariance
    cannot change the routing-mean selection, only the BMA's single-sample passes.
    """

    name = "variational"
    Config = VariationalConfig
    uncertainty_signal = "logit_variance"
    bench_variants = {"variational diag": ["router.covariance=diag"], "variational full": ["router.covariance=full"],
                      "variational diag, shared hidden": ["router.covariance=diag", "router.shared_hidden=true"],
                      "variational full, shared hidden": ["router.covariance=full", "router.shared_hidden=true"]}
    # Held to what it cannot go below on a CPU: its heads in training, torch's one-at-a-time normal
    # draws at evaluation (both measured; see docs/performance.md).
    bench_targets = {**Router.bench_targets, "layer train": "heads", "model train": "heads", "eval": "normals"}

    def __init__(self, d_model: int, n_experts: int, cfg: VariationalConfig):
        super().__init__(d_model, n_experts, cfg)
        self.full_covariance = cfg.covariance == "full"
        log_sigma_init = math.log(cfg.sigma_init)
        if self.full_covariance:
            rows, cols = torch.tril_indices(n_experts, n_experts)
            is_diag_P = rows == cols
            # The head's E(E+1)/2 outputs fill L row by row; the diagonal ones are log L_ii.
            self.register_buffer("tril_flat_P", rows * n_experts + cols, persistent=False)
            self.register_buffer("is_diag_P", is_diag_P, persistent=False)
            self.register_buffer("diag_positions_E", is_diag_P.nonzero().squeeze(-1), persistent=False)
            # L starts at sigma_init * I: diagonal bias log(sigma_init), strictly-lower bias 0.
            scale_outputs, scale_bias = len(rows), torch.where(is_diag_P, log_sigma_init, 0.0)
        else:
            scale_outputs, scale_bias = n_experts, log_sigma_init  # log sigma
        if cfg.shared_hidden:
            # One hidden layer, then each head's output layer (zero weights: the same start).
            hidden = max(1, round(d_model * cfg.head_hidden_ratio))
            self.shared_hidden_layer = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU())
            self.residual_head = _zero_output_layer(hidden, n_experts, 0.0)
            self.scale_head = _zero_output_layer(hidden, scale_outputs, scale_bias)
        else:
            self.residual_head = zero_init_head(d_model, cfg.head_hidden_ratio, n_experts, 0.0)  # dmu_phi
            self.scale_head = zero_init_head(d_model, cfg.head_hidden_ratio, scale_outputs, scale_bias)

    def posterior(self, u_TD: torch.Tensor) -> LogitPosterior:
        base_TE = self.gate(u_TD).float()
        residual_TE, raw = self.head_outputs(u_TD)
        if not self.full_covariance:
            return LogitPosterior(base_TE + residual_TE, residual_TE, raw)
        n_tokens, n_experts = base_TE.shape
        entries_TP = torch.where(self.is_diag_P, raw.exp(), raw)
        chol_TEE = raw.new_zeros(n_tokens, n_experts * n_experts).index_copy(1, self.tril_flat_P, entries_TP)
        return LogitPosterior(base_TE + residual_TE, residual_TE, raw[:, self.diag_positions_E],
                              chol_TEE.view(n_tokens, n_experts, n_experts), entries_TP)

    def head_outputs(self, u_TD: torch.Tensor) -> list[torch.Tensor]:
        """The residual and the scale head's raw outputs (fp32).

        The first layers of both heads read the same u: they run as one matmul over their
        concatenated weights (the same maths as two, one pass over u and a better-shaped product,
        forward and backward) and one GELU covers both hidden layers. The parameters stay where
        they are, so checkpoints are unchanged."""
        if self.cfg.shared_hidden:
            hidden_TH = self.shared_hidden_layer(u_TD)
            return [self.residual_head(hidden_TH).float(), self.scale_head(hidden_TH).float()]
        first = self._first_layers()
        if first is None:
            return [self.residual_head(u_TD).float(), self.scale_head(u_TD).float()]
        hidden_r, hidden_s = self.residual_head[1](F.linear(u_TD, *first)).split(
            [self.residual_head[0].out_features, self.scale_head[0].out_features], dim=1)
        return [self.residual_head[2](hidden_r).float(), self.scale_head[2](hidden_s).float()]

    def _first_layers(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """Both heads' first layers as one (weight, bias), or None where they cannot be fused (layers
        or activations that differ from the ones ``zero_init_head`` builds)."""
        (first_r, act_r), (first_s, act_s) = self.residual_head[:2], self.scale_head[:2]
        if not (type(first_r) is type(first_s) is nn.Linear and type(act_r) is type(act_s) is nn.GELU
                and act_r.approximate == act_s.approximate and first_r.bias is not None and first_s.bias is not None
                and first_r.weight.dtype == first_s.weight.dtype and first_r.weight.device == first_s.weight.device):
            return None
        return torch.cat([first_r.weight, first_s.weight]), torch.cat([first_r.bias, first_s.bias])

    def forward(self, u_TD: torch.Tensor) -> Routing:
        post = self.posterior(u_TD)
        sample_probs_STE = None
        if self.training:  # one reparameterised sample, differentiable
            scores_TE = self.scoring.scores(tempered(post.sample(1)[0], self.cfg.temperature))
        elif self.cfg.sigmoid_mean == "probit" and self.cfg.samples > 1:
            scores_TE = post.probit_mean_sigmoid(self.cfg.temperature)
        else:
            mean = post.mean_scores(self.cfg.samples, keep=self.keep_samples, temperature=self.cfg.temperature,
                                    scoring=self.scoring)
            scores_TE, sample_probs_STE = mean.mean_TE(), mean.samples_STE()
        ids_TK, gates_TK = self.select(scores_TE)
        probs_TE = self.scoring.distribution(scores_TE)
        trace_T = post.trace_T()
        kl = post.kl_T(trace_T).mean()
        trace_T = trace_T.detach()
        stats = {"kl": kl.detach(), "trace_sigma": trace_T.mean(),
                 "residual_norm": post.residual_TE.detach().norm(dim=-1).mean(),
                 "topk_overlap": self.overlap_with_topk(ids_TK, tempered(post.mean_TE, self.cfg.temperature))}
        aux = self.balance_terms(post.mean_TE, probs_TE, ids_TK) + self.cfg.beta * kl
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, aux, stats, sample_probs_STE, trace_T)

    def flops_per_token(self, samples: int) -> float:
        e = self.n_experts
        if self.full_covariance:
            # L eps with a lower-triangular L: E(E+1)/2 multiply-adds; exp of the diagonal; + mu.
            noise = e * (e + 1) + 2 * e
        else:
            noise = 2 * e  # mu + sigma * eps
        sigma = e  # sigma (or the diagonal of L) from its log
        if self.cfg.sigmoid_mean == "probit" and samples > 1:  # the marginal variance, the scaled mean and one sigmoid per expert
            marginal = (e * (e + 1) // 2 if self.full_covariance else 0) + 4 * e
            return linear_flops(self.gate) + self.head_flops_per_token() + sigma + marginal \
                + SOFTMAX_FLOPS_PER_CLASS * e + 2 * self.k
        per_sample = noise + SOFTMAX_FLOPS_PER_CLASS * e + e  # + the running average of the S softmaxes
        return linear_flops(self.gate) + self.head_flops_per_token() + sigma + samples * per_sample + 2 * self.k
