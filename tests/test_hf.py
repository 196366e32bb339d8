"""Pretrained Hugging Face MoE backbones (model=hf): exact swaps, the post-hoc protocol, bad input.

Every model here is a tiny random one of its family, built from its config and saved with
save_pretrained to a temporary directory with a tiny tokenizer trained offline: nothing is
downloaded.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")

import transformers  # noqa: E402

from vrmoe.checkpoint import load_checkpoint  # noqa: E402
from vrmoe.compose import compose_over_saved  # noqa: E402
from vrmoe.config import ConfigError, ModelConfig  # noqa: E402
from vrmoe.data.tokenizers import HFTokenizer, encode_prompt  # noqa: E402
from vrmoe.eval.run import evaluate_run  # noqa: E402
from vrmoe.data.corpora import load_corpus  # noqa: E402
from vrmoe.model import build_model, build_tokenizer  # noqa: E402
from vrmoe.model import hf  # noqa: E402
from vrmoe.model.hf import HFBackbone  # noqa: E402
from vrmoe.model.routers import build_router, router_config  # noqa: E402
from vrmoe.tracking import EVAL_FILE  # noqa: E402
from vrmoe.train import train  # noqa: E402

from conftest import make_config, run_cli  # noqa: E402
from hf_models import (PAPER_MODELS, SELECTION_BIAS, family_configs, save_paper_standin, save_tiny_model,  # noqa: E402
                       train_tokenizer)

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
    # softmax over the K selected logits, equal to the renormalised softmax up to rounding; DeepSeek-V2
    # takes the selected softmax entries, vrmoe's softmax equal to its own up to rounding; DeepSeek-V3
    # and GLM-4-MoE select on the sigmoid scores plus their bias and renormalise the selected scores.
    torch.testing.assert_close(got, want, atol=2e-6, rtol=0)
    # sigma = 1e-6 with the residual head at zero: the same routing up to noise of that size.
    torch.testing.assert_close(near, want, atol=1e-4, rtol=0)
    if family in SELECTION_BIAS:  # the probit mean of the sigmoid scores: sigmoid(mu) itself at sigma = 1e-6
        with torch.no_grad():
            probit = hf_model(tiny_models[family], "variational", sigma_init=1e-6, sigmoid_mean="probit", samples=4)
            torch.testing.assert_close(probit(idx).logits_BLV, want, atol=1e-4, rtol=0)
        original_bias = [m.e_score_correction_bias for m in original.modules() if hasattr(m, "e_score_correction_bias")]
        for layer, bias in zip(swapped.moe_layers, original_bias, strict=True):
            assert torch.equal(layer.router.e_score_correction_bias, bias)
    # Every MoE layer is swapped: both layers, or DeepSeek's two after its dense first layer.
    first_moe = getattr(original.config, "first_k_dense_replace", 0)
    assert swapped.moe_layer_names == [f"layer{i}" for i in range(first_moe, original.config.num_hidden_layers)]


@pytest.mark.parametrize("family", ["deepseek_v2_lite", "deepseek_v2", "deepseek_v3", "glm4_moe"])
def test_the_routing_vrmoe_sees_is_the_one_the_deepseek_model_uses(tiny_models, family):
    original = transformers.AutoModelForCausalLM.from_pretrained(tiny_models[family]).eval()
    used = []  # (logits, weights, indices) of the original routers
    for module in original.modules():
        if type(module).__name__.endswith("TopkRouter"):
            module.register_forward_hook(lambda module, args, output: used.append(output))
    idx = torch.randint(0, original.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        original(input_ids=idx)
        out = hf_model(tiny_models[family], "topk")(idx)
    scale = original.config.routed_scaling_factor
    rule_differs = False
    for routing, stats, (_, weights_TK, ids_TK) in zip(out.routings, out.layer_stats, used):
        # The experts the model ran, weighted by the selected scores times routed_scaling_factor: the
        # entries of the routing distribution as they are (DeepSeek-V2), or the selected sigmoid scores
        # renormalised (DeepSeek-V3, GLM: the distribution's entries renormalised, the same ratios);
        # the statistics count the same experts.
        assert torch.equal(routing.expert_ids_TK.sort(-1).values, ids_TK.sort(-1).values)
        selected_TK = routing.probs_TE.gather(-1, routing.expert_ids_TK)
        if family in SELECTION_BIAS:
            selected_TK = selected_TK / selected_TK.sum(-1, keepdim=True)
        torch.testing.assert_close(routing.gates_TK, selected_TK * scale)
        torch.testing.assert_close(routing.gates_TK.sort(-1).values, weights_TK.sort(-1).values, atol=1e-6, rtol=0)
        counts_E = torch.bincount(ids_TK.reshape(-1), minlength=8).float()
        torch.testing.assert_close(stats["utilisation"], counts_E / counts_E.sum())
        plain_TK = routing.probs_TE.topk(2, dim=-1).indices.sort(-1).values
        rule_differs |= bool((plain_TK != routing.expert_ids_TK.sort(-1).values).any())
    # DeepSeek-V2's group limit, and DeepSeek-V3's and GLM's bias (and V3's groups), change the
    # selection on some tokens; V2-Lite's greedy rule never does.
    assert rule_differs == (family != "deepseek_v2_lite")


def test_group_limited_top_k_chooses_inside_the_kept_groups():
    # Two groups of three experts; the first holds the best score, so only it is kept (softmax: a group
    # scores its best entry, DeepSeek-V2's rule).
    probs_TE = torch.tensor([[0.35, 0.05, 0.15, 0.25, 0.10, 0.10]])

    def chosen(n_group, topk_group, perturbed_TE=None):
        router = build_router(4, 6, router_config("topk", k=2, n_group=n_group, topk_group=topk_group))
        return router.select(probs_TE, perturbed_TE)[0].sort(-1).values.tolist()

    assert chosen(2, 1) == [[0, 2]]  # the kept group's best two, not the plain Top-K [0, 3]
    assert chosen(2, 2) == [[0, 3]]
    # A sampling router's draw is made inside the kept groups too: expert 3's perturbed score is the
    # largest, but its group is out.
    assert chosen(2, 1, torch.tensor([[0.0, 2.0, 0.0, 9.0, 0.0, 0.0]])) == [[0, 1]]
    # Sigmoid scores (DeepSeek-V3's rule): a group scores the sum of its best two, so the second group
    # (0.8 + 0.7) beats the first (0.9 + 0.1) though the first holds the best expert.
    router = build_router(4, 6, router_config("topk", k=2, n_group=2, topk_group=1, scoring_func="sigmoid"))
    scores_TE = torch.tensor([[0.9, 0.1, 0.1, 0.8, 0.7, 0.1]])
    assert router.select(scores_TE)[0].sort(-1).values.tolist() == [[3, 4]]


def test_deepseek_shape_parameters_and_flops(tiny_models):
    app = make_config("model=hf", f"model.hf_name={tiny_models['deepseek_v2']}")
    assert (app.router.k, app.model.n_experts, app.model.d_model, app.model.n_layers) == (2, 8, 32, 3)
    model = hf_model(tiny_models["deepseek_v2"], "topk")
    config = model.hf.config
    named = dict(model.hf.named_parameters())
    routed = sum(p.numel() for n, p in named.items() if ".mlp.experts." in n)
    counts = model.parameter_counts()
    assert counts["experts"] == routed and counts["active"] == int(counts["total"] - routed * (1 - 2 / 8))
    flops = model.flops_per_token(samples=1, context=15)
    # Multi-head latent attention: every projection (q_a/q_b, kv_a_proj_with_mqa, kv_b, o) once, and
    # scores over qk_nope + qk_rope wide query-key heads and v_head_dim wide values.
    projections = sum(p.numel() for n, p in named.items() if ".self_attn." in n and p.ndim == 2)
    assert {n.split(".")[-2] for n, p in named.items() if ".self_attn." in n and p.ndim == 2} == {
        "q_a_proj", "q_b_proj", "kv_a_proj_with_mqa", "kv_b_proj", "o_proj"}
    head_dims = config.qk_nope_head_dim + config.qk_rope_head_dim + config.v_head_dim
    scores = 2 * config.num_attention_heads * head_dims * (15 + 1) / 2
    assert flops.attention == 2 * projections + scores * config.num_hidden_layers
    # The dense first layer, the shared experts and the untied output head count whole; routed experts K of E.
    dense = sum(p.numel() for n, p in named.items() if p.ndim == 2 and (".layers.0.mlp." in n or "shared_experts" in n
                                                                         or n == "lm_head.weight"))
    assert flops.other == 2 * dense and flops.experts == 2 * routed * 2 / 8


def test_an_older_transformers_is_one_line_naming_both_versions(monkeypatch):
    hf._transformers()  # the installed one is new enough
    # The module the import statement finds now (transformers may have replaced its lazy module).
    monkeypatch.setattr(sys.modules["transformers"], "__version__", "5.20.0")
    with pytest.raises(ConfigError) as err:
        hf._transformers()
    assert str(err.value) == (f"model=hf needs transformers>={hf.MIN_TRANSFORMERS}, found 5.20.0: "
                              f"pip install 'transformers>={hf.MIN_TRANSFORMERS}'")
    # The extras ask for the same release.
    pyproject = (Path(__file__).parents[1] / "pyproject.toml").read_text()
    assert pyproject.count(f'"transformers>={hf.MIN_TRANSFORMERS}"') == 3 and pyproject.count('"transformers>=') == 3


def test_prompts_start_with_bos_exactly_when_the_checkpoints_tokenizer_adds_one(tmp_path):
    from vrmoe.data.mcq import MCQItem, encode_items
    from vrmoe.data.mcq_datasets import LETTERS, MCQQuestion, encode_questions, letter_tokens

    train_tokenizer(tmp_path / "bos", bos=True)
    train_tokenizer(tmp_path / "plain")
    with_bos, plain = HFTokenizer(str(tmp_path / "bos")), HFTokenizer(str(tmp_path / "plain"))
    assert with_bos.bos_ids == (with_bos.tokenizer.bos_token_id,) == (1,) and plain.bos_ids == ()
    question = MCQQuestion("Which of these is a list?", ("a dict", "a list", "a str", "an int"), 1)
    item = MCQItem("Return a new ", " of the items.", ("list", "dict", "str", "int"), 0)
    for tokenizer, bos in ((with_bos, [1]), (plain, [])):
        text = tokenizer.encode(question.prompt()).tolist()
        assert encode_prompt(tokenizer, question.prompt()).tolist() == bos + text
        assert text[:1] != [1] or not bos  # encode itself never adds one
        # The letters are the letters' own last tokens, not a BOS.
        prefix, letters = letter_tokens(tokenizer)
        assert letters.tolist() == [int(tokenizer.encode(f" {letter}")[-1]) for letter in LETTERS]
        tensors = encode_questions([question], tokenizer, 256, "test")
        n = int(tensors.lengths_N[0])
        assert tensors.tokens_NL[0, :n].tolist() == bos + text + prefix.tolist()  # and no EOS at the end
        cloze = encode_items([item], tokenizer)
        for o in range(4):
            length = int(cloze.lengths_NO[0, o])
            assert cloze.tokens_NOL[0, o, :length].tolist() == bos + tokenizer.encode(item.filled(o)).tolist()
        assert int(cloze.starts_N[0]) == len(bos) + len(tokenizer.encode(item.prefix))


@pytest.mark.parametrize("hub_id", list(PAPER_MODELS))
def test_paper_standins_have_the_real_models_structure(tmp_path, hub_id):
    path = save_paper_standin(hub_id, tmp_path / "model")
    config = transformers.AutoConfig.from_pretrained(path)
    real = transformers.AutoConfig.from_pretrained(PAPER_CONFIGS / {
        "ibm-granite/granite-3.0-3b-a800m-base": "granite-3.0-3b-a800m-base", "Qwen/Qwen1.5-MoE-A2.7B": "qwen1.5-moe-a2.7b",
        "deepseek-ai/DeepSeek-V2-Lite": "deepseek-v2-lite"}[hub_id])
    assert config.model_type == real.model_type and config.hidden_size <= 32
    for key in ("tie_word_embeddings", "norm_topk_prob", "topk_method", "n_shared_experts", "first_k_dense_replace",
                "routed_scaling_factor", "q_lora_rank", "embedding_multiplier", "logits_scaling",
                "residual_multiplier"):
        assert getattr(config, key, None) == getattr(real, key, None), key
    shared = [getattr(c, "shared_expert_intermediate_size", 0) > 0 for c in (config, real)]
    assert shared[0] == shared[1]
    # DeepSeek's tokenizer puts a BOS in front, as the real one does; Granite's and Qwen's do not.
    assert HFTokenizer(str(path)).bos_ids == ((1,) if real.model_type == "deepseek_v2" else ())
    model = hf_model(path, "topk")
    assert len(model.moe_layers) == config.num_hidden_layers - getattr(config, "first_k_dense_replace", 0)


PAPER_CONFIGS = Path(__file__).parents[1] / "experiments" / "paper_models"


@pytest.mark.parametrize("slug, total, active", [
    ("granite-3.0-3b-a800m-base", 3_298_788_864, 0.88e9),  # 3.3B; 800M active besides the embedding
    ("qwen1.5-moe-a2.7b", 14_315_784_192, 2.69e9),  # 14.3B, A2.7B
    ("deepseek-v2-lite", 15_706_484_224, 2.66e9),  # 15.7B; 2.4B active besides the embedding
    ("olmoe-1b-7b-0924", 6_919_161_856, 1.28e9),  # 6.9B total, 1.3B active
    ("mixtral-8x7b-v0.1", 46_702_792_704, 12.88e9),  # 46.7B total, 12.9B active
])
def test_the_paper_model_configs_give_the_published_totals(slug, total, active):
    config = transformers.AutoConfig.from_pretrained(PAPER_CONFIGS / slug)
    with torch.device("meta"):  # shapes only: no memory, nothing downloaded
        model = transformers.AutoModelForCausalLM.from_config(config)
    assert sum(p.numel() for p in model.parameters()) == total
    experts = sum(p.numel() for m in model.modules() if type(m).__name__.endswith("Experts") for p in m.parameters())
    n_experts = getattr(config, "num_local_experts", None) or config.num_experts
    assert abs(total - experts * (1 - config.num_experts_per_tok / n_experts) - active) < 0.01e9


def test_the_last_n_layers_get_the_router_the_rest_top_k(tiny_models):
    model = HFBackbone(ModelConfig(name="hf", backbone="hf", hf_name=str(tiny_models["olmoe"])),
                       router_config("variational", k=2, layers="1"))
    assert [layer.router.name for layer in model.moe_layers] == ["topk", "variational"]


@pytest.mark.parametrize("override", ["router.scoring_func=sigmoid", "router.n_group=2", "model.n_shared_experts=1",
                                      "router.routed_scaling_factor=2.5"])
def test_the_native_routing_keys_are_one_line_for_a_pretrained_model(tiny_models, override):
    with pytest.raises(ConfigError) as err:
        make_config("model=hf", f"model.hf_name={tiny_models['deepseek_v3']}", override)
    assert str(err.value).startswith(f"{override} is for the native model; model=hf")


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
    # DeepSeek-V3's default n_group=8 cannot split 4 experts into groups.
    (lambda root: save_family(root / "dsv3", transformers.DeepseekV3Config), ["n_group=8", "group-limited Top-K"]),
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
