"""``vrmoe bench``: performance ratios on the current device, as one table.

    vrmoe bench                        # about four minutes on 2 CPU cores
    vrmoe bench --format markdown      # the same table, for docs/performance.md
    vrmoe bench --tiny                 # tiny shapes and one repeat: a smoke test in seconds
    vrmoe bench --only width           # the variational router against Top-K at D = 256 to 2048
    vrmoe bench --record experiments/results/bench   # also keep the output as a dated record

Every ratio compares contenders measured in the same process, run in turns (A, B, C, B, C,
A, ..., the order rotating every round): the "ms" column is a contender's median time, the
ratio the median over rounds of its time over the baseline's in the same round, so load
from other processes on a shared machine hits every contender alike. Next to it, a 95%
interval of that median (distribution-free, from the order statistics of the rounds'
ratios), and the verdict reads it: ``yes`` when the whole interval is within the target,
``NO`` when all of it is beyond, ``~yes`` / ``~NO`` (the median's side) when the target lies
inside the interval, where this many rounds on this machine cannot tell. The rows:

* **MoE layer**: forward + backward of one MoE layer (Top-K router, SwiGLU experts) against
  a dense SwiGLU *floor* with the same active FLOPs (hidden K*F), and the peer, Hugging Face's
  Mixtral sparse block (``pip install 'vrmoe[bench]'``; skipped when transformers is missing).
  Peak memory of one step of each, parameter gradients included.
* **Router overheads**, for one MoE layer (E = 8, then E = 16 and E = 64 for the variational
  router, so that the scaling with E shows) and for a whole ``model=small`` training step
  (forward, backward, AdamW): each Bayesian router's training step against Top-K's;
  evaluation with S = 32 routing samples against S = 1, next to its *floor* (S = 1 plus
  drawing the S x T x E standard normals alone, per routed layer: what no implementation on
  torch's generator can go below); each training step with heads next to its floor (Top-K's
  step plus the forward and backward of that variant's heads alone: what no implementation of
  those heads can go below); the peak memory of evaluation, S = 32 against S = 1.
* **Training steps by parts**: a whole training step varies by 10-25% from round to round on a
  shared CPU, too much to tell a router that adds 1-3%. So each router is also timed alone,
  forward and backward in training mode on every routed layer's input (:func:`router_step`),
  interleaved with the steps, and its step *by parts* is Top-K's step with Top-K's routers'
  time swapped for this router's: the rest of the step (experts, attention, optimiser) is the
  same work whatever the router. Its interval is that of a short contender, about ten times
  narrower; the whole step's row stays beside it as the check.

* **Width** (opt-in, ``--only width``, ``--widths``): the variational router's training step and
  its S = 32 evaluation against Top-K's at one MoE layer, D = 256, 512, 1024 and 2048 (E = 8,
  F = 2D, K = 2), the same FLOPs per step at every width, next to the same two floors.
* **On CUDA only**: the three GPU layer shapes in bf16, and the model FLOPs utilisation (MFU)
  of ``model=gpt_small`` trained with bf16 autocast and torch.compile, against 989 TFLOP/s
  (H100 dense bf16) and against a bf16 matmul measured here; the compiled graph's breaks
  from ``torch._dynamo.explain``.

Each row with a target says whether it is met. The MoE layer's target is the bench's
(``LAYER_TARGET``); a router's are its own (``Router.bench_targets``): a ratio, or a floor the
bench measures in the same rounds (the variational router's training at its heads' floor, its
evaluation at the normals' floor), read as the floor's median.

``experiments/bench.py`` is the long form (more repeats, thread counts, a real ``vrmoe train`` run).
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import math
import os
import platform
import re
import shlex
import statistics
import sys
import time
from dataclasses import dataclass
from datetime import date, datetime, timezone
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from .compose import compose_config
from .config import AppConfig, ConfigError
from .console import CommandParser
from .device import resolve_device, synchronize
from .model import build_model
from .model.routers import ROUTERS as ROUTER_REGISTRY
from .train.step import TrainStep, make_optimizer

H100_BF16_DENSE_FLOPS = 989e12
# The targets (a ratio must be at most its target); rows without one are for information. The
# routers' own targets are theirs (``Router.bench_targets``); the MoE layer's is the bench's.
LAYER_TARGET = 1.05  # MoE layer step / dense floor
MAX_TRAIN_TARGET_EXPERTS = 16  # the layer's router targets hold up to this many experts
#: The measurements a router's target may be for, and the floors each may name, each floor measured
#: in the same rounds as the ratio it judges: "heads", Top-K's step plus the variant's heads' forward
#: and backward alone (its "floor: topk + the ... heads" row); "normals", its S = 1 evaluation plus
#: drawing the S x T x E normals alone.
TARGET_MEASUREMENTS = {"layer train": ("heads",), "model train": ("heads",), "eval": ("normals",), "memory": ()}


def router_variants() -> list[tuple[str, list[str]]]:
    """The routers whose overhead is measured, as (label, router overrides): every registered router
    but Top-K (the baseline), in the configurations its class names (``Router.bench_variants``)."""
    variants = []
    for name, cls in ROUTER_REGISTRY.items():
        if name != "topk":
            for label, extra in (cls.bench_variants or {name: []}).items():
                variants.append((label, [f"router={name}", *extra]))
    return variants


def router_name(overrides: list[str]) -> str:
    return overrides[0].split("=", 1)[1]


def samples_at_eval(overrides: list[str]) -> bool:
    return ROUTER_REGISTRY[router_name(overrides)].Config().samples_at_eval()


def router_target(overrides: list[str], measurement: str | None) -> float | str | None:
    """The target a variant's router declares for ``measurement`` (None: none, or no measurement)."""
    if measurement is None:
        return None
    return ROUTER_REGISTRY[router_name(overrides)].bench_targets.get(measurement)


def check_router_targets() -> None:
    """Each router's ``bench_targets`` names known measurements, and ratios or known floors."""
    for name, cls in ROUTER_REGISTRY.items():
        for measurement, target in cls.bench_targets.items():
            if measurement not in TARGET_MEASUREMENTS:
                raise TypeError(f"{cls.__name__}.bench_targets: {measurement!r} is not a measurement; "
                                f"choose from {', '.join(TARGET_MEASUREMENTS)}")
            if isinstance(target, str) and target not in TARGET_MEASUREMENTS[measurement]:
                raise TypeError(f"{cls.__name__}.bench_targets[{measurement!r}] = {target!r}: a ratio"
                                + "".join(f" or {floor!r}" for floor in TARGET_MEASUREMENTS[measurement]))

GPU_SHAPES = ((16384, 256, 512, 8, 2), (16384, 1024, 2048, 8, 2), (16384, 2048, 1408, 64, 6))


