"""Statistics of a calibration / OOD study: temperature scaling and paired bootstrap intervals.

Every interval is a basic (reverse-percentile) bootstrap over *items*: ``[2 t - q_hi, 2 t - q_lo]``
for the estimate ``t`` and the resampled statistic's quantiles ``q``. Unlike the percentile
interval ``[q_lo, q_hi]`` it is not displaced by the statistic's resampling bias: ECE is biased
upwards on resamples (duplicated items sharpen the bins), more so the better calibrated a model is,
so percentile intervals of ECE and of ECE differences sit beside their estimates rather than
around them. A resample draws N item indices
with replacement and the same draw is applied to every seed of a model and to both
models of a comparison: item difficulty then cancels in a difference (pairing) and the
seeds are pooled (the statistic is the mean over seeds, so an ensemble row with S=1 can
be compared with a per-seed row with S=5). Detection resamples in-distribution and OOD
items separately (stratified), so every resample has both classes.

The single-set definitions are those of :mod:`vrmoe.metrics`; the batched versions here
agree with them to rounding on the un-resampled data. Every metric used is linear in the
multiplicities of the items, so a chunk of resamples is one ``counts_RN @ terms_NK``.
"""

from __future__ import annotations

import math
import re
from dataclasses import asdict, dataclass

import torch

from . import metrics

METRICS = ("ece_10", "ece_15", "nll", "accuracy", "brier")
N_RESAMPLES = 2000
# The temperature search interval: wide enough for logits and for summed log-likelihoods.
T_MIN, T_MAX = 1e-2, 1e3
# Resamples are drawn and evaluated this many (resample, item) cells at a time (32 MiB in float64).
_CHUNK_CELLS = 1 << 22


# --------------------------------------------------------------------------- temperature


def _nll_slope(a: float, z_NC: torch.Tensor, z_true_N: torch.Tensor) -> float:
    """d/da of the mean NLL of ``softmax(a z)``: ``E_p[z] - z_true``, nondecreasing in a (convexity)."""
    p_NC = torch.softmax(a * z_NC, -1)
    return float(((p_NC * z_NC).sum(-1) - z_true_N).mean())


def fit_temperature(scores_NC: torch.Tensor, labels_N: torch.Tensor) -> float:
    """The T in ``[T_MIN, T_MAX]`` minimising the mean NLL of ``softmax(scores / T)``.

    The NLL is convex in ``a = 1/T``, so the sign of its slope brackets the minimum and a
    bisection on ``log a`` finds it without step-size tuning, deterministically. A minimum
    beyond the bounds returns the bound: all items right by huge margins keep lowering the
    NLL as T -> 0 (T_MIN), all wrong keep lowering it as T -> inf (T_MAX). An NLL that does
    not depend on T at all (constant scores) returns 1, i.e. no rescaling.
    """
    z_NC = scores_NC.double()
    if z_NC.dim() != 2 or labels_N.shape != z_NC.shape[:1]:
        raise ValueError(f"scores {tuple(scores_NC.shape)} and labels {tuple(labels_N.shape)} must be (N, C) and (N,)")
    if not bool(torch.isfinite(z_NC).all()):
        raise ValueError("fit_temperature needs finite scores")
    # Shifting a row changes neither the softmax nor the slope, and keeps E_p[z] accurate
    # for log-likelihoods of large magnitude.
    z_NC = z_NC - z_NC.max(-1, keepdim=True).values
    z_true_N = z_NC.gather(-1, labels_N.long()[:, None]).squeeze(-1)
    lo, hi = math.log(1 / T_MAX), math.log(1 / T_MIN)
    slope_lo, slope_hi = _nll_slope(math.exp(lo), z_NC, z_true_N), _nll_slope(math.exp(hi), z_NC, z_true_N)
    if slope_lo == 0 and slope_hi == 0:
        return 1.0
    if slope_lo >= 0:
        return T_MAX
    if slope_hi <= 0:
        return T_MIN
    while True:
        mid = 0.5 * (lo + hi)
        if mid in (lo, hi):  # the bracket is down to adjacent floats
            break
        slope = _nll_slope(math.exp(mid), z_NC, z_true_N)
        if slope > 0:
            hi = mid
        elif slope < 0:
            lo = mid
        else:
            lo = hi = mid
            break
    return math.exp(-0.5 * (lo + hi))


