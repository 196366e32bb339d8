"""The router contract, the registry and the helpers every router shares.

A router maps token states ``u_TD`` to a :class:`Routing`; the MoE layer and the
training loop only read :class:`Routing` and never ask which router produced it.
A router's own loss terms arrive already weighted in ``Routing.aux_loss`` and its
diagnostics in ``Routing.stats`` (detached tensors, turned into numbers only when
the loop logs). All randomness comes from torch's global generator, which
checkpoints save and resume restores.

A router is one class (registered with :func:`register_router`) plus, optionally,
one YAML file in ``conf/router/``. The class owns everything about itself:

* ``Config``: a dataclass extending :class:`~vrmoe.config.RouterConfig` with the
  router's own keys, and ``Config.check(model)`` with their range checks;
* ``flops_per_token(samples)``: its FLOPs at evaluation, S and its heads counted;
* ``uncertainty_signal``: the name of its own per-token uncertainty
  (``Routing.uncertainty_T``) as an OOD score, or None;
* ``Config.samples_at_eval()``: whether evaluation averages S routing samples;
* ``bench_variants``: the configurations ``vrmoe bench`` measures;
* ``bench_targets``: the overheads ``vrmoe bench`` holds it to (a ratio, or a floor it measures);
* ``head_outputs(u)``: its heads' outputs, if it has heads (the bench's training floor);
* ``posthoc_trained_parameters()``: the loaded weights its post-hoc method trains (SWAG's gate),
  which ``train.freeze=backbone`` then leaves trainable.

How logits become expert scores, and scores the experts and gates a token gets, is one
:class:`Scoring` (``router.scoring_func``, ``norm_topk_prob``, ``routed_scaling_factor``,
``n_group``/``topk_group``) that every router reads through :meth:`Router.select`; the selection
bias that auxiliary-loss-free balancing moves lives on the base class too.

Routers that average S routing samples share :class:`ScoreMean`: the samples are drawn and
turned into scores a chunk at a time and only their running sum is kept, so S x T x E numbers
never exist at once unless ``Router.keep_samples`` asks for them.

Shape suffixes: T tokens, D model width, E experts, K experts per token,
S Monte-Carlo samples, C the samples of one chunk, P packed lower-triangle entries.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
import torch.nn as nn
import torch.nn.functional as F

from ...config import ConfigError, ModelConfig, RouterConfig
from ...distributed import sum_over_ranks, world_size
from ..flops import SOFTMAX_FLOPS_PER_CLASS, linear_flops


@dataclass
class Routing:
    expert_ids_TK: torch.Tensor  # long, the selected experts
    # The selected experts' weights: summing to 1 per token with router.norm_topk_prob (the default),
    # times router.routed_scaling_factor.
    gates_TK: torch.Tensor
    # The routing distribution selection was made from (S-averaged at evaluation): the softmax, or the
    # sigmoid scores normalised to sum to 1 (router.scoring_func=sigmoid).
    probs_TE: torch.Tensor
    aux_loss: torch.Tensor  # scalar, weighted: load balance + z-loss + the router's own terms
    stats: dict[str, torch.Tensor] = field(default_factory=dict)  # detached diagnostics
    # The S per-sample routing distributions whose mean is probs_TE (under sigmoid scoring: whose
    # mean, normalised, is probs_TE), only where they were asked for
    # (the router's ``keep_samples`` is True) and S > 1; None otherwise. The default leaves them
    # out: the mean is accumulated without them (evaluation's mutual information runs S
    # single-sample passes instead, see vrmoe/eval/context.py).
    sample_probs_STE: torch.Tensor | None = None
    # The router's own per-token uncertainty signal for OOD scores (None if it has none):
    # tr(Sigma_post) for the variational router, the mean temperature for vtsr.
    uncertainty_T: torch.Tensor | None = None


class Router(nn.Module):
    """Base: holds the deterministic logit layer ``gate`` (NN_det in the paper).

    Every router keeps the name ``gate`` for it so a Top-K checkpoint loads into
    any router (the post-hoc protocol uses it as the frozen mean base).
    """

    name: ClassVar[str]
    Config: ClassVar[type[RouterConfig]] = RouterConfig
    #: The OOD-score name of ``Routing.uncertainty_T`` (None: the router reports none).
    uncertainty_signal: ClassVar[str | None] = None
    #: What ``vrmoe bench`` measures: label -> router overrides (beyond ``router=<name>``).
    bench_variants: ClassVar[dict[str, list[str]] | None] = None
    #: What ``vrmoe bench`` holds the router to on a CPU, measurement -> target: a ratio it must stay
    #: at or below, or a floor the bench measures in the same rounds, "heads" (Top-K's training step
    #: plus the forward and backward of this router's heads alone) or "normals" (evaluation at S = 1
    #: plus drawing the S x T x E standard normals alone). Measurements: "layer train" and "model
    #: train" (the training step over Top-K's, at one MoE layer with E <= 16 and over a whole model),
    #: "eval" (evaluation with S samples over S = 1) and "memory" (its peak memory, S over 1).
    bench_targets: ClassVar[dict[str, float | str]] = {"model train": 1.03, "memory": 1.10}
    #: A router that averages S samples returns them in ``Routing.sample_probs_STE`` only when
    #: this is True (set it on the instance); by default it keeps only their running mean.
    keep_samples: bool = False

    def __init__(self, d_model: int, n_experts: int, cfg: RouterConfig):
        super().__init__()
        self.n_experts, self.k, self.cfg = n_experts, cfg.k, cfg
        self.scoring = Scoring.of(cfg)
        self.gate = nn.Linear(d_model, n_experts, bias=False)
        nn.init.normal_(self.gate.weight, std=d_model ** -0.5 * 0.1)
        # The selection bias (DeepSeek-V3's e_score_correction_bias): added to the scores for selection
        # only. It exists where it can matter, a sigmoid router (a family's checkpoint or a post-hoc
        # base brings one) or one whose training moves it, and is trained state there; elsewhere it
        # is None and the state_dict holds no entry for it (checkpoints of softmax runs are unchanged).
        uses_bias = cfg.scoring_func == "sigmoid" or cfg.bias_update_speed > 0
        self.register_buffer("e_score_correction_bias", torch.zeros(n_experts) if uses_bias else None)

    def select(self, scores_TE: torch.Tensor, perturbed_TE: torch.Tensor | None = None,
               scaled_TE: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The K experts of every token and their gates, from its scores (S-averaged at evaluation).

        Selection is Top-K of ``scores + bias`` inside the kept expert groups, or, for a router that
        samples, of ``perturbed_TE`` (its Gumbel-perturbed :meth:`sampling_log_weights`) inside the
        same groups; the groups are kept on the unperturbed scores. Gates are the selected scores as
        :meth:`Scoring.gates` makes them (``scaled_TE``: the scaled logits the scores came from, where
        the router has them). In training the bias then moves towards balance
        (``router.bias_update_speed``)."""
        bias_E = self.e_score_correction_bias
        if perturbed_TE is None and bias_E is None and self.scoring.plain:
            if scaled_TE is None:
                return renormalised_topk(scores_TE, self.k)  # the paper's Top-K, the numbers it always gave
            perturbed_TE = scaled_TE  # Top-K of the scaled logits is that of their softmax, without its rounding
        ids_TK = self.selection_choice(scores_TE, perturbed_TE).topk(self.k, dim=-1).indices
        if self.training and self.cfg.bias_update_speed > 0:
            self.update_bias(ids_TK)
        return ids_TK, self.scoring.gates(scores_TE, ids_TK, scaled_TE)

    def selection_choice(self, scores_TE: torch.Tensor, perturbed_TE: torch.Tensor | None = None) -> torch.Tensor:
        """What :meth:`select` takes the Top-K of (detached): the scores plus the selection bias, or
        ``perturbed_TE`` where the router samples, at -inf outside the groups kept on the scores."""
        bias_E = self.e_score_correction_bias
        choice_TE = scores_TE.detach() if bias_E is None else scores_TE.detach() + bias_E
        if self.scoring.grouped:
            kept_TE = self.scoring.kept_groups(choice_TE)
            return (choice_TE if perturbed_TE is None else perturbed_TE.detach()).masked_fill(~kept_TE, -math.inf)
        return choice_TE if perturbed_TE is None else perturbed_TE.detach()

    def overlap_with_topk(self, ids_TK: torch.Tensor, scaled_TE: torch.Tensor) -> torch.Tensor:
        """Mean fraction of the chosen experts ``ids_TK`` that deterministic selection on the same gate
        logits (``scaled_TE``, as the router scales them: ``l / T``) would also choose (1 = exactly
        what it would have chosen); detached. Without a selection bias or expert groups that is Top-K
        of the scaled logits (the scores are monotone in them); with either, what :meth:`select`
        chooses from their scores."""
        if self.e_score_correction_bias is None and not self.scoring.grouped:
            return topk_overlap(ids_TK, scaled_TE)
        return topk_overlap(ids_TK, self.selection_choice(self.scoring.scores(scaled_TE.detach())))

    def sampling_log_weights(self, scaled_TE: torch.Tensor, scores_TE: torch.Tensor) -> torch.Tensor:
        """What a sampling router perturbs with Gumbel noise: the log of the weights it draws K experts
        in proportion to (Gumbel-top-K), from the scaled logits and the scores made of them. Without a
        bias the weights are the scores, so the draw is from the routing distribution
        (``softmax(l / T)``, or ``sigmoid(l / T)`` normalised); with one they are the scores plus the
        bias, floored at 0 (an expert whose corrected score is not positive is not drawn): the draw
        is in proportion to what Top-K takes the largest of."""
        bias_E = self.e_score_correction_bias
        if bias_E is None:
            return self.scoring.log_weights(scaled_TE)
        return (scores_TE + bias_E).clamp_min(torch.finfo(scores_TE.dtype).tiny).log()

    @torch.no_grad()
    def update_bias(self, ids_TK: torch.Tensor) -> None:
        """Auxiliary-loss-free balancing (Wang et al. 2024; DeepSeek-V3): every expert's bias moves by
        ``router.bias_update_speed`` times the sign of its load error, up for an expert that took fewer
        than the mean number of slots, down for one that took more. Training routes each step's batch
        once, so this runs once per optimiser step, on that step's load (the global batch's under
        torchrun, so every rank moves its bias alike). The move waits for the step's update
        (:func:`balancing_routers`, settled by the training step): a step skipped as non-finite moves the bias no more than the weights."""
        counts_E = torch.zeros(self.n_experts, device=ids_TK.device, dtype=torch.float32)
        counts_E.scatter_add_(0, ids_TK.reshape(-1), torch.ones(ids_TK.numel(), device=ids_TK.device))
        counts_E = sum_over_ranks(counts_E)
        self.pending_bias_move_E = (counts_E.mean() - counts_E).sign() * self.cfg.bias_update_speed

    @torch.no_grad()
    def settle_bias_update(self, apply: bool) -> None:
        """Apply (or drop) the bias move of the latest training forward."""
        move_E = getattr(self, "pending_bias_move_E", None)
        if move_E is not None:
            if apply:
                self.e_score_correction_bias.add_(move_E)
            self.pending_bias_move_E = None

    def balance_terms(self, logits_TE: torch.Tensor, probs_TE: torch.Tensor, ids_TK: torch.Tensor) -> torch.Tensor:
        # In training every rank routes its slice of one global batch in step; evaluation is per rank.
        loss = self.cfg.load_balance_weight * load_balance_loss(probs_TE, ids_TK, over_ranks=self.training)
        if self.cfg.z_loss_weight > 0:
            loss = loss + self.cfg.z_loss_weight * z_loss(logits_TE)
        return loss

    def forward(self, u_TD: torch.Tensor) -> Routing:  # pragma: no cover - abstract
        raise NotImplementedError

    def head_outputs(self, u_TD: torch.Tensor) -> list[torch.Tensor]:
        """The outputs of the router's own heads (its layers besides the gate) for ``u_TD``: the
        matmuls its training step adds to Top-K's, which ``vrmoe bench`` times alone as the
        router's training floor. A router without heads has none."""
        return []

    def posthoc_trained_parameters(self) -> list[nn.Parameter]:
        """Parameters that come from the base model (``train.init_from``, a pretrained checkpoint)
        and still train under ``train.freeze=backbone``. Routers whose post-hoc method is new heads
        on the frozen gate have none; a router whose method trains the gate itself (SWAG, over the
        gate's weights) names it."""
        return []

    def topk_flops_per_token(self) -> float:
        """What deterministic Top-K on the same gate costs: the logit layer, the softmax (a sigmoid
        is counted alike) and the renormalisation of the K gates (Top-K selection is comparisons and
        is not counted)."""
        return linear_flops(self.gate) + SOFTMAX_FLOPS_PER_CLASS * self.n_experts + 2 * self.k

    def head_flops_per_token(self) -> float:
        """Every linear layer the router owns besides the gate (its heads), once per token."""
        return linear_flops(self) - linear_flops(self.gate)

    def flops_per_token(self, samples: int) -> float:
        """FLOPs per token at evaluation with ``samples`` routing samples (see ``vrmoe.model.flops``)."""
        return self.topk_flops_per_token() + self.head_flops_per_token()


