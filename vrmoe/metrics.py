"""Uncertainty metrics as pure functions on tensors.

Conventions: ``probs_NC`` holds N predictive distributions over C classes,
``labels_N`` the true class indices; scores for detection are "higher means
more likely out-of-distribution", with in-distribution labelled 0 and OOD 1.
Everything is computed in float64 so that the reference implementations in
scikit-learn agree to rounding.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

# The paper reports ECE with 10 equal-width bins; 15 is the other common choice.
ECE_BINS = (10, 15)
RELIABILITY_BINS = 10
#: Values (rows x classes) per slice of ``brier``: about 32 MB of float64.
BRIER_SLICE_VALUES = 1 << 22


def entropy(probs: torch.Tensor, dim: int = -1) -> torch.Tensor:
    """Shannon entropy in nats along ``dim`` (0 log 0 = 0)."""
    p = probs.double()
    return -torch.special.xlogy(p, p).sum(dim)


def mutual_information(sample_probs_S: torch.Tensor) -> torch.Tensor:
    """BALD: ``H[mean_s p_s] - mean_s H[p_s]`` over the leading (sample) dimension.

    Written as ``mean_s KL(p_s || p_bar)`` (the same quantity) with the mean
    taken as an offset from the first sample, ``p_bar = p_0 + mean_s (p_s - p_0)``:
    when every sample is bitwise identical (a deterministic router) the offsets
    are exactly zero, so the result is exactly 0 rather than rounding noise.
    Its float64 temporaries are several times the input: for S samples of a
    vocabulary-sized distribution, :class:`RunningPredictive` takes one at a time.
    """
    p = sample_probs_S.double()
    p_bar = p[0] + (p - p[0]).mean(0)
    log_ratio = torch.where(p > 0, p.clamp_min(1e-300).log() - p_bar.clamp_min(1e-300).log(), torch.zeros_like(p))
    return (p * log_ratio).sum(-1).mean(0).clamp_min(0.0)


class RunningPredictive:
    """The mean of S predictive distributions and their mutual information, fed one sample at a
    time: what next-token probabilities need, where S samples of a batch over a pretrained
    model's vocabulary (S x batch x tokens x 150k) would not fit in memory together.

    Holds the first sample and the running sum of the others' offsets from it (float64, so at
    most about four float64 copies of one sample are alive at once), so bitwise identical
    samples give exactly the first sample as the mean and exactly 0 as the mutual information,
    as :func:`mutual_information` does. Otherwise the two agree to float64 rounding of
    ``H[mean_s p_s] - mean_s H[p_s]``: about 1e-15 nats absolute, so a mutual information
    below about 1e-12 (a router that barely samples) is mostly that rounding.
    """

    def __init__(self) -> None:
        self.count = 0

    def add(self, probs: torch.Tensor) -> None:
        p = probs.to(torch.float64, copy=True)  # a copy: it is changed in place below
        h = entropy(p)
        if self.count == 0:
            self.first, self.first_entropy = p, h
            self.offset, self.entropy_offset = torch.zeros_like(p), torch.zeros_like(h)
        else:
            self.offset += p.sub_(self.first)
            self.entropy_offset += h - self.first_entropy
        self.count += 1

    def mean(self) -> torch.Tensor:
        """``mean_s p_s`` (float64)."""
        return self.first + self.offset / self.count

    def mutual_information(self, mean: torch.Tensor | None = None) -> torch.Tensor:
        """``H[mean_s p_s] - mean_s H[p_s]``, at least 0; ``mean`` is :meth:`mean`'s, when the
        caller has it already."""
        mean_entropy = self.first_entropy + self.entropy_offset / self.count
        return (entropy(self.mean() if mean is None else mean) - mean_entropy).clamp_min(0.0)


def accuracy(probs_NC: torch.Tensor, labels_N: torch.Tensor) -> float:
    return float((probs_NC.argmax(-1) == labels_N).double().mean())


def nll(probs_NC: torch.Tensor, labels_N: torch.Tensor) -> float:
    """Mean negative log-likelihood of the true class (nats)."""
    p_true = probs_NC.gather(-1, labels_N[:, None]).squeeze(-1).double()
    return float(-p_true.clamp_min(torch.finfo(torch.float64).tiny).log().mean())


def brier(probs_NC: torch.Tensor, labels_N: torch.Tensor) -> float:
    """Multi-class Brier score ``mean_n sum_c (p_nc - y_nc)^2`` (in [0, 2]), a slice of rows at a
    time: a next-token set's float64 temporaries (tokens x a pretrained model's vocabulary) would
    be several times its probabilities."""
    step = max(1, BRIER_SLICE_VALUES // max(1, probs_NC.shape[-1]))
    per_row = [_brier_rows(probs_NC[i:i + step], labels_N[i:i + step]) for i in range(0, labels_N.numel(), step)]
    return float(torch.cat(per_row).mean() if per_row else torch.tensor(float("nan")))


def _brier_rows(probs_NC: torch.Tensor, labels_N: torch.Tensor) -> torch.Tensor:
    p = probs_NC.double()
    onehot = torch.nn.functional.one_hot(labels_N, p.shape[-1]).double()
    return (p - onehot).square().sum(-1)


@dataclass
class ReliabilityBins:
    """Equal-width confidence bins over [0, 1]; empty bins hold NaN confidence/accuracy."""

    bin_confidence: torch.Tensor
    bin_accuracy: torch.Tensor
    bin_count: torch.Tensor

    def as_dict(self) -> dict[str, list]:
        return {"bin_confidence": self.bin_confidence.tolist(), "bin_accuracy": self.bin_accuracy.tolist(),
                "bin_count": [int(c) for c in self.bin_count.tolist()]}


def reliability_bins(confidence_N: torch.Tensor, correct_N: torch.Tensor, n_bins: int) -> ReliabilityBins:
    """Bin b holds confidences in ``(b/n, (b+1)/n]``; a confidence of exactly 0 falls in bin 0."""
    conf = confidence_N.double().reshape(-1)
    correct = correct_N.double().reshape(-1)
    index = (torch.ceil(conf * n_bins).long() - 1).clamp(0, n_bins - 1)
    count = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, torch.ones_like(conf))
    conf_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, conf)
    correct_sum = torch.zeros(n_bins, dtype=torch.float64).index_add_(0, index, correct)
    nan = torch.full_like(count, float("nan"))
    return ReliabilityBins(torch.where(count > 0, conf_sum / count.clamp_min(1), nan),
                           torch.where(count > 0, correct_sum / count.clamp_min(1), nan), count.long())


def expected_calibration_error(confidence_N: torch.Tensor, correct_N: torch.Tensor, n_bins: int) -> float:
    """ECE: ``sum_b (n_b / N) |acc_b - conf_b|`` over equal-width bins."""
    bins = reliability_bins(confidence_N, correct_N, n_bins)
    filled = bins.bin_count > 0
    gaps = (bins.bin_accuracy[filled] - bins.bin_confidence[filled]).abs()
    return float((bins.bin_count[filled].double() * gaps).sum() / bins.bin_count.sum().clamp_min(1))


def maximum_calibration_error(confidence_N: torch.Tensor, correct_N: torch.Tensor, n_bins: int) -> float:
    """MCE: the largest ``|acc_b - conf_b|`` over non-empty bins."""
    bins = reliability_bins(confidence_N, correct_N, n_bins)
    filled = bins.bin_count > 0
    if not bool(filled.any()):
        return 0.0
    return float((bins.bin_accuracy[filled] - bins.bin_confidence[filled]).abs().max())


def calibration_report(probs_NC: torch.Tensor, labels_N: torch.Tensor) -> dict:
    """Accuracy, NLL, Brier, ECE (10 and 15 bins), MCE and the reliability bins (10) of
    a set of predictive distributions; the confidence is the top class's probability."""
    confidence, predicted = probs_NC.max(-1)  # float64 after the max: no copy of the whole set
    confidence, correct = confidence.double(), predicted == labels_N
    report = {"accuracy": accuracy(probs_NC, labels_N), "nll": nll(probs_NC, labels_N),
              "brier": brier(probs_NC, labels_N)}
    for n_bins in ECE_BINS:
        report[f"ece_{n_bins}"] = expected_calibration_error(confidence, correct, n_bins)
    report["mce"] = maximum_calibration_error(confidence, correct, RELIABILITY_BINS)
    report["reliability"] = reliability_bins(confidence, correct, RELIABILITY_BINS).as_dict()
    report["n"] = int(labels_N.numel())
    return report