def apply_temperature(scores_NC: torch.Tensor, T: float) -> torch.Tensor:
    """``softmax(scores / T)`` over the last dimension, in float64."""
    if not T > 0:
        raise ValueError(f"temperature {T} must be > 0")
    return torch.softmax(scores_NC.double() / T, -1)


# --------------------------------------------------------------------------- batched metrics


def _as_SNC(probs: torch.Tensor) -> torch.Tensor:
    if probs.dim() == 2:
        return probs[None]
    if probs.dim() != 3:
        raise ValueError(f"probabilities must be (S, N, C) or (N, C), got {tuple(probs.shape)}")
    return probs


def _as_SN(scores: torch.Tensor) -> torch.Tensor:
    if scores.dim() == 1:
        scores = scores[None]
    if scores.dim() != 2:
        raise ValueError(f"scores must be (S, N) or (N,), got {tuple(scores.shape)}")
    if bool(torch.isnan(scores).any()):
        raise ValueError("detection scores contain NaN")
    return scores.double()


def _ece_bins(name: str) -> int | None:
    match = re.fullmatch(r"ece_(\d+)", name)
    return int(match.group(1)) if match else None


def _counts(idx_RN: torch.Tensor, n_items: int) -> torch.Tensor:
    """Multiplicity of each item in each resample, ``(R, n_items)`` float64."""
    counts_RN = torch.zeros(idx_RN.shape[0], n_items, dtype=torch.float64)
    return counts_RN.scatter_add_(1, idx_RN.long(), torch.ones(idx_RN.shape, dtype=torch.float64))


class _ItemSums:
    """A metric written as per-item terms whose count-weighted sums give the (R, S) values."""

    def __init__(self, name: str, probs_SNC: torch.Tensor, labels_N: torch.Tensor):
        probs_SNC = _as_SNC(probs_SNC)
        S, N, C = probs_SNC.shape
        if labels_N.shape != (N,):
            raise ValueError(f"labels {tuple(labels_N.shape)} do not match probabilities {tuple(probs_SNC.shape)}")
        labels_N = labels_N.long()
        p_SNC = probs_SNC.double()
        self.n_seeds, self.n_items, self.n_bins = S, N, _ece_bins(name)
        if self.n_bins is not None:
            # Confidence, correctness and bin edges exactly as metrics.calibration_report and
            # metrics.reliability_bins: bin b holds (b/B, (b+1)/B], a confidence of 0 bin 0.
            conf_SN, predicted_SN = p_SNC.max(-1)
            gap_SN = (predicted_SN == labels_N).double() - conf_SN
            bin_SN = (torch.ceil(conf_SN * self.n_bins).long() - 1).clamp(0, self.n_bins - 1)
            # n_b |acc_b - conf_b| = |sum over the bin of (correct - conf)|: one column per (seed, bin).
            terms_NSB = torch.zeros(N, S, self.n_bins, dtype=torch.float64)
            terms_NSB.scatter_(-1, bin_SN.T[..., None], gap_SN.T[..., None])
            self.terms_NK = terms_NSB.reshape(N, S * self.n_bins)
            return
        if name == "nll":
            p_true_SN = p_SNC.gather(-1, labels_N.expand(S, N)[..., None]).squeeze(-1)
            terms_SN = -p_true_SN.clamp_min(torch.finfo(torch.float64).tiny).log()
        elif name == "accuracy":
            terms_SN = (probs_SNC.argmax(-1) == labels_N).double()
        elif name == "brier":
            onehot_NC = torch.nn.functional.one_hot(labels_N, C).double()
            terms_SN = (p_SNC - onehot_NC).square().sum(-1)
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)} (or ece_<bins>)")
        self.terms_NK = terms_SN.T.contiguous()

    def __call__(self, counts_RN: torch.Tensor) -> torch.Tensor:
        # Every resample holds N items, so N is the denominator of each mean and of the ECE.
        sums_RK = counts_RN @ self.terms_NK
        if self.n_bins is not None:
            return sums_RK.view(-1, self.n_seeds, self.n_bins).abs().sum(-1) / self.n_items
        return sums_RK / self.n_items