# ---------------------------------------------------------------------------
# The registry
# ---------------------------------------------------------------------------

ROUTERS: dict[str, type[Router]] = {}


def register_router(cls: type[Router]) -> type[Router]:
    """Class decorator: make ``router=<cls.name>`` selectable. The class's ``Config`` must name
    the router by default (``name: str = "<cls.name>"``)."""
    default_name = next(f.default for f in dataclasses.fields(cls.Config) if f.name == "name")
    if default_name != cls.name:
        raise TypeError(f"{cls.__name__}.Config.name defaults to {default_name!r}, not {cls.name!r}")
    ROUTERS[cls.name] = cls
    return cls


def router_class(name: str) -> type[Router]:
    try:
        return ROUTERS[name]
    except KeyError:
        raise ConfigError(f"router={name!r} is unknown; choose one of {', '.join(ROUTERS)}") from None


def router_config(name: str, **fields: Any) -> RouterConfig:
    """A router's config in code (tests, benchmarks): its own dataclass with these fields."""
    return router_class(name).Config(**fields)


def build_router(d_model: int, n_experts: int, cfg: RouterConfig) -> Router:
    return router_class(cfg.name)(d_model, n_experts, cfg)


# ---------------------------------------------------------------------------
# Helpers shared by the routers
# ---------------------------------------------------------------------------

