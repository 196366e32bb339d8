"""The native backbone: a decoder-only transformer whose feed-forward blocks are MoE layers.

Read top to bottom: rotary attention, a dense SwiGLU for non-MoE blocks, the
block, the language model. The model returns every MoE layer's routing and
diagnostics explicitly (:class:`ModelOutput`); nothing is collected globally.
"""

from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from ..config import ConfigError, ModelConfig, RouterConfig, layers_text
from .backbone import ModelOutput, PerturbEmbeddings
from .flops import FlopsBreakdown, attention_flops, swiglu_flops
from .moe import MoELayer, build_moe
from .routers import router_class


def rotary_tables(seq_len: int, head_dim: int, base: float = 10000.0) -> tuple[torch.Tensor, torch.Tensor]:
    inv_freq = 1.0 / base ** (torch.arange(0, head_dim, 2).float() / head_dim)
    angles = torch.outer(torch.arange(seq_len).float(), inv_freq)
    return angles.cos(), angles.sin()


def apply_rotary(x_BHLd: torch.Tensor, cos_Ld: torch.Tensor, sin_Ld: torch.Tensor) -> torch.Tensor:
    x1, x2 = x_BHLd.float().chunk(2, dim=-1)
    out = torch.cat([x1 * cos_Ld - x2 * sin_Ld, x1 * sin_Ld + x2 * cos_Ld], dim=-1)
    return out.to(x_BHLd.dtype)


