"""``vrmoe cost``: each router's FLOPs over Top-K's at the shapes of real MoE models, counted.

    vrmoe cost experiments/paper_models        # every config.json under it: docs/results.md's tables
    vrmoe cost path/to/model_dir --samples 1 8 32

Each model is built from its ``config.json`` alone on PyTorch's meta device (shapes only: no
weights, no memory, nothing downloaded), with vrmoe routers put where ``model=hf`` puts them
(:class:`MetaBackbone`), and counted by the rules a real run reports: ``HFBackbone.flops_per_token``
(every matmul read off the modules, routed experts K of E, attention over the mean causal context)
with each router counting itself (``Router.flops_per_token``: its gate, its heads and, per routing
sample, its noise, softmax and running average). A cell is the model's FLOPs per token at
evaluation with the router, over the same model's with Top-K, minus 1: with S routing samples,
with the router on every MoE layer (``router.layers=all``) or on the last one only
(``router.layers=1``), with the router's default heads or with the thinnest heads its config
accepts (:func:`thinnest_heads`). Cells under 1% (the paper's budget) say ``yes``.
"""

from __future__ import annotations

import copy
import dataclasses
import re
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Iterable

import torch
import torch.nn as nn

from .config import ConfigError, ModelConfig, RouterConfig
from .console import CommandParser
from .model.hf import (CONVENTIONS, HFBackbone, SwappedRouter, _parent, _routers, _transformers, check_family,
                       config_value, first_line)
from .model.native import router_layer_plan
from .model.routers import ROUTERS, build_router

#: The paper's budget: under 1% extra FLOPs.
BUDGET = 0.01
#: Router keys that shape the heads: the table's head columns set them, so a router's bench variants
#: that set them are left out of its rows.
HEAD_KEYS = ("head_hidden_ratio", "shared_hidden")


def default_context() -> int:
    """The mean causal context is counted over ``model=hf``'s default sequence length."""
    from omegaconf import OmegaConf

    return int(OmegaConf.load(Path(__file__).parent / "conf" / "model" / "hf.yaml").seq_len)


def read_config(config_dir: Path):
    """The ``transformers`` config in ``config_dir`` (its ``config.json``), or a one-line error."""
    transformers = _transformers()
    if not (Path(config_dir) / "config.json").is_file():
        raise ConfigError(f"{config_dir}: no config.json here; give a model directory or a folder of them")
    try:
        config = transformers.AutoConfig.from_pretrained(Path(config_dir).resolve())
    except Exception as exc:  # an unknown model_type, a malformed file: one line for the user
        raise ConfigError(f"{config_dir}: cannot read its config.json ({first_line(exc)})") from None
    check_family(str(config_dir), config.model_type)
    if config.model_type not in CONVENTIONS:
        raise ConfigError(f"{config_dir}: {config.model_type} routing is not one vrmoe knows how to swap; "
                          f"supported families: {', '.join(CONVENTIONS)}")
    return config


