"""Composition of every config group, the top-level knobs, and validation messages."""

from __future__ import annotations

import pytest

from vrmoe.compose import CONFIG_GROUPS, check_overrides, group_options
from vrmoe.config import ConfigError

from conftest import make_config


@pytest.mark.parametrize("group", [g for g in CONFIG_GROUPS if g not in ("experiment", "hparams_search")])
def test_every_option_of_every_group_composes(group, tmp_path):
    for option in group_options(group):
        extra = {"text": [f"data.path={tmp_path}"], "hf": [f"{group}.hf_name={tmp_path}"],
                 "mcq": [f"data.mcq_name={tmp_path}"]}.get(option, [])
        if group == "model" and option == "hf":  # a pretrained checkpoint: tested in test_hf.py
            continue
        section = getattr(make_config(f"{group}={option}", *extra), group)
        # Every named option's file is what gets composed (eval/train options carry no name).
        assert getattr(section, "name", option) == option


def test_experiment_presets_compose():
    for option in group_options("experiment"):
        cfg = make_config(f"experiment={option}")
        assert cfg.train.max_steps >= 1


def test_the_optuna_preset_sets_its_router_objective_and_evaluation():
    pytest.importorskip("hydra_plugins.hydra_optuna_sweeper")
    cfg = make_config("hparams_search=variational_ece")
    assert (cfg.router.name, cfg.train.objective, cfg.eval.at_end) == ("variational", "mcq_ece", True)


def test_top_level_knobs_reach_the_router():
    cfg = make_config("K=1", "S=8", "T=0.7", "beta=0.5")
    assert (cfg.router.k, cfg.router.samples) == (1, 8)
    assert make_config("router=temperature", "T=0.7").router.temperature == 0.7
    assert make_config("router=variational", "beta=0.5").router.beta == 0.5


def test_defaults_are_the_documented_ones():
    cfg = make_config()
    assert (cfg.model.name, cfg.router.name, cfg.data.name, cfg.logger.name, cfg.logger.mode) == \
        ("small", "topk", "stdlib_docs", "wandb", "offline")


@pytest.mark.parametrize("override, words", [
    ("K=9", ["K=9", "[1, 8]"]),
    ("K=0", ["K=0", "[1, 8]"]),
    ("S=0", ["S=0", "positive"]),
    ("T=0", ["T=0", "> 0"]),
    ("beta=-1", ["beta=-1", ">= 0"]),
    ("train.max_steps=0", ["train.max_steps=0"]),
    ("train.lr=0", ["train.lr=0"]),
    ("train.lr=-1e-3", ["train.lr"]),
    ("train.lr=inf", ["train.lr=inf", "finite"]),  # inf passes a "> 0" check
    ("T=inf", ["T=inf", "finite"]),
    ("beta=nan", ["beta=nan", "finite"]),
    ("eval.gammas=[0,inf]", ["eval.gammas", "finite"]),
    ("seed=99999999999999999999", ["seed=", "2^40"]),
    ("model.dropout=2", ["model.dropout=2", "[0, 1)"]),
    ("train.weight_decay=-1", ["train.weight_decay", ">= 0"]),
])
def test_bad_values_give_one_line_naming_the_key(override, words):
    with pytest.raises(ConfigError) as info:
        make_config(override)
    message = str(info.value)
    assert "\n" not in message
    for word in words:
        assert word in message


@pytest.mark.parametrize("override, allowed", [
    ("router=nope", "topk"), ("model=huge", "tiny"), ("data=wiki", "stdlib_docs")])
def test_unknown_group_choice_is_refused_before_hydra(override, allowed):
    with pytest.raises(ConfigError) as info:
        check_overrides([override])
    assert override.split("=")[1] in str(info.value) and allowed in str(info.value)


def test_sweep_lists_are_checked_item_by_item():
    check_overrides(["router=topk", "model=tiny,small"])
    with pytest.raises(ConfigError, match="'bogus'"):
        check_overrides(["model=tiny,bogus"])


@pytest.mark.parametrize("override", ["train.max_steps=abc", "K=1.5", "seed=0,x"])
def test_a_value_of_the_wrong_type_is_one_line_before_hydra(override):
    with pytest.raises(ConfigError) as info:
        check_overrides([override])
    assert "could not be converted" in str(info.value) and "\n" not in str(info.value)


def test_model_hf_without_a_name_says_so_before_looking_anything_up():
    with pytest.raises(ConfigError) as info:
        make_config("model=hf")
    assert str(info.value) == "model=hf needs model.hf_name=<hub id or local directory>"


def test_posthoc_heads_train_on_the_papers_objective_unless_told_otherwise():
    # The Switch balance loss is for routers trained from scratch; post-hoc heads on a frozen
    # pretrained router train on L_task + beta * KL alone, unless the user sets the weight.
    assert make_config("router=variational").router.load_balance_weight == 0.01
    posthoc = ("router=variational", "train.freeze=backbone", "train.init_from=somewhere")
    assert make_config(*posthoc).router.load_balance_weight == 0.0
    assert make_config(*posthoc, "router.load_balance_weight=0.05").router.load_balance_weight == 0.05


@pytest.mark.parametrize("overrides, message", [
    (["router=swag", "train.max_steps=10"], "router.swag_start=50 is not below train.max_steps=10: no iterate would"),
    (["eval.mcq_items=0"], "eval.mcq_items=0 must be a positive integer, or null (the default)"),
])
def test_a_value_that_would_do_nothing_or_too_little_is_one_line(overrides, message):
    with pytest.raises(ConfigError) as info:
        make_config(*overrides)
    assert str(info.value).startswith(message) and "\n" not in str(info.value)