@dataclass(frozen=True)
class Sizes:
    """What one bench run measures: the layer shape, the whole-model preset, the repeats."""

    tokens: int = 4096
    d_model: int = 256
    hidden: int = 512
    n_experts: int = 8
    k: int = 2
    model: str = "small"
    samples: int = 32
    repeats: int = 21
    warmup: int = 2
    # The router overheads at the layer again with more experts (label -> router overrides), so
    # that the scaling with E shows: the full covariance's head has E(E+1)/2 outputs.
    more_experts: tuple[tuple[int, tuple[str, ...]], ...] = ((16, ("variational diag", "variational full")),
                                                             (64, ("variational diag",)))
    # The width section (opt-in): one router variant against Top-K at the MoE layer at each width D,
    # with F = 2D and T tokens so that T x D^2 = width_work (the same FLOPs per step at every width:
    # at D = 256 the router section's T = 4096; per-call overheads weigh alike at every width).
    widths: tuple[int, ...] = (256, 512, 1024, 2048)
    width_work: int = 4096 * 256 ** 2
    width_variant: str = "variational diag"
    gpu_shapes: tuple[tuple[int, int, int, int, int], ...] = GPU_SHAPES  # (T, D, F, E, K)
    gpu_model: str = "gpt_small"
    gpu_batch: int = 16
    gpu_steps: int = 10
    matmul_size: int = 8192  # the bf16 matmul that measures the attainable FLOP/s


QUICK = Sizes()
TINY = Sizes(tokens=256, d_model=32, hidden=64, n_experts=4, model="tiny", samples=4, repeats=1, warmup=1,
             more_experts=((8, ("variational diag",)),), widths=(16, 32), width_work=256 * 16 ** 2,
             gpu_shapes=((256, 32, 64, 4, 2),), gpu_model="tiny",
             gpu_batch=4, gpu_steps=2, matmul_size=256)


@dataclass
class Row:
    section: str
    name: str
    time_ms: float | None = None
    ratio: float | None = None
    target: float | None = None  # the ratio should be at most this
    memory_mb: float | None = None
    note: str = ""
    interval: tuple[float, float] | None = None  # a 95% interval of the ratio (median over rounds)

    @property
    def verdict(self) -> str:
        """yes / NO when the interval is on one side of the target; ~yes / ~NO (the median's side)
        when the target lies inside it; without an interval, the median's side."""
        if self.ratio is None or self.target is None:
            return ""
        low, high = self.interval or (self.ratio, self.ratio)
        if high <= self.target:
            return "yes"
        if low > self.target:
            return "NO"
        return "~yes" if self.ratio <= self.target else "~NO"


# ---------------------------------------------------------------------------
# Measuring
# ---------------------------------------------------------------------------

def interleaved_times(contenders: dict[str, Callable[[], Any]], repeats: int, warmup: int,
                      device: torch.device) -> dict[str, list[float]]:
    """Seconds per call of each contender in every round. The contenders run in turns, the
    order rotating every round, so background load and clock drift hit them alike."""
    names = list(contenders)
    for _ in range(warmup):
        for name in names:
            contenders[name]()
    synchronize(device)
    times: dict[str, list[float]] = {name: [] for name in names}
    for round_ in range(repeats):
        shift = round_ % len(names)
        for name in names[shift:] + names[:shift]:
            start = time.perf_counter()
            contenders[name]()
            synchronize(device)  # the device's work is part of the call (no sync inside it)
            times[name].append(time.perf_counter() - start)
    return times


def round_ratios(times: dict[str, list[float]], name: str, baseline: str) -> list[float]:
    """``name``'s time over ``baseline``'s in each round. Two calls a moment apart see the same
    background load, so the median of these ratios is steadier than the ratio of the medians
    when the load drifts."""
    return [a / b for a, b in zip(times[name], times[baseline])]


def median_interval(values: list[float], confidence: float = 0.95) -> tuple[float, float]:
    """A distribution-free interval for the median of ``values`` (independent rounds): the j-th
    smallest and j-th largest value, j the largest with P(Binomial(n, 1/2) < j) <= (1 -
    confidence) / 2, so that it covers the median at least ``confidence`` of the time. With
    few values (n <= 8 at 95%) it is the whole range, which covers less than that when n < 6."""
    ordered, n = sorted(values), len(values)
    alpha = (1 - confidence) / 2

    def below(j: int) -> float:  # P(B < j), B ~ Binomial(n, 1/2)
        return sum(math.comb(n, i) for i in range(j)) / 2 ** n

    j = 1
    while j + 1 <= (n + 1) // 2 and below(j + 1) <= alpha:
        j += 1
    return ordered[j - 1], ordered[n - j]


def floor_ratios(times: dict[str, list[float]], base: str, extra: str) -> list[float]:
    """(``base`` + ``extra``) / ``base`` in each round: a floor's ratio, ``extra`` being the work
    that no implementation can avoid adding to ``base``."""
    return [(a + b) / a for a, b in zip(times[base], times[extra])]


def ratio_fields(ratios: list[float]) -> dict[str, Any]:
    """A Row's ratio (the median of the rounds' ratios) and its 95% interval."""
    return {"ratio": statistics.median(ratios), "interval": median_interval(ratios)}


def peak_memory_mb(fn: Callable[[], Any], device: torch.device) -> float | None:
    """Peak memory that one call of ``fn`` allocates above what was live before it: the CUDA
    allocator's statistics, or on CPU the torch profiler's memory timeline (None where that
    private API is unavailable)."""
    if device.type == "cuda":
        synchronize(device)
        before = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        fn()
        synchronize(device)
        return (torch.cuda.max_memory_allocated(device) - before) / 2**20
    try:
        from torch.profiler import ProfilerActivity, profile
        from torch.profiler._memory_profiler import Action, MemoryProfile

        with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True,
                                      record_shapes=True, with_stack=True) as prof:
            fn()
        live = peak = 0
        for _, action, _, size in MemoryProfile(prof.profiler.kineto_results).timeline:
            if action == Action.CREATE:
                live += size
            elif action == Action.DESTROY:
                live -= size
            peak = max(peak, live)
        return peak / 2**20
    except Exception:  # a private API: its absence costs the column, not the bench
        return None