class MetaBackbone(HFBackbone):
    """A ``model=hf`` backbone built from a ``config.json`` alone on the meta device: the model's
    shapes, with vrmoe routers where :class:`HFBackbone` puts them (:meth:`swap`), and no weights.
    Everything HFBackbone counts (``flops_per_token``, ``parameter_counts``) it counts the same way:
    those methods are HFBackbone's own."""

    def __init__(self, config_dir: Path | str, context: int | None = None, dtype: torch.dtype = torch.float32):
        nn.Module.__init__(self)  # HFBackbone.__init__ loads the checkpoint's weights; this builds shapes only
        config = read_config(Path(config_dir))
        with torch.device("meta"):
            self.hf = _transformers().AutoModelForCausalLM.from_config(config, dtype=dtype)
        self.family = config.model_type
        self.cfg = ModelConfig(name="hf", backbone="hf", hf_name=str(config_dir),
                               seq_len=default_context() if context is None else context)
        self._originals = _routers(self.hf)  # a plain list: kept to swap again, not counted as modules
        if not self._originals:
            raise ConfigError(f"{config_dir}: a {self.family} model has no expert router to swap; "
                              "choose a Mixture-of-Experts config")
        self._rule = CONVENTIONS[self.family].rule(self.cfg.hf_name, config)
        self.moe_layers: list[SwappedRouter] = []
        self.moe_layer_names = [f"layer{index.group(1)}" if (index := re.search(r"layers\.(\d+)\.", name)) else name
                                for name, _ in self._originals]

    @property
    def shape(self) -> ModelConfig:
        """The model's shape under vrmoe's names, read from the config as ``model=hf`` reads it."""
        keys = ("d_model", "n_experts", "top_k", "n_layers", "vocab_size")
        return ModelConfig(name="hf", backbone="hf", hf_name=self.cfg.hf_name, seq_len=self.cfg.seq_len,
                           **{key: config_value(self.cfg.hf_name, key) for key in keys})

    def swap(self, router_cfg: RouterConfig) -> "MetaBackbone":
        """Put vrmoe routers where the model's routers stood (replacing those of an earlier swap), on
        the MoE layers ``router.layers`` chooses and Top-K on the others, as HFBackbone does."""
        templates: dict[tuple, nn.Module] = {}
        self.moe_layers = []
        plan = router_layer_plan(len(self._originals), self._rule.configure(router_cfg))
        for (module_name, original), layer_cfg in zip(self._originals, plan):
            swapped = SwappedRouter(original, self._meta_router(original, layer_cfg, templates))
            parent, attr = _parent(self.hf, module_name)
            setattr(parent, attr, swapped)
            self.moe_layers.append(swapped)
        return self

    @staticmethod
    def _meta_router(original: nn.Module, cfg: RouterConfig, templates: dict[tuple, nn.Module]) -> nn.Module:
        """A router of ``cfg`` with the pretrained router's shape (and bias, where it has one), on meta.

        Each distinct router is built once on the CPU, where the full covariance's index buffers can
        be computed (nonzero has no meta kernel), moved to meta, and copied for each layer (copies of
        meta tensors allocate nothing)."""
        n_experts, d_model = original.weight.shape
        bias = getattr(original, "bias", None) is not None
        key = (id(cfg), n_experts, d_model, bias)
        if key not in templates:
            router = build_router(d_model, n_experts, cfg)
            if bias:
                router.gate = nn.Linear(d_model, n_experts, bias=True)
            templates[key] = router.to("meta")
        return copy.deepcopy(templates[key])


# ---------------------------------------------------------------------------
# The routers and their settings
# ---------------------------------------------------------------------------

def router_settings() -> list[tuple[str, list[str]]]:
    """(label, router overrides) of every registered router, in the configurations it names for the
    bench (``Router.bench_variants``) less those that only differ in the heads, Top-K first."""
    settings = [("topk", ["router=topk"])]
    for name, cls in ROUTERS.items():
        if name == "topk":
            continue
        for label, extra in (cls.bench_variants or {name: []}).items():
            if not any(o.split("=", 1)[0].removeprefix("router.") in HEAD_KEYS for o in extra):
                settings.append((label, [f"router={name}", *extra]))
    return settings


@lru_cache(maxsize=None)
def composed_router(overrides: tuple[str, ...]) -> RouterConfig:
    """The router config ``vrmoe train`` would build from these overrides (its YAML's defaults);
    composed once per process (callers derive settings with ``dataclasses.replace``)."""
    from .compose import compose_config

    return compose_config(overrides).router


