"""Pretrained Hugging Face MoE language models as backbones, with vrmoe routers swapped in.

``model=hf model.hf_name=<hub id or local directory>`` loads a ``transformers`` MoE causal LM
(the optional extra ``vrmoe[hf]``) and replaces the router of every MoE block (or of the
last N, ``router.layers=N``) by a vrmoe router whose deterministic gate is the pretrained
one (NN_det, the prior's mean). The model's own experts, shared experts and routing
conventions are kept:

* every supported family scores experts with a softmax over the router logits and picks
  the Top-K of it; whether the K selected weights are renormalised to sum to 1 is the
  family's (Mixtral, GraniteMoE and gpt-oss always; Qwen2/Qwen3-MoE and OLMoE as
  ``norm_topk_prob`` says), and so is a bias on the router (gpt-oss);
* vrmoe's router decides the selection and its routing distribution (S-averaged at
  evaluation for the sampling routers); the gates handed to the experts are the
  router's renormalised gates where the family renormalises, and the selected entries
  of the routing distribution where it does not.

With ``router=topk`` the swapped model computes exactly what the original does. DeepSeek-V3
style routing (sigmoid scores with a score-correction bias and grouped Top-K) is not a
softmax distribution a vrmoe router samples from, and is refused with one line.
"""

from __future__ import annotations

import re
from functools import lru_cache
from pathlib import Path
from typing import Any

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig, RouterConfig
from .backbone import ModelOutput, PerturbEmbeddings
from .flops import FlopsBreakdown
from .moe import routing_stats
from .native import router_layer_plan
from .routers import Router, Routing, build_router

# model_type -> whether the family renormalises the K selected weights (None: config.norm_topk_prob).
SOFTMAX_TOPK_FAMILIES: dict[str, bool | None] = {
    "mixtral": True, "qwen2_moe": None, "qwen3_moe": None, "olmoe": None, "granitemoe": True,
    "granitemoeshared": True, "gpt_oss": True,
}
# Families with MoE routing that a vrmoe router cannot express, and why.
UNSUPPORTED_ROUTING = {
    "deepseek_v3": "sigmoid expert scores with a score-correction bias and grouped Top-K",
    "deepseek_v2": "grouped Top-K over softmax scores scaled by routed_scaling_factor",
    "glm4_moe": "sigmoid expert scores with a score-correction bias and grouped Top-K",
}
HF_INSTALL = "pip install 'vrmoe[hf]'"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model=hf needs the transformers package: {HF_INSTALL}") from None
    return transformers


def _source(name: str) -> str:
    """A local directory as an absolute path; anything else is a hub id."""
    path = Path(name).expanduser()
    if path.exists():
        if not path.is_dir():
            raise ConfigError(f"model.hf_name={name}: is a file, not a model directory; give the directory that "
                              "save_pretrained wrote, or a hub id")
        return str(path.resolve())
    if name.startswith((".", "/", "~")) or name.count("/") > 1:
        raise ConfigError(f"model.hf_name={name}: no such directory; give a local model directory or a hub id "
                          "such as allenai/OLMoE-1B-7B-0924")
    return name


@lru_cache(maxsize=16)
def hf_config(name: str):
    """The model's ``transformers`` config (read once per name)."""
    transformers = _transformers()
    if not name:
        raise ConfigError("model=hf needs model.hf_name=<hub id or local directory>")
    try:
        return transformers.AutoConfig.from_pretrained(_source(name))
    except ConfigError:
        raise
    except Exception as exc:  # offline, unknown id, unreadable config: one line for the user
        raise ConfigError(f"model.hf_name={name}: cannot read its config ({first_line(exc)}); check the name, "
                          "or download it first and give the local directory") from None


def first_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return text[0] if text else type(exc).__name__