class _Ranks:
    """Mann-Whitney AUROC (OOD positive, a tie counts 1/2) of count-weighted resamples.

    Sorting the in-distribution scores once fixes, for each OOD score, how many sorted
    in-scores lie strictly below it and how many at or below it; a resample's weighted
    counts are then a cumulative sum of its in-counts read at those two positions.
    """

    def __init__(self, in_SN: torch.Tensor, ood_SM: torch.Tensor):
        in_SN, ood_SM = _as_SN(in_SN), _as_SN(ood_SM)
        if in_SN.shape[0] != ood_SM.shape[0]:
            raise ValueError(f"{in_SN.shape[0]} in-distribution seeds but {ood_SM.shape[0]} OOD seeds")
        self.n_seeds, self.n_in = in_SN.shape
        self.n_ood = ood_SM.shape[1]
        sorted_SN, self.order_SN = torch.sort(in_SN, dim=-1, stable=True)
        # Positions in the cumulative sum (which starts with a 0): strictly below, then at or below.
        self.bounds_S2M = torch.stack([torch.searchsorted(sorted_SN, ood_SM.contiguous(), right=False),
                                       torch.searchsorted(sorted_SN, ood_SM.contiguous(), right=True)], 1)

    def __call__(self, counts_in_RN: torch.Tensor, counts_ood_RM: torch.Tensor) -> torch.Tensor:
        R = counts_in_RN.shape[0]
        out_RS = torch.empty(R, self.n_seeds, dtype=torch.float64)
        zeros_R1 = counts_in_RN.new_zeros(R, 1)
        for s in range(self.n_seeds):  # per seed, so memory stays (R, N)
            cum_RN = torch.cat([zeros_R1, counts_in_RN.index_select(1, self.order_SN[s]).cumsum(1)], 1)
            # below + equal/2 = (below + upto) / 2; integer-valued sums, so exact in float64.
            below_upto_R2M = cum_RN.index_select(1, self.bounds_S2M[s].reshape(-1)).view(R, 2, self.n_ood)
            out_RS[:, s] = (counts_ood_RM * below_upto_R2M.sum(1)).sum(1) / (2.0 * self.n_in * self.n_ood)
        return out_RS


def resampled_metric(name: str, probs_SNC: torch.Tensor, labels_N: torch.Tensor,
                     idx_RN: torch.Tensor) -> torch.Tensor:
    """``name`` (see METRICS, or ece_<bins>) of each seed on each resample ``probs[:, idx_RN[r]]``: (R, S)."""
    terms = _ItemSums(name, probs_SNC, labels_N)
    chunk = _chunk_size(terms.n_items)
    return torch.cat([terms(_counts(idx_RN[i:i + chunk], terms.n_items))
                      for i in range(0, idx_RN.shape[0], chunk)])


def resampled_auroc(in_SN: torch.Tensor, ood_SM: torch.Tensor, idx_in_RN: torch.Tensor,
                    idx_ood_RM: torch.Tensor) -> torch.Tensor:
    """AUROC (higher score = more OOD) of each seed on each stratified resample: (R, S)."""
    ranks = _Ranks(in_SN, ood_SM)
    if idx_in_RN.shape[0] != idx_ood_RM.shape[0]:
        raise ValueError("idx_in_RN and idx_ood_RM must hold the same number of resamples")
    chunk = _chunk_size(max(ranks.n_in, ranks.n_ood))
    return torch.cat([ranks(_counts(idx_in_RN[i:i + chunk], ranks.n_in), _counts(idx_ood_RM[i:i + chunk], ranks.n_ood))
                      for i in range(0, idx_in_RN.shape[0], chunk)])


# --------------------------------------------------------------------------- intervals


