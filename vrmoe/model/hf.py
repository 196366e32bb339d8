"""Pretrained Hugging Face MoE language models as backbones, with vrmoe routers swapped in.

``model=hf model.hf_name=<hub id or local directory>`` loads a ``transformers`` MoE causal LM
(the optional extra ``vrmoe[hf]``) and replaces the router of every MoE block (or of the
last N, ``router.layers=N``) by a vrmoe router whose deterministic gate is the pretrained
one (NN_det, the prior's mean). The model's own experts, shared experts and routing
conventions are kept; each supported family's convention is one :class:`Convention`:

* the scores: a softmax over the router logits (Mixtral, Qwen-MoE, OLMoE, GraniteMoE, gpt-oss,
  DeepSeek-V2), or a sigmoid of each logit with a score-correction bias that only the selection
  sees (DeepSeek-V3 and Moonlight, GLM-4-MoE); whether the K selected scores are renormalised
  to sum to 1 (Mixtral, GraniteMoE and gpt-oss always; Qwen2/Qwen3-MoE, OLMoE, DeepSeek-V3 and
  GLM-4-MoE as ``norm_topk_prob`` says; DeepSeek-V2 never); a bias on the router (gpt-oss); a
  factor on the weights (DeepSeek's and GLM's ``routed_scaling_factor``); and the selection
  rule (Top-K, or group-limited Top-K: the ``topk_group`` best of ``n_group`` expert groups,
  Top-K inside them);
* the family's convention becomes the router keys that express it (``router.scoring_func``,
  ``norm_topk_prob``, ``routed_scaling_factor``, ``n_group``, ``topk_group``: :class:`RoutingRule`),
  and the pretrained selection bias is loaded into the router's own; the vrmoe router then
  routes exactly as a native router with those keys does (:meth:`Router.select`), so the
  :class:`Routing` every caller sees (the experts, the routing statistics, the stability and
  posterior probes) holds the experts the model uses and the weights it hands them.

With ``router=topk`` the swapped model computes what the original does.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass
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


@dataclass(frozen=True)
class RoutingRule:
    """One model's routing as router keys: its family's :class:`Convention` as its config sets it."""

    scoring_func: str = "softmax"
    norm_topk_prob: bool = True  # the K selected scores are rescaled to sum to 1
    routed_scaling_factor: float = 1.0  # a factor on the selected weights
    n_group: int = 1  # group-limited Top-K: the topk_group best of n_group groups
    topk_group: int = 1

    def configure(self, cfg: RouterConfig) -> RouterConfig:
        """``cfg`` with the family's routing keys (the command line cannot set them for model=hf)."""
        out = dataclasses.replace(cfg, **dataclasses.asdict(self))
        out.check_scoring()
        return out


