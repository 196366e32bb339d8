"""Metrics against scikit-learn and straightforward numpy references, on random inputs."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from sklearn.metrics import average_precision_score, brier_score_loss, log_loss, roc_auc_score

from vrmoe.metrics import (auprc, auroc, brier, calibration_report, entropy, expected_calibration_error,
                           maximum_calibration_error, mutual_information, nll, reliability_bins,
                           topk_sets_jaccard)


def _random_predictions(seed: int, n: int = 500, n_classes: int = 5):
    gen = np.random.default_rng(seed)
    logits = gen.normal(size=(n, n_classes)) * gen.uniform(0.2, 4.0)
    probs = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    labels = gen.integers(0, n_classes, size=n)
    return probs, labels


def _numpy_ece_mce(confidence: np.ndarray, correct: np.ndarray, n_bins: int) -> tuple[float, float]:
    """The textbook definition, one bin at a time."""
    edges = np.linspace(0.0, 1.0, n_bins + 1)
    ece, mce = 0.0, 0.0
    for b in range(n_bins):
        lo, hi = edges[b], edges[b + 1]
        in_bin = (confidence > lo) & (confidence <= hi) if b > 0 else (confidence >= lo) & (confidence <= hi)
        if in_bin.any():
            gap = abs(correct[in_bin].mean() - confidence[in_bin].mean())
            ece += in_bin.mean() * gap
            mce = max(mce, gap)
    return ece, mce


@pytest.mark.parametrize("seed", [0, 1, 2])
@pytest.mark.parametrize("n_bins", [10, 15])
def test_ece_and_mce_match_a_numpy_reference(seed, n_bins):
    probs, labels = _random_predictions(seed)
    confidence, correct = probs.max(1), (probs.argmax(1) == labels).astype(float)
    want_ece, want_mce = _numpy_ece_mce(confidence, correct, n_bins)
    conf_t, correct_t = torch.tensor(confidence), torch.tensor(correct)
    assert expected_calibration_error(conf_t, correct_t, n_bins) == pytest.approx(want_ece, abs=1e-12)
    assert maximum_calibration_error(conf_t, correct_t, n_bins) == pytest.approx(want_mce, abs=1e-12)


def test_reliability_bins_edges_counts_and_empty_bins():
    conf = torch.tensor([0.0, 0.1, 0.10001, 0.95, 1.0], dtype=torch.float64)
    correct = torch.tensor([0.0, 1.0, 1.0, 0.0, 1.0])
    bins = reliability_bins(conf, correct, 10)
    assert bins.bin_count.tolist() == [2, 1, 0, 0, 0, 0, 0, 0, 0, 2]  # (0, 0.1] holds 0 and 0.1
    assert bins.bin_accuracy[0] == pytest.approx(0.5) and bins.bin_confidence[9] == pytest.approx(0.975)
    assert math.isnan(float(bins.bin_accuracy[4]))


def test_a_perfectly_calibrated_predictor_has_zero_ece():
    # Confidence 0.75 in every case, right exactly 3 times in 4.
    conf = torch.full((400,), 0.75)
    correct = torch.tensor([1.0, 1.0, 1.0, 0.0]).repeat(100)
    assert expected_calibration_error(conf, correct, 10) == pytest.approx(0.0, abs=1e-12)
    assert expected_calibration_error(torch.ones(10), torch.zeros(10), 10) == pytest.approx(1.0)


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_nll_brier_accuracy_match_sklearn(seed):
    probs, labels = _random_predictions(seed)
    p, y = torch.tensor(probs), torch.tensor(labels)
    classes = list(range(probs.shape[1]))
    assert nll(p, y) == pytest.approx(log_loss(labels, probs, labels=classes), rel=1e-10)
    assert brier(p, y) == pytest.approx(brier_score_loss(labels, probs, labels=classes), rel=1e-10)
    report = calibration_report(p, y)
    assert report["accuracy"] == pytest.approx((probs.argmax(1) == labels).mean())
    assert set(report) >= {"accuracy", "nll", "brier", "ece_10", "ece_15", "mce", "reliability"}
    assert sum(report["reliability"]["bin_count"]) == len(labels)


def test_brier_in_slices_of_rows_equals_one_pass(monkeypatch):
    """Brier works through slices of rows (a next-token set over a pretrained model's vocabulary
    would otherwise take several float64 copies of it): every row's term is computed as in one
    pass, so the score is the same bit for bit."""
    from vrmoe import metrics

    g = torch.Generator().manual_seed(1)
    p = torch.softmax(torch.randn(517, 300, generator=g) * 2, -1)
    y = torch.randint(0, 300, (517,), generator=g)
    one_pass = brier(p, y)
    monkeypatch.setattr(metrics, "BRIER_SLICE_VALUES", 300 * 50)  # 11 slices, the last one shorter
    assert brier(p, y) == one_pass
    assert math.isnan(brier(p[:0], y[:0]))


def test_binary_brier_is_twice_sklearns_positive_class_form():
    # sklearn's binary Brier scores the positive class only; the multi-class sum counts both.
    probs, labels = _random_predictions(3, n_classes=2)
    assert brier(torch.tensor(probs), torch.tensor(labels)) == pytest.approx(
        2 * brier_score_loss(labels, probs[:, 1]), rel=1e-10)


@pytest.mark.parametrize("seed", [0, 1, 2, 3])
def test_auroc_and_auprc_match_sklearn_with_ties(seed):
    gen = np.random.default_rng(seed)
    labels = gen.integers(0, 2, size=300)
    scores = gen.normal(size=300) + labels * gen.uniform(0, 2)
    scores = np.round(scores, 1)  # many tied scores
    s, y = torch.tensor(scores), torch.tensor(labels)
    assert auroc(s, y) == pytest.approx(roc_auc_score(labels, scores), abs=1e-12)
    assert auprc(s, y) == pytest.approx(average_precision_score(labels, scores), abs=1e-12)


def test_auroc_orientation_and_degenerate_cases():
    y = torch.tensor([0, 0, 1, 1])
    assert auroc(torch.tensor([0.1, 0.2, 0.8, 0.9]), y) == 1.0  # OOD scored higher
    assert auroc(torch.tensor([0.9, 0.8, 0.2, 0.1]), y) == 0.0
    assert auroc(torch.zeros(4), y) == 0.5  # a constant score cannot separate
    assert math.isnan(auroc(torch.rand(4), torch.zeros(4, dtype=torch.long)))


def test_entropy_bounds_and_zero_log_zero():
    assert float(entropy(torch.tensor([1.0, 0.0, 0.0]))) == 0.0
    assert float(entropy(torch.full((8,), 1 / 8))) == pytest.approx(math.log(8))


def test_mutual_information_is_zero_for_identical_samples_and_positive_otherwise():
    p = torch.softmax(torch.randn(6, 7, 11), -1)  # (tokens..., classes)
    same = p.expand(5, *p.shape).clone()  # 5 identical samples
    assert torch.equal(mutual_information(same), torch.zeros(6, 7, dtype=torch.float64))
    varied = torch.softmax(torch.randn(5, 6, 7, 11), -1)
    mi = mutual_information(varied)
    bald = entropy(varied.double().mean(0)) - entropy(varied).mean(0)
    assert torch.allclose(mi, bald, atol=1e-12) and bool((mi > 0).all())


def test_running_predictive_matches_the_stacked_samples_one_sample_at_a_time():
    """Next-token probabilities take their S samples one at a time (RunningPredictive): the mean
    and the mutual information agree with the stacked samples' to float64 rounding, and a
    deterministic router's identical samples give exactly its distribution and exactly 0."""
    from vrmoe.metrics import RunningPredictive

    g = torch.Generator().manual_seed(0)
    p = torch.softmax(torch.randn(8, 3, 43, 4096, generator=g) * 3, -1)  # (S, windows, tokens, vocabulary)
    running = RunningPredictive()
    for sample in p:
        running.add(sample)
    assert torch.allclose(running.mean(), p.double().mean(0), rtol=1e-14, atol=1e-18)
    mi = running.mutual_information()
    assert mi.shape == (3, 43) and torch.allclose(mi, mutual_information(p), rtol=1e-9, atol=1e-13)
    assert bool((mi > 0).all())
    identical = RunningPredictive()
    for _ in range(8):
        identical.add(p[0])
    assert torch.equal(identical.mean(), p[0].double())
    assert torch.equal(identical.mutual_information(), torch.zeros(3, 43, dtype=torch.float64))


def test_jaccard_of_identical_sets_is_one_disjoint_zero_partial_a_third():
    a = torch.tensor([[0, 1], [2, 3], [0, 1]])
    assert topk_sets_jaccard(a, a.flip(-1), 4).tolist() == [1.0, 1.0, 1.0]  # order does not matter
    b = torch.tensor([[2, 3], [0, 1], [1, 2]])
    assert topk_sets_jaccard(a, b, 4).tolist() == [0.0, 0.0, pytest.approx(1 / 3)]