@dataclass(frozen=True)
class Interval:
    """A basic bootstrap interval. ``estimate`` is the statistic on the full data, not the
    bootstrap mean (which carries the resampling bias of e.g. ECE)."""

    estimate: float
    low: float
    high: float
    level: float
    n_resamples: int

    @property
    def excludes_zero(self) -> bool:
        return self.low > 0 or self.high < 0

    def as_dict(self) -> dict:
        return {**asdict(self), "excludes_zero": self.excludes_zero}


def _chunk_size(n_items: int) -> int:
    # Depends on the item count only, so a single and a paired interval with the same
    # seed and N draw the same resamples.
    return max(1, _CHUNK_CELLS // max(1, n_items))


def seed_mean_metric(name: str, probs_SNC: torch.Tensor, labels_N: torch.Tensor) -> float:
    """``name`` on the full data by :mod:`vrmoe.metrics` itself, averaged over seeds.

    The estimates come from here rather than from the batched path so that they are the
    very numbers metrics.calibration_report prints for the same predictions.
    """
    values = []
    for probs_NC in _as_SNC(probs_SNC):
        n_bins = _ece_bins(name)
        if n_bins is not None:
            confidence_N, predicted_N = probs_NC.double().max(-1)
            values.append(metrics.expected_calibration_error(confidence_N, predicted_N == labels_N, n_bins))
        elif name in ("nll", "accuracy", "brier"):
            values.append(getattr(metrics, name)(probs_NC, labels_N.long()))
        else:
            raise ValueError(f"unknown metric {name!r}; known: {', '.join(METRICS)} (or ece_<bins>)")
    return sum(values) / len(values)


def seed_mean_auroc(in_SN: torch.Tensor, ood_SM: torch.Tensor) -> float:
    """AUROC on the full data by :func:`vrmoe.metrics.auroc`, averaged over seeds."""
    in_SN, ood_SM = _as_SN(in_SN), _as_SN(ood_SM)
    values = [metrics.ood_auroc(in_N, ood_M) for in_N, ood_M in zip(in_SN, ood_SM)]
    return sum(values) / len(values)


def _check(n_resamples: int, level: float) -> None:
    if n_resamples < 1:
        raise ValueError(f"n_resamples={n_resamples} must be >= 1")
    if not 0 < level < 1:
        raise ValueError(f"level={level} must be in (0, 1)")


def _interval(estimate: float, stats_R: torch.Tensor, level: float) -> Interval:
    q = torch.tensor([(1 - level) / 2, (1 + level) / 2], dtype=torch.float64)
    q_low, q_high = torch.quantile(stats_R, q).tolist()  # linear interpolation, as numpy's default
    # The basic interval: the resampled statistic's spread about the estimate, reflected through it.
    return Interval(float(estimate), 2 * estimate - q_high, 2 * estimate - q_low, level, int(stats_R.numel()))


def _bootstrap_items(statistic, estimate: float, n_items: int, n_resamples: int, seed: int,
                     level: float) -> Interval:
    """The interval of ``statistic(counts_RN) -> (R,)`` over n_resamples item resamples."""
    _check(n_resamples, level)
    gen = torch.Generator().manual_seed(seed)
    chunk, stats = _chunk_size(n_items), []
    for start in range(0, n_resamples, chunk):
        idx_RN = torch.randint(0, n_items, (min(chunk, n_resamples - start), n_items), generator=gen)
        stats.append(statistic(_counts(idx_RN, n_items)))
    return _interval(estimate, torch.cat(stats), level)


def _bootstrap_stratified(statistic, estimate: float, n_in: int, n_ood: int, n_resamples: int, seed: int,
                          level: float) -> Interval:
    """The interval of ``statistic(counts_in_RN, counts_ood_RM) -> (R,)``, in and OOD items resampled separately."""
    _check(n_resamples, level)
    gen = torch.Generator().manual_seed(seed)
    chunk, stats = _chunk_size(max(n_in, n_ood)), []
    for start in range(0, n_resamples, chunk):
        R = min(chunk, n_resamples - start)
        idx_in_RN = torch.randint(0, n_in, (R, n_in), generator=gen)
        idx_ood_RM = torch.randint(0, n_ood, (R, n_ood), generator=gen)
        stats.append(statistic(_counts(idx_in_RN, n_in), _counts(idx_ood_RM, n_ood)))
    return _interval(estimate, torch.cat(stats), level)


def single_interval(metric: str, probs_SNC: torch.Tensor, labels_N: torch.Tensor, n_resamples: int = N_RESAMPLES,
                    seed: int = 0, level: float = 0.95) -> Interval:
    """Interval of one model's ``metric`` (mean over its seeds); ``probs`` may be (N, C) for S=1."""
    terms = _ItemSums(metric, probs_SNC, labels_N)
    estimate = seed_mean_metric(metric, probs_SNC, labels_N)
    return _bootstrap_items(lambda counts_RN: terms(counts_RN).mean(1), estimate, terms.n_items, n_resamples, seed,
                            level)


def paired_difference(metric: str, probs_a_SNC: torch.Tensor, probs_b_SNC: torch.Tensor, labels_N: torch.Tensor,
                      n_resamples: int = N_RESAMPLES, seed: int = 0, level: float = 0.95) -> Interval:
    """Interval of ``mean_s metric(a_s) - mean_s metric(b_s)`` on the same labelled items.

    ``a`` and ``b`` may have different seed counts; each resample is applied to all of them.
    """
    a = _ItemSums(metric, probs_a_SNC, labels_N)
    b = _ItemSums(metric, probs_b_SNC, labels_N)
    if _as_SNC(probs_a_SNC).shape[1:] != _as_SNC(probs_b_SNC).shape[1:]:
        raise ValueError(f"a {tuple(probs_a_SNC.shape)} and b {tuple(probs_b_SNC.shape)} differ beyond the seed count")
    estimate = seed_mean_metric(metric, probs_a_SNC, labels_N) - seed_mean_metric(metric, probs_b_SNC, labels_N)
    return _bootstrap_items(lambda counts_RN: a(counts_RN).mean(1) - b(counts_RN).mean(1), estimate, a.n_items,
                            n_resamples, seed, level)


def single_auroc_interval(in_SN: torch.Tensor, ood_SM: torch.Tensor, n_resamples: int = N_RESAMPLES, seed: int = 0,
                          level: float = 0.95) -> Interval:
    """Interval of one detector's AUROC (mean over its seeds; higher score = more OOD)."""
    ranks = _Ranks(in_SN, ood_SM)
    return _bootstrap_stratified(lambda c_in, c_ood: ranks(c_in, c_ood).mean(1), seed_mean_auroc(in_SN, ood_SM),
                                 ranks.n_in, ranks.n_ood, n_resamples, seed, level)


def paired_auroc_difference(in_a_SN: torch.Tensor, ood_a_SM: torch.Tensor, in_b_SN: torch.Tensor,
                            ood_b_SM: torch.Tensor, n_resamples: int = N_RESAMPLES, seed: int = 0,
                            level: float = 0.95) -> Interval:
    """Interval of ``mean_s AUROC(a_s) - mean_s AUROC(b_s)`` on the same in and OOD items."""
    a, b = _Ranks(in_a_SN, ood_a_SM), _Ranks(in_b_SN, ood_b_SM)
    if (a.n_in, a.n_ood) != (b.n_in, b.n_ood):
        raise ValueError(f"a scores {a.n_in} in / {a.n_ood} OOD items, b {b.n_in} / {b.n_ood}")
    estimate = seed_mean_auroc(in_a_SN, ood_a_SM) - seed_mean_auroc(in_b_SN, ood_b_SM)
    return _bootstrap_stratified(lambda c_in, c_ood: a(c_in, c_ood).mean(1) - b(c_in, c_ood).mean(1), estimate,
                                 a.n_in, a.n_ood, n_resamples, seed, level)


__all__ = ["METRICS", "N_RESAMPLES", "T_MIN", "T_MAX", "fit_temperature", "apply_temperature", "resampled_metric",
           "resampled_auroc", "seed_mean_metric", "seed_mean_auroc", "Interval", "single_interval", "paired_difference", "single_auroc_interval",
           "paired_auroc_difference"]