@dataclass(frozen=True)
class Convention:
    """How a family turns router logits into the experts' weights (read off the family's
    ``*TopkRouter`` in ``transformers``)."""

    renormalise: bool | None = True  # None: as config.norm_topk_prob says
    scaled: bool = False  # the weights are multiplied by config.routed_scaling_factor
    # Group-limited Top-K: "method" where config.topk_method may be "group_limited_greedy" (DeepSeek-V2),
    # "always" where the router always applies config.n_group and topk_group (DeepSeek-V3, GLM-4-MoE).
    grouped: str | None = None
    scoring_func: str = "softmax"  # sigmoid: sigmoid scores and a selection bias (e_score_correction_bias)

    def rule(self, name: str, config: Any) -> RoutingRule:
        renormalise = self.renormalise
        if renormalise is None:
            renormalise = bool(getattr(config, "norm_topk_prob", False))
        scale = float(getattr(config, "routed_scaling_factor", None) or 1.0) if self.scaled else 1.0
        method = (getattr(config, "topk_method", None) or "greedy") if self.grouped == "method" else "greedy"
        if method not in ("greedy", "group_limited_greedy"):
            raise ConfigError(f"model.hf_name={name}: topk_method={method} is not a selection rule vrmoe swaps; "
                              "supported: greedy, group_limited_greedy")
        if method == "greedy" and self.grouped != "always":
            return RoutingRule(self.scoring_func, renormalise, scale)
        n_group, topk_group = config.n_group, config.topk_group
        n_experts, top_k = config.n_routed_experts, config.num_experts_per_tok
        if not (isinstance(n_group, int) and isinstance(topk_group, int) and 1 <= topk_group <= n_group
                and n_experts % n_group == 0 and top_k <= topk_group * (n_experts // n_group)):
            raise ConfigError(f"model.hf_name={name}: group-limited Top-K needs n_group dividing the {n_experts} "
                              f"experts, 1 <= topk_group <= n_group and the {top_k} experts per token inside the "
                              f"kept groups (its config has n_group={n_group}, topk_group={topk_group}); fix the "
                              "checkpoint's config.json")
        return RoutingRule(self.scoring_func, renormalise, scale, n_group, topk_group)


# model_type -> the family's routing convention (the families whose routing a vrmoe router can take over).
CONVENTIONS: dict[str, Convention] = {
    "mixtral": Convention(renormalise=True), "qwen2_moe": Convention(renormalise=None),
    "qwen3_moe": Convention(renormalise=None), "olmoe": Convention(renormalise=None),
    "granitemoe": Convention(renormalise=True), "granitemoeshared": Convention(renormalise=True),
    "gpt_oss": Convention(renormalise=True),
    # transformers' DeepseekV2TopkRouter never renormalises, whatever config.norm_topk_prob says.
    "deepseek_v2": Convention(renormalise=False, scaled=True, grouped="method"),
    # DeepSeek-V3 (and Moonlight, which uses its configuration) and GLM-4.5: sigmoid scores plus the
    # selection bias, Top-K inside the best topk_group of n_group groups (each scored by its best two).
    "deepseek_v3": Convention(renormalise=None, scaled=True, grouped="always", scoring_func="sigmoid"),
    "glm4_moe": Convention(renormalise=None, scaled=True, grouped="always", scoring_func="sigmoid"),
}
# Families with MoE routing that a vrmoe router cannot express, and why.
UNSUPPORTED_ROUTING: dict[str, str] = {}
HF_INSTALL = "pip install 'vrmoe[hf]'"
# The first release whose every supported family routes through a ``*TopKRouter`` module that
# returns (logits, weights, indices): GraniteMoE's returned them in another order before 5.21.
MIN_TRANSFORMERS = "5.21.0"


def _transformers():
    try:
        import transformers
    except ImportError:
        raise ConfigError(f"model=hf needs the transformers package: {HF_INSTALL}") from None
    from packaging.version import Version

    if Version(transformers.__version__) < Version(MIN_TRANSFORMERS):
        raise ConfigError(f"model=hf needs transformers>={MIN_TRANSFORMERS}, found {transformers.__version__}: "
                          f"pip install 'transformers>={MIN_TRANSFORMERS}'")
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
    if cfg.model_type in CONVENTIONS:  # a routing rule its config does not make sense of is refused now
        CONVENTIONS[cfg.model_type].rule(name, cfg)
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
                          f"swapped for a vrmoe router; supported families: {', '.join(CONVENTIONS)}")


class SwappedRouter(nn.Module):
    """Stands where the family's router stood and answers as it did: (logits, weights, indices).

    The vrmoe router inside decides, built with the family's routing keys (:class:`RoutingRule`),
    so whoever calls the router (this module, the posterior probe's extra draws) gets the
    selection and weights the model uses. The last routing and its statistics are kept for the
    backbone to collect after the forward pass (one module per layer, no global state)."""

    def __init__(self, original: nn.Module, router: Router):
        super().__init__()
        self.router = router
        self.n_experts, self.hidden_dim = router.n_experts, original.weight.shape[1]
        self.last: tuple[Routing, dict[str, torch.Tensor]] | None = None

    def forward(self, hidden_states: torch.Tensor):
        # The router (its heads train) stays in fp32 when the frozen model is loaded in bf16.
        u_TD = hidden_states.reshape(-1, self.hidden_dim).to(self.router.gate.weight.dtype)
        routing = self.router(u_TD)
        self.last = (routing, routing_stats(routing, self.n_experts, over_ranks=self.training))
        return self.router.gate(u_TD), routing.gates_TK.to(hidden_states.dtype), routing.expert_ids_TK


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
        if family not in CONVENTIONS:
            raise ConfigError(f"model.hf_name={name}: {family} routing is not one vrmoe knows how to swap; "
                              f"supported families: {', '.join(CONVENTIONS)}")
        rule = CONVENTIONS[family].rule(name, config)
        self.hf.config.use_cache = False
        pretrained_ids = {id(p) for p in self.hf.parameters()}
        plan = router_layer_plan(len(originals), rule.configure(router_cfg))
        self.moe_layers: list[SwappedRouter] = []
        self.moe_layer_names: list[str] = []
        for (module_name, original), layer_cfg in zip(originals, plan):
            swapped = SwappedRouter(original, self._router_from(original, layer_cfg))
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
        """A vrmoe router whose gate is the pretrained router's weight (and bias, where it has one),
        and whose selection bias is the pretrained one (DeepSeek-V3's and GLM's
        ``e_score_correction_bias``)."""
        n_experts, d_model = original.weight.shape
        router = build_router(d_model, n_experts, cfg)
        bias = getattr(original, "bias", None)
        if bias is not None:
            router.gate = nn.Linear(d_model, n_experts, bias=True)
        selection_bias = getattr(original, "e_score_correction_bias", None)
        with torch.no_grad():
            router.gate.weight.copy_(original.weight)
            if bias is not None:
                router.gate.bias.copy_(bias)
            if selection_bias is not None:
                router.e_score_correction_bias.copy_(selection_bias)
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
        # Multi-head latent attention (DeepSeek-V2) has wider query-key heads than value heads, and
        # its head_dim is only the rotary part: q.k over qk_head_dim, the weighted sum over v_head_dim.
        qk_dim = getattr(config, "qk_head_dim", None) or head_dim
        v_dim = getattr(config, "v_head_dim", None) or head_dim
        scores = 2 * config.num_attention_heads * (qk_dim + v_dim) * (context + 1) / 2
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
