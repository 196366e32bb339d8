"""Every knob means something: T for every router that samples routes, S by the router's method,
and a knob the chosen router does not read said (or refused) in one line."""

from __future__ import annotations

import json

import pytest
import torch

from vrmoe.config import ConfigError
from vrmoe.knobs import check_knobs, duplicate_jobs, ignored_knobs, readers, unread_settings
from vrmoe.metrics import entropy
from vrmoe.model import build_model
from vrmoe.train import train

from conftest import TINY, make_config, run_cli


def eval_routing(*overrides: str) -> tuple[float, torch.Tensor]:
    """(mean routing entropy, selection frequency per expert) of the first MoE layer at evaluation."""
    model = build_model(make_config(*TINY, *overrides)).eval()
    torch.manual_seed(0)
    idx = torch.randint(0, 256, (16, 32), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        routing = model(idx).routings[0]
    freq = torch.bincount(routing.expert_ids_TK.flatten(), minlength=routing.probs_TE.shape[-1]).float()
    return float(entropy(routing.probs_TE).mean()), freq / freq.sum()


@pytest.mark.parametrize("router", [["router=variational", "router.sigma_init=2.0"],
                                    ["router=mc_dropout", "router.dropout=0.3"]])
def test_T_sharpens_or_softens_every_sampled_routing_distribution(router):
    # An untrained gate gives near-uniform logits: scale them up so that T has room to act.
    cold, warm, hot = (eval_routing(*router, "S=4", f"T={t}") for t in (0.5, 1.0, 2.0))
    assert cold[0] < warm[0] < hot[0]  # the S-averaged routing distribution's entropy grows with T
    assert not torch.equal(cold[1], warm[1]) or not torch.equal(hot[1], warm[1])


def test_T_equal_to_1_divides_nothing():
    from vrmoe.model.routers.base import tempered

    logits = torch.randn(4, 8)
    assert tempered(logits, 1.0) is logits and torch.equal(tempered(logits, 0.5), logits / 0.5)


def test_the_knobs_each_router_reads():
    assert set(readers("T")) >= {"temperature", "variational", "mc_dropout"} and "topk" not in readers("T")
    assert readers("beta") == ["variational"]
    assert make_config("router=variational").router.samples == 8  # the method's S by default
    assert make_config("router=mc_dropout").router.samples == 8
    assert make_config("router=topk").router.samples == 1
    assert make_config("router=variational", "S=1").router.samples == 1  # a single draw, when asked for
    topk = make_config("router=topk").router
    assert ignored_knobs(topk, ["T=0.5", "K=1", "seed=3", "S=4"]) == ["T=0.5", "S=4"]
    assert ignored_knobs(make_config("router=variational").router, ["T=0.5", "beta=0.1", "S=4"]) == []
    # The temperature router draws at evaluation only in sample mode: only then does S matter.
    assert ignored_knobs(make_config("router=temperature", "router.eval_mode=topk").router, ["S=4"]) == ["S=4"]
    assert ignored_knobs(make_config("router=temperature").router, ["S=4"]) == []


def test_a_knob_the_router_does_not_read_is_said_and_recorded(tmp_path, corpus_cache):
    summary = train(make_config(*TINY, "router=topk", "T=0.5", "train.max_steps=1"), tmp_path / "said",
                    overrides=["router=topk", "T=0.5"])
    assert summary["ignored_knobs"] == ["T=0.5"]
    assert json.loads((tmp_path / "said" / "summary.json").read_text())["ignored_knobs"] == ["T=0.5"]
    with pytest.raises(ConfigError, match=r"^T=0.5 changes nothing: router=topk does not read T \(T is read by"):
        check_knobs(make_config("router=topk").router, ["T=0.5"], strict=True)


def test_a_setting_the_run_does_not_read_is_said_and_recorded(tmp_path, corpus_cache, capsys):
    summary = train(make_config(*TINY, "data.vocab_size=8192", "train.max_steps=1"), tmp_path / "bytes",
                    overrides=["data.vocab_size=8192"])
    line = "data.vocab_size=8192 changes nothing: only data.tokenizer=bpe reads it, and this run's tokenizer is bytes"
    assert summary["unread_settings"][0].startswith(line)
    assert "note: " + line in " ".join(capsys.readouterr().err.split())
    assert unread_settings(make_config("data.tokenizer=bpe", "data.vocab_size=512"),
                           ["data.tokenizer=bpe", "data.vocab_size=512"]) == []


def test_strict_knobs_refuses_the_run_in_one_line_and_writes_nothing(tmp_path, corpus_cache):
    proc = run_cli("train", *TINY, "router=topk", "T=0.5", "train.strict_knobs=true", "train.max_steps=1",
                   cwd=tmp_path, check=False)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines()[-1].startswith("error: T=0.5 changes nothing: router=topk")
    assert not (tmp_path / "outputs").exists()  # refused before anything was written


def test_a_sweep_lists_its_jobs_that_are_the_same_run():
    same = duplicate_jobs(["router=topk,temperature", "T=0.5,1.0", "seed=0,1"])
    assert same == [["router=topk T=0.5 seed=0", "router=topk T=1.0 seed=0"],
                    ["router=topk T=0.5 seed=1", "router=topk T=1.0 seed=1"]]
    assert duplicate_jobs(["router=temperature,variational", "T=0.5,1.0"]) == []
    assert duplicate_jobs(["router=topk", "lr=interval(0.1,1)"]) == []  # a sweeper's own syntax: not expanded