class CausalSelfAttention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.head_dim = cfg.n_heads, cfg.d_model // cfg.n_heads
        self.qkv = nn.Linear(cfg.d_model, 3 * cfg.d_model, bias=False)
        self.proj = nn.Linear(cfg.d_model, cfg.d_model, bias=False)
        self.dropout = cfg.dropout

    def forward(self, x_BLD: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        B, L, D = x_BLD.shape
        q, k, v = self.qkv(x_BLD).view(B, L, 3, self.n_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k = apply_rotary(q, cos[:L], sin[:L]), apply_rotary(k, cos[:L], sin[:L])
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True,
                                           dropout_p=self.dropout if self.training else 0.0)
        return self.proj(y.transpose(1, 2).reshape(B, L, D))


class SwiGLU(nn.Module):
    def __init__(self, d_model: int, hidden: int):
        super().__init__()
        self.w1 = nn.Linear(d_model, hidden, bias=False)
        self.w3 = nn.Linear(d_model, hidden, bias=False)
        self.w2 = nn.Linear(hidden, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, moe: MoELayer | None):
        super().__init__()
        self.norm1 = nn.RMSNorm(cfg.d_model)
        self.attn = CausalSelfAttention(cfg)
        self.norm2 = nn.RMSNorm(cfg.d_model)
        self.moe = moe
        self.ffn = SwiGLU(cfg.d_model, cfg.dense_hidden) if moe is None else None
        # DeepSeek's shared experts: one SwiGLU as wide as n_shared_experts routed ones, that every
        # token goes through beside the K routed experts (no router sees it).
        self.shared_experts = (SwiGLU(cfg.d_model, cfg.n_shared_experts * cfg.expert_hidden)
                               if moe is not None and cfg.n_shared_experts > 0 else None)

    def forward(self, x, cos, sin):
        x = x + self.attn(self.norm1(x), cos, sin)
        h = self.norm2(x)
        if self.moe is None:
            return x + self.ffn(h), None
        out = self.moe(h)
        if self.shared_experts is not None:
            return x + out.y_TD + self.shared_experts(h), out
        return x + out.y_TD, out


def moe_layer_indices(cfg: ModelConfig) -> list[int]:
    """Blocks with an MoE feed-forward: every `moe_every`-th, counted from the first."""
    if cfg.moe_every <= 0:
        return []
    return [i for i in range(cfg.n_layers) if (i + 1) % cfg.moe_every == 0]


def router_layer_plan(n_moe_layers: int, router_cfg: RouterConfig) -> list[RouterConfig]:
    """The router config of each MoE layer: the configured router on the MoE layers that
    ``router.layers`` chooses (all of them; the last N; or the listed indices, counted from 0 over
    the MoE layers only, whichever blocks they sit in) and deterministic Top-K on the rest."""
    topk = router_class("topk").Config(**router_cfg.shared())
    chosen = chosen_moe_layers(n_moe_layers, router_cfg.layers)
    return [router_cfg if i in chosen else topk for i in range(n_moe_layers)]


def chosen_moe_layers(n_moe_layers: int, layers: str | list[int]) -> set[int]:
    """The indices of the MoE layers ``router.layers`` gives the router to, checked against the
    model's MoE layer count (its form is checked with the config)."""
    given = layers_text(layers)
    if isinstance(layers, list):
        for i in layers:
            if not 0 <= i < n_moe_layers:
                raise ConfigError(f"router.layers={given} lists MoE layer {i} but the model has {n_moe_layers} MoE "
                                  f"layer(s); list indices from 0 to {n_moe_layers - 1}")
        repeated = sorted({i for i in layers if layers.count(i) > 1})
        if repeated:
            raise ConfigError(f"router.layers={given} lists MoE layer {repeated[0]} more than once (the model has "
                              f"{n_moe_layers} MoE layer(s)); list each index once, e.g. "
                              f"router.layers={layers_text(sorted(set(layers)))}")
        return set(layers)
    if layers != "all" and int(layers) > n_moe_layers:
        raise ConfigError(f"router.layers={given} but the model has {n_moe_layers} MoE layer(s); "
                          f"give a number up to {n_moe_layers}, or all")
    n_chosen = n_moe_layers if layers == "all" else int(layers)
    return set(range(n_moe_layers - n_chosen, n_moe_layers))


class MoETransformer(nn.Module):
    def __init__(self, cfg: ModelConfig, router_cfg: RouterConfig):
        super().__init__()
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        moe_at = moe_layer_indices(cfg)
        plan = iter(router_layer_plan(len(moe_at), router_cfg))
        self.blocks = nn.ModuleList(
            Block(cfg, build_moe(cfg.d_model, cfg.n_experts, cfg.expert_hidden, next(plan), cfg.dispatch)
                  if i in moe_at else None)
            for i in range(cfg.n_layers))
        self.norm = nn.RMSNorm(cfg.d_model)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self.lm_head.weight = self.embed.weight  # tied
        nn.init.normal_(self.embed.weight, std=0.02)
        for block in self.blocks:  # scale residual outputs down with depth (GPT-2)
            nn.init.normal_(block.attn.proj.weight, std=0.02 / (2 * cfg.n_layers) ** 0.5)
        cos, sin = rotary_tables(cfg.seq_len, cfg.d_model // cfg.n_heads)
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)

    @property
    def moe_layers(self) -> list[MoELayer]:
        return [b.moe for b in self.blocks if b.moe is not None]

    @property
    def moe_layer_names(self) -> list[str]:
        return [f"layer{i}" for i in moe_layer_indices(self.cfg)]

    def embeddings(self, idx_BL: torch.Tensor) -> torch.Tensor:
        return self.embed(idx_BL)

    def forward(self, idx_BL: torch.Tensor, targets_BL: torch.Tensor | None = None,
                perturb_embeddings: PerturbEmbeddings | None = None) -> ModelOutput:
        x = self.embed(idx_BL)
        if perturb_embeddings is not None:  # the routing-stability probe's noise
            x = perturb_embeddings(x)
        routings, stats = [], []
        aux = x.new_zeros((), dtype=torch.float32)
        for block in self.blocks:
            x, moe_out = block(x, self.rope_cos, self.rope_sin)
            if moe_out is not None:
                routings.append(moe_out.routing)
                stats.append(moe_out.stats)
                aux = aux + moe_out.routing.aux_loss
        logits = self.lm_head(self.norm(x))
        loss = None
        if targets_BL is not None:
            loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), targets_BL.reshape(-1))
        return ModelOutput(logits, loss, aux, routings, stats)

    def parameter_counts(self) -> dict[str, int]:
        """Total parameters and those active per token (K of E experts)."""
        total = sum(p.numel() for p in self.parameters())
        expert = sum(p.numel() for m in self.moe_layers for p in m.experts.parameters())
        k = self.moe_layers[0].router.k if self.moe_layers else 0
        inactive = expert * (1 - k / self.cfg.n_experts) if self.moe_layers else 0
        return {"total": total, "active": int(total - inactive), "experts": expert}

    def flops_per_token(self, samples: int, context: int | None = None) -> FlopsBreakdown:
        """FLOPs per token at evaluation over windows of ``context`` tokens (default seq_len), each
        router counting itself with ``samples`` routing samples (rules in ``vrmoe.model.flops``)."""
        cfg = self.cfg
        context = cfg.seq_len if context is None else context
        routers = iter(layer.router for layer in self.moe_layers)
        attention = experts = router = other = 0.0
        for block in self.blocks:
            attention += attention_flops(cfg.d_model, context)
            if block.moe is not None:
                layer_router = next(routers)
                experts += layer_router.k * swiglu_flops(cfg.d_model, cfg.expert_hidden) + 2 * layer_router.k * cfg.d_model
                router += layer_router.flops_per_token(samples)
                if block.shared_experts is not None:  # counted as model=hf counts them: with the dense MLPs
                    other += swiglu_flops(cfg.d_model, cfg.n_shared_experts * cfg.expert_hidden)
            else:
                other += swiglu_flops(cfg.d_model, cfg.dense_hidden)
        other += 2 * cfg.d_model * cfg.vocab_size  # output head (tied to the embedding)
        return FlopsBreakdown(attention, experts, router, other)
