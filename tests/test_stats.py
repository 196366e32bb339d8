"""Bootstrap intervals and temperature scaling against vrmoe.metrics, scikit-learn and known truths."""

from __future__ import annotations

import json
import math

import pytest
import torch
from sklearn.metrics import roc_auc_score

from vrmoe import metrics
from vrmoe.stats import (METRICS, T_MAX, T_MIN, Interval, apply_temperature, fit_temperature, paired_auroc_difference,
                         paired_difference, resampled_auroc, resampled_metric, seed_mean_auroc, seed_mean_metric,
                         single_auroc_interval, single_interval)


def _gen(seed: int) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def _metric_by_metrics_py(name: str, probs_NC: torch.Tensor, labels_N: torch.Tensor) -> float:
    """The single-set reference, as metrics.calibration_report computes it."""
    return metrics.calibration_report(probs_NC, labels_N)[name]


def _predictions(seed: int, n_seeds: int = 3, n: int = 400, n_classes: int = 4, dtype=torch.float64):
    """Random predictions, plus a block of rows whose confidence sits exactly on ECE bin edges."""
    g = _gen(seed)
    logits_SNC = torch.randn(n_seeds, n, n_classes, generator=g, dtype=torch.float64) * 2.0
    probs_SNC = torch.softmax(logits_SNC, -1)
    edges = torch.tensor([0.3, 0.4, 0.5, 0.6, 0.7, 0.8, 0.9, 1.0], dtype=torch.float64)
    rest = (1 - edges)[:, None] / (n_classes - 1)
    edge_rows = torch.cat([edges[:, None], rest.expand(-1, n_classes - 1)], 1)
    probs_SNC[:, :len(edges)] = edge_rows
    labels_N = torch.randint(0, n_classes, (n,), generator=g)
    return probs_SNC.to(dtype), labels_N


def _sample_labels(probs_NC: torch.Tensor, seed: int) -> torch.Tensor:
    return torch.multinomial(probs_NC.float(), 1, generator=_gen(seed)).squeeze(-1)


# --------------------------------------------------------------------------- batched metrics


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("name", METRICS)
def test_batched_metric_on_the_full_data_is_metrics_py(name, dtype):
    probs_SNC, labels_N = _predictions(0, dtype=dtype)
    identity_1N = torch.arange(labels_N.numel())[None]
    got_S = resampled_metric(name, probs_SNC, labels_N, identity_1N)[0]
    want_S = [_metric_by_metrics_py(name, probs_NC, labels_N) for probs_NC in probs_SNC]
    assert got_S.tolist() == pytest.approx(want_S, abs=1e-9, rel=0)
    assert seed_mean_metric(name, probs_SNC, labels_N) == pytest.approx(sum(want_S) / len(want_S), abs=1e-12)


@pytest.mark.parametrize("name", METRICS)
def test_batched_metric_on_resamples_is_metrics_py_on_the_gathered_items(name):
    probs_SNC, labels_N = _predictions(1, n=150)
    idx_RN = torch.randint(0, 150, (6, 150), generator=_gen(2))
    idx_RN[0] = 7  # one item drawn N times: every other bin empty
    got_RS = resampled_metric(name, probs_SNC, labels_N, idx_RN)
    assert got_RS.shape == (6, 3)
    for r, idx_N in enumerate(idx_RN):
        want_S = [_metric_by_metrics_py(name, probs_NC[idx_N], labels_N[idx_N]) for probs_NC in probs_SNC]
        assert got_RS[r].tolist() == pytest.approx(want_S, abs=1e-9, rel=0)


def test_ece_bin_edges_follow_metrics_py():
    # Confidence exactly 0.7 and 0.5 with 10 bins; (b/B, (b+1)/B] in metrics.py, float rounding included.
    probs_NC = torch.tensor([[0.7, 0.3], [0.5, 0.5], [1.0, 0.0], [0.55, 0.45], [0.6, 0.4]], dtype=torch.float64)
    labels_N = torch.tensor([0, 1, 0, 1, 0])
    for n_bins in (10, 15):
        got = resampled_metric(f"ece_{n_bins}", probs_NC, labels_N, torch.arange(5)[None])
        confidence_N, predicted_N = probs_NC.max(-1)
        want = metrics.expected_calibration_error(confidence_N, predicted_N == labels_N, n_bins)
        assert float(got) == pytest.approx(want, abs=1e-12)