@contextlib.contextmanager
def _quiet_stderr():
    """Silence the profiler's own start/stop lines, which it writes to file descriptor 2."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def autocast_for(device: torch.device, bf16: bool | None = None):
    """bf16 autocast, by default on CUDA only (how GPU runs train); full precision elsewhere."""
    bf16 = device.type == "cuda" if bf16 is None else bf16
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=bf16)


# ---------------------------------------------------------------------------
# Configs and contenders
# ---------------------------------------------------------------------------

def router_config(overrides: Iterable[str], k: int, samples: int = 1):
    return compose_config([*overrides, f"K={k}", f"S={samples}"]).router


def with_samples(module: torch.nn.Module, samples: int) -> torch.nn.Module:
    """A copy of ``module`` (same weights) whose routers draw ``samples`` routing samples."""
    from .model.routers import Router

    twin = copy.deepcopy(module)
    for sub in twin.modules():
        if isinstance(sub, Router):
            sub.cfg = dataclasses.replace(sub.cfg, samples=samples)
    return twin


def layer_train_step(layer: torch.nn.Module, x_TD: torch.Tensor, device: torch.device) -> Callable[[], None]:
    """Forward + backward of one feed-forward layer (an MoE layer, the dense floor or the peer)
    against a fixed output gradient, gradients set to None first as a training step does."""
    grad_y = torch.randn_like(x_TD)
    params = [p for p in layer.parameters() if p.requires_grad]

    def step() -> None:
        for p in [*params, x_TD]:
            p.grad = None
        with autocast_for(device):
            out = layer(x_TD)
        outputs, grads = _outputs_and_grads(out, grad_y)
        torch.autograd.backward(outputs, grads)

    return step


def _outputs_and_grads(out: Any, grad_y: torch.Tensor) -> tuple[list[torch.Tensor], list[torch.Tensor]]:
    """The tensors a layer's output hands to backward: the MoE layer's y and router loss, the
    dense floor's y, or the first element of a peer's tuple."""
    from .model.moe import MoEOutput

    if isinstance(out, MoEOutput):
        return [out.y_TD, out.routing.aux_loss], [grad_y.to(out.y_TD.dtype), torch.ones_like(out.routing.aux_loss)]
    y = out[0] if isinstance(out, tuple) else out
    return [y], [grad_y.reshape(y.shape).to(y.dtype)]


def layer_eval_step(layer: torch.nn.Module, x_TD: torch.Tensor, device: torch.device) -> Callable[[], None]:
    layer.eval()

    @torch.no_grad()
    def step() -> None:
        with autocast_for(device):
            layer(x_TD)

    return step


def mixtral_block(d_model: int, hidden: int, n_experts: int, k: int) -> torch.nn.Module | None:
    """Hugging Face's Mixtral sparse MoE block of the same shape, or None without transformers."""
    try:
        from transformers import MixtralConfig
        from transformers.models.mixtral.modeling_mixtral import MixtralSparseMoeBlock
    except ImportError:
        return None
    config = MixtralConfig(hidden_size=d_model, intermediate_size=hidden, num_local_experts=n_experts,
                           num_experts_per_tok=k, router_jitter_noise=0.0)
    if hasattr(config, "_experts_implementation"):
        config._experts_implementation = "eager"  # what a standalone block runs
    block = MixtralSparseMoeBlock(config)
    for p in block.parameters():  # transformers leaves the stacked expert weights uninitialised
        torch.nn.init.normal_(p, std=d_model ** -0.5)
    return block


class _PeerInput(torch.nn.Module):
    """The Mixtral block takes (batch, length, D); feed it the same tokens as one sequence."""

    def __init__(self, block: torch.nn.Module):
        super().__init__()
        self.block = block

    def forward(self, x_TD: torch.Tensor):
        out = self.block(x_TD.unsqueeze(0))
        return out[0] if isinstance(out, tuple) else out


def normals_floor_labels(variants: list[tuple[str, list[str]]]) -> list[str]:
    """The variants whose evaluation floor is shown: those whose router holds its evaluation to the
    cost of drawing the normals (``Router.bench_targets``)."""
    return [label for label, overrides in variants if router_target(overrides, "eval") == "normals"]


def heads_contender(label: str) -> str:
    """The name under which a variant's heads alone are timed (its training floor)."""
    return f"{label} heads"


def heads_floor_labels(variants: list[tuple[str, list[str]]], routers: dict[str, torch.nn.Module]) -> list[str]:
    """The variants whose training floor is measured: every variant whose router has heads
    (``Router.head_outputs``; ``routers`` maps a variant to one of its routers). Each is its own
    floor: the full covariance's scale head is wider, a shared hidden layer halves the first layers."""
    return [label for label, _ in variants if routers[label].head_flops_per_token() > 0]


def heads_step(routers: list[torch.nn.Module], inputs: list[torch.Tensor], device: torch.device) -> Callable[[], None]:
    """Forward and backward of routers' heads alone (``Router.head_outputs``), each router on its
    input, against unit output gradients: what the router's training step adds to Top-K's in
    matmuls and activations, whatever else its implementation does."""
    params = [p for router in routers for p in router.parameters() if p.requires_grad]

    def step() -> None:
        for t in [*params, *inputs]:
            t.grad = None
        outputs = []
        with autocast_for(device):
            for router, u_TD in zip(routers, inputs):
                outputs += router.head_outputs(u_TD)
        torch.autograd.backward(outputs, [torch.ones_like(o) for o in outputs])

    return step


def router_contender(label: str) -> str:
    """The name under which a variant's routers alone are timed (its step by parts)."""
    return f"{label} routers"


def router_step(routers: list[torch.nn.Module], inputs: list[torch.Tensor], device: torch.device) -> Callable[[], None]:
    """Forward and backward of routers alone, in training mode, each on its input, as an MoE
    layer's training step runs them: the routing, the layer's routing statistics, and the
    backward of the gates (against a fixed gradient) and of the router's loss terms into the
    input and the router's parameters. What a router's step adds to the experts', attention's
    and the optimiser's, which are the same whatever the router."""
    from .model.moe import routing_stats

    params = [p for router in routers for p in router.parameters() if p.requires_grad]
    generator = torch.Generator().manual_seed(0)
    grad_gates = [torch.randn(u.shape[0], router.k, generator=generator).to(device)
                  for router, u in zip(routers, inputs)]
    for router in routers:
        router.train()

    def step() -> None:
        for t in [*params, *inputs]:
            t.grad = None
        outputs, grads = [], []
        with autocast_for(device):
            for router, u_TD, grad in zip(routers, inputs, grad_gates):
                routing = router(u_TD)
                routing_stats(routing, router.n_experts, over_ranks=True)
                outputs += [routing.gates_TK, routing.aux_loss]
                grads += [grad.to(routing.gates_TK.dtype), torch.ones_like(routing.aux_loss)]
        torch.autograd.backward(outputs, grads)

    return step


def parts_ratios(times: dict[str, list[float]], base: str, extra: str, reference: str) -> list[float]:
    """(``base`` + ``extra`` - ``reference``) / ``base`` in each round: ``base``'s step with the
    part ``reference`` replaced by ``extra`` (a step by parts)."""
    return [(b + e - r) / b for b, e, r in zip(times[base], times[extra], times[reference])]


