"""What a training run will hold in memory, stated before it runs.

Counted from the model as built (after freezing): the weights in the dtype each is held in,
and for every parameter that trains an fp32 gradient and AdamW's two fp32 moments. Activations
depend on the batch, the sequence length and the kernels, and are not counted.
"""

from __future__ import annotations

from typing import Any

import torch

GIB = 1024 ** 3
ADAMW_STATES = 2  # exp_avg and exp_avg_sq, each the parameter's shape and dtype


def training_memory(model: torch.nn.Module) -> dict[str, Any]:
    """Parameters (total, trainable) and the bytes of weights, gradients and optimiser state."""
    params = list(model.parameters())
    trainable = [p for p in params if p.requires_grad]
    return {
        "params_total": sum(p.numel() for p in params),
        "params_trainable": sum(p.numel() for p in trainable),
        "weights_bytes": sum(p.numel() * p.element_size() for p in params),
        "gradients_bytes": sum(p.numel() * p.element_size() for p in trainable),
        "optimizer_bytes": ADAMW_STATES * sum(p.numel() * p.element_size() for p in trainable),
    }


def gib(n_bytes: float) -> str:
    return f"{n_bytes / GIB:.3g} GiB" if n_bytes >= 0.1 * GIB else f"{n_bytes / 1024 ** 2:.3g} MiB"


def memory_line(memory: dict[str, Any], tokens_per_step: int) -> str:
    """One line: what the run trains and the memory its state takes (activations aside)."""
    state = memory["weights_bytes"] + memory["gradients_bytes"] + memory["optimizer_bytes"]
    return (f"{memory['params_trainable'] / 1e6:,.2f}M of {memory['params_total'] / 1e6:,.2f}M parameters train; "
            f"weights {gib(memory['weights_bytes'])}, gradients {gib(memory['gradients_bytes'])}, AdamW state "
            f"{gib(memory['optimizer_bytes'])}: {gib(state)} before activations; {tokens_per_step:,} tokens per step")
