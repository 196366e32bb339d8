"""Tiny randomly initialised Hugging Face MoE models of each family, saved locally (nothing is downloaded),
with a tiny tokenizer trained offline with `tokenizers` on standard-library text."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, vocab_size=VOCAB)
# DeepSeek-V2: a dense first layer and two MoE layers; multi-head latent attention has one key
# and value head per query head (its KV is shared through the latent, not through fewer heads).
MLA = dict(SHAPE, num_hidden_layers=3, num_key_value_heads=4, intermediate_size=48, moe_intermediate_size=16,
           n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=2, first_k_dense_replace=1,
           kv_lora_rank=16, qk_nope_head_dim=8, qk_rope_head_dim=4, v_head_dim=8)


def family_configs() -> dict:
    import transformers as tf

    return {
        "mixtral": tf.MixtralConfig(**SHAPE, intermediate_size=48, num_local_experts=4, num_experts_per_tok=2),
        "qwen2_moe": tf.Qwen2MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                       num_experts_per_tok=2, shared_expert_intermediate_size=24,
                                       norm_topk_prob=False, decoder_sparse_step=1),
        "qwen3_moe": tf.Qwen3MoeConfig(**SHAPE, intermediate_size=48, moe_intermediate_size=24, num_experts=4,
                                       num_experts_per_tok=2, norm_topk_prob=True, decoder_sparse_step=1),
        "olmoe": tf.OlmoeConfig(**SHAPE, intermediate_size=24, num_experts=4, num_experts_per_tok=2),
        "granitemoe": tf.GraniteMoeConfig(**SHAPE, intermediate_size=24, num_local_experts=4,
                                          num_experts_per_tok=2),
        "gpt_oss": tf.GptOssConfig(**SHAPE, intermediate_size=24, num_local_experts=4, num_experts_per_tok=2,
                                   head_dim=8, sliding_window=16, layer_types=["sliding_attention", "full_attention"]),
        # DeepSeek-V2-Lite: plain Top-K of the softmax scores, no query compression, factor 1.
        "deepseek_v2_lite": tf.DeepseekV2Config(**MLA, q_lora_rank=None, topk_method="greedy", n_group=1,
                                                topk_group=1, routed_scaling_factor=1.0),
        # DeepSeek-V2: Top-K inside the best of two expert groups (it differs from plain Top-K whenever
        # the second-best expert is in the other group), compressed queries, weights scaled by 2.5.
        "deepseek_v2": tf.DeepseekV2Config(**MLA, q_lora_rank=16, topk_method="group_limited_greedy", n_group=2,
                                           topk_group=1, routed_scaling_factor=2.5),
        # DeepSeek-V3 (Moonlight's configuration too): sigmoid scores plus the selection bias, Top-K inside
        # the best two of four groups (scored by their best two), renormalised, weights scaled by 2.5.
        "deepseek_v3": tf.DeepseekV3Config(**MLA, q_lora_rank=16, n_group=4, topk_group=2, norm_topk_prob=True,
                                           routed_scaling_factor=2.5),
        # GLM-4.5: sigmoid scores plus the selection bias, one group, renormalised, factor 1.8.
        "glm4_moe": tf.Glm4MoeConfig(**SHAPE, head_dim=8, intermediate_size=48, moe_intermediate_size=16,
                                     n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1,
                                     first_k_dense_replace=1, n_group=1, topk_group=1, norm_topk_prob=True,
                                     routed_scaling_factor=1.8),
    }


#: Families whose routers carry a selection bias (e_score_correction_bias): the stand-ins give it
#: random values, as a trained checkpoint's are, so that it changes the selection.
SELECTION_BIAS = ("deepseek_v3", "glm4_moe")


def train_tokenizer(path: Path, vocab_size: int = VOCAB, bos: bool = False) -> None:
    """A byte-level BPE tokenizer trained on a little standard-library prose, saved as a fast tokenizer.
    With ``bos`` it has a ``<bos>`` token (id 1) that encoding with special tokens puts in front, as
    Llama-style tokenizers (Mixtral's, DeepSeek's) do."""
    import inspect

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    text = [inspect.getdoc(obj) or "" for obj in (Path, dict, list, str, int, open, sorted, zip, map)]
    special = ["<eos>", "<bos>"] if bos else ["<eos>"]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=special,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:vocab_size - len(special)])
    tokenizer.train_from_iterator(text, trainer)
    if bos:
        tokenizer.post_processor = processors.TemplateProcessing(
            single="<bos> $A", pair="<bos> $A <bos> $B", special_tokens=[("<bos>", tokenizer.token_to_id("<bos>"))])
    special_tokens = {"eos_token": "<eos>", **({"bos_token": "<bos>"} if bos else {})}
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, **special_tokens).save_pretrained(path)


def save_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    """The family's tiny model and the tiny tokenizer, saved in ``path`` (the vocabulary is the tokenizer's)."""
    return _save(family_configs()[family], path, seed, bos=False)


def _save(config, path: Path, seed: int, bos: bool) -> Path:
    import transformers as tf

    train_tokenizer(path, bos=bos)
    tokenizer = tf.AutoTokenizer.from_pretrained(path)
    torch.manual_seed(seed)
    config.vocab_size = len(tokenizer)
    config.eos_token_id = config.pad_token_id = 0
    config.bos_token_id = tokenizer.bos_token_id if bos else 0
    model = tf.AutoModelForCausalLM.from_config(config)
    for p in model.parameters():  # some families leave stacked expert weights uninitialised
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.1)
    for name, buffer in model.named_buffers():  # the selection bias, of the scores' own size
        if name.endswith("e_score_correction_bias"):
            torch.nn.init.normal_(buffer, std=0.1)
    model.save_pretrained(path)
    return path


def _granite_standin():
    import transformers as tf

    # granite-3.0-3b-a800m: renormalised Top-K, tied embeddings, the muP multipliers (the attention
    # multiplier is 1/head_dim there, 1/64; here heads are 8 wide).
    return tf.GraniteMoeConfig(**SHAPE, intermediate_size=16, num_local_experts=8, num_experts_per_tok=2,
                               tie_word_embeddings=True, embedding_multiplier=12.0, logits_scaling=6.0,
                               residual_multiplier=0.22, attention_multiplier=1 / 8)


def _qwen_standin():
    import transformers as tf

    # Qwen1.5-MoE-A2.7B: the selected softmax entries unrenormalised, a sigmoid-gated shared expert as
    # wide as four routed ones, full multi-head attention, untied embeddings.
    return tf.Qwen2MoeConfig(**dict(SHAPE, num_key_value_heads=4), intermediate_size=64, moe_intermediate_size=16,
                             shared_expert_intermediate_size=64, num_experts=8, num_experts_per_tok=2,
                             norm_topk_prob=False, decoder_sparse_step=1, tie_word_embeddings=False)


def _deepseek_lite_standin():
    import transformers as tf

    # DeepSeek-V2-Lite: greedy Top-K, two shared experts, the first layer dense, factor 1, no query
    # compression, untied embeddings.
    return tf.DeepseekV2Config(**MLA, q_lora_rank=None, topk_method="greedy", n_group=1, topk_group=1,
                               routed_scaling_factor=1.0, norm_topk_prob=False, tie_word_embeddings=False)


#: The stand-ins' context: long enough for MMLU-Law's longest prompts in the tiny tokenizer, as the
#: real models' 4,096 tokens (and more) are for the real prompts.
STANDIN_CONTEXT = 2048
#: hub id -> (tiny config of the same structure, whether its tokenizer puts a BOS in front).
PAPER_MODELS = {
    "ibm-granite/granite-3.0-3b-a800m-base": (_granite_standin, False),
    "Qwen/Qwen1.5-MoE-A2.7B": (_qwen_standin, False),
    "deepseek-ai/DeepSeek-V2-Lite": (_deepseek_lite_standin, True),
}


def save_paper_standin(hub_id: str, path: Path, seed: int = 0) -> Path:
    """A tiny random model with the structure of one of the paper's models (``PAPER_MODELS``) and a
    tiny tokenizer (DeepSeek's puts a BOS in front, as the real one does), saved in ``path``."""
    make, bos = PAPER_MODELS[hub_id]
    config = make()
    config.max_position_embeddings = STANDIN_CONTEXT
    return _save(config, path, seed, bos=bos)