def balancing_routers(model: nn.Module) -> list[Router]:
    """The routers of ``model`` whose selection bias training moves (``router.bias_update_speed > 0``):
    the training step settles their pending moves once it knows whether it updated the weights."""
    return [m for m in model.modules() if isinstance(m, Router) and m.cfg.bias_update_speed > 0]


def load_balance_loss(probs_TE: torch.Tensor, expert_ids_TK: torch.Tensor, over_ranks: bool = False) -> torch.Tensor:
    """Switch Transformer balance loss ``E * sum_e f_e P_e``: 1 when the load is uniform."""
    n_experts = probs_TE.shape[-1]
    counts_E = torch.zeros(n_experts, device=probs_TE.device, dtype=probs_TE.dtype)
    counts_E.scatter_add_(0, expert_ids_TK.reshape(-1), torch.ones_like(expert_ids_TK, dtype=probs_TE.dtype).reshape(-1))
    # over_ranks (training under torchrun): the fractions are the global batch's, P_e stays this rank's,
    # so the ranks' averaged gradients are the gradient of the global loss.
    if over_ranks:
        fraction_E = sum_over_ranks(counts_E) / (expert_ids_TK.numel() * world_size())
    else:
        fraction_E = counts_E / expert_ids_TK.numel()
    return n_experts * (fraction_E * probs_TE.mean(0)).sum()


