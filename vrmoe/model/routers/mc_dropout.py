"""Weight-space baseline: MC dropout on the router input."""

from __future__ import annotations

import math
import threading
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from ...config import ConfigError, ModelConfig
from ..flops import SOFTMAX_FLOPS_PER_CLASS, linear_flops
from .base import Router, Routing, ScoreMean, TemperedConfig, register_router, sample_chunks, tempered

#: Positions (tokens x samples x input features) per chunk of the sparse sampler: about p x 8M
#: dropped features, whose bookkeeping lives in reused scratch buffers (:class:`Scratch`, about
#: 13 MB at p = 0.05). Fewer, larger chunks pay fewer per-op overheads.
DROP_CHUNK_POSITIONS = 1 << 23
#: The geometric sampler's lookup table: one entry per value of 15 random bits.
TABLE_BITS = 15
#: Bits of the uniform that refines the table's few ambiguous entries (as many as a float64 holds).
REFINE_BITS = 52
#: Caps on one gap (beyond any chunk), so that a vanishing p cannot overflow: the table's int32
#: entries, and the refined draws (int64).
MAX_TABLE_GAP = 1 << 30
MAX_GAP = 1 << 40


@dataclass
class MCDropoutConfig(TemperedConfig):
    name: str = "mc_dropout"
    # Dropout probability on the router input (kept on at evaluation).
    dropout: float = 0.05

    def check(self, model: ModelConfig) -> None:
        super().check(model)
        if not 0 <= self.dropout < 1:
            raise ConfigError(f"router.dropout={self.dropout} must be in [0, 1)")

    def samples_at_eval(self) -> bool:
        return True


class Scratch:
    """Flat buffers the sparse sampler reuses from one chunk and one call to the next, by name.

    Its per-chunk arrays are a few MB each. Fresh ones are faulted in a 4 KB page at a time on
    every chunk, because the allocator hands blocks that large back to the system when they are
    freed; reused ones are not. A buffer grows when a chunk needs more and is never shrunk.
    :func:`shared_scratch` keeps one set per thread and device, shared by every layer's router
    (they run one after another)."""

    def __init__(self, device: torch.device):
        self.device = device
        self.buffers: dict[tuple[str, torch.dtype], torch.Tensor] = {}

    def get(self, name: str, n: int, dtype: torch.dtype) -> torch.Tensor:
        """A contiguous (n,) tensor of ``dtype`` (uninitialised), valid until ``name`` is asked for again."""
        buffer = self.buffers.get((name, dtype))
        if buffer is None or buffer.numel() < n:
            buffer = self.buffers[(name, dtype)] = torch.empty(n, dtype=dtype, device=self.device)
        return buffer[:n]


_SCRATCH = threading.local()


def shared_scratch(device: torch.device) -> Scratch:
    """This thread's scratch buffers on ``device``."""
    by_device = _SCRATCH.__dict__.setdefault("by_device", {})
    if device not in by_device:
        by_device[device] = Scratch(device)
    return by_device[device]


