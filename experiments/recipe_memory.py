"""What each step of the paper's recipe holds in memory, for the paper's three models, computed
from their published configurations (experiments/paper_models/*/config.json) on PyTorch's meta
device: nothing is downloaded and no weight is allocated.

    python experiments/recipe_memory.py            # a markdown table (docs/pretrained.md's)

The rules are vrmoe's own (``vrmoe.model.load_dtype``, ``vrmoe.train.memory``): fine-tuning every
weight under train.precision=bf16 keeps fp32 master weights, fp32 gradients and AdamW's two fp32
moments; post-hoc heads (train.freeze=backbone) hold the frozen model in bf16 with the routers in
fp32 and train only the heads; evaluation holds the bf16 model once. Activations are not counted.
"""

from __future__ import annotations

import sys
from pathlib import Path

import torch

from vrmoe.cost import MetaBackbone
from vrmoe.model.routers import router_config
from vrmoe.train.memory import GIB, training_memory

MODELS = Path(__file__).parent / "paper_models"


def step_memory(config_dir: Path, covariance: str = "full") -> dict[str, dict]:
    """step -> training_memory of the model as that step holds it."""
    backbone = MetaBackbone(config_dir)  # fp32, on the meta device
    fine_tune = training_memory(backbone.hf)  # every weight trains, fp32
    backbone.hf.to(torch.bfloat16).requires_grad_(False)
    # The swapped routers, where model=hf puts them: fp32 gate (frozen) and heads (trained).
    backbone.swap(router_config("variational", k=1, covariance=covariance))
    for layer in backbone.moe_layers:
        layer.router.gate.requires_grad_(False)
    posthoc = training_memory(backbone.hf)
    evaluation = dict(posthoc, params_trainable=0, gradients_bytes=0, optimizer_bytes=0)
    return {"fine-tune (step 1)": fine_tune, "post-hoc heads (step 2)": posthoc, "evaluation": evaluation}


def main() -> int:
    print("| model | step | parameters | trained | weights | gradients | AdamW state | total (GiB) |")
    print("|---|---|---:|---:|---:|---:|---:|---:|")
    for config_dir in sorted(p for p in MODELS.iterdir() if (p / "config.json").is_file()):
        for step, m in step_memory(config_dir).items():
            total = m["weights_bytes"] + m["gradients_bytes"] + m["optimizer_bytes"]
            print(f"| {config_dir.name} | {step} | {m['params_total'] / 1e9:.2f}B | {m['params_trainable'] / 1e6:,.1f}M "
                  f"| {m['weights_bytes'] / GIB:.1f} | {m['gradients_bytes'] / GIB:.2f} | "
                  f"{m['optimizer_bytes'] / GIB:.2f} | {total / GIB:.1f} |")
    return 0


if __name__ == "__main__":
    sys.exit(main())
