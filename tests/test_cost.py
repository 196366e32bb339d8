"""`vrmoe cost`: router FLOPs over Top-K's at real models' shapes, counted on the meta device."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

pytest.importorskip("transformers")

from vrmoe.config import ModelConfig  # noqa: E402
from vrmoe.cost import MetaBackbone, model_cost, thinnest_heads  # noqa: E402
from vrmoe.model.hf import HFBackbone  # noqa: E402
from vrmoe.model.routers import router_config  # noqa: E402

from conftest import run_cli  # noqa: E402

# A tiny OLMoE: D = 32, 2 layers, 4 heads of 8 (2 KV heads), 4 experts of 24, top-2, 96 tokens, untied.
TINY_OLMOE = {"architectures": ["OlmoeForCausalLM"], "model_type": "olmoe", "hidden_size": 32,
              "num_hidden_layers": 2, "num_attention_heads": 4, "num_key_value_heads": 2, "intermediate_size": 24,
              "num_experts": 4, "num_experts_per_tok": 2, "vocab_size": 96, "max_position_embeddings": 128,
              "norm_topk_prob": False, "tie_word_embeddings": False, "eos_token_id": 0, "pad_token_id": 0}


@pytest.fixture
def tiny_dir(tmp_path) -> Path:
    path = tmp_path / "tiny-olmoe"
    path.mkdir()
    (path / "config.json").write_text(json.dumps(TINY_OLMOE), encoding="utf-8")
    return path


def table_rows(out: str) -> dict[tuple[str, str], list[str]]:
    """(router, S) -> the cells of the first table's row."""
    rows = {}
    for line in out.split("\n\n*Under")[0].splitlines():
        if line.startswith("| ") and not line.startswith("| router"):
            cells = [c.strip() for c in line.strip("|").split("|")]
            rows.setdefault((cells[0], cells[1]), cells[2:])
    return rows


def percent(cell: str) -> float:
    return float(cell.split("%")[0])


def test_cost_runs_on_a_config_dir_and_orders_the_settings(tiny_dir, tmp_path):
    out = run_cli("cost", str(tiny_dir), "--samples", "1", "32", cwd=tmp_path).stdout
    assert ("*tiny-olmoe: OlmoeForCausalLM, D=32, E=4, K=2, 2 MoE layers of 2; Top-K model 0.00 GFLOPs per token "
            "at evaluation, context 256; thinnest heads: 1 hidden unit(s)*") in out
    assert ("| router | S | all MoE layers, default heads | all MoE layers, thinnest heads | last MoE layer, default "
            "heads | last MoE layer, thinnest heads |") in out
    rows = table_rows(out)
    assert rows[("topk", "1")] == rows[("topk", "32")] == ["0.000% yes"] * 4
    all_default, all_thin, last_default, last_thin = range(4)
    diag_1, diag_32 = ([percent(c) for c in rows[("variational diag", s)]] for s in ("1", "32"))
    # The variational router's S samples cost router work: more at S = 32; on the last layer only, half.
    assert diag_32[all_default] > diag_1[all_default] and diag_32[all_thin] > diag_1[all_thin]
    assert diag_1[last_default] < diag_1[all_default] and diag_32[last_default] < diag_32[all_default]
    assert diag_1[last_default] == pytest.approx(diag_1[all_default] / 2, abs=1e-3)
    assert diag_1[all_thin] < diag_1[all_default]  # thinner heads cost less
    # A router without heads costs the same under both head settings; VTSR's cost does not depend on S.
    assert rows[("mc_dropout", "32")][all_default] == rows[("mc_dropout", "32")][all_thin]
    assert rows[("vtsr", "1")] == rows[("vtsr", "32")]
    assert "*Under 1% on how many" not in out  # one model: no summary