def train_step(app: AppConfig, model, idx: torch.Tensor, device: torch.device, forward=None) -> Callable[[], None]:
    """One training step exactly as ``vrmoe train`` takes it (the loop's :class:`TrainStep`):
    forward, task + router loss, backward, clipping, AdamW."""
    forward = model if forward is None else forward
    step = TrainStep(model, make_optimizer(model, app.train.lr, app.train.weight_decay), app.train, device)
    return lambda: step(0, lambda: forward(idx, idx))


def model_on(app: AppConfig, device: torch.device):
    return build_model(app).to(device)


def random_tokens(app: AppConfig, batch_size: int, device: torch.device) -> torch.Tensor:
    generator = torch.Generator().manual_seed(0)
    return torch.randint(0, app.model.vocab_size, (batch_size, app.model.seq_len), generator=generator).to(device)


# ---------------------------------------------------------------------------
# Sections
# ---------------------------------------------------------------------------

def moe_layer_rows(tokens: int, d_model: int, hidden: int, n_experts: int, k: int, sizes: Sizes,
                   device: torch.device, title: str = "MoE layer fwd+bwd") -> list[Row]:
    """MoE layer forward + backward against the dense floor and the Mixtral peer."""
    from .model.moe import build_moe
    from .model.native import SwiGLU

    precision = "bf16 autocast" if device.type == "cuda" else "fp32"
    section = f"{title}: T={tokens} D={d_model} F={hidden} E={n_experts} K={k}, {precision}"
    torch.manual_seed(0)
    x_TD = torch.randn(tokens, d_model, device=device, requires_grad=True)  # a residual stream: it needs dx
    layers = {
        "dense SwiGLU floor": SwiGLU(d_model, k * hidden).to(device),
        "vrmoe MoE layer": build_moe(d_model, n_experts, hidden, router_config(["router=topk"], k), "auto").to(device),
    }
    with autocast_for(device):  # the kernel depends on the dtype the step computes in
        kernel = "grouped_mm" if layers["vrmoe MoE layer"].experts.use_grouped_mm(x_TD) else "loop"
    peer = mixtral_block(d_model, hidden, n_experts, k)
    if peer is not None:
        layers["HF Mixtral sparse block"] = _PeerInput(peer).to(device)
    steps = {name: layer_train_step(layer, x_TD, device) for name, layer in layers.items()}
    times = interleaved_times(steps, sizes.repeats, sizes.warmup, device)
    notes = {"dense SwiGLU floor": f"hidden K*F = {k * hidden}: the same active FLOPs",
             "vrmoe MoE layer": f"{kernel} dispatch, Top-K router",
             "HF Mixtral sparse block": "peer (transformers, eager experts)"}
    rows = [Row(section, name, 1e3 * statistics.median(times[name]),
                target=LAYER_TARGET if name == "vrmoe MoE layer" else None,
                memory_mb=peak_memory_mb(steps[name], device), note=notes[name],
                **(ratio_fields(round_ratios(times, name, "dense SwiGLU floor")) if name != "dense SwiGLU floor"
                   else {"ratio": 1.0})) for name in steps]
    if peer is None:
        rows.append(Row(section, "HF Mixtral sparse block", note="skipped: transformers is not installed "
                                                                   "(pip install 'vrmoe[bench]')"))
    return rows


def router_layer_rows(sizes: Sizes, device: torch.device, n_experts: int | None = None,
                      labels: Iterable[str] | None = None) -> list[Row]:
    """Each router's training step and S-sample evaluation at the layer level (with ``n_experts``
    experts, and only the variants ``labels``, when given)."""
    from .model.moe import build_moe

    n_experts = n_experts or sizes.n_experts
    variants = [(label, o) for label, o in router_variants() if labels is None or label in labels]
    section = (f"Router overhead, MoE layer: T={sizes.tokens} D={sizes.d_model} F={sizes.hidden} "
               f"E={n_experts} K={sizes.k}")
    torch.manual_seed(0)
    x_TD = torch.randn(sizes.tokens, sizes.d_model, device=device, requires_grad=True)

    def layer(overrides: list[str]) -> torch.nn.Module:
        torch.manual_seed(0)
        return build_moe(sizes.d_model, n_experts, sizes.hidden, router_config(overrides, sizes.k),
                         "auto").to(device)

    layers = {"topk": layer(["router=topk"]), **{label: layer(o) for label, o in variants}}
    train_steps = {name: layer_train_step(m, x_TD, device) for name, m in layers.items()}
    for label in heads_floor_labels(variants, {label: layers[label].router for label, _ in variants}):
        train_steps[heads_contender(label)] = heads_step([layers[label].router], [x_TD], device)
    for name, m in layers.items():
        train_steps[router_contender(name)] = router_step([m.router], [x_TD], device)
    train = interleaved_times(train_steps, sizes.repeats, sizes.warmup, device)
    evals = {label: {s: layer_eval_step(with_samples(layers[label], s), x_TD, device) for s in (1, sizes.samples)}
             for label, _ in variants}
    normals = (sizes.samples, sizes.tokens, n_experts)
    targets = n_experts <= MAX_TRAIN_TARGET_EXPERTS
    return _router_rows(section, variants, train, evals, sizes, device, "layer train" if targets else None,
                        "eval" if targets else None, normal_draws=[normals])


def router_model_rows(sizes: Sizes, device: torch.device) -> list[Row]:
    """Each router's whole-model training step (and the step's throughput), and S-sample
    evaluation of the whole model."""
    precision = ["train.precision=bf16"] if device.type == "cuda" else []
    base = compose_config([f"model={sizes.model}", f"K={sizes.k}", *precision])
    section = (f"Router overhead, whole model: model={sizes.model}, batch {base.train.batch_size}x"
               f"{base.model.seq_len}, train step = fwd+bwd+AdamW")
    idx = random_tokens(base, base.train.batch_size, device)
    variants = router_variants()
    apps = {"topk": base, **{label: compose_config([f"model={sizes.model}", f"K={sizes.k}", *precision, *overrides])
                             for label, overrides in variants}}
    models = {name: model_on(app, device) for name, app in apps.items()}
    steps = {}
    for name, model in models.items():
        model.train()
        steps[name] = train_step(apps[name], model, idx, device)
    # The routers (and their heads) of every routed layer, each on a batch of router inputs.
    torch.manual_seed(0)
    inputs = [torch.randn(idx.numel(), base.model.d_model, device=device, requires_grad=True)
              for _ in models["topk"].moe_layers]
    for label in heads_floor_labels(variants, {label: models[label].moe_layers[0].router for label, _ in variants}):
        steps[heads_contender(label)] = heads_step([layer.router for layer in models[label].moe_layers], inputs, device)
    for name, model in models.items():
        steps[router_contender(name)] = router_step([layer.router for layer in model.moe_layers], inputs, device)
    train = interleaved_times(steps, sizes.repeats, sizes.warmup, device)
    evals = {label: {s: layer_eval_step(with_samples(models[label], s), idx, device) for s in (1, sizes.samples)}
             for label, _ in variants}
    layers = [layer for layer in models["topk"].moe_layers]
    normals = [(sizes.samples, idx.numel(), base.model.n_experts)] * len(layers)
    rows = _router_rows(section, variants, train, evals, sizes, device, "model train", "eval", normal_draws=normals)
    step_s = statistics.median(train["topk"])
    rows.append(Row(section, "train step throughput (topk)", 1e3 * step_s,
                    note=f"{idx.numel() / step_s:,.0f} tokens/s"))
    return rows