def thinnest_heads(cfg: RouterConfig, model: ModelConfig) -> RouterConfig:
    """``cfg`` with the thinnest heads its router's config accepts: ``shared_hidden`` on where the
    router has that key, and the smallest ``head_hidden_ratio`` its ``check`` passes among hidden
    widths of 1, 2, 4, ... units up to its own (a head's hidden width is ``max(1, round(D x
    ratio))``). A router without heads keys is returned as it is."""
    keys = {f.name for f in dataclasses.fields(cfg)}
    if "shared_hidden" in keys:
        cfg = dataclasses.replace(cfg, shared_hidden=True)
    if "head_hidden_ratio" in keys:
        d_model, width = model.d_model, 1
        while width < d_model * cfg.head_hidden_ratio:
            candidate = dataclasses.replace(cfg, head_hidden_ratio=width / d_model)
            try:
                candidate.check(model)
                return candidate
            except ConfigError:
                width *= 2
    return cfg


@dataclass
class Cell:
    overhead: float | None  # FLOPs with the router / with Top-K - 1; None where the config refuses the model
    reason: str = ""


@dataclass
class ModelCost:
    """One model's overheads: (label, S) -> (layers, heads) -> Cell."""

    name: str
    summary: str
    topk_flops: float
    cells: dict[tuple[str, int], dict[tuple[str, str], Cell]]
    thin_note: str


LAYERS = (("all", "all"), ("last", "1"))  # (column name, router.layers)
HEADS = ("default", "thinnest")


def model_cost(config_dir: Path, samples: Iterable[int] = (1, 32), context: int | None = None,
               settings: list[tuple[str, list[str]]] | None = None) -> ModelCost:
    """Every router setting's FLOPs over Top-K's on the model of ``config_dir``."""
    model = MetaBackbone(config_dir, context)
    shape = model.shape
    samples = list(samples)
    settings = router_settings() if settings is None else settings
    base = {label: composed_router(tuple(overrides)) for label, overrides in settings}
    topk = model.swap(dataclasses.replace(base["topk"], k=shape.top_k, samples=1)).flops_per_token(1).total
    cells: dict[tuple[str, int], dict[tuple[str, str], Cell]] = {}
    thin_widths: set[str] = set()
    for label, _ in settings:
        for heads in HEADS:
            for layers_name, layers in LAYERS:
                cfg = dataclasses.replace(base[label], k=shape.top_k, layers=layers)
                try:
                    cfg.check(shape)
                except ConfigError as exc:
                    for s in samples:
                        cells.setdefault((label, s), {})[(layers_name, heads)] = Cell(None, str(exc))
                    continue
                if heads == "thinnest":
                    cfg = thinnest_heads(cfg, shape)
                    if "head_hidden_ratio" in {f.name for f in dataclasses.fields(cfg)}:
                        thin_widths.add(f"{max(1, round(shape.d_model * cfg.head_hidden_ratio))}")
                model.swap(cfg)
                for s in samples:
                    flops = model.flops_per_token(s).total
                    cells.setdefault((label, s), {})[(layers_name, heads)] = Cell(flops / topk - 1)
    n_moe = len(model.moe_layers)
    summary = (f"{type(model.hf).__name__}, D={shape.d_model}, E={shape.n_experts}, K={shape.top_k}, "
               f"{n_moe} MoE layers of {shape.n_layers}; Top-K model {topk / 1e9:.2f} GFLOPs per token "
               f"at evaluation, context {model.cfg.seq_len}")
    thin = f"thinnest heads: {' or '.join(sorted(thin_widths)) or '-'} hidden unit(s)"
    return ModelCost(Path(config_dir).name, summary, topk, cells, thin)


def model_dirs(paths: Iterable[Path]) -> list[Path]:
    """Each path is a model directory (it holds a config.json) or a folder of them (sorted)."""
    dirs: list[Path] = []
    for path in map(Path, paths):
        if (path / "config.json").is_file():
            dirs.append(path)
        elif path.is_dir() and (found := sorted(p.parent for p in path.glob("*/config.json"))):
            dirs += found
        else:
            raise ConfigError(f"{path}: neither a model directory (with a config.json) nor a folder of them")
    return dirs


# ---------------------------------------------------------------------------
# Output
# ---------------------------------------------------------------------------