def z_loss(logits_TE: torch.Tensor) -> torch.Tensor:
    """ST-MoE router z-loss: keeps logits small so the softmax stays well conditioned."""
    return torch.logsumexp(logits_TE.float(), dim=-1).square().mean()


def renormalised_topk(scores_TE: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Top-K of a probability vector, the selected entries renormalised to sum to 1."""
    top_TK, ids_TK = scores_TE.topk(k, dim=-1)
    return ids_TK, top_TK / top_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(top_TK.dtype).tiny)


@dataclass(frozen=True)
class Scoring:
    """How a router's logits become expert scores, and the selected scores gates: the router keys
    ``scoring_func``, ``norm_topk_prob``, ``routed_scaling_factor``, ``n_group`` and ``topk_group``,
    read here and nowhere else.

    * **softmax** (the paper): the scores are a distribution over the experts.
    * **sigmoid** (DeepSeek-V3, GLM-4.5, Moonlight): each expert's score is ``sigmoid`` of its own
      logit, so an expert's score depends on nothing but its logit; the routing distribution
      (``Routing.probs_TE``: the balance loss, the gate entropy) is the scores normalised to sum to 1.

    A router that samples routes averages scores of this kind (``mean_s sigmoid(l_s / T)`` under
    sigmoid) before selection, and a router that draws K experts draws them in proportion to the
    scores (:meth:`log_weights`)."""

    func: str = "softmax"
    renormalise: bool = True
    scale: float = 1.0
    n_group: int = 1
    topk_group: int = 1

    @classmethod
    def of(cls, cfg: RouterConfig) -> "Scoring":
        return cls(cfg.scoring_func, cfg.norm_topk_prob, float(cfg.routed_scaling_factor), cfg.n_group,
                   cfg.topk_group)

    @property
    def grouped(self) -> bool:
        return self.topk_group < self.n_group

    @property
    def plain(self) -> bool:
        """The paper's rule: softmax scores, the K selected renormalised, no factor, no groups."""
        return self.func == "softmax" and self.renormalise and self.scale == 1.0 and not self.grouped

    def scores(self, logits: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The scores of logits whose experts lie along ``dim`` (any layout: the sample chunks of
        :class:`ScoreMean` keep the experts off the innermost dimension)."""
        if self.func == "sigmoid":
            return logits.sigmoid()
        return expert_softmax(logits) if dim == -1 else logits.softmax(dim)

    def distribution(self, scores: torch.Tensor, dim: int = -1) -> torch.Tensor:
        """The routing distribution of scores: the softmax itself, or the sigmoid scores normalised."""
        if self.func == "softmax":
            return scores
        return scores / scores.sum(dim, keepdim=True).clamp_min(torch.finfo(scores.dtype).tiny)

    def log_weights(self, scaled_TE: torch.Tensor) -> torch.Tensor:
        """Log-weights whose Gumbel-top-K draws K experts from the routing distribution of the scaled
        logits ``l / T``: the scaled logits themselves under softmax (``log softmax`` up to a constant
        per token), ``log sigmoid(l / T)`` under sigmoid (the normalised scores)."""
        return scaled_TE if self.func == "softmax" else F.logsigmoid(scaled_TE)

    def kept_groups(self, choice_TE: torch.Tensor) -> torch.Tensor:
        """Which experts lie in the ``topk_group`` best of the ``n_group`` equal groups (bool, T x E),
        a group scored by its best selection score under softmax (DeepSeek-V2) and by the sum of its
        best two under sigmoid (DeepSeek-V3, GLM-4.5; its only one if a group holds one expert)."""
        n_tokens, n_experts = choice_TE.shape
        per_group = n_experts // self.n_group
        grouped_TGX = choice_TE.view(n_tokens, self.n_group, per_group)
        if self.func == "softmax":
            group_TG = grouped_TGX.amax(-1)
        else:
            group_TG = grouped_TGX.topk(min(2, per_group), dim=-1).values.sum(-1)
        kept_TG = torch.zeros_like(group_TG, dtype=torch.bool).scatter_(
            -1, group_TG.topk(self.topk_group, dim=-1).indices, True)
        return kept_TG.repeat_interleave(per_group, dim=-1)

    def gates(self, scores_TE: torch.Tensor, ids_TK: torch.Tensor, scaled_TE: torch.Tensor | None = None) -> torch.Tensor:
        """The selected experts' weights: their scores, rescaled to sum to 1 with ``norm_topk_prob``,
        times ``routed_scaling_factor``. Under softmax with the scaled logits at hand the renormalised
        scores are the softmax over the selected scaled logits (the same numbers, fewer roundings)."""
        if self.func == "softmax" and self.renormalise and scaled_TE is not None:
            gates_TK = expert_softmax(scaled_TE.gather(-1, ids_TK))
        else:
            gates_TK = scores_TE.gather(-1, ids_TK)
            if self.renormalise:
                gates_TK = gates_TK / gates_TK.sum(-1, keepdim=True).clamp_min(torch.finfo(gates_TK.dtype).tiny)
        return gates_TK if self.scale == 1.0 else gates_TK * self.scale


def zero_init_head(d_model: int, hidden_ratio: float, n_out: int, bias_init: float | torch.Tensor) -> nn.Sequential:
    """A small MLP ``D -> D*hidden_ratio -> n_out`` whose output starts at ``bias_init`` for
    every input: the last layer's weights are zero, so a head added to a trained router
    leaves its routing unchanged until training moves it."""
    hidden = max(1, round(d_model * hidden_ratio))
    head = nn.Sequential(nn.Linear(d_model, hidden), nn.GELU(), nn.Linear(hidden, n_out))
    nn.init.zeros_(head[-1].weight)
    with torch.no_grad():
        head[-1].bias.copy_(torch.as_tensor(bias_init, dtype=head[-1].bias.dtype).expand(n_out))
    return head


def gumbel_perturbed(scores_TE: torch.Tensor) -> torch.Tensor:
    """``scores + Gumbel(0, 1)`` noise: the Top-K of the result is a sample of K experts without
    replacement from ``softmax(scores)`` (Gumbel-top-K). The noise comes from torch's global
    generator, so a resumed run draws the same noise."""
    exp_TE = standard_exponential_like(scores_TE).clamp_min(torch.finfo(scores_TE.dtype).tiny)
    return scores_TE - exp_TE.log()  # -log(Exp(1)) ~ Gumbel(0, 1)


def standard_exponential_like(x: torch.Tensor) -> torch.Tensor:
    """Exp(1) draws of ``x``'s shape, dtype and device, from torch's global generator.

    On CPU this is the inversion ``-log1p(-U)`` of float64 uniforms, vectorised: exactly what
    ``exponential_()`` computes there (the same uniforms from the same stream, the same
    inversion, so the same numbers; a test holds the two equal), but torch runs that one
    element at a time, about 20 ns each, which made the draw most of the temperature and VTSR
    routers' own cost. Elsewhere ``exponential_()`` is the parallel kernel."""
    if x.device.type != "cpu" or x.dtype not in (torch.float32, torch.float64):
        return torch.empty_like(x).exponential_()
    return torch.rand(x.shape, dtype=torch.float64).neg_().log1p_().neg_().to(x.dtype)


def expert_softmax(scores_TX: torch.Tensor) -> torch.Tensor:
    """``softmax`` over the last, short dimension of (T, X) scores (the E experts, or the K
    selected ones). On CPU it runs on the transposed view, the experts outermost: PyTorch's
    kernel then vectorises across tokens instead of within a row of 8, 3-6 times faster forward
    and backward at T = 4096, E <= 64 (the same softmax; the summation order differs, so a
    value can differ in its last bit)."""
    if scores_TX.device.type != "cpu" or scores_TX.dim() != 2:
        return scores_TX.softmax(-1)
    return scores_TX.T.softmax(0).T


#: Numbers per chunk of routing samples (1 MiB in fp32): a chunk's draws, logits and softmaxes
#: stay in cache while it is processed, and S x T x E numbers are never alive at once.
SAMPLE_CHUNK_ELEMENTS = 1 << 18


def sample_chunks(n_samples: int, elements_per_sample: int, chunk_elements: int = SAMPLE_CHUNK_ELEMENTS,
                  power_of_two: bool = False) -> list[int]:
    """Split S samples into chunks of about ``chunk_elements`` numbers (at least one sample each);
    with ``power_of_two`` every chunk holds a power of two samples (S = 32 in chunks of 4, S = 3
    as 2 + 1)."""
    per_chunk = max(1, min(n_samples, chunk_elements // max(1, elements_per_sample)))
    if power_of_two:
        per_chunk = 1 << (per_chunk.bit_length() - 1)
    chunks, left = [], n_samples
    while left:
        size = min(per_chunk, left)
        if power_of_two:
            size = 1 << (size.bit_length() - 1)
        chunks.append(size)
        left -= size
    return chunks


def token_chunks(n_tokens: int, elements_per_token: int, chunk_elements: int = SAMPLE_CHUNK_ELEMENTS) -> list[slice]:
    """Consecutive token ranges of about ``chunk_elements`` numbers each (at least one token)."""
    size = max(1, chunk_elements // max(1, elements_per_token))
    return [slice(start, min(start + size, n_tokens)) for start in range(0, n_tokens, size)]


class ScoreMean:
    """``mean_s scores(l_s)`` over S routing samples of every token (``softmax(l_s)``, or the
    element-wise ``sigmoid(l_s)``: :class:`Scoring`), accumulated a chunk at a time.

    Chunks keep the experts off the innermost dimension, so the softmax over E runs vectorised
    across the samples or tokens that are innermost (PyTorch's softmax over a contiguous last
    dimension of E = 8, the (S, T, E) layout, costs more than ten times as much at T = 4096).
    Either all chunks are sample chunks, (C, E, T): C samples of every token
    (:meth:`add_samples`), or all are token chunks, (X, E, S): every sample of X consecutive
    tokens (:meth:`add_tokens`). Only the running sums outlive a chunk, unless ``keep`` asks for
    the per-sample scores. Differentiable: a router evaluated with gradients on gets them
    through the mean.
    """

    def __init__(self, n_samples: int, keep: bool = False, temperature: float = 1.0, scoring: Scoring = Scoring()):
        self.n_samples, self.scoring = n_samples, scoring
        # Every sample's distribution is softmax(l_s / T) (the routing temperature; T = 1 divides nothing).
        self.temperature = temperature
        self.sum_ET: torch.Tensor | None = None  # sample chunks: the running sum over samples
        self.token_sums_XE: list[torch.Tensor] = []  # token chunks: each chunk's sum over samples
        self.kept: list[torch.Tensor] | None = [] if keep else None

    def add_samples(self, logits_CET: torch.Tensor) -> None:
        """C more samples of every token, as logits (C, E, T) (any strides)."""
        scores_CET = self.scoring.scores(tempered(logits_CET, self.temperature), dim=1)
        sum_ET = scores_CET.sum(0) if self.kept is None else self._kept(scores_CET).sum(0)
        if self.sum_ET is None:
            self.sum_ET = sum_ET
        elif sum_ET.requires_grad or self.sum_ET.requires_grad:
            self.sum_ET = self.sum_ET + sum_ET
        else:
            self.sum_ET.add_(sum_ET)

    def add_tokens(self, logits_XES: torch.Tensor) -> None:
        """All S samples of the next X tokens, as logits (X, E, S) (any strides)."""
        scores_XES = self.scoring.scores(tempered(logits_XES, self.temperature), dim=1)
        self.token_sums_XE.append((scores_XES if self.kept is None else self._kept(scores_XES)).sum(-1))

    def _kept(self, probs: torch.Tensor) -> torch.Tensor:
        self.kept.append(probs)
        return probs

    def mean_TE(self) -> torch.Tensor:
        if self.token_sums_XE:
            sum_TE = torch.cat(self.token_sums_XE) if len(self.token_sums_XE) > 1 else self.token_sums_XE[0]
        else:
            sum_TE = self.sum_ET.T
        return (sum_TE * (1.0 / self.n_samples)).contiguous()

    def samples_STE(self) -> torch.Tensor | None:
        """The per-sample routing distributions (S, T, E) when kept and S > 1, else None."""
        if self.kept is None or self.n_samples == 1:
            return None
        if self.token_sums_XE:
            return self.scoring.distribution(torch.cat(self.kept).permute(2, 0, 1))
        return self.scoring.distribution(torch.cat(self.kept).transpose(1, 2))


def tempered(logits: torch.Tensor, temperature: float) -> torch.Tensor:
    """``logits / T``; at T = 1 the logits themselves, so the numbers are those of no temperature."""
    return logits if temperature == 1.0 else logits / temperature


@dataclass
class TemperedConfig(RouterConfig):
    """The keys of a router that samples routing distributions at a temperature: T sharpens
    (T < 1) or softens (T > 1) every routing distribution it samples, ``softmax(l / T)``."""

    # T: the routing temperature.
    temperature: float = 1.0

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if not self.temperature > 0:
            raise ConfigError(f"T={self.temperature} is out of range; it must be > 0")


def topk_overlap(ids_TK: torch.Tensor, reference_TE: torch.Tensor) -> torch.Tensor:
    """Mean fraction of the chosen experts that are also in the Top-K of ``reference_TE``
    (1 = the router chose exactly what deterministic Top-K would have); detached."""
    k = ids_TK.shape[-1]
    in_reference_TE = torch.zeros_like(reference_TE).scatter_(-1, reference_TE.detach().topk(k, dim=-1).indices, 1.0)
    return in_reference_TE.gather(-1, ids_TK).mean()


def inverse_softplus(y: float) -> float:
    return y + math.log(-math.expm1(-y))  # log(exp(y) - 1), stable for large y


def check_head_ratio(ratio: float) -> None:
    if not ratio > 0:
        raise ConfigError(f"router.head_hidden_ratio={ratio} must be > 0 (heads are D -> D*ratio -> outputs)")