def _router_rows(section: str, variants: list[tuple[str, list[str]]], train: dict[str, list[float]],
                 evals: dict[str, dict[int, Callable[[], None]]], sizes: Sizes, device: torch.device,
                 train_measurement: str | None, eval_measurement: str | None,
                 normal_draws: list[tuple[int, int, int]]) -> list[Row]:
    """Training rows, then evaluation rows (S = sizes.samples against S = 1, timed together with
    the floor their sampling cannot go below: drawing the S x T x E standard normals alone, once
    per routed layer), then the peak memory of evaluation. Each row with a target holds the
    variant to its router's own (``Router.bench_targets`` under ``train_measurement`` and
    ``eval_measurement``; None: this section sets none): a ratio, or a floor measured here."""
    samples = sizes.samples
    floors: dict[str, dict[str, float]] = {"heads": {}, "normals": {}}  # floor -> variant -> its median

    def target(overrides: list[str], label: str, measurement: str | None) -> dict[str, Any]:
        """A row's target and the note that says where a floor target comes from."""
        wanted = router_target(overrides, measurement)
        if not isinstance(wanted, str):
            return {"target": wanted}
        value = floors[wanted].get(label)
        return {"target": value, "note": f"target: its {wanted} floor (median)" if value is not None
                else f"no {wanted} floor here: no target"}

    for label, _ in variants:
        if heads_contender(label) in train:
            floors["heads"][label] = statistics.median(floor_ratios(train, "topk", heads_contender(label)))
    rows = [Row(section, "train step: topk", 1e3 * statistics.median(train["topk"]), 1.0, note="the baseline")]
    for label, overrides in variants:
        rows.append(Row(section, f"train step: {label} / topk", 1e3 * statistics.median(train[label]),
                        **target(overrides, label, train_measurement),
                        **ratio_fields(round_ratios(train, label, "topk"))))
    for label, overrides in variants:
        fields = target(overrides, label, train_measurement)
        note = "; ".join(filter(None, ["topk's step, its routers' fwd+bwd swapped for these (timed alone)",
                                       fields.pop("note", "")]))
        rows.append(Row(section, f"train step by parts: {label} / topk",
                        1e3 * statistics.median(train[router_contender(label)]), **fields, note=note,
                        **ratio_fields(parts_ratios(train, "topk", router_contender(label), router_contender("topk")))))
    for label, _ in variants:
        heads = heads_contender(label)
        if heads in train:
            rows.append(Row(section, f"floor: topk + the {label} heads' fwd+bwd / topk",
                            1e3 * statistics.median(train[heads]), **ratio_fields(floor_ratios(train, "topk", heads)),
                            note="the heads' matmuls and activations alone"))

    def draw_normals() -> None:
        for shape in normal_draws:
            torch.randn(shape, device=device)

    contenders = {f"{label} S={s}": step for label, by_s in evals.items() for s, step in by_s.items()}
    contenders["normals"] = draw_normals
    times = interleaved_times(contenders, sizes.repeats, sizes.warmup, device)
    for label, _ in variants:
        floors["normals"][label] = statistics.median(floor_ratios(times, f"{label} S=1", "normals"))
    for label, overrides in variants:
        many, one = f"{label} S={samples}", f"{label} S=1"
        sampled = samples_at_eval(overrides)
        fields = target(overrides, label, eval_measurement) if sampled else {"note": "S is unused at evaluation"}
        rows.append(Row(section, f"eval: {label} S={samples} / S=1", 1e3 * statistics.median(times[many]),
                        **fields, **ratio_fields(round_ratios(times, many, one))))
    per_normal_ns = 1e9 * statistics.median(times["normals"]) / sum(math.prod(d) for d in normal_draws)
    for label in normals_floor_labels(variants):
        rows.append(Row(section, f"floor: {label} S=1 + drawing S={samples} normals / S=1",
                        1e3 * statistics.median(times["normals"]),
                        **ratio_fields(floor_ratios(times, f"{label} S=1", "normals")),
                        note=f"torch's generator alone: {per_normal_ns:.1f} ns a normal, "
                             f"{len(normal_draws)} x {'x'.join(map(str, normal_draws[0]))}"))
    for label, overrides in variants:
        if samples_at_eval(overrides):
            one, many = (peak_memory_mb(evals[label][s], device) for s in (1, samples))
            ratio = many / one if one and many is not None else None
            rows.append(Row(section, f"peak memory: eval {label} S={samples} / S=1", ratio=ratio,
                            target=router_target(overrides, "memory"), memory_mb=many,
                            note=f"S=1: {one:.1f} MB" if one is not None else "the profiler's memory timeline "
                                                                              "is unavailable here"))
    return rows