def cell_text(cell: Cell) -> str:
    if cell.overhead is None:
        return "n/a"
    return f"{100 * cell.overhead:.3f}% {'yes' if cell.overhead < BUDGET else 'NO'}"


COLUMNS = [(layers, heads) for layers, _ in LAYERS for heads in HEADS]
HEADERS = ["router", "S", *(f"{'all MoE layers' if layers == 'all' else 'last MoE layer'}, {heads} heads"
                            for layers, heads in COLUMNS)]


def render_markdown(costs: list[ModelCost]) -> str:
    lines = ["**Router FLOPs over Top-K's at the shapes of published MoE models** (per token, at evaluation)", "",
             "A cell: the model's FLOPs per token with the router / with Top-K - 1 (vrmoe's counting: "
             "`HFBackbone.flops_per_token`, each router's `flops_per_token`); `yes` when under 1%, the paper's "
             "budget. Default heads: the router's own `head_hidden_ratio` (0.25: D -> D/4 -> outputs); thinnest: "
             "the smallest ratio its config accepts, with `shared_hidden=true` where it has that key. A router "
             "without heads costs the same under both; one whose evaluation does not average S samples, the same "
             "at every S.", ""]
    refused: list[str] = []
    for cost in costs:
        lines += [f"*{cost.name}: {cost.summary}; {cost.thin_note}*", "",
                  "| " + " | ".join(HEADERS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
        for (label, s), by_column in cost.cells.items():
            lines.append(f"| {label} | {s} | " + " | ".join(cell_text(by_column[c]) for c in COLUMNS) + " |")
            refused += [f"{cost.name}, {label}: {cell.reason}" for cell in by_column.values() if cell.reason]
        lines.append("")
    if len(costs) > 1:
        lines += [f"*Under 1% on how many of the {len(costs)} models*", "",
                  "| " + " | ".join(HEADERS) + " |", "|---|---|" + "---:|" * len(COLUMNS)]
        for key in costs[0].cells:
            counts = [sum(c.cells.get(key, {}).get(col, Cell(None)).overhead is not None
                          and c.cells[key][col].overhead < BUDGET for c in costs) for col in COLUMNS]
            lines.append(f"| {key[0]} | {key[1]} | " + " | ".join(f"{n} of {len(costs)}" for n in counts) + " |")
        lines.append("")
    for line in dict.fromkeys(refused):
        lines.append(f"n/a: {line}")
    return "\n".join(lines).rstrip() + "\n"


# ---------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------

def main(argv: list[str]) -> None:
    parser = CommandParser(
        prog="vrmoe cost",
        description="Each router's FLOPs per token over Top-K's at the shapes of MoE models given by their "
                    "config.json (built on the meta device: no weights, nothing downloaded), with the router on "
                    "every MoE layer or the last one, default or thinnest heads, at each S. Markdown on stdout.")
    parser.add_argument("paths", nargs="+", type=Path,
                        help="model directories holding a config.json, or folders of them "
                             "(e.g. experiments/paper_models)")
    parser.add_argument("--samples", type=int, nargs="+", default=[1, 32], help="routing samples S (default 1 32)")
    parser.add_argument("--context", type=int, default=None,
                        help="tokens of causal context the attention is counted over (default: model=hf's seq_len)")
    args = parser.parse_args(argv)
    for s in args.samples:
        if s < 1:
            raise ConfigError(f"--samples {s}: must be at least 1")
    if args.context is not None and args.context < 1:
        raise ConfigError(f"--context {args.context}: must be at least 1")
    from .console import log_line

    costs = []
    for config_dir in model_dirs(args.paths):
        log_line(f"cost: {config_dir}")
        costs.append(model_cost(config_dir, dict.fromkeys(args.samples), args.context))
    print(render_markdown(costs), end="")


__all__ = ["MetaBackbone", "model_cost", "router_settings", "thinnest_heads", "render_markdown", "main"]
