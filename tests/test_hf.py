"""Pretrained Hugging Face MoE backbones (model=hf): exact swaps, the post-hoc protocol, bad input.

Every model here is a tiny random one of its family, built from its config and saved with
save_pretrained to a temporary directory with a tiny tokenizer trained offline: nothing is
downloaded.
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from vrmoe.checkpoint import load_checkpoint  # noqa: E402
from vrmoe.compose import compose_over_saved  # noqa: E402
from vrmoe.config import ModelConfig  # noqa: E402
from vrmoe.data.tokenizers import HFTokenizer  # noqa: E402
from vrmoe.eval.run import evaluate_run  # noqa: E402
from vrmoe.data.corpora import load_corpus  # noqa: E402
from vrmoe.model import build_model, build_tokenizer  # noqa: E402
from vrmoe.model.hf import HFBackbone  # noqa: E402
from vrmoe.model.routers import router_config  # noqa: E402
from vrmoe.tracking import EVAL_FILE  # noqa: E402
from vrmoe.train import train  # noqa: E402

from conftest import make_config, run_cli  # noqa: E402
from hf_models import family_configs, save_tiny_model  # noqa: E402

FAMILIES = list(family_configs())
RUN = ["logger=none", "model.seq_len=32", "train.batch_size=4", "train.log_every=2", "train.eval_every=2",
       "train.eval_batches=1", "train.warmup_steps=1", "train.max_steps=2"]


@pytest.fixture(scope="module")
def tiny_models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("hf")
    return {family: save_tiny_model(family, root / family) for family in FAMILIES}


def hf_model(path: Path, router: str, **fields) -> HFBackbone:
    torch.manual_seed(0)
    return HFBackbone(ModelConfig(name="hf", backbone="hf", hf_name=str(path), seq_len=32),
                      router_config(router, k=2, **fields)).eval()


@pytest.mark.parametrize("family", FAMILIES)
def test_swapped_topk_router_gives_the_original_logits(tiny_models, family):
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    idx = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want = original(input_ids=idx).logits
        swapped = hf_model(tiny_models[family], "topk")
        got = swapped(idx).logits_BLV
        near = hf_model(tiny_models[family], "variational", sigma_init=1e-6)(idx).logits_BLV
    # Mixtral, Qwen and OLMoE renormalise exactly as vrmoe does (bitwise); GraniteMoE and gpt-oss take a
    # softmax over the K selected logits, equal to the renormalised softmax up to rounding.
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    # sigma = 1e-6 with the residual head at zero: the same routing up to noise of that size.
    torch.testing.assert_close(near, want, atol=1e-4, rtol=0)
    assert len(swapped.moe_layers) == 2 and swapped.moe_layer_names == ["layer0", "layer1"]


def test_the_last_n_layers_get_the_router_the_rest_top_k(tiny_models):
    model = HFBackbone(ModelConfig(name="hf", backbone="hf", hf_name=str(tiny_models["olmoe"])),
                       router_config("variational", k=2, layers="1"))
    assert [layer.router.name for layer in model.moe_layers] == ["topk", "variational"]


def test_k_and_the_shape_follow_the_checkpoint(tiny_models):
    cfg = make_config("model=hf", f"model.hf_name={tiny_models['qwen3_moe']}")
    vocab = len(transformers.AutoTokenizer.from_pretrained(tiny_models["qwen3_moe"]))
    assert (cfg.router.k, cfg.model.n_experts, cfg.model.d_model, cfg.model.vocab_size) == (2, 4, 32, vocab)
    assert make_config("model=hf", f"model.hf_name={tiny_models['qwen3_moe']}", "K=1").router.k == 1


def test_post_hoc_training_trains_only_the_heads_and_stores_only_them(tiny_models, tmp_path):
    app = make_config("model=hf", f"model.hf_name={tiny_models['qwen2_moe']}", "router=variational",
                      "train.freeze=backbone", *RUN)
    summary = train(app, tmp_path)
    model = build_model(app)
    heads = sum(p.numel() for n, p in model.named_parameters() if n not in model.pretrained_parameters)
    assert summary["params_trainable"] == heads < summary["params_total"] / 10
    state = load_checkpoint(tmp_path, "run")
    assert set(state["model"]) == {n for n in model.state_dict() if n not in model.pretrained_parameters}
    n_optimised = sum(v["exp_avg"].numel() for v in state["optimizer"]["state"].values())
    assert n_optimised == heads  # no optimiser state for the frozen weights
    # The routing statistics and the KL are logged per layer, as for the native model.
    row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[-1])
    assert set(row["moe"]) == {"layer0", "layer1"} and row["moe"]["layer1"]["kl"] >= 0
    # vrmoe eval rebuilds the model from the base and the stored heads; every probe runs.
    app_eval = compose_over_saved(state["config"], ["S=2", "eval.windows=2", "eval.mcq_items=4",
                                                    "eval.stability_windows=1", "eval.gammas=[0.01]"])
    evaluate_run(tmp_path, app_eval)
    result = json.loads((tmp_path / EVAL_FILE).read_text())
    assert {"logit_variance", "mutual_information", "gate_entropy"} <= set(result["ood"]["far"]["auroc"])
    assert result["cost"]["router_overhead_vs_topk"] > 0 and result["stability"]["jaccard"]["mean"][0] > 0


def test_bf16_weights_with_fp32_router_heads(tiny_models, tmp_path):
    app = make_config("model=hf", f"model.hf_name={tiny_models['mixtral']}", "router=variational",
                      "train.freeze=backbone", "train.precision=bf16", *RUN)
    model = build_model(app)
    assert model.hf.get_input_embeddings().weight.dtype == torch.bfloat16
    assert {p.dtype for n, p in model.named_parameters() if n not in model.pretrained_parameters} == {torch.float32}
    assert train(app, tmp_path)["status"] == "completed"


def test_the_corpus_uses_the_checkpoints_tokenizer(tiny_models):
    app = make_config("model=hf", f"model.hf_name={tiny_models['mixtral']}", *RUN)
    corpus = load_corpus(app.data, tokenizer=build_tokenizer(app))
    in_bytes = load_corpus(app.data)
    assert isinstance(corpus.tokenizer, HFTokenizer)
    text = in_bytes.tokenizer.decode(in_bytes.val)
    assert torch.equal(corpus.val.long(), corpus.tokenizer.encode(text))
    assert corpus.tokenizer.decode(corpus.val[:200]) == text[:len(corpus.tokenizer.decode(corpus.val[:200]))]


@pytest.mark.parametrize("make, words", [
    (lambda root: root / "nowhere", ["model.hf_name", "no such directory"]),
    (lambda root: save_dense(root / "llama"), ["not a Mixture-of-Experts model"]),
    (lambda root: save_family(root / "dsv3", transformers.DeepseekV3Config), ["deepseek_v3", "cannot be swapped"]),
])
def test_bad_models_are_one_line_exit_2_and_nothing_written(tmp_path, make, words):
    path = make(tmp_path)
    proc = run_cli("train", "model=hf", f"model.hf_name={path}", *RUN, cwd=tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1 and "Traceback" not in proc.stderr, proc.stderr
    for word in words:
        assert word in err[0]
    assert not (tmp_path / "outputs").exists() or not any((tmp_path / "outputs").rglob("summary.json"))


def test_a_hub_name_while_offline_is_one_line(tmp_path, monkeypatch):
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")  # read when the hub client is imported: a fresh process
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf_home"))
    proc = run_cli("train", "model=hf", "model.hf_name=someone/no-such-moe", *RUN, cwd=tmp_path, check=False)
    err = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(err) == 1, proc.stderr
    assert "model.hf_name=someone/no-such-moe: cannot read its config" in err[0]


def save_dense(path: Path) -> Path:
    config = transformers.LlamaConfig(hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                                      num_attention_heads=2, vocab_size=64)
    transformers.AutoModelForCausalLM.from_config(config).save_pretrained(path)
    return path


def save_family(path: Path, config_class) -> Path:
    config = config_class(hidden_size=16, intermediate_size=32, moe_intermediate_size=16, num_hidden_layers=1,
                          num_attention_heads=2, vocab_size=64, n_routed_experts=4, num_experts_per_tok=2)
    config.save_pretrained(path)
    return path


def test_post_hoc_on_a_multiple_choice_dataset_with_ood_datasets(tiny_models, tmp_path):
    from test_mcq_datasets import make_dataset

    data, other = make_dataset(tmp_path / "arith", 16), make_dataset(tmp_path / "other", 8, offset=40)
    app = make_config("model=hf", f"model.hf_name={tiny_models['olmoe']}", "router=variational",
                      "train.freeze=backbone", "data=mcq", f"data.mcq_name={data}", "task=mcq", *RUN,
                      "model.seq_len=64", "S=2", "eval.mcq_items=8", "eval.windows=2", "eval.stability_windows=1",
                      "eval.gammas=[0.01]", f"eval.ood_mcq=[{other}]")
    train(app, tmp_path / "run")
    result = evaluate_run(tmp_path / "run", app)
    assert result["ood_task"] == "mcq" and set(result["ood"]) == {"other", "scores", "predictions"}
    assert {"logit_variance", "mutual_information"} <= set(result["ood"]["other"]["auroc"])
    assert sum(result["calibration"]["mcq"]["reliability"]["bin_count"]) == 8