def config_value(name: str, key: str) -> Any:
    """What a model config says, under vrmoe's names (the ``vrmoe_hf`` resolver of the YAML).
    A family whose routing cannot be swapped is refused here, when the config is composed."""
    cfg = hf_config(name)
    check_family(name, cfg.model_type)
    aliases = {"n_experts": ("num_local_experts", "num_experts", "n_routed_experts"),
               "top_k": ("num_experts_per_tok", "moe_topk", "top_k"),
               "d_model": ("hidden_size",), "n_layers": ("num_hidden_layers",), "vocab_size": ("vocab_size",)}
    for attr in aliases[key]:
        value = getattr(cfg, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    if key in ("n_experts", "top_k"):
        raise ConfigError(f"model.hf_name={name}: a {cfg.model_type} model is not a Mixture-of-Experts model "
                          f"(its config has no {aliases[key][0]}); choose an MoE checkpoint")
    raise ConfigError(f"model.hf_name={name}: its config has no {aliases[key][0]}")


def check_family(name: str, family: str) -> None:
    if family in UNSUPPORTED_ROUTING:
        raise ConfigError(f"model.hf_name={name}: {family} routing ({UNSUPPORTED_ROUTING[family]}) cannot be "
                          f"swapped for a vrmoe router; supported families: {', '.join(SOFTMAX_TOPK_FAMILIES)}")


class SwappedRouter(nn.Module):
    """Stands where the family's router stood and answers as it did: (logits, weights, indices).

    The vrmoe router inside decides; the last routing and its statistics are kept for the
    backbone to collect after the forward pass (one module per layer, no global state)."""

    def __init__(self, original: nn.Module, router: Router, renormalise: bool):
        super().__init__()
        self.router, self.renormalise = router, renormalise
        self.n_experts, self.hidden_dim = router.n_experts, original.weight.shape[1]
        self.last: tuple[Routing, dict[str, torch.Tensor]] | None = None

    def forward(self, hidden_states: torch.Tensor):
        # The router (its heads train) stays in fp32 when the frozen model is loaded in bf16.
        u_TD = hidden_states.reshape(-1, self.hidden_dim).to(self.router.gate.weight.dtype)
        routing = self.router(u_TD)
        ids_TK = routing.expert_ids_TK
        if self.renormalise:
            weights_TK = routing.gates_TK
        else:  # the selected entries of the routing distribution, as the family uses them
            weights_TK = routing.probs_TE.gather(-1, ids_TK)
        self.last = (routing, routing_stats(routing, self.n_experts, over_ranks=self.training))
        return self.router.gate(u_TD), weights_TK.to(hidden_states.dtype), ids_TK


def _routers(model: nn.Module) -> list[tuple[str, nn.Module]]:
    return [(name, module) for name, module in model.named_modules()
            if type(module).__name__.lower().endswith("topkrouter")]


def _parent(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    path, _, attr = name.rpartition(".")
    return model.get_submodule(path) if path else model, attr


class HFBackbone(nn.Module):
    """A ``transformers`` MoE causal LM behind the backbone contract (``vrmoe.model.backbone``)."""

    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig, dtype: torch.dtype = torch.float32):
        super().__init__()
        self.cfg = cfg
        name = cfg.hf_name or ""
        config = hf_config(name)
        family = config.model_type
        check_family(name, family)
        transformers = _transformers()
        transformers.utils.logging.disable_progress_bar()
        try:
            self.hf = transformers.AutoModelForCausalLM.from_pretrained(_source(name), dtype=dtype)
        except ConfigError:
            raise
        except Exception as exc:
            raise ConfigError(f"model.hf_name={name}: cannot load the model ({first_line(exc)})") from None
        originals = _routers(self.hf)
        if not originals:
            raise ConfigError(f"model.hf_name={name}: a {family} model has no expert router to swap; "
                              "choose a Mixture-of-Experts checkpoint")
        if family not in SOFTMAX_TOPK_FAMILIES:
            raise ConfigError(f"model.hf_name={name}: {family} routing is not one vrmoe knows how to swap; "
                              f"supported families: {', '.join(SOFTMAX_TOPK_FAMILIES)}")
        renormalise = SOFTMAX_TOPK_FAMILIES[family]
        if renormalise is None:
            renormalise = bool(getattr(config, "norm_topk_prob", False))
        self.hf.config.use_cache = False
        pretrained_ids = {id(p) for p in self.hf.parameters()}
        plan = router_layer_plan(len(originals), router_cfg)
        self.moe_layers: list[SwappedRouter] = []
        self.moe_layer_names: list[str] = []
        for (module_name, original), layer_cfg in zip(originals, plan):
            swapped = SwappedRouter(original, self._router_from(original, layer_cfg), renormalise)
            parent, attr = _parent(self.hf, module_name)
            setattr(parent, attr, swapped)
            self.moe_layers.append(swapped)
            index = re.search(r"layers\.(\d+)\.", module_name)
            self.moe_layer_names.append(f"layer{index.group(1)}" if index else module_name)
        self.family = family
        gate_ids = {id(p) for layer in self.moe_layers for p in layer.router.gate.parameters()}
        #: Parameters that come from the checkpoint (the swapped routers' gates included): they are
        #: what train.freeze=backbone freezes, and a run's checkpoint need not copy them.
        self.pretrained_parameters = {name for name, p in self.named_parameters()
                                      if id(p) in pretrained_ids or id(p) in gate_ids}

    def _router_from(self, original: nn.Module, cfg: RouterConfig) -> Router:
        """A vrmoe router whose gate is the pretrained router's weight (and bias, where it has one)."""
        n_experts, d_model = original.weight.shape
        router = build_router(d_model, n_experts, cfg)
        bias = getattr(original, "bias", None)
        if bias is not None:
            router.gate = nn.Linear(d_model, n_experts, bias=True)
        with torch.no_grad():
            router.gate.weight.copy_(original.weight)
            if bias is not None:
                router.gate.bias.copy_(bias)
        return router

    # -- the backbone contract ------------------------------------------------------------

    def embeddings(self, idx_BL: torch.Tensor) -> torch.Tensor:
        return self.hf.get_input_embeddings()(idx_BL)

    def forward(self, idx_BL: torch.Tensor, targets_BL: torch.Tensor | None = None,
                perturb_embeddings: PerturbEmbeddings | None = None) -> ModelOutput:
        handle = None
        if perturb_embeddings is not None:  # the routing-stability probe's noise, on the embedding output
            handle = self.hf.get_input_embeddings().register_forward_hook(
                lambda module, args, output: perturb_embeddings(output))
        try:
            logits = self.hf(input_ids=idx_BL, use_cache=False).logits
        finally:
            if handle is not None:
                handle.remove()
        routings = [layer.last[0] for layer in self.moe_layers]
        stats = [layer.last[1] for layer in self.moe_layers]
        aux = logits.new_zeros((), dtype=torch.float32)
        for routing in routings:
            aux = aux + routing.aux_loss
        loss = None
        if targets_BL is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets_BL.reshape(-1))
        return ModelOutput(logits, loss, aux, routings, stats)

    def _experts(self) -> list[nn.Module]:
        return [m for m in self.hf.modules() if type(m).__name__.endswith("Experts")]

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and those active per token (K of E routed experts)."""
        total = sum(p.numel() for p in self.parameters())
        experts = sum(p.numel() for m in self._experts() for p in m.parameters())
        layer = self.moe_layers[0]
        inactive = experts * (1 - layer.router.k / layer.n_experts)
        return {"total": total, "active": int(total - inactive), "experts": experts}

    def flops_per_token(self, samples: int, context: int | None = None) -> FlopsBreakdown:
        """Matmul FLOPs per token read off the modules: every linear weight once (2 FLOPs per
        weight), routed experts K of E, attention scores over the mean causal context, and each
        swapped router counting itself with ``samples`` routing samples."""
        context = self.cfg.seq_len if context is None else context
        config = self.hf.config
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        scores = 2 * 2 * config.num_attention_heads * head_dim * (context + 1) / 2
        expert_params = {id(p) for m in self._experts() for p in m.parameters()}
        router_params = {id(p) for layer in self.moe_layers for p in layer.parameters()}
        embedding = self.hf.get_input_embeddings().weight
        attention = experts = other = 0.0
        for name, p in self.hf.named_parameters():  # the embedding lookup is not a matmul
            if p.ndim < 2 or p is embedding or id(p) in router_params or id(p) in expert_params:
                continue
            if "attn" in name or "attention" in name:
                attention += 2 * p.numel()
            else:  # dense and shared-expert MLPs, shared-expert gates, an untied output head
                other += 2 * p.numel()
        if self.hf.get_output_embeddings().weight is embedding:  # tied output head
            other += 2 * embedding.numel()
        attention += scores * config.num_hidden_layers
        for module in self._experts():
            per_expert = sum(p.numel() for p in module.parameters() if p.ndim >= 2) / self.moe_layers[0].n_experts
            experts += 2 * per_expert * self.moe_layers[0].router.k
        router = sum(layer.router.flops_per_token(samples) for layer in self.moe_layers)
        return FlopsBreakdown(attention, experts, router, other)
