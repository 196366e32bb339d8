"""Temperature scaling of every predictive (routing mean and BMA), fit on the calibration split, with
per-item numbers a study can pair against Top-K + temperature scaling; eval.json stays readable."""

from __future__ import annotations

import math

import pytest
import torch

from vrmoe import metrics
from vrmoe.eval import schema
from vrmoe.eval.run import evaluate_run
from vrmoe.stats import apply_temperature, fit_temperature
from vrmoe.train import train

from conftest import TINY, make_config

SMALL_EVAL = ["eval.windows=4", "eval.mcq_items=16", "eval.calibration_items=16", "eval.stability_windows=1",
              "eval.batch_size=8", "eval.gammas=[0.01]", "eval.ood_task=mcq"]


@pytest.fixture(scope="module")
def sampled(tmp_path_factory, corpus_cache):
    path = tmp_path_factory.mktemp("variational")
    app = make_config(*TINY, "router=variational", "router.sigma_init=2.0", "S=3", "train.max_steps=2", *SMALL_EVAL)
    train(app, path)
    return evaluate_run(path, app)


def test_every_predictive_is_reported_after_temperature_scaling(sampled):
    block = sampled[schema.TS_KEY]
    assert set(block["temperatures"]) == {"routing_mean", "bma"}
    assert block["fit_items"] == 16
    # The routing mean's scaled numbers stay where they were (calibration.mcq_ts), with the same T.
    assert block["temperatures"]["routing_mean"] == sampled["calibration"]["mcq_ts"]["temperature"]
    labels, predictions = schema.item_predictions(sampled)
    assert {"routing_mean", "bma", "ts", "bma_ts"} <= set(predictions)
    bma_ts = torch.tensor(predictions["bma_ts"], dtype=torch.float64)
    assert torch.allclose(bma_ts.sum(-1), torch.ones(len(labels), dtype=torch.float64), atol=1e-4)
    assert schema.calibration_number(sampled, "mcq", "nll", "bma_ts") == pytest.approx(
        metrics.nll(bma_ts, torch.tensor(labels)), abs=1e-4)
    # Scaling only sharpens or flattens: the BMA's argmax, hence its accuracy, is unchanged.
    assert schema.calibration_number(sampled, "mcq", "accuracy", "bma_ts") == pytest.approx(
        schema.calibration_number(sampled, "mcq", "accuracy", "bma"))


def test_scaled_entropies_give_per_item_ood_scores(sampled):
    scores = schema.scaled_ood_scores(sampled)
    assert set(scores) == {"in", "near", "far"}
    for name, per in scores.items():
        assert set(per) == {"ts", "bma_ts"}
        n = len(schema.ood_scores(sampled)[name]["predictive_entropy"])
        assert all(len(v) == n and all(0 <= x <= math.log(4) + 1e-9 for x in v) for v in per.values())
    auroc = sampled[schema.TS_KEY]["ood"]["far"]["bma"]
    labels = torch.cat([torch.zeros(len(scores["in"]["bma_ts"])), torch.ones(len(scores["far"]["bma_ts"]))])
    assert auroc == pytest.approx(metrics.auroc(torch.tensor(scores["in"]["bma_ts"] + scores["far"]["bma_ts"]), labels))


def test_a_deterministic_router_is_its_own_bma(tmp_path, corpus_cache):
    app = make_config(*TINY, "train.max_steps=2", *SMALL_EVAL)
    train(app, tmp_path)
    result = evaluate_run(tmp_path, app)
    block = result[schema.TS_KEY]
    assert block["temperatures"]["bma"] == block["temperatures"]["routing_mean"]
    _, predictions = schema.item_predictions(result)
    assert predictions["bma_ts"] == predictions["ts"]


def test_pool_then_calibrate_matches_a_direct_computation():
    """The BMA's scaled distribution is softmax(log mean_s p_s / T) with T fit on the calibration items."""
    gen = torch.Generator().manual_seed(0)
    z_SNC = torch.randn(3, 40, 4, generator=gen, dtype=torch.float64) * 3
    labels = torch.randint(0, 4, (40,), generator=gen)
    log_bma = z_SNC.log_softmax(-1).logsumexp(0) - math.log(3)
    assert torch.allclose(log_bma.exp(), z_SNC.softmax(-1).mean(0))
    T = fit_temperature(log_bma, labels)
    scaled = apply_temperature(log_bma, T)
    nll = lambda t: metrics.nll(apply_temperature(log_bma, t), labels)  # noqa: E731
    assert nll(T) <= min(nll(T * 1.05), nll(T / 1.05)) + 1e-12
    assert torch.allclose(scaled.sum(-1), torch.ones(40, dtype=torch.float64))


def test_an_older_eval_json_reads_without_the_block():
    old = {"calibration": {"mcq_ts": {"ece_10": 0.1, "temperature": 2.0},
                           "predictions": {"mcq": {"labels": [0], "routing_mean": [[1, 0, 0, 0]]}}}}
    assert schema.calibration_number(old, "mcq", "ece_10", "bma_ts") is None
    assert schema.scaled_ood_scores(old) == {}
    assert schema.temperature(old) == 2.0 and schema.temperature(old, "bma") is None
    assert set(schema.item_predictions(old)[1]) == {"routing_mean"}
    assert schema.METRICS["mcq_ece_bma_ts"](old) is None
