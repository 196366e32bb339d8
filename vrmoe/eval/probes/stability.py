"""Routing stability: Jaccard of the Top-K sets with and without Gaussian noise on the
embedding output, per MoE layer and noise scale gamma (sigma = gamma * mean embedding norm).

The embedding noise and the routers' sampling noise come from two separately seeded
streams (the generator is re-seeded right after the noise is drawn), and the clean and
the noisy pass share the routers' stream, so a sampling router sees the same sampling
noise in both and the Jaccard measures the input noise alone; gamma = 0 gives exactly 1.
``jaccard_unmatched`` repeats each noisy pass with fresh sampling noise, which adds the
router's own variability (the number a user of a sampling router experiences).
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import TYPE_CHECKING, Any, Callable

import torch

from ... import distributed, metrics
from ...console import console
from ...data.batches import derived_seed
from ...model.backbone import Backbone
from ...model.routers import Routing
from .base import Probe, fmt, register_probe

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext

JACCARD_PNG = "jaccard_vs_gamma.png"


def routings_with_noise(model: Backbone, x: torch.Tensor, sigma: float, noise_seed: int,
                        router_seed: int) -> list[Routing]:
    """One forward pass with two separate random streams: the embedding noise comes from
    ``noise_seed``, and the generator is re-seeded with ``router_seed`` before the first block,
    so the routers' sampling noise does not depend on whether (or how much) noise was drawn."""
    def perturb(x_BLD: torch.Tensor) -> torch.Tensor:
        if sigma > 0:
            x_BLD = x_BLD + sigma * torch.randn_like(x_BLD)
        torch.manual_seed(router_seed)
        return x_BLD

    torch.manual_seed(noise_seed)
    return model(x, perturb_embeddings=perturb).routings


@torch.no_grad()
def routing_stability(model: Backbone, windows: list[torch.Tensor], gammas: list[float], seed: int,
                      unmatched: bool) -> dict[str, Any]:
    """Jaccard of the Top-K sets with and without embedding noise, per MoE layer and gamma."""
    here = distributed.env()  # under torchrun each rank takes its block of windows, and the sums are added up
    mine = range(len(windows))[here.block(len(windows))]
    if here.enabled:
        norms = torch.cat([torch.zeros(0), *(model.embeddings(windows[b]).norm(dim=-1).reshape(-1).cpu() for b in mine)])
        norms = norms.double()
        total = distributed.sum_over_ranks(torch.stack([norms.sum(), torch.tensor(float(norms.numel()))]))
        embed_norm = (total[0] / total[1]).float()
    else:
        embed_norm = torch.cat([model.embeddings(x).norm(dim=-1).reshape(-1) for x in windows]).mean()
    layer_names = model.moe_layer_names
    sums = {"matched": torch.zeros(len(gammas), len(layer_names), dtype=torch.float64),
            "unmatched": torch.zeros(len(gammas), len(layer_names), dtype=torch.float64)}
    n_tokens = 0
    for b in mine:  # the window's index in the whole set seeds its noise: the same on any number of ranks
        x = windows[b]
        noise_seed, router_seed = derived_seed(seed, b), derived_seed(seed, b) + 500_000
        clean = routings_with_noise(model, x, 0.0, noise_seed, router_seed)
        n_tokens += x.numel()
        for g, gamma in enumerate(gammas):
            sigma = float(gamma * embed_norm)
            runs = {"matched": router_seed}
            if unmatched:
                runs["unmatched"] = router_seed + 7_919 * (g + 1)  # another draw of the sampling noise
            for kind, pass_router_seed in runs.items():
                noisy = routings_with_noise(model, x, sigma, noise_seed, pass_router_seed)
                for layer, (r_clean, r_noisy, moe) in enumerate(zip(clean, noisy, model.moe_layers)):
                    sums[kind][g, layer] += metrics.topk_sets_jaccard(
                        r_clean.expert_ids_TK, r_noisy.expert_ids_TK, moe.n_experts).sum().cpu()

    for total in sums.values():
        distributed.sum_over_ranks(total)
    n_tokens = int(distributed.sum_over_ranks(torch.tensor(float(n_tokens), dtype=torch.float64)))

    def table(total: torch.Tensor) -> dict[str, list[float]]:
        mean_GL = total / max(n_tokens, 1)
        out = {name: mean_GL[:, layer].tolist() for layer, name in enumerate(layer_names)}
        # A dense model has no routing to be stable or not: NaN (null in eval.json), not a perfect 1.
        out["mean"] = mean_GL.mean(1).tolist() if layer_names else [math.nan] * len(gammas)
        return out

    result = {"gammas": list(gammas), "embedding_norm": float(embed_norm), "jaccard": table(sums["matched"])}
    if unmatched:
        result["jaccard_unmatched"] = table(sums["unmatched"])
    return result


@register_probe
class StabilityProbe(Probe):
    name = "stability"
    order = 30

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:
        from ..context import windows

        app = ctx.app
        stability_windows = [x for x, _ in windows(ctx.corpus.val, app, app.eval.stability_windows,
                                                   "the validation split", ctx.device)]
        return routing_stability(ctx.model, stability_windows, list(app.eval.gammas), app.seed,
                                 app.eval.stability_unmatched)

    def headline(self, block: dict[str, Any]) -> dict[str, Any]:
        return {"stability/jaccard_mean": dict(zip((f"gamma={g:g}" for g in block["gammas"]),
                                                   block["jaccard"]["mean"]))}

    def figures(self, block: dict[str, Any], run_dir: Path) -> dict[str, Callable[[], Path]]:
        from ... import plots

        positive = [i for i, g in enumerate(block["gammas"]) if g > 0]  # the plot's gamma axis is logarithmic
        if not positive:
            return {}
        curves = {k: [v[i] for i in positive] for k, v in block["jaccard"].items()}
        return {"jaccard_vs_gamma": lambda: plots.jaccard_plot(
            [block["gammas"][i] for i in positive], curves, run_dir / JACCARD_PNG)}

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        from rich.table import Table

        table = Table(title="Top-K Jaccard", title_justify="left")
        table.add_column("gamma", justify="right")
        for layer in block["jaccard"]:
            table.add_column(layer, justify="right")
        for g, gamma in enumerate(block["gammas"]):
            table.add_row(f"{gamma:g}", *(fmt(values[g]) for values in block["jaccard"].values()))
        console.print(table)