def width_tokens(d_model: int, sizes: Sizes) -> int:
    """Tokens at width ``d_model``: T x D^2 = ``sizes.width_work``, at least 16."""
    return max(16, sizes.width_work // d_model ** 2)


def width_rows(sizes: Sizes, device: torch.device) -> list[Row]:
    """One router variant (``sizes.width_variant``) against Top-K at the MoE layer, at each width in
    ``sizes.widths`` (E and K as the layer section's, F = 2D): its training step and its evaluation
    with S samples, each against Top-K's, next to their floors (Top-K's step plus the variant's heads
    alone; Top-K's evaluation plus drawing the S x T x E normals alone). The router's own work grows
    as D^2 in its heads and as E x S in its sampling, the experts' as D x F = 2 D^2: the sampling's
    share shrinks as the model widens, the heads' does not. With the same FLOPs per step the widest
    layers get few tokens (64 at D = 2048: 16 rows an expert), so their experts' matmuls are bound by
    reading the weights, which the heads' small ones are not: the ms column shows it."""
    from .model.moe import MoELayer, build_moe
    from .model.routers import build_router

    variants = dict(router_variants())
    if sizes.width_variant not in variants:
        raise ConfigError(f"width section: no router variant {sizes.width_variant!r}; "
                          f"choose one of {', '.join(variants)}")
    label, overrides = sizes.width_variant, variants[sizes.width_variant]
    n_experts, k, samples = sizes.n_experts, sizes.k, sizes.samples
    section = (f"{label} against topk by width, MoE layer: E={n_experts} F=2D K={k} S={samples}, "
               f"T x D^2 = {sizes.width_work:,} (the same FLOPs per step at every width)")
    rows: list[Row] = []
    for d_model in sizes.widths:
        tokens, hidden = width_tokens(d_model, sizes), 2 * d_model
        torch.manual_seed(0)
        x_TD = torch.randn(tokens, d_model, device=device, requires_grad=True)
        topk = build_moe(d_model, n_experts, hidden, router_config(["router=topk"], k), "auto").to(device)
        torch.manual_seed(0)
        router = build_router(d_model, n_experts, router_config(overrides, k, samples)).to(device)
        # The same experts (one module): the same work whatever the router, and one copy of a wide
        # layer's weights in memory. Built with hidden 1, then given Top-K's layer's experts.
        bayes = MoELayer(d_model, n_experts, 1, router).to(device)
        bayes.experts = topk.experts

        def in_mode(layer: torch.nn.Module, training: bool, step: Callable[[], None]) -> Callable[[], None]:
            def run() -> None:  # one layer serves both contenders: each sets the mode it runs in
                layer.train(training)
                step()
            return run

        def draw_normals(shape=(samples, tokens, n_experts)) -> None:
            torch.randn(shape, device=device)

        contenders = {"topk train": in_mode(topk, True, layer_train_step(topk, x_TD, device)),
                      "train": in_mode(bayes, True, layer_train_step(bayes, x_TD, device)),
                      "heads": heads_step([router], [x_TD], device),
                      "topk eval": in_mode(topk, False, layer_eval_step(topk, x_TD, device)),
                      "eval": in_mode(bayes, False, layer_eval_step(bayes, x_TD, device)),
                      "normals": draw_normals}
        times = interleaved_times(contenders, sizes.repeats, sizes.warmup, device)
        at = f"D={d_model} T={tokens}"
        median_ms = {name: 1e3 * statistics.median(t) for name, t in times.items()}
        rows += [Row(section, f"{at}: train step: topk", median_ms["topk train"], 1.0, note="the baseline"),
                 Row(section, f"{at}: train step: {label} / topk", median_ms["train"],
                     **ratio_fields(round_ratios(times, "train", "topk train"))),
                 Row(section, f"{at}: floor: topk + the {label} heads' fwd+bwd / topk", median_ms["heads"],
                     **ratio_fields(floor_ratios(times, "topk train", "heads")),
                     note="the heads' matmuls and activations alone"),
                 Row(section, f"{at}: eval: topk", median_ms["topk eval"], 1.0, note="the baseline"),
                 Row(section, f"{at}: eval: {label} S={samples} / topk", median_ms["eval"],
                     **ratio_fields(round_ratios(times, "eval", "topk eval"))),
                 Row(section, f"{at}: floor: topk eval + drawing S={samples} normals / topk", median_ms["normals"],
                     **ratio_fields(floor_ratios(times, "topk eval", "normals")),
                     note="torch's generator alone")]
        del topk, bayes, router, contenders  # a 2048-wide layer's weights and gradients before the next width
    return rows


def measured_matmul_flops(device: torch.device, n: int = 8192, repeats: int = 10) -> float:
    """FLOP/s of a large bf16 matmul on this device: the attainable roofline for MFU."""
    a = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    b = torch.randn(n, n, device=device, dtype=torch.bfloat16)
    for _ in range(3):
        a @ b
    synchronize(device)
    start = time.perf_counter()
    for _ in range(repeats):
        a @ b
    synchronize(device)
    return 2 * n**3 * repeats / (time.perf_counter() - start)


def graph_breaks(model, idx: torch.Tensor) -> tuple[int, list[str]]:
    """How many graph breaks torch.compile meets in a bf16-autocast forward of ``model``, and why."""
    import torch._dynamo

    torch._dynamo.reset()
    with autocast_for(idx.device, bf16=True):
        explanation = torch._dynamo.explain(model)(idx, idx)
    torch._dynamo.reset()
    reasons = [getattr(r, "reason", str(r)).splitlines()[0] for r in explanation.break_reasons]
    return explanation.graph_break_count, reasons


def model_throughput(app: AppConfig, batch_size: int, steps: int, device: torch.device,
                     compiled: bool = True) -> dict[str, float]:
    """Tokens/s and model FLOP/s of ``steps`` training steps (bf16 autocast on CUDA, optionally
    compiled), timed after three warm-up steps (which include the compilation). Model FLOPs
    per token are three forward passes' (forward + backward), counted by the backbone
    (``flops_per_token``): matmuls with K of E experts, causal attention at its mean context,
    the routers in full."""
    model = model_on(app, device)
    model.train()
    idx = random_tokens(app, batch_size, device)
    forward = torch.compile(model) if compiled else model
    step = train_step(app, model, idx, device, forward)
    for _ in range(3):
        step()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        step()
    synchronize(device)
    elapsed = time.perf_counter() - start
    tokens_per_s = steps * idx.numel() / elapsed
    train_flops_per_token = 3 * model.flops_per_token(samples=1).total
    return {"tokens_per_s": tokens_per_s, "flops_per_s": tokens_per_s * train_flops_per_token,
            "step_ms": 1e3 * elapsed / steps}


def gpu_rows(sizes: Sizes, device: torch.device) -> list[Row]:
    rows: list[Row] = []
    for tokens, d_model, hidden, n_experts, k in sizes.gpu_shapes:
        rows += moe_layer_rows(tokens, d_model, hidden, n_experts, k, sizes, device, title="GPU MoE layer fwd+bwd")
    app = compose_config([f"model={sizes.gpu_model}", "train.precision=bf16", "train.compile=true"])
    section = (f"MFU: model={sizes.gpu_model}, batch {sizes.gpu_batch}x{app.model.seq_len}, bf16 autocast, "
               "torch.compile")
    matmul = measured_matmul_flops(device, sizes.matmul_size)
    rows.append(Row(section, f"bf16 matmul {sizes.matmul_size}^3", note=f"{matmul / 1e12:.1f} TFLOP/s measured"))
    result = model_throughput(app, sizes.gpu_batch, sizes.gpu_steps, device)
    rows.append(Row(section, "train step", result["step_ms"],
                    note=f"{result['tokens_per_s']:,.0f} tokens/s, {result['flops_per_s'] / 1e12:.1f} TFLOP/s: "
                         f"MFU {result['flops_per_s'] / H100_BF16_DENSE_FLOPS:.1%} of 989 TFLOP/s (H100 dense "
                         f"bf16), {result['flops_per_s'] / matmul:.1%} of the measured matmul"))
    model = model_on(app, device)
    count, reasons = graph_breaks(model, random_tokens(app, 1, device))
    rows.append(Row(section, "graph breaks (torch._dynamo.explain)", note=f"{count}" + (f": {reasons[0]}" if reasons else "")))
    return rows


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def cpu_model() -> str:
    """The CPU's model name (``/proc/cpuinfo``; the platform's processor or machine elsewhere)."""
    cpu = platform.processor() or platform.machine()
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
    except (OSError, StopIteration):
        pass
    return cpu


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return f"{torch.cuda.get_device_name(device)} (CUDA), torch {torch.__version__}"
    policy = os.environ.get("OMP_WAIT_POLICY", "unset")
    return (f"CPU {cpu_model()}, {torch.get_num_threads()} torch threads of {os.cpu_count()} cores "
            f"(OMP_WAIT_POLICY {policy}), torch {torch.__version__}")


def shared_cpu_warning(device: torch.device) -> str | None:
    """The OpenMP wait policy that misleads on this CPU, if any. On a CPU that other processes
    keep busy, spinning OpenMP barriers make every parallel op wait for a descheduled thread;
    many small ops (an expert loop) suffer far more than few large ones, and the ratios then
    measure the neighbours. On an idle CPU, OMP_WAIT_POLICY=PASSIVE is the opposite mistake:
    the sleeping thread is woken for each of those small ops."""
    if device.type != "cpu" or not hasattr(os, "getloadavg") or torch.get_num_threads() < 2:
        return None
    load = os.getloadavg()[0]
    passive = os.environ.get("OMP_WAIT_POLICY", "").lower() == "passive"
    if load > (os.cpu_count() or 1) and not passive:
        return (f"the CPU is shared (load {load:.1f} on {os.cpu_count()} cores): multi-threaded timings suffer "
                "from spinning OpenMP barriers; rerun with OMP_WAIT_POLICY=PASSIVE or --threads 1")
    if load < 0.5 * (os.cpu_count() or 1) and passive:
        return (f"OMP_WAIT_POLICY=PASSIVE on an idle CPU (load {load:.1f} on {os.cpu_count()} cores): every parallel "
                "op wakes a sleeping thread, which slows the expert loop's many small ops; unset it here")
    return None


def _cell(value: float | None, spec: str) -> str:
    return "" if value is None else format(value, spec)


def table_cells(row: Row) -> list[str]:
    target = f"<= {row.target:.2f}" if row.target is not None else ""
    interval = f"{row.interval[0]:.3f}-{row.interval[1]:.3f}" if row.interval is not None else ""
    return [row.name, _cell(row.time_ms, ".1f"), _cell(row.ratio, ".3f") and _cell(row.ratio, ".3f") + "x",
            interval, target, row.verdict, _cell(row.memory_mb, ".1f"), row.note]


HEADERS = ["measurement", "ms", "ratio", "95% interval", "target", "met", "peak MB", "note"]
VERDICT_LEGEND = ("ratio: the median over rounds of the same-round ratios; 95% interval: of that median; met: "
                  "yes / NO when the whole interval is within / beyond the target, ~yes / ~NO (the median's side) "
                  "when the target lies inside it")
VERDICT_STYLES = {"yes": "[green]yes[/]", "NO": "[red]NO[/]", "~yes": "[yellow]~yes[/]", "~NO": "[yellow]~NO[/]"}


def render_markdown(rows: list[Row], title: str) -> str:
    lines = [f"**{title}**", "", VERDICT_LEGEND, ""]
    for section in dict.fromkeys(r.section for r in rows):
        lines += [f"*{section}*", "", "| " + " | ".join(HEADERS) + " |", "|" + "---|" * len(HEADERS)]
        lines += ["| " + " | ".join(table_cells(r)) + " |" for r in rows if r.section == section]
        lines.append("")
    return "\n".join(lines)


def render_rich(rows: list[Row], title: str) -> None:
    """One table per section, on stdout (a log or a pipe gets 160 columns rather than 80)."""
    from rich.console import Console
    from rich.table import Table

    out = Console(highlight=False)
    if not out.is_terminal:
        out = Console(highlight=False, width=160)
    out.print(f"[bold]{title}[/]")
    out.print(VERDICT_LEGEND)
    for section in dict.fromkeys(r.section for r in rows):
        table = Table(title=section, title_justify="left", title_style="bold")
        for header in HEADERS:
            table.add_column(header, justify="right" if header in ("ms", "ratio", "peak MB") else "left")
        for r in (r for r in rows if r.section == section):
            cells = table_cells(r)
            cells[5] = VERDICT_STYLES.get(cells[5], cells[5])
            table.add_row(*cells)
        out.print(table)


# ---------------------------------------------------------------------------
# Records: an output kept as a dated file
# ---------------------------------------------------------------------------

RECORD_LABEL = re.compile(r"[a-z0-9]+(?:-[a-z0-9]+)*")
# The environment variables that change what a bench measures, written into a record's command.
RECORD_ENVIRONMENT = ("OMP_NUM_THREADS", "OMP_WAIT_POLICY", "CUDA_VISIBLE_DEVICES")


def device_slug(device: torch.device) -> str:
    """The hardware in a record's file name: the GPU's or the CPU's model name in lower case, words
    joined by hyphens (``cpu-amd-epyc``, ``nvidia-h100-80gb-hbm3``)."""
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else f"cpu {cpu_model()}"
    name = re.sub(r"\((r|tm)\)", "", name.lower())
    return re.sub(r"[^a-z0-9]+", "-", name).strip("-")


def record_path(directory: Path, day: date, device: str, commit: str | None, label: str | None = None) -> Path:
    """``<directory>/<YYYY-MM-DD>_<device>_<short commit>[_<label>].md`` (``no-commit`` outside a checkout)."""
    short = commit[:7] if commit else "no-commit"
    return directory / ("_".join([day.isoformat(), device, short, *([label] if label else [])]) + ".md")


def record_command(words: list[str]) -> str:
    """The command line as a shell would rerun it, the environment variables that change a
    measurement (``RECORD_ENVIRONMENT``) first where they are set."""
    env = [f"{name}={shlex.quote(os.environ[name])}" for name in RECORD_ENVIRONMENT if name in os.environ]
    return " ".join([*env, shlex.join(words)])


def record_header(when: datetime, versions: dict[str, str | None], device: str, command: str) -> str:
    """The facts that head a record, one ``- key: value`` line each."""
    commit = versions.get("git_commit")
    if commit is None:
        commit_text = "not recorded (not a git checkout)"
    else:
        state = "with uncommitted changes" if commit.endswith("+dirty") else "clean tree"
        commit_text = f"{commit.removesuffix('+dirty')} ({state})"
    fields = {"date": f"{when:%Y-%m-%d %H:%M} UTC", "commit": commit_text, "device": device,
              "python": versions.get("python"), "torch": versions.get("torch"), "vrmoe": versions.get("vrmoe"),
              "transformers": versions.get("transformers") or "not installed", "command": f"`{command}`"}
    return "\n".join(f"- {key}: {value}" for key, value in fields.items())


@dataclass(frozen=True)
class Record:
    """Where an output will be kept, and the header that goes above it."""

    path: Path
    header: str

    def write(self, body: str) -> None:
        from .tracking import atomic_write_text

        self.path.parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(self.path, f"{self.header}\n\n{body.rstrip()}\n")


def start_record(directory: Path, device: torch.device, command: list[str], label: str | None = None) -> Record:
    """The record of a run about to start: named by today's date (UTC), the device and vrmoe's
    commit, refused before anything is measured when the label is malformed or the file exists."""
    from .tracking import software_versions

    if label is not None and not RECORD_LABEL.fullmatch(label):
        raise ConfigError(f"--label {label!r}: lower-case letters, digits and single hyphens only "
                          "(it ends the record's file name)")
    when = datetime.now(timezone.utc)
    versions = software_versions()
    path = record_path(directory, when.date(), device_slug(device), versions["git_commit"], label)
    if path.exists():
        raise ConfigError(f"--record: {path} exists; add --label to name this run apart")
    return Record(path, record_header(when, versions, device_name(device), record_command(command)))


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

DEFAULT_SECTIONS = ("layer", "router", "model", "gpu")
SECTIONS = (*DEFAULT_SECTIONS, "width")  # width is opt-in: --only width


def run_benchmarks(sizes: Sizes, device: torch.device, sections: Iterable[str] = DEFAULT_SECTIONS,
                   progress: Callable[[str], None] = lambda _: None) -> list[Row]:
    check_router_targets()
    rows: list[Row] = []
    sections = set(sections)
    if "layer" in sections:
        progress("MoE layer against the dense floor and the peer")
        rows += moe_layer_rows(sizes.tokens, sizes.d_model, sizes.hidden, sizes.n_experts, sizes.k, sizes, device)
    if "router" in sections:
        progress("router overheads at the layer")
        rows += router_layer_rows(sizes, device)
        for n_experts, labels in sizes.more_experts:
            progress(f"router overheads at the layer with E={n_experts}")
            rows += router_layer_rows(sizes, device, n_experts, labels)
    if "model" in sections:
        progress(f"router overheads over a model={sizes.model} step")
        rows += router_model_rows(sizes, device)
    if "width" in sections:
        progress(f"{sizes.width_variant} against topk at widths {', '.join(map(str, sizes.widths))}")
        rows += width_rows(sizes, device)
    if "gpu" in sections and device.type == "cuda":
        progress("GPU shapes and MFU")
        rows += gpu_rows(sizes, device)
    return rows


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = CommandParser(
        prog="vrmoe bench",
        description="Performance ratios on this device: the MoE layer against a dense floor and Hugging Face's "
                    "Mixtral block, the Bayesian routers' training and S-sample evaluation overheads, and on CUDA "
                    "the GPU layer shapes and the MFU of model=gpt_small. Ratios come from interleaved rounds.")
    parser.add_argument("--format", choices=("table", "markdown"), default="table",
                        help="a rich table (default) or a markdown table for docs/performance.md")
    parser.add_argument("--tiny", action="store_true", help="tiny shapes and one repeat (a smoke test)")
    parser.add_argument("--repeats", type=int, default=None, help=f"timed rounds per contender (default {QUICK.repeats})")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("--device", choices=("auto", "cpu", "cuda"), default="auto",
                        help="auto (CUDA when present), cpu or cuda")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=DEFAULT_SECTIONS,
                        help="run only these sections (width, the router against Top-K at widths D, runs only "
                             "when named)")
    parser.add_argument("--widths", type=int, nargs="+", default=None,
                        help=f"the width section's model widths D (default {' '.join(map(str, QUICK.widths))})")
    parser.add_argument("--record", type=Path, default=None, metavar="DIR",
                        help="also keep the markdown output as DIR/<date>_<device>_<commit>[_<label>].md, headed by "
                             "the date, commit, device, versions and this command (docs/performance.md)")
    parser.add_argument("--label", default=None,
                        help="a word that ends the record's file name (with --record): run1, threads1, ...")
    return parser.parse_args(argv)