@pytest.mark.parametrize("seed", [0, 1])
def test_resampled_auroc_is_metrics_py_and_sklearn_with_ties(seed):
    g = _gen(seed)
    in_SN = torch.round(torch.randn(2, 120, generator=g, dtype=torch.float64) * 3) / 3  # many ties
    ood_SM = torch.round((torch.randn(2, 80, generator=g, dtype=torch.float64) + 0.7) * 3) / 3
    idx_in_RN = torch.cat([torch.arange(120)[None], torch.randint(0, 120, (4, 120), generator=g)])
    idx_ood_RM = torch.cat([torch.arange(80)[None], torch.randint(0, 80, (4, 80), generator=g)])
    got_RS = resampled_auroc(in_SN, ood_SM, idx_in_RN, idx_ood_RM)
    labels = torch.cat([torch.zeros(120), torch.ones(80)])
    for r in range(5):
        for s in range(2):
            scores = torch.cat([in_SN[s, idx_in_RN[r]], ood_SM[s, idx_ood_RM[r]]])
            assert float(got_RS[r, s]) == pytest.approx(metrics.auroc(scores, labels), abs=1e-12)
            assert float(got_RS[r, s]) == pytest.approx(roc_auc_score(labels.numpy(), scores.numpy()), abs=1e-12)
    assert seed_mean_auroc(in_SN, ood_SM) == pytest.approx(float(got_RS[0].mean()), abs=1e-12)


def test_constant_scores_give_an_auroc_of_exactly_one_half():
    idx_in_RN = torch.randint(0, 50, (20, 50), generator=_gen(0))
    idx_ood_RM = torch.randint(0, 30, (20, 30), generator=_gen(1))
    got_RS = resampled_auroc(torch.full((3, 50), 2.5), torch.full((3, 30), 2.5), idx_in_RN, idx_ood_RM)
    assert bool((got_RS == 0.5).all())
    interval = single_auroc_interval(torch.zeros(50), torch.zeros(30), n_resamples=100)
    assert (interval.estimate, interval.low, interval.high) == (0.5, 0.5, 0.5)


# --------------------------------------------------------------------------- temperature


@pytest.mark.parametrize("t_true", [0.5, 2.5])
def test_fit_temperature_recovers_a_known_temperature(t_true):
    logits_NC = torch.randn(20000, 5, generator=_gen(3), dtype=torch.float64) * 2.0
    labels_N = _sample_labels(torch.softmax(logits_NC / t_true, -1), seed=4)
    t_fit = fit_temperature(logits_NC, labels_N)
    assert t_fit == pytest.approx(t_true, rel=0.05)
    nll_at = lambda t: metrics.nll(apply_temperature(logits_NC, t), labels_N)  # noqa: E731
    assert nll_at(t_fit) <= nll_at(1.0)
    for step in (0.99, 1.01, 0.9, 1.1):
        assert nll_at(t_fit) <= nll_at(t_fit * step)


def test_fit_temperature_ignores_per_row_offsets_of_log_likelihood_scores():
    logits_NC = torch.randn(500, 4, generator=_gen(5), dtype=torch.float64)
    labels_N = _sample_labels(torch.softmax(logits_NC, -1), seed=6)
    offsets_N1 = -5000.0 * torch.rand(500, 1, generator=_gen(7), dtype=torch.float64)  # summed log-likelihoods
    assert fit_temperature(logits_NC + offsets_N1, labels_N) == pytest.approx(fit_temperature(logits_NC, labels_N),
                                                                              rel=1e-9)


def test_fit_temperature_degenerate_inputs_give_a_bound_or_one():
    labels_N = torch.arange(40) % 4
    right_NC = torch.nn.functional.one_hot(labels_N, 4).double() * 1e4  # all right by huge margins
    assert fit_temperature(right_NC, labels_N) == T_MIN  # the NLL keeps falling as T -> 0
    assert fit_temperature(-right_NC, labels_N) == T_MAX  # all wrong: flattening always helps
    assert fit_temperature(torch.zeros(40, 4), labels_N) == 1.0  # the NLL does not depend on T
    with pytest.raises(ValueError):
        fit_temperature(torch.full((40, 4), -math.inf), labels_N)


def test_apply_temperature_is_a_tempered_softmax():
    scores_NC = torch.randn(10, 3, generator=_gen(8))
    probs_NC = apply_temperature(scores_NC, 2.0)
    assert probs_NC.dtype == torch.float64
    assert torch.allclose(probs_NC, torch.softmax(scores_NC.double() / 2.0, -1), atol=1e-15)
    with pytest.raises(ValueError):
        apply_temperature(scores_NC, 0.0)


# --------------------------------------------------------------------------- intervals


@pytest.mark.parametrize("name", METRICS)
def test_a_model_compared_with_itself_is_exactly_zero(name):
    probs_SNC, labels_N = _predictions(9)
    interval = paired_difference(name, probs_SNC, probs_SNC.clone(), labels_N, n_resamples=200)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)
    assert not interval.excludes_zero


