"""Tiny randomly initialised Hugging Face MoE models of each family, saved locally (nothing is downloaded),
with a tiny tokenizer trained offline with `tokenizers` on standard-library text."""

from __future__ import annotations

from pathlib import Path

import torch

VOCAB = 96
SHAPE = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
             max_position_embeddings=128, vocab_size=VOCAB)


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
    }


def train_tokenizer(path: Path, vocab_size: int = VOCAB) -> None:
    """A byte-level BPE tokenizer trained on a little standard-library prose, saved as a fast tokenizer."""
    import inspect

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    text = [inspect.getdoc(obj) or "" for obj in (Path, dict, list, str, int, open, sorted, zip, map)]
    tokenizer = Tokenizer(models.BPE())
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<eos>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()[:vocab_size - 1])
    tokenizer.train_from_iterator(text, trainer)
    PreTrainedTokenizerFast(tokenizer_object=tokenizer, eos_token="<eos>").save_pretrained(path)


def save_tiny_model(family: str, path: Path, seed: int = 0) -> Path:
    """The family's tiny model and the tiny tokenizer, saved in ``path`` (the vocabulary is the tokenizer's)."""
    import transformers as tf

    train_tokenizer(path)
    vocab = len(tf.AutoTokenizer.from_pretrained(path))
    torch.manual_seed(seed)
    config = family_configs()[family]
    config.vocab_size = vocab
    config.bos_token_id = config.eos_token_id = config.pad_token_id = 0
    model = tf.AutoModelForCausalLM.from_config(config)
    for p in model.parameters():  # some families leave stacked expert weights uninitialised
        if p.ndim >= 2:
            torch.nn.init.normal_(p, std=0.1)
    model.save_pretrained(path)
    return path