def test_a_value_checked_by_hand_on_the_tiny_shape(tiny_dir):
    # Per layer: attention projections 2 x (32x32 + 2 x 16x32 + 32x32) = 6,144, scores over the mean
    # context of 256: 2 x 4 heads x (8 + 8) x 257 / 2 = 16,448; experts 2 x K=2 x 3 x 32 x 24 = 9,216;
    # Top-K's router: gate 2 x 32 x 4 = 256, softmax 5 x 4 = 20, renormalising 2 x 2 = 4: 280. Once:
    # the untied output head 2 x 96 x 32 = 6,144. Two layers: 2 x (6,144 + 16,448 + 9,216 + 280) + 6,144.
    topk = 2 * (6_144 + 16_448 + 9_216 + 280) + 6_144
    # Variational diag, D/4 = 8 hidden: two heads of (2 x 32 x 8 + 8) + (2 x 8 x 4 + 4) = 588 FLOPs;
    # sigma from its log 4; per sample mu + sigma * eps 8, softmax 20, running mean 4; gate 256 and
    # renormalising 4. At S = 32: 256 + 1,176 + 4 + 32 x 32 + 4 = 2,464 per layer, 2,184 above Top-K's.
    assert topk == 70_320
    cost = model_cost(tiny_dir, samples=(1, 32))
    assert cost.topk_flops == topk
    assert cost.cells[("variational diag", 32)][("all", "default")].overhead == pytest.approx(2 * 2_184 / topk)
    assert cost.cells[("variational diag", 1)][("last", "default")].overhead == pytest.approx((1_472 - 280) / topk)
    # Thinnest: one shared hidden unit, 2 x 32 + 1 = 65, then two output layers of 2 x 4 + 4 = 12 each.
    assert cost.cells[("variational diag", 1)][("all", "thinnest")].overhead == pytest.approx(
        2 * (256 + 89 + 4 + 32 + 4 - 280) / topk)


def test_the_meta_model_counts_what_the_loaded_model_counts(tmp_path):
    """The meta-device model is counted by HFBackbone's own methods: built from the same config it
    gives the numbers of the model loaded with its weights, router by router."""
    from hf_models import save_tiny_model

    path = save_tiny_model("qwen2_moe", tmp_path / "qwen2_moe")
    meta = MetaBackbone(path, context=32)
    for name, fields in [("topk", {}), ("variational", {"covariance": "full", "layers": "1"}),
                         ("vtsr", {"head_hidden_ratio": 0.5}), ("mc_dropout", {})]:
        cfg = router_config(name, k=2, **fields)
        loaded = HFBackbone(ModelConfig(name="hf", backbone="hf", hf_name=str(path), seq_len=32), cfg)
        meta.swap(cfg)
        for samples in (1, 8):
            assert meta.flops_per_token(samples) == loaded.flops_per_token(samples), (name, samples)
        assert meta.parameter_counts() == loaded.parameter_counts(), name
        assert [layer.router.name for layer in meta.moe_layers] == [layer.router.name for layer in loaded.moe_layers]
        assert meta.moe_layer_names == loaded.moe_layer_names
        assert all(p.is_meta for p in meta.parameters())


def test_the_thinnest_heads_are_one_hidden_unit_and_shared():
    model = ModelConfig(name="hf", backbone="hf", d_model=2048, n_experts=64, top_k=8)
    thin = thinnest_heads(router_config("variational", k=8, covariance="full"), model)
    assert (thin.head_hidden_ratio, thin.shared_hidden, thin.covariance) == (1 / 2048, True, "full")
    assert thinnest_heads(router_config("vtsr", k=8), model).head_hidden_ratio == 1 / 2048
    dropout = router_config("mc_dropout", k=8)
    assert thinnest_heads(dropout, model) == dropout  # no heads


@pytest.mark.parametrize("make, message", [
    (lambda p: p, "neither a model directory (with a config.json) nor a folder of them"),
    (lambda p: (p / "config.json").write_text("{not json") and p, "cannot read its config.json"),
])
def test_a_bad_model_dir_is_one_line(tmp_path, make, message):
    path = tmp_path / "model"
    path.mkdir()
    proc = run_cli("cost", str(make(path)), cwd=tmp_path, check=False)
    errors = [line for line in proc.stderr.splitlines() if line.startswith("error:")]
    assert proc.returncode == 2 and len(errors) == 1 and message in errors[0], proc.stderr
    assert "Traceback" not in proc.stderr and proc.stderr.strip().endswith(errors[0])


def test_bad_samples_are_one_line(tiny_dir, tmp_path):
    proc = run_cli("cost", str(tiny_dir), "--samples", "0", cwd=tmp_path, check=False)
    assert proc.returncode == 2 and proc.stderr.strip() == "error: --samples 0: must be at least 1"