def test_identical_detectors_differ_by_exactly_zero():
    g = _gen(10)
    in_SN, ood_SM = torch.randn(3, 200, generator=g), torch.randn(3, 100, generator=g) + 1
    interval = paired_auroc_difference(in_SN, ood_SM, in_SN.clone(), ood_SM.clone(), n_resamples=200)
    assert (interval.estimate, interval.low, interval.high) == (0.0, 0.0, 0.0)


def _calibrated_and_overconfident(n_seeds: int = 3, n: int = 1000):
    logits_SNC = torch.randn(n_seeds, n, 4, generator=_gen(11), dtype=torch.float64) * 1.5
    true_NC = torch.softmax(logits_SNC[0], -1)
    labels_N = _sample_labels(true_NC, seed=12)
    calibrated_SNC = torch.softmax(logits_SNC[:1].expand(n_seeds, -1, -1), -1)
    overconfident_SNC = torch.softmax(logits_SNC[:1] * 3 + 0.2 * logits_SNC, -1)
    return calibrated_SNC, overconfident_SNC, labels_N


def test_a_calibrated_predictor_beats_an_overconfident_one_and_a_perturbation_does_not():
    calibrated_SNC, overconfident_SNC, labels_N = _calibrated_and_overconfident()
    better = paired_difference("ece_10", calibrated_SNC, overconfident_SNC, labels_N)
    assert better.high < 0 and better.excludes_zero
    assert better.low <= better.estimate <= better.high
    noise_SNC = 1e-3 * torch.randn(calibrated_SNC.shape, generator=_gen(13), dtype=torch.float64)
    perturbed_SNC = (calibrated_SNC + noise_SNC).clamp_min(1e-6)
    perturbed_SNC = perturbed_SNC / perturbed_SNC.sum(-1, keepdim=True)
    same = paired_difference("ece_10", calibrated_SNC, perturbed_SNC, labels_N)
    assert same.low <= 0 <= same.high and not same.excludes_zero
    assert same.high - same.low < 0.1 * (better.high - better.low) + 1e-2


def test_ece_intervals_are_basic_intervals_around_the_estimate_not_beside_it():
    """Resampled ECE is biased upwards, most for a calibrated predictor: the percentile interval
    (the resamples' quantiles) is centred above the estimate, the basic one reflects them through it."""
    from vrmoe.stats import N_RESAMPLES, _bootstrap_items, _ItemSums

    calibrated_SNC, _, labels_N = _calibrated_and_overconfident()
    interval = single_interval("ece_10", calibrated_SNC, labels_N, seed=3)
    terms = _ItemSums("ece_10", calibrated_SNC, labels_N)
    resampled = _bootstrap_items(lambda counts_RN: terms(counts_RN).mean(1), 0.0, terms.n_items, N_RESAMPLES, 3, 0.95)
    # With an estimate of 0 the basic interval is (-q_high, -q_low): the quantiles recovered exactly.
    q_low, q_high = -resampled.high, -resampled.low
    assert interval.low == pytest.approx(2 * interval.estimate - q_high)
    assert interval.high == pytest.approx(2 * interval.estimate - q_low)
    assert (q_low + q_high) / 2 > interval.estimate + 0.01  # the percentile interval's centre, biased up
    assert (interval.low + interval.high) / 2 < interval.estimate and interval.low < interval.estimate < interval.high


def test_intervals_contain_a_known_true_difference():
    # Accuracy: a is right with probability 0.8, b (independently) with 0.7; truth 0.1.
    n, g = 2000, _gen(14)
    labels_N = torch.zeros(n, dtype=torch.long)
    right_a_N, right_b_N = torch.rand(n, generator=g) < 0.8, torch.rand(n, generator=g) < 0.7
    probs_a_NC = torch.where(right_a_N[:, None], torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9]))
    probs_b_NC = torch.where(right_b_N[:, None], torch.tensor([0.9, 0.1]), torch.tensor([0.1, 0.9]))
    interval = paired_difference("accuracy", probs_a_NC, probs_b_NC, labels_N, n_resamples=1000)
    assert interval.low < 0.1 < interval.high and interval.excludes_zero
    # AUROC of N(0,1) in-scores against N(d,1) OOD scores is Phi(d / sqrt 2).
    phi = lambda x: 0.5 * (1 + math.erf(x / math.sqrt(2)))  # noqa: E731
    in_N, shift_M = torch.randn(1500, generator=g, dtype=torch.float64), torch.randn(1000, generator=g, dtype=torch.float64)
    single = single_auroc_interval(in_N, shift_M + 1.0, n_resamples=1000)
    assert single.low < phi(1.0 / math.sqrt(2)) < single.high
    diff = paired_auroc_difference(in_N, shift_M + 1.0, in_N, shift_M + 0.5, n_resamples=1000)
    assert diff.low < phi(1.0 / math.sqrt(2)) - phi(0.5 / math.sqrt(2)) < diff.high