class GeometricGaps:
    """Exact draws of ``G + 1`` for ``G ~ Geometric(p)`` (failures before the first success): the
    distances between consecutive ones of a Bernoulli(p) sequence.

    By inversion, ``G = floor(log U / log(1 - p))`` for ``U ~ Uniform(0, 1)``, from 15 random bits
    per draw: a table maps the 15 leading bits ``h`` of U to G wherever every U in
    ``[h, h + 1) / 2^15`` gives the same G (all but about 0.5% of them at p = 0.05); for the others
    (h = 0, the tail, among them) U is completed with 52 fresh bits, ``U = (h + r) / 2^15``, and G
    computed in float64. One 64-bit draw of torch's generator gives four draws. The result has
    the distribution of a float64 inversion, the precision ``torch.bernoulli`` samples with.
    """

    def __init__(self, p: float, device: torch.device):
        if not 0 < p < 1:
            raise ValueError(f"p={p} must be in (0, 1)")
        self.log_q = math.log1p(-p)
        h = torch.arange(1 << TABLE_BITS, dtype=torch.float64)
        # x(U) = log U / log q falls as U grows: over [h, h + 1) / 2^15 it spans (x_b, x_a], and G is
        # one value iff no integer lies there (a margin of 1e-9 marks near-integers as ambiguous).
        x_a = torch.log(h * 2.0 ** -TABLE_BITS) / self.log_q
        x_b = torch.log((h + 1) * 2.0 ** -TABLE_BITS) / self.log_q
        g_b = torch.floor(x_b - 1e-9)
        exact = torch.floor(x_a + 1e-9) == g_b
        table = torch.where(exact, (g_b + 1).clamp(max=MAX_TABLE_GAP), 0).to(torch.int32)
        # Indexed by a whole 16-bit field, whose top bit it ignores (the table repeats).
        self.table = table.repeat(2).to(device)
        # The largest gap a draw can give (a refined U is at least 2^-67): positions stay in int32
        # while a round's gaps cannot add up past it.
        self.max_gap = min(MAX_GAP, math.floor(-(TABLE_BITS + REFINE_BITS) * math.log(2) / self.log_q) + 1)

    def draw(self, n: int, scratch: Scratch | None = None) -> torch.Tensor:
        """``n`` independent draws of ``G + 1`` (at least 1; int32 capped at 2^30, int64 where a
        refined tail draw is larger). With ``scratch`` the result lives in its buffers."""
        device = self.table.device
        scratch = scratch or Scratch(device)
        words = scratch.get("words", (n + 3) // 4, torch.int64).random_()
        # random_() fills int64 with 63 uniform bits: four 16-bit fields, the low 15 bits of each used.
        fields = scratch.get("fields", n, torch.int32).copy_(words.view(torch.uint16)[:n])
        gaps = torch.index_select(self.table, 0, fields, out=scratch.get("gaps", n, torch.int32))
        ambiguous = (gaps == 0).nonzero().squeeze(1)
        if ambiguous.numel():
            rest = torch.empty(ambiguous.numel(), dtype=torch.int64, device=device).random_()
            rest = rest.bitwise_and_((1 << REFINE_BITS) - 1).double().add_(0.5).mul_(2.0 ** -REFINE_BITS)
            prefix = fields.index_select(0, ambiguous).bitwise_and_((1 << TABLE_BITS) - 1)
            u = prefix.double().add_(rest).mul_(2.0 ** -TABLE_BITS)
            refined = u.log_().div_(self.log_q).floor_().add_(1).clamp_(max=MAX_GAP).to(torch.int64)
            if self.max_gap >= 2 ** 31:
                gaps = gaps.to(torch.int64)
            gaps.index_copy_(0, ambiguous, refined.to(gaps.dtype))
        return gaps

    def ones(self, n: int, p: float, margin: float = 8.0, slack: int = 64,
             scratch: Scratch | None = None) -> torch.Tensor:
        """The sorted positions of the ones among ``n`` independent Bernoulli(p) draws (int32 when
        n < 2^31, else int64). With ``scratch`` the result may live in its buffers.

        Gaps are drawn in rounds of the expected count plus ``margin`` standard deviations plus
        ``slack`` (by default a second round is needed with probability about 1e-15; it goes on
        from the last one)."""
        parts, last = [], -1  # the position of the last one so far
        while True:
            expected = p * (n - 1 - last)
            count = max(1, int(expected + margin * math.sqrt(expected) + slack))
            gaps = self.draw(count, scratch)
            small = n < 2 ** 31 and last + count * self.max_gap < 2 ** 31  # int32 cannot overflow
            if small and gaps.dtype == torch.int32:  # the running sum in place, `last` added first
                positions = gaps
                positions[:1].add_(last)
                positions.cumsum_(0)
            else:
                positions = gaps.cumsum(0, dtype=torch.int32 if small else torch.int64).add_(last)
            cut = int(torch.searchsorted(positions, n))
            if cut < count:
                parts.append(positions[:cut])
                break
            parts.append(positions.clone())  # the next round's draw reuses the scratch buffers
            last = int(positions[-1])
        dtype = torch.int32 if n < 2 ** 31 else torch.int64
        return torch.cat([part.to(dtype) for part in parts]) if len(parts) > 1 else parts[0].to(dtype)


@register_router
class MCDropoutRouter(Router):
    """Dropout (p = ``router.dropout``) on the router input, kept on at evaluation.

    Training is one dropped-out pass; evaluation averages the scores (softmaxes, or sigmoids) of S
    passes and selects on the average (:meth:`Router.select`), like the variational router. ``topk_overlap``
    compares the choice with deterministic selection on the dropout-free logits.

    On CPU the dropped features are drawn sparsely (:class:`GeometricGaps`: about p x D per token
    and sample rather than S x T x D Bernoulli draws). Without gradients (evaluation) a pass's
    logits ``W (m * u) / (1 - p) + b`` are then computed as ``(W u - W ((1 - m) * u)) / (1 - p) + b``
    from those features alone and one shared ``W u``; with gradients (training) the keep masks
    are filled from them and the pass is the plain masked matmul. Elsewhere, and under
    ``torch.compile``, the masks come from ``F.dropout`` (a parallel draw on a GPU). Every way
    samples the same distribution.
    """

    name = "mc_dropout"
    Config = MCDropoutConfig
    # The exact sparse sampler's bookkeeping in PyTorch operations measured 1.26-1.36x on two
    # threads (docs/performance.md): its floor short of a fused kernel.
    bench_targets = {**Router.bench_targets, "eval": 1.40}

    def forward(self, u_TD: torch.Tensor) -> Routing:
        n_samples = 1 if self.training else self.cfg.samples
        clean_logits_TE = self.gate(u_TD).float()
        acc = ScoreMean(n_samples, keep=self.keep_samples, temperature=self.cfg.temperature, scoring=self.scoring)
        if self.cfg.dropout == 0:  # every pass is the clean one
            for _ in range(n_samples):
                acc.add_samples(clean_logits_TE.T.unsqueeze(0))
        elif u_TD.device.type != "cpu" or torch.compiler.is_compiling():
            self._dense_passes(u_TD, acc)
        elif torch.is_grad_enabled() and (u_TD.requires_grad or self.gate.weight.requires_grad):
            self._masked_passes(u_TD, acc)
        else:
            self._sparse_passes(u_TD, clean_logits_TE, acc)
        scores_TE = acc.mean_TE()
        ids_TK, gates_TK = self.select(scores_TE)
        probs_TE = self.scoring.distribution(scores_TE)
        overlap = self.overlap_with_topk(ids_TK, tempered(clean_logits_TE, self.cfg.temperature))
        return Routing(ids_TK, gates_TK.to(u_TD.dtype), probs_TE,
                       self.balance_terms(clean_logits_TE, probs_TE, ids_TK), {"topk_overlap": overlap},
                       acc.samples_STE())

    def _dense_passes(self, u_TD: torch.Tensor, acc: ScoreMean) -> None:
        """S passes through ``F.dropout``, a chunk of samples at a time."""
        for size in sample_chunks(acc.n_samples, u_TD.numel()):
            u_CTD = F.dropout(u_TD.expand(size, *u_TD.shape), self.cfg.dropout, training=True)
            acc.add_samples(self.gate(u_CTD).float().transpose(1, 2))

    def _masked_passes(self, u_TD: torch.Tensor, acc: ScoreMean) -> None:
        """S differentiable passes of ``u * m``, m the keep mask ``1 / (1 - p)`` everywhere but 0 at
        the features the sparse draw drops, as ``F.dropout`` scales them: computed as ``u / (1 - p)``
        with the dropped entries zeroed (the same products; no mask tensor, and the backward
        zeroes the same entries of the scaled gradient)."""
        p = self.cfg.dropout
        gaps = self._gaps(p, u_TD.device)
        keep_scale = 1.0 / (1.0 - p)
        scratch = shared_scratch(u_TD.device)
        for size in sample_chunks(acc.n_samples, u_TD.numel()):
            # The product is a fresh tensor, not a view, so zeroing it in place copies no base.
            scaled = u_TD.expand(size, *u_TD.shape).reshape(-1) * keep_scale
            dropped_u = scaled.index_fill_(0, gaps.ones(scaled.numel(), p, scratch=scratch).long(), 0.0)
            acc.add_samples(self.gate(dropped_u.view(size, *u_TD.shape)).float().transpose(1, 2))

    def _sparse_passes(self, u_TD: torch.Tensor, clean_logits_TE: torch.Tensor, acc: ScoreMean) -> None:
        """S passes from the dropped features alone (no gradients).

        A chunk of C samples (a power of two) is one Bernoulli(p) sequence over its T x C x D'
        (token, sample, feature) positions, D' = D rounded up to a power of two (the extra
        features are zeros of u and of W, so dropping them changes nothing): a position's token,
        sample and feature are then bit fields, and the dropped features of each (token, sample)
        are one contiguous bag, summed against W's columns by ``embedding_bag``."""
        p = self.cfg.dropout
        n_tokens, d_model = u_TD.shape
        feature_bits = (d_model - 1).bit_length()
        padding = (1 << feature_bits) - d_model
        keep_scale = 1.0 / (1.0 - p)
        weight, bias = self.gate.weight, self.gate.bias
        # logits = (W u - W ((1 - m) * u)) / (1 - p) + b: the first and last terms once, W pre-scaled.
        if bias is None:
            base_ET = clean_logits_TE.T * keep_scale
        else:
            base_ET = F.linear(u_TD, weight).float().T * keep_scale + bias.float().unsqueeze(-1)
        u_flat = (F.pad(u_TD.float(), (0, padding)) if padding else u_TD.float()).reshape(-1)
        w_DE = F.pad(weight.float().T * keep_scale, (0, 0, 0, padding)).contiguous()
        gaps = self._gaps(p, u_TD.device)
        scratch = shared_scratch(u_TD.device)
        for size in sample_chunks(acc.n_samples, n_tokens << feature_bits, DROP_CHUNK_POSITIONS, power_of_two=True):
            sample_bits = size.bit_length() - 1
            positions = gaps.ones(n_tokens * size << feature_bits, p, scratch=scratch)
            n_dropped = positions.numel()
            feature = torch.bitwise_and(positions, (1 << feature_bits) - 1,
                                        out=scratch.get("feature", n_dropped, positions.dtype))
            # Bag (token, sample) = position >> feature bits; the bags are consecutive runs.
            bag = torch.bitwise_right_shift(positions, feature_bits, out=scratch.get("bag", n_dropped, positions.dtype))
            if sample_bits:  # the (token, feature) element of u: the bag's token, then the feature
                element = torch.bitwise_right_shift(bag, sample_bits,
                                                    out=scratch.get("element", n_dropped, positions.dtype))
                element.bitwise_left_shift_(feature_bits).bitwise_or_(feature)
            else:
                element = positions
            counts = torch.bincount(bag, minlength=n_tokens * size)
            offsets = scratch.get("offsets", counts.numel(), positions.dtype)  # where each bag starts
            offsets[:1].zero_()
            torch.cumsum(counts[:-1], 0, dtype=positions.dtype, out=offsets[1:])
            weights = torch.index_select(u_flat, 0, element, out=scratch.get("weights", n_dropped, u_flat.dtype))
            dropped_XE = F.embedding_bag(feature, w_DE, offsets, mode="sum", per_sample_weights=weights)
            logits_CET = scratch.get("logits", base_ET.numel() * size, base_ET.dtype).view(size, *base_ET.shape)
            acc.add_samples(torch.sub(base_ET, dropped_XE.view(n_tokens, size, -1).permute(1, 2, 0), out=logits_CET))

    def _gaps(self, p: float, device: torch.device) -> GeometricGaps:
        cached = getattr(self, "_gap_sampler", None)
        if cached is None or cached[0] != (p, device):
            cached = ((p, device), GeometricGaps(p, device))
            self._gap_sampler = cached
        return cached[1]

    def flops_per_token(self, samples: int) -> float:
        # Each sample masks the input (one multiply per feature) and re-runs the logit layer.
        per_sample = self.gate.in_features + linear_flops(self.gate) + SOFTMAX_FLOPS_PER_CLASS * self.n_experts \
            + self.n_experts
        return self.head_flops_per_token() + samples * per_sample + 2 * self.k
