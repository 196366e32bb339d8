"""The paper's post-hoc protocol end to end: a trained Top-K model is frozen (its router's logit
layer included) and only the new routers' heads train."""

from __future__ import annotations

import pytest
import torch

from vrmoe.config import ConfigError
from vrmoe.checkpoint import load_checkpoint, load_run_weights
from vrmoe.model import build_model
from vrmoe.train import train

from conftest import TINY, make_config


@pytest.fixture(scope="module")
def base_run(tmp_path_factory, corpus_cache):
    run_dir = tmp_path_factory.mktemp("base")
    train(make_config(*TINY, "router=topk", "train.max_steps=4"), run_dir)
    return run_dir


def weights(run_dir) -> dict[str, torch.Tensor]:
    return load_checkpoint(run_dir, "train.resume")["model"]


@pytest.mark.parametrize("router_args, trained_heads", [
    (["router=variational"], {"blocks.0.moe.router.residual_head", "blocks.0.moe.router.scale_head",
                              "blocks.1.moe.router.residual_head", "blocks.1.moe.router.scale_head"}),
    # Only the last MoE layer gets the router; the first stays the frozen Top-K.
    (["router=vtsr", "router.layers=1"], {"blocks.1.moe.router.temperature_head"}),
    # A listed layer: the first MoE layer gets the variational router, the last stays the frozen Top-K.
    (["router=variational", "router.layers=[0]"], {"blocks.0.moe.router.residual_head",
                                                    "blocks.0.moe.router.scale_head"}),
])
def test_posthoc_trains_only_the_new_heads(tmp_path, base_run, router_args, trained_heads):
    cfg = make_config(*TINY, *router_args, "train.max_steps=4", f"train.init_from={base_run}",
                      "train.freeze=backbone")
    summary = train(cfg, tmp_path)
    base, stored = weights(base_run), weights(tmp_path)
    # The checkpoint stores what the run trained; the frozen weights come back from train.init_from.
    new = set(stored)
    assert not new & set(base)
    assert {name.rsplit(".", 2)[0] for name in new} == trained_heads
    model = build_model(cfg)
    load_run_weights(model, load_checkpoint(tmp_path, "run"), "run", tmp_path, cfg)
    after = model.state_dict()
    for name, value in base.items():  # every loaded parameter, NN_det (`gate`) included, is untouched
        assert torch.equal(after[name], value), name
    fresh = build_model(cfg).state_dict()  # the heads' initialisation, before any step
    for head in trained_heads:  # each head's last layer starts at zero weights and has moved
        assert torch.count_nonzero(fresh[f"{head}.2.weight"]) == 0
        assert not torch.equal(after[f"{head}.2.weight"], fresh[f"{head}.2.weight"]), head
    assert summary["params_trainable"] == sum(after[name].numel() for name in new)


def test_posthoc_with_a_router_without_heads_is_refused(tmp_path, base_run):
    cfg = make_config(*TINY, "router=mc_dropout", f"train.init_from={base_run}", "train.freeze=backbone")
    with pytest.raises(ConfigError, match="train.freeze=backbone leaves nothing to train"):
        train(cfg, tmp_path)


def test_init_from_another_model_shape_names_the_key(tmp_path, base_run):
    cfg = make_config(*TINY, "router=variational", "model.d_model=64", f"train.init_from={base_run}",
                      "train.freeze=backbone")
    with pytest.raises(ConfigError) as info:
        train(cfg, tmp_path)
    message = str(info.value)
    assert message.startswith("train.init_from=") and "model.d_model" in message and "\n" not in message