def test_estimate_is_the_direct_computation_with_metrics_py():
    calibrated_SNC, overconfident_SNC, labels_N = _calibrated_and_overconfident(n=300)
    for name in METRICS:
        mean_a = sum(_metric_by_metrics_py(name, p, labels_N) for p in calibrated_SNC) / 3
        mean_b = sum(_metric_by_metrics_py(name, p, labels_N) for p in overconfident_SNC) / 3
        diff = paired_difference(name, calibrated_SNC, overconfident_SNC, labels_N, n_resamples=50)
        assert diff.estimate == pytest.approx(mean_a - mean_b, abs=1e-12)
        assert single_interval(name, calibrated_SNC, labels_N, n_resamples=50).estimate == pytest.approx(mean_a,
                                                                                                         abs=1e-12)


def test_the_same_seed_reproduces_and_another_seed_differs():
    calibrated_SNC, overconfident_SNC, labels_N = _calibrated_and_overconfident(n=300)
    first = paired_difference("nll", calibrated_SNC, overconfident_SNC, labels_N, n_resamples=300, seed=3)
    again = paired_difference("nll", calibrated_SNC, overconfident_SNC, labels_N, n_resamples=300, seed=3)
    other = paired_difference("nll", calibrated_SNC, overconfident_SNC, labels_N, n_resamples=300, seed=4)
    assert first == again and (first.low, first.high) != (other.low, other.high)
    assert first.estimate == other.estimate
    in_N, ood_M = torch.randn(100, generator=_gen(15)), torch.randn(60, generator=_gen(16))
    assert single_auroc_interval(in_N, ood_M, n_resamples=100, seed=1) == single_auroc_interval(in_N, ood_M,
                                                                                                n_resamples=100, seed=1)


def test_different_seed_counts_pair_on_items():
    calibrated_SNC, overconfident_SNC, labels_N = _calibrated_and_overconfident(n=300)
    ensemble_NC = overconfident_SNC.mean(0)  # an ensemble row: S = 1
    for b in (ensemble_NC, ensemble_NC[None]):
        diff = paired_difference("brier", calibrated_SNC, b, labels_N, n_resamples=200)
        want = seed_mean_metric("brier", calibrated_SNC, labels_N) - metrics.brier(ensemble_NC, labels_N)
        assert diff.estimate == pytest.approx(want, abs=1e-12) and diff.low <= diff.estimate <= diff.high
    g = _gen(17)
    in_a_SN, ood_a_SM = torch.randn(5, 100, generator=g), torch.randn(5, 60, generator=g) + 1
    in_b_N, ood_b_M = torch.randn(100, generator=g), torch.randn(60, generator=g) + 1
    diff = paired_auroc_difference(in_a_SN, ood_a_SM, in_b_N, ood_b_M, n_resamples=200)
    assert diff.estimate == pytest.approx(seed_mean_auroc(in_a_SN, ood_a_SM) - seed_mean_auroc(in_b_N, ood_b_M))
    with pytest.raises(ValueError):
        paired_difference("nll", calibrated_SNC, calibrated_SNC[:, :200], labels_N)
    with pytest.raises(ValueError):
        paired_auroc_difference(in_a_SN, ood_a_SM, in_b_N[:50], ood_b_M)


def test_pairing_narrows_the_interval_of_a_difference():
    # Both models share the item difficulty; unpaired resampling would keep it in the spread.
    calibrated_SNC, overconfident_SNC, labels_N = _calibrated_and_overconfident(n=500)
    paired = paired_difference("nll", calibrated_SNC, overconfident_SNC, labels_N, n_resamples=500)
    single_a = single_interval("nll", calibrated_SNC, labels_N, n_resamples=500)
    single_b = single_interval("nll", overconfident_SNC, labels_N, n_resamples=500, seed=1)
    assert paired.high - paired.low < (single_a.high - single_a.low) + (single_b.high - single_b.low)


def test_interval_record():
    interval = Interval(estimate=-0.02, low=-0.03, high=-0.01, level=0.95, n_resamples=2000)
    record = json.loads(json.dumps(interval.as_dict()))
    assert record == {"estimate": -0.02, "low": -0.03, "high": -0.01, "level": 0.95, "n_resamples": 2000,
                      "excludes_zero": True}
    assert not Interval(0.0, -0.01, 0.01, 0.95, 10).excludes_zero
    probs_SNC, labels_N = _predictions(18, n=100)
    interval = single_interval("accuracy", probs_SNC, labels_N, n_resamples=120, level=0.9)
    assert interval.n_resamples == 120 and interval.level == 0.9
    with pytest.raises(ValueError):
        single_interval("auroc", probs_SNC, labels_N)
    with pytest.raises(ValueError):
        single_interval("nll", probs_SNC, labels_N, level=1.0)
