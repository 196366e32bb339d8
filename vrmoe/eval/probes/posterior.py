"""The routing posterior at the end of training, per MoE layer, on the in-distribution
validation windows (the first ``MAX_TOKENS`` tokens of them, whole windows).

For a router that averages S routing samples at evaluation (``samples_at_eval()``, S > 1):
every MoE layer's router input ``u_TD`` and its evaluation selection (the Top-K of the
S-averaged routing distribution) are captured with forward hooks on ``ctx.model``; then the
same layer's router, switched to one routing sample per pass (``single_sample_routing``: the
same module and weights), runs ``DRAWS`` times on that same ``u_TD``. ``flip_rate`` is the
fraction of (token, draw) pairs whose single-sample Top-K set differs from the evaluation set
(as sets, order-free); ``sample_jaccard`` their mean Jaccard index.

For a router with a logit posterior (the variational router's ``posterior(u)``) in addition:
``sigma`` is each expert's logit std (mean-field: ``exp(log sigma)``; full covariance: the row
norms of L, ``sqrt(diag(L L^T))``); ``gap = mu_(K) - mu_(K+1)``, the margin between the K-th and
the (K+1)-th largest mean logit; ``sd_gap = sqrt(Var(l_a - l_b))`` for those two experts
(mean-field ``sqrt(sigma_a^2 + sigma_b^2)``; full ``|L_a - L_b|``, the covariance included);
``z = gap / sd_gap``. ``flip_rate_by_z`` is the flip rate per bin of z: bin i holds the tokens
with ``edges[i] <= z < edges[i + 1]``, the last bin is open-ended (``z >= edges[-1]``), and its
counts add up to ``tokens``. A router whose sigma is large exactly where the Top-K decision is
close has a flip rate that falls with z. ``eval_vs_mean_flip`` is the fraction of tokens whose
evaluation selection differs from the Top-K of the posterior mean logits.

The draws come from the evaluation seed and the global generator's state is restored afterwards,
so the probe changes nothing any other probe draws. Under torchrun every rank measures the same
tokens and gets the same block (it is cheap).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import torch

from ... import metrics
from ...console import console, log_line
from ..context import single_sample_routing
from .base import Probe, fmt, register_probe

if TYPE_CHECKING:  # pragma: no cover
    from ..context import EvalContext

#: Tokens of the in-distribution validation windows measured (whole windows, at least one).
MAX_TOKENS = 4096
#: Single routing samples drawn per token and layer.
DRAWS = 8
#: Lower edges of the z bins (the last bin is open-ended).
Z_EDGES = (0.0, 0.25, 0.5, 1.0, 2.0, 4.0)


def topk_mask(ids_TK: torch.Tensor, n_experts: int) -> torch.Tensor:
    """The selected experts as a boolean (T, E) membership mask."""
    mask_TE = torch.zeros(ids_TK.shape[0], n_experts, dtype=torch.bool, device=ids_TK.device)
    return mask_TE.scatter_(1, ids_TK, True)


def gap_statistics(post: Any, k: int) -> dict[str, torch.Tensor] | None:
    """Per token: the mean experts' std (T, E), the gap between the K-th and (K+1)-th largest mean
    logit, the std of that difference, and whether the Top-K of the mean logits is (T, E); None
    when K = E (no (K+1)-th expert: the selection cannot change)."""
    mean_TE = post.mean_TE.double()
    n_experts = mean_TE.shape[-1]
    if k >= n_experts:
        return None
    order_TE = mean_TE.topk(k + 1, dim=-1).indices
    a_T1, b_T1 = order_TE[:, k - 1:k], order_TE[:, k:k + 1]
    gap_T = (mean_TE.gather(-1, a_T1) - mean_TE.gather(-1, b_T1)).squeeze(-1)
    if post.chol_TEE is None:
        sigma_TE = post.log_scale_TE.double().exp()
        sd_gap_T = (sigma_TE.gather(-1, a_T1).square() + sigma_TE.gather(-1, b_T1).square()).sqrt().squeeze(-1)
    else:  # Var(l_a - l_b) = |L_a|^2 + |L_b|^2 - 2 L_a . L_b = |L_a - L_b|^2 (rows of L)
        chol_TEE = post.chol_TEE.double()
        sigma_TE = chol_TEE.square().sum(-1).sqrt()
        rows = torch.arange(chol_TEE.shape[0], device=chol_TEE.device)
        sd_gap_T = (chol_TEE[rows, a_T1.squeeze(-1)] - chol_TEE[rows, b_T1.squeeze(-1)]).norm(dim=-1)
    z_T = gap_T / sd_gap_T.clamp_min(torch.finfo(torch.float64).tiny)
    return {"sigma_TE": sigma_TE, "gap_T": gap_T, "sd_gap_T": sd_gap_T, "z_T": z_T,
            "mean_topk_TE": topk_mask(order_TE[:, :k], n_experts)}


def first_windows(batches: list[tuple[torch.Tensor, torch.Tensor]], max_tokens: int) -> list[torch.Tensor]:
    """The leading windows of ``batches`` up to ``max_tokens`` tokens (at least one window)."""
    out, tokens = [], 0
    for x, _ in batches:
        if tokens >= max_tokens:
            break
        rows = max(1, min(x.shape[0], -(-(max_tokens - tokens) // x.shape[1])))
        out.append(x[:rows])
        tokens += x[:rows].numel()
    return out


@torch.no_grad()
def routing_posterior(model: Any, windows: list[torch.Tensor], draws: int, seed: int,
                      edges: tuple[float, ...] = Z_EDGES) -> dict[str, Any]:
    """The ``posterior`` block for a model whose routers sample (see the module docstring).
    Layers whose router does not average samples at evaluation (``router.layers=N`` leaves the
    others deterministic Top-K) are listed under ``deterministic_layers`` instead."""
    names = list(model.moe_layer_names)
    sampling = [i for i, layer in enumerate(model.moe_layers) if layer.router.cfg.samples_at_eval()]
    per_layer: dict[int, dict[str, list[torch.Tensor]]] = {i: {} for i in sampling}
    captured: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def hook(index: int):
        def capture(module, args, output):
            # The single draws below run the same router module: only the evaluation pass is kept.
            if index not in captured:
                captured[index] = (args[0].detach(), output.expert_ids_TK.detach())
        return capture

    handles = [model.moe_layers[i].router.register_forward_hook(hook(i)) for i in sampling]
    devices = [windows[0].device] if windows and windows[0].device.type == "cuda" else []
    n_tokens = 0
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            for x in windows:
                captured.clear()
                model(x)
                n_tokens += x.numel()
                for i in sampling:
                    u_TD, eval_ids_TK = captured[i]
                    store = per_layer[i]
                    n_experts = model.moe_layers[i].n_experts
                    eval_TE = topk_mask(eval_ids_TK, n_experts)
                    flips, jaccard = [], []
                    with single_sample_routing(model):
                        for _ in range(draws):
                            ids_TK = model.moe_layers[i].router(u_TD).expert_ids_TK
                            flips.append((topk_mask(ids_TK, n_experts) != eval_TE).any(-1))
                            jaccard.append(metrics.topk_sets_jaccard(eval_ids_TK, ids_TK, n_experts))
                    store.setdefault("flips_T", []).append(torch.stack(flips).double().sum(0).cpu())
                    store.setdefault("jaccard_T", []).append(torch.stack(jaccard).sum(0).cpu())
                    router = model.moe_layers[i].router
                    if callable(getattr(router, "posterior", None)):
                        stats = gap_statistics(router.posterior(u_TD), router.k)
                        if stats is not None:
                            store.setdefault("sigma_TE", []).append(stats["sigma_TE"].cpu())
                            for key in ("gap_T", "sd_gap_T", "z_T"):
                                store.setdefault(key, []).append(stats[key].cpu())
                            store.setdefault("eval_vs_mean_T", []).append(
                                (stats["mean_topk_TE"] != eval_TE).any(-1).double().cpu())
    finally:
        for handle in handles:
            handle.remove()

    layers: dict[str, Any] = {}
    for i, store in per_layer.items():
        if not store:
            continue
        flips_T = torch.cat(store["flips_T"])  # flipped draws per token
        entry: dict[str, Any] = {"flip_rate": float(flips_T.sum() / (flips_T.numel() * draws)),
                                 "sample_jaccard": float(torch.cat(store["jaccard_T"]).sum() / (flips_T.numel() * draws))}
        if "z_T" in store:
            z_T = torch.cat(store["z_T"])
            entry.update({"sigma_mean": float(torch.cat(store["sigma_TE"]).mean()),
                          "gap_mean": float(torch.cat(store["gap_T"]).mean()),
                          "sd_gap_mean": float(torch.cat(store["sd_gap_T"]).mean()),
                          "z_median": float(z_T.median()),
                          "eval_vs_mean_flip": float(torch.cat(store["eval_vs_mean_T"]).mean())})
            bin_T = torch.bucketize(z_T, torch.tensor(edges, dtype=z_T.dtype), right=True) - 1  # z >= 0
            rates, counts = [], []
            for b in range(len(edges)):
                in_bin = bin_T == b
                count = int(in_bin.sum())
                counts.append(count)
                rates.append(float(flips_T[in_bin].sum() / (count * draws)) if count else None)
            entry["flip_rate_by_z"] = {"edges": list(edges), "flip_rate": rates, "count": counts}
        layers[names[i]] = entry
    block: dict[str, Any] = {"tokens": n_tokens, "draws": draws, "layers": layers}
    deterministic = [names[i] for i in range(len(names)) if i not in per_layer]
    if deterministic:
        block["deterministic_layers"] = deterministic
    return block


RATES = ("flip_rate", "sample_jaccard")


def _general(value: Any) -> str:
    """sigma, gaps and z span many orders of magnitude: three significant digits."""
    return fmt(value) if value is None or value != value else f"{value:.3g}"


@register_probe
class PosteriorProbe(Probe):
    name = "posterior"
    order = 35  # after stability (30), before cost (40)

    def measure(self, ctx: "EvalContext") -> dict[str, Any]:
        router = ctx.app.router
        if not router.samples_at_eval():
            return {"layers": {}, "note": f"router {router.name} does not average routing samples at evaluation"}
        if router.samples <= 1:
            return {"layers": {}, "note": f"S = {router.samples}: evaluation draws a single routing sample, "
                                          "so there is no averaged selection to compare samples with"}
        windows = first_windows(ctx.lm_sets["in"], MAX_TOKENS)
        return routing_posterior(ctx.model, windows, DRAWS, ctx.app.seed)

    def headline(self, block: dict[str, Any]) -> dict[str, Any]:
        layers = block.get("layers") or {}
        if not layers:
            return {}
        out = {"posterior/flip_rate": {name: entry["flip_rate"] for name, entry in layers.items()}}
        z = {name: entry["z_median"] for name, entry in layers.items() if "z_median" in entry}
        if z:
            out["posterior/z_median"] = z
        return out

    def show(self, block: dict[str, Any], result: dict[str, Any]) -> None:
        from rich.table import Table

        layers = block.get("layers") or {}
        if not layers:
            if block.get("note"):
                log_line(f"routing posterior: {block['note']}")
            return
        table = Table(title=f"Routing posterior ({block['tokens']} tokens, {block['draws']} single draws)",
                      title_justify="left")
        columns = {"flip_rate": "flip rate", "sample_jaccard": "Jaccard", "sigma_mean": "sigma",
                   "gap_mean": "gap K/K+1", "sd_gap_mean": "sd(gap)", "z_median": "median z"}
        shown = [key for key in columns if any(key in entry for entry in layers.values())]
        table.add_column("layer")
        for key in shown:
            table.add_column(columns[key], justify="right")
        for name, entry in layers.items():
            table.add_row(name, *(fmt(entry.get(key)) if key in RATES else _general(entry.get(key)) for key in shown))
        console.print(table)