def _ranked(scores_N: torch.Tensor, labels_N: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cumulative true/false positives at each distinct threshold, highest score first."""
    scores = scores_N.double().reshape(-1)
    labels = labels_N.double().reshape(-1)
    order = torch.argsort(scores, descending=True, stable=True)
    scores, labels = scores[order], labels[order]
    # The last position of each run of tied scores is where a threshold can sit.
    last_of_tie = torch.ones_like(scores, dtype=torch.bool)
    last_of_tie[:-1] = scores[1:] != scores[:-1]
    tp = labels.cumsum(0)[last_of_tie]
    fp = (1 - labels).cumsum(0)[last_of_tie]
    return tp, fp, labels.sum()


def auroc(scores_N: torch.Tensor, labels_N: torch.Tensor) -> float:
    """Area under the ROC curve (trapezoids, so ties count one half); NaN when one class is absent."""
    tp, fp, n_pos = _ranked(scores_N, labels_N)
    n_neg = labels_N.numel() - n_pos
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    tpr = torch.cat([tp.new_zeros(1), tp / n_pos])
    fpr = torch.cat([fp.new_zeros(1), fp / n_neg])
    return float(torch.trapezoid(tpr, fpr))


def ood_auroc(in_N: torch.Tensor, ood_M: torch.Tensor) -> float:
    """AUROC of telling OOD scores (label 1) from in-distribution ones (label 0): higher = more OOD."""
    in_N, ood_M = torch.as_tensor(in_N), torch.as_tensor(ood_M)
    return auroc(torch.cat([in_N, ood_M]), torch.cat([torch.zeros(in_N.numel()), torch.ones(ood_M.numel())]))


def auprc(scores_N: torch.Tensor, labels_N: torch.Tensor) -> float:
    """Average precision ``sum_n (R_n - R_{n-1}) P_n`` over distinct thresholds (as scikit-learn)."""
    tp, fp, n_pos = _ranked(scores_N, labels_N)
    if n_pos == 0:
        return float("nan")
    precision = tp / (tp + fp)
    recall = tp / n_pos
    recall_step = torch.diff(recall, prepend=recall.new_zeros(1))
    return float((recall_step * precision).sum())


def topk_sets_jaccard(ids_a_TK: torch.Tensor, ids_b_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """Per-token Jaccard index ``|A n B| / |A u B|`` of two selections of expert ids."""
    a = torch.zeros(ids_a_TK.shape[0], n_experts, dtype=torch.bool, device=ids_a_TK.device)
    b = torch.zeros_like(a)
    a.scatter_(1, ids_a_TK, True)
    b.scatter_(1, ids_b_TK, True)
    inter = (a & b).sum(-1).double()
    union = (a | b).sum(-1).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


__all__ = ["entropy", "mutual_information", "accuracy", "nll", "brier", "ReliabilityBins", "reliability_bins",
           "expected_calibration_error", "maximum_calibration_error", "calibration_report", "auroc", "auprc",
           "topk_sets_jaccard", "ECE_BINS", "RELIABILITY_BINS"]
