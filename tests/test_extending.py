"""Extending vrmoe: a router defined entirely in this file trains, evaluates and benches.

Nothing outside this file knows the router: its class declares its config keys and
their checks, its FLOPs, its uncertainty signal and whether evaluation samples, and
the registry hands it to composition, the loop, the probes and the benchmark.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import pytest
import torch

from vrmoe.bench import TINY as TINY_BENCH
from vrmoe.bench import router_layer_rows
from vrmoe.config import ConfigError, ModelConfig, RouterConfig
from vrmoe.eval.run import evaluate_run
from vrmoe.model.routers import ROUTERS, Router, Routing, register_router, renormalised_topk
from vrmoe.model.routers.listing import router_rows
from vrmoe.tracking import EVAL_FILE
from vrmoe.train import train

from conftest import TINY, make_config

JITTER_FLOPS_PER_EXPERT = 7


@dataclass
class JitterConfig(RouterConfig):
    name: str = "jitter"
    jitter: float = 0.1  # standard deviation of the Gaussian noise on the logits

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if not self.jitter >= 0:
            raise ConfigError(f"router.jitter={self.jitter} must be >= 0")

    def samples_at_eval(self) -> bool:
        return True


class JitterRouter(Router):
    """Top-K of the mean softmax over S jittered copies of the logits."""

    name = "jitter"
    Config = JitterConfig
    uncertainty_signal = "logit_spread"

    def forward(self, u_TD: torch.Tensor) -> Routing:
        logits_TE = self.gate(u_TD).float()
        n = 1 if self.training else self.cfg.samples
        sample_probs_STE = (logits_TE + self.cfg.jitter * torch.randn(n, *logits_TE.shape)).softmax(-1)
        probs_TE = sample_probs_STE.mean(0)
        ids_TK, gates_TK = renormalised_topk(probs_TE, self.k)
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE, self.balance_terms(logits_TE, probs_TE, ids_TK),
                       {"jitter": torch.tensor(self.cfg.jitter)}, sample_probs_STE if n > 1 else None,
                       uncertainty_T=logits_TE.std(-1))

    def flops_per_token(self, samples: int) -> float:
        return self.topk_flops_per_token() + samples * JITTER_FLOPS_PER_EXPERT * self.n_experts


@pytest.fixture
def jitter_router():
    register_router(JitterRouter)
    yield JitterRouter
    ROUTERS.pop("jitter")


def test_a_router_defined_in_a_test_file_trains_evaluates_and_benches(jitter_router, tmp_path):
    app = make_config(*TINY, "router=jitter", "router.jitter=0.3", "S=3", "train.max_steps=4", "eval.windows=4",
                      "eval.mcq_items=8", "eval.stability_windows=2", "eval.gammas=[0.01]")
    assert isinstance(app.router, JitterConfig) and app.router.jitter == 0.3 and app.router.samples == 3

    summary = train(app, tmp_path)
    assert summary["status"] == "completed" and summary["router"] == "jitter"
    last = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()][-1]
    assert last["moe"]["layer0"]["jitter"] == pytest.approx(0.3)  # its own diagnostics are logged

    evaluate_run(tmp_path, app)
    result = json.loads((tmp_path / EVAL_FILE).read_text())
    assert result["router"] == "jitter" and result["router_config"]["jitter"] == 0.3
    assert {"logit_spread", "mutual_information"} <= set(result["ood"]["far"]["auroc"])
    n_moe, n_experts = 2, app.model.n_experts
    gate_flops = 2 * app.model.d_model * n_experts
    expected = n_moe * (gate_flops + 5 * n_experts + 2 * app.router.k + 3 * JITTER_FLOPS_PER_EXPERT * n_experts)
    assert result["cost"]["flops_per_token"]["router"] == expected
    assert result["cost"]["router_overhead_vs_topk"] > 0

    rows = {row.name: row for row in router_layer_rows(dataclasses.replace(TINY_BENCH, repeats=1, warmup=0),
                                                        torch.device("cpu"))}
    assert rows["train step: jitter / topk"].ratio > 0
    assert rows[f"eval: jitter S={TINY_BENCH.samples} / S=1"].note == ""  # S is used: it averages samples

    listed = {row["router"]: row for row in router_rows()}
    assert listed["jitter"]["its own keys"] == "router.jitter=0.1" and listed["jitter"]["OOD signal"] == "logit_spread"


def test_the_new_routers_keys_are_checked_like_any_other(jitter_router):
    with pytest.raises(ConfigError, match=r"router.jitter=-1.0 must be >= 0"):
        make_config(*TINY, "router=jitter", "router.jitter=-1")
    with pytest.raises(ConfigError, match=r"router=topk has no key jitter"):
        make_config(*TINY, "router.jitter=0.2")
    with pytest.raises(ConfigError, match=r"router.jitter=abc"):
        make_config(*TINY, "router=jitter", "router.jitter=abc")