def main(argv: list[str]) -> None:
    args = parse_args(argv)
    from .console import log_line

    if args.repeats is not None and args.repeats < 1:
        raise ConfigError(f"--repeats {args.repeats}: must be at least 1")
    if args.threads is not None:
        if args.threads < 1:
            raise ConfigError(f"--threads {args.threads}: must be at least 1")
        torch.set_num_threads(args.threads)
    if args.device == "cuda" and not torch.cuda.is_available():
        raise ConfigError("--device cuda: no CUDA device is available here; use --device cpu (or auto)")
    device = resolve_device(args.device)
    sizes = TINY if args.tiny else QUICK
    if args.repeats is not None:
        sizes = dataclasses.replace(sizes, repeats=args.repeats)
    if args.widths is not None:
        if "width" not in args.only:
            raise ConfigError("--widths sets the width section's widths, which runs only when asked for: "
                              "add --only width")
        for width in args.widths:
            if width < 4:
                raise ConfigError(f"--widths {width}: must be at least 4 (heads of D/4)")
        sizes = dataclasses.replace(sizes, widths=tuple(args.widths))
    if args.label is not None and args.record is None:
        raise ConfigError("--label names a record's file: add --record DIR")
    record = start_record(args.record, device, ["vrmoe", "bench", *argv], args.label) if args.record else None
    warning = shared_cpu_warning(device)
    if warning:
        log_line(f"[yellow]note:[/] {warning}")
    start = time.perf_counter()
    rows = run_benchmarks(sizes, device, args.only, progress=lambda s: log_line(f"bench: {s}"))
    title = f"vrmoe bench on {device_name(device)}; medians of {sizes.repeats} interleaved rounds"
    if args.format == "markdown":
        print(render_markdown(rows, title))
    else:
        render_rich(rows, title)
    if record is not None:
        record.write(render_markdown(rows, title))
        log_line(f"wrote {record.path}")
    if device.type != "cuda" and "gpu" in args.only:
        log_line("GPU rows (three bf16 layer shapes, MFU of model=gpt_small, graph breaks) need CUDA; skipped here")
    log_line(f"bench took {time.perf_counter() - start:.0f}s")
    sys.stdout.flush()


__all__ = ["main", "run_benchmarks", "start_record", "Record", "Sizes", "QUICK", "TINY", "Row", "interleaved_times", "round_ratios", "median_interval", "peak_memory_mb",
           "graph_breaks", "model_throughput", "compose_config", "render_markdown"]
