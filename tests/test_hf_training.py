"""Training a pretrained Hugging Face MoE model: bf16 that trains, and the memory a run states.

Models are tiny random ones saved locally (tests/hf_models.py); nothing is downloaded."""

from __future__ import annotations

import pytest
import torch

pytest.importorskip("transformers")

from vrmoe.checkpoint import load_checkpoint  # noqa: E402
from vrmoe.model import build_model  # noqa: E402
from vrmoe.train import train  # noqa: E402
from vrmoe.train.memory import memory_line, training_memory  # noqa: E402

from conftest import make_config  # noqa: E402
from hf_models import save_tiny_model  # noqa: E402

ONE_STEP = ["logger=none", "model.seq_len=32", "train.batch_size=4", "train.max_steps=1", "train.warmup_steps=0",
            "train.lr=1e-5", "train.weight_decay=0", "train.grad_clip=0", "train.eval_every=1",
            "train.eval_batches=1"]


@pytest.fixture(scope="module")
def qwen(tmp_path_factory):
    return save_tiny_model("qwen2_moe", tmp_path_factory.mktemp("hf") / "qwen2_moe")


def one_step_update(path, tmp_path, precision: str) -> dict[str, torch.Tensor]:
    app = make_config("model=hf", f"model.hf_name={path}", f"train.precision={precision}", *ONE_STEP)
    before = {n: p.detach().float().clone() for n, p in build_model(app, training=True).named_parameters()}
    train(app, tmp_path / precision)
    after = load_checkpoint(tmp_path / precision, "run")["model"]
    return {n: after[n].float() - before[n] for n in before if after[n].dtype == torch.float32}


def test_a_bf16_fine_tuning_step_moves_the_weights_as_the_fp32_step_does(qwen, tmp_path):
    # lr 1e-5 on weights of about 0.1 is far below half a bf16 ulp (about 2e-4 there): bf16 weights
    # would not move at all. fp32 master weights under bf16 autocast take the step.
    bf16, fp32 = one_step_update(qwen, tmp_path, "bf16"), one_step_update(qwen, tmp_path, "fp32")
    assert set(bf16) == set(fp32) and len(bf16) > 10  # every weight trains, and each is stored in fp32
    moved = torch.cat([d.flatten() for d in bf16.values()])
    reference = torch.cat([d.flatten() for d in fp32.values()])
    # What the fp32 step moves (the embedding rows of tokens the batch lacks get no gradient), bf16 moves too.
    moves = reference != 0
    assert moves.float().mean() > 0.5 and (moved[moves] != 0).float().mean() > 0.9
    # AdamW's first step is lr * sign(gradient): the bf16 forward changes the sign of a few small gradients only.
    assert (torch.sign(moved[moves]) == torch.sign(reference[moves])).float().mean() > 0.9
    assert torch.allclose(moved.abs().mean(), reference.abs().mean(), rtol=0.05)


def test_weights_that_train_are_fp32_and_frozen_ones_bf16(qwen):
    full = build_model(make_config("model=hf", f"model.hf_name={qwen}", "train.precision=bf16"), training=True)
    assert {p.dtype for p in full.parameters()} == {torch.float32}
    # Evaluation and frozen weights: bf16 (the router and its heads stay fp32).
    frozen = build_model(make_config("model=hf", f"model.hf_name={qwen}", "train.precision=bf16",
                                     "router=variational", "train.freeze=backbone"), training=True)
    assert frozen.hf.get_input_embeddings().weight.dtype == torch.bfloat16
    evaluated = build_model(make_config("model=hf", f"model.hf_name={qwen}", "train.precision=bf16"))
    assert evaluated.hf.get_input_embeddings().weight.dtype == torch.bfloat16


def test_the_memory_a_run_will_take_is_counted_from_what_it_holds(qwen, tmp_path):
    app = make_config("model=hf", f"model.hf_name={qwen}", "train.precision=bf16", "router=variational",
                      "train.freeze=backbone", *ONE_STEP)
    model = build_model(app, training=True)
    heads = [p for n, p in model.named_parameters() if n not in model.pretrained_parameters]
    for n, p in model.named_parameters():
        p.requires_grad_(n not in model.pretrained_parameters)
    memory = training_memory(model)
    n_heads = sum(p.numel() for p in heads)
    assert memory["params_trainable"] == n_heads
    assert memory["gradients_bytes"] == 4 * n_heads and memory["optimizer_bytes"] == 8 * n_heads
    assert memory["weights_bytes"] == sum(p.numel() * p.element_size() for p in model.parameters())
    line = memory_line(memory, 128)
    assert line.startswith(f"{n_heads / 1e6:,.2f}M of") and "128 tokens per step" in line and "\n" not in line
    summary = train(app, tmp_path)
    assert summary["memory"] == memory
