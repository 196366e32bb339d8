"""Cost: analytic FLOPs per token split into attention, experts, router (S samples and the
heads counted, each router counting itself) and the rest; the router's share, the extra
over deterministic Top-K on the same gates, and the measured evaluation tokens/s."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from ...console import log_line
from ...model.backbone import Backbone
from .base import Probe, register_probe

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext


def cost_summary(model: Backbone, samples: int, context: int | None = None) -> dict[str, Any]:
    """The analytic part of the ``cost`` block."""
    flops = model.flops_per_token(samples, context)
    topk_routers = sum(layer.router.topk_flops_per_token() for layer in model.moe_layers)
    baseline_total = flops.total - flops.router + topk_routers
    return {"flops_per_token": flops.as_dict(),
            "router_share": flops.router / flops.total,
            "router_overhead_vs_topk": flops.total / baseline_total - 1.0}


@register_probe
class CostProbe(Probe):
    name = "cost"
    order = 40

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:
        cost = cost_summary(ctx.model, ctx.samples)
        next_token = ctx.scored("in", "lm")  # timed while scoring calibration
        cost["tokens_per_s"] = next_token.tokens / max(next_token.seconds, 1e-9)
        return cost

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        log_line(f"FLOPs/token {block['flops_per_token']['total']:,.0f} (router {100 * block['router_share']:.2f}%, "
                 f"{100 * block['router_overhead_vs_topk']:+.2f}% over Top-K), eval {block['tokens_per_s']:,.0f} tokens/s")
