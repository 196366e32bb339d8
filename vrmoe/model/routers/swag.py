"""Weight-space baseline: SWAG (Maddox et al. 2019) over the router's gate weights."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ConfigError, ModelConfig
from ..flops import SOFTMAX_FLOPS_PER_CLASS, linear_flops
from .base import Router, Routing, ScoreMean, TemperedConfig, register_router, sample_chunks, tempered

# Maddox et al.'s SWAG draw: the diagonal and the low-rank halves each carry half the covariance.
HALF_SQRT = math.sqrt(0.5)
#: Per sample and expert, the sampled logit variance's running sums: the square, and two additions.
VARIANCE_FLOPS_PER_SAMPLE = 3
#: Per expert, once per token: the squared sum over S, its subtraction, the sum over experts.
VARIANCE_FLOPS_PER_TOKEN = 3


@dataclass
class SWAGConfig(TemperedConfig):
    name: str = "swag"
    # Training steps (training forwards of the router) before the first iterate is collected: the
    # warm-up that lets the gate leave its start before SWAG measures where it wanders.
    swag_start: int = 50
    # After the warm-up, every swag_every-th step's gate weights are collected.
    swag_every: int = 1
    # K: the last K deviations W_i - mean_i kept as the low-rank part of the covariance.
    swag_rank: int = 20

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if self.swag_start < 0:
            raise ConfigError(f"router.swag_start={self.swag_start} must be >= 0 (training steps before collecting)")
        if self.swag_every < 1:
            raise ConfigError(f"router.swag_every={self.swag_every} must be >= 1 (collect every N-th step)")
        if self.swag_rank < 2:
            raise ConfigError(f"router.swag_rank={self.swag_rank} must be >= 2 (the low-rank covariance "
                              "D D^T / (K - 1) needs two deviations)")

    def samples_at_eval(self) -> bool:
        return True


@register_router
class SWAGRouter(Router):
    """SWAG over the gate weights: the SGD iterates' mean, diagonal variance and last K
    deviations; evaluation averages the softmaxes of S sampled gates before Top-K.

    Training is deterministic Top-K on the gate, and the gate trains (post hoc too:
    ``train.freeze=backbone`` leaves the gate of the layers with this router trainable, see
    :meth:`posthoc_trained_parameters`). Each training forward counts one step; from step
    ``swag_start`` on, every ``swag_every``-th records the gate weights ``W_i`` as they are at that
    step (the iterate the step starts from) into buffers: the running mean, the running second
    moment and a ring of the last K deviations ``W_i - mean_i`` (mean after ``W_i``). The buffers
    are trained state: checkpoints store them, a resume continues the collection, ``vrmoe eval``
    reloads them.

    Evaluation draws S gates ``W_s = mean + diag(sigma) z1 / sqrt 2 + D z2 / sqrt(2 (K' - 1))``,
    ``sigma^2 = max(second - mean^2, 0)``, K' the deviations held (at most K), and routes on the
    mean of the S softmaxes (or sigmoids) of ``u W_s^T`` (accumulated in chunks, :class:`ScoreMean`),
    selecting on it as every router does (:meth:`Router.select`). S multiplies router work only. The logits are the mean
    gate's once, plus each sample's ``u N_s^T`` for its noise ``N_s = W_s - mean`` (under bf16
    the noise, small beside the weights, keeps its precision). Before any iterate, or with zero
    variance, evaluation is exactly Top-K on the gate (on the mean, which zero variance makes
    every iterate). A gate bias (a pretrained family's) stays as loaded: SWAG is over the weights.

    ``uncertainty_T``: per token, the sum over experts of the S sampled logits' variance
    (unbiased; 0 when S = 1 or before any iterate).
    """

    name = "swag"
    Config = SWAGConfig
    uncertainty_signal = "sampled_logit_variance"

    def __init__(self, d_model: int, n_experts: int, cfg: SWAGConfig):
        super().__init__(d_model, n_experts, cfg)
        # Persistent buffers: the state_dict (checkpoints, post-hoc checkpoints, vrmoe eval) carries them.
        self.register_buffer("swag_steps", torch.zeros((), dtype=torch.long))  # training forwards seen
        self.register_buffer("swag_collected", torch.zeros((), dtype=torch.long))  # iterates recorded
        self.register_buffer("swag_mean_ED", torch.zeros(n_experts, d_model))
        self.register_buffer("swag_second_ED", torch.zeros(n_experts, d_model))
        # Slot (i - 1) mod K holds iterate i's deviation; slots not yet written are zeros.
        self.register_buffer("swag_deviations_RED", torch.zeros(cfg.swag_rank, n_experts, d_model))

    def posthoc_trained_parameters(self) -> list[nn.Parameter]:
        return [self.gate.weight]

    # -- collection -----------------------------------------------------------------------

    @torch.no_grad()
    def collect(self) -> None:
        """One training step: count it, and record the gate's weights if the schedule says so.

        Branch-free on device tensors (a step gets no host sync, a compiled step one graph): a step
        that is not collected adds exact zeros. The updates ``m += (W - m) / n`` keep an unchanged
        iterate exactly where it was, so identical iterates give exactly zero variance."""
        cfg = self.cfg
        step = self.swag_steps
        due = (step >= cfg.swag_start) & ((step - cfg.swag_start).remainder(cfg.swag_every) == 0)
        n = self.swag_collected + due.long()
        rate = due.float() / n.clamp_min(1).float()  # 1/n when collected, else 0
        w_ED = self.gate.weight.detach().float()
        self.swag_mean_ED.add_((w_ED - self.swag_mean_ED) * rate)
        self.swag_second_ED.add_((w_ED * w_ED - self.swag_second_ED) * rate)
        slot = (n - 1).clamp_min(0).remainder(cfg.swag_rank).view(1)
        kept_1ED = self.swag_deviations_RED.index_select(0, slot)
        self.swag_deviations_RED.index_copy_(0, slot, torch.where(due, (w_ED - self.swag_mean_ED).unsqueeze(0),
                                                                  kept_1ED))
        self.swag_collected.copy_(n)
        self.swag_steps.add_(1)

    def sigma_ED(self) -> torch.Tensor:
        """The diagonal standard deviation: ``sqrt(max(second - mean^2, 0))``. The floor at 0 only
        removes round-off below it; nothing divides by sigma and no gradient passes the root."""
        return (self.swag_second_ED - self.swag_mean_ED.square()).clamp_min_(0.0).sqrt_()

    def deviations_held(self) -> int:
        """K': the deviations held (host read)."""
        return min(int(self.swag_collected), self.cfg.swag_rank)

    def deviation_scale(self) -> float:
        """``1 / sqrt(2 (K' - 1))``, K' - 1 at least 1: with one deviation held it is zero anyway
        (the first iterate is the mean)."""
        return HALF_SQRT / math.sqrt(max(self.deviations_held() - 1, 1))

    def weight_noise(self, n_samples: int, sigma_ED: torch.Tensor | None = None,
                     deviation_scale: float | None = None) -> torch.Tensor:
        """``N_s = W_s - mean`` for S draws, (S, E, D) in fp32, from torch's global generator:
        ``diag(sigma) z1 / sqrt 2 + D z2 / sqrt(2 (K' - 1))``."""
        sigma_ED = self.sigma_ED() if sigma_ED is None else sigma_ED
        deviation_scale = self.deviation_scale() if deviation_scale is None else deviation_scale
        rank, n_experts, d_model = self.swag_deviations_RED.shape
        z1_SED = torch.randn(n_samples, n_experts, d_model, device=sigma_ED.device)
        z2_SR = torch.randn(n_samples, rank, device=sigma_ED.device)
        low_rank_SED = (z2_SR @ self.swag_deviations_RED.view(rank, -1)).view(n_samples, n_experts, d_model)
        return z1_SED.mul_(sigma_ED * HALF_SQRT).add_(low_rank_SED, alpha=deviation_scale)

    # -- routing --------------------------------------------------------------------------

    def forward(self, u_TD: torch.Tensor) -> Routing:
        if self.training:
            self.collect()
            return self._topk(u_TD, self.gate.weight, {"swag_collected": self.swag_collected.detach().float()})
        if int(self.swag_collected) == 0:  # nothing collected: Top-K on the gate
            return self._topk(u_TD, self.gate.weight, {"topk_overlap": u_TD.new_ones((), dtype=torch.float32)})
        sigma_ED = self.sigma_ED()
        mean_ED = self.swag_mean_ED.to(self.gate.weight.dtype)
        if not (bool(sigma_ED.any()) or bool(self.swag_deviations_RED.any())):  # a point mass at the mean
            return self._topk(u_TD, mean_ED, {"topk_overlap": u_TD.new_ones((), dtype=torch.float32)})
        return self._sampled(u_TD, mean_ED, sigma_ED)

    def _topk(self, u_TD: torch.Tensor, weight_ED: torch.Tensor, stats: dict[str, torch.Tensor]) -> Routing:
        """Deterministic Top-K on ``u W^T`` (+ the gate's bias): TopKRouter's computation."""
        logits_TE = F.linear(u_TD, weight_ED, self.gate.bias).float()
        scores_TE = self.scoring.scores(logits_TE)
        ids_TK, gates_TK = self.select(scores_TE)
        probs_TE = self.scoring.distribution(scores_TE)
        uncertainty_T = None if self.training else logits_TE.new_zeros(logits_TE.shape[0])
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, self.balance_terms(logits_TE, probs_TE, ids_TK),
                       stats, uncertainty_T=uncertainty_T)

    def _sampled(self, u_TD: torch.Tensor, mean_ED: torch.Tensor, sigma_ED: torch.Tensor) -> Routing:
        n_samples, (n_tokens, d_model) = self.cfg.samples, u_TD.shape
        base_TE = F.linear(u_TD, mean_ED, self.gate.bias).float()
        base_ET, u_DT = base_TE.T, u_TD.T
        acc = ScoreMean(n_samples, keep=self.keep_samples, temperature=self.cfg.temperature, scoring=self.scoring)
        noise_sum_ET = noise_square_sum_ET = None
        deviation_scale = self.deviation_scale()
        for size in sample_chunks(n_samples, self.n_experts * (n_tokens + d_model)):
            noise_CED = self.weight_noise(size, sigma_ED, deviation_scale)
            noise_CET = torch.matmul(noise_CED.to(u_TD.dtype), u_DT).float()
            # The variance from the noise logits alone (mean zero): no cancellation against the mean's.
            if noise_sum_ET is None:
                noise_sum_ET, noise_square_sum_ET = noise_CET.sum(0), noise_CET.square().sum(0)
            else:
                noise_sum_ET = noise_sum_ET + noise_CET.sum(0)
                noise_square_sum_ET = noise_square_sum_ET + noise_CET.square().sum(0)
            acc.add_samples(noise_CET + base_ET)
        scores_TE = acc.mean_TE()
        ids_TK, gates_TK = self.select(scores_TE)
        probs_TE = self.scoring.distribution(scores_TE)
        if n_samples > 1:
            spread_ET = noise_square_sum_ET - noise_sum_ET.square() / n_samples
            variance_T = (spread_ET.sum(0) / (n_samples - 1)).detach().clamp_min(0.0)
        else:
            variance_T = base_TE.new_zeros(n_tokens)
        overlap = self.overlap_with_topk(ids_TK, tempered(base_TE, self.cfg.temperature))
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, self.balance_terms(base_TE, probs_TE, ids_TK),
                       {"topk_overlap": overlap}, acc.samples_STE(), variance_T)

    def flops_per_token(self, samples: int) -> float:
        """Per token: the mean gate's logits once (the gate's matmul), and per sample the noise
        logits ``u N_s^T`` (one more E x D matmul), adding the mean's, the softmax, the running
        average and the variance's running sums; then the variance and the K gates'
        renormalisation. Drawing the S gates ``W_s`` (about ``S (2 K + 3) E D`` FLOPs) happens once
        per batch, not per token: it is not counted here (over a batch of T tokens it adds
        ``S (2 K + 3) E D / T`` per token)."""
        e, d = self.n_experts, self.gate.in_features
        per_sample = 2 * e * d + e + SOFTMAX_FLOPS_PER_CLASS * e + e + VARIANCE_FLOPS_PER_SAMPLE * e
        return linear_flops(self.gate) + samples * per_sample + VARIANCE_FLOPS_PER_TOKEN * e + 2 * self.k
