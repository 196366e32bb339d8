"""What every probe of one evaluation shares: the model, its text sets and their scored predictions.

Everything that can refuse the input (a missing OOD file, a text too short for a
window, a text that yields no multiple-choice item) is built in
:meth:`EvalContext.build`, before any probe runs and before anything is written.
Scoring a set is cached, so calibration and OOD detection share one pass, and
each set's sampling noise is drawn from the evaluation seed afresh, so the numbers
do not depend on which probe asked first.

Choices worth knowing:

* **Mutual information.** BALD needs S *predictive* distributions, one per
  routing sample, while a router's ``sample_probs_STE`` are routing
  distributions that the model never turns into S predictions (the experts run
  once on the averaged selection). So the model is run S more times with a
  copy whose routers draw a single sample (``router.samples=1``), giving
  ``p_1 .. p_S``; ``MI = H[mean_s p_s] - mean_s H[p_s]``. A deterministic
  router gives S identical passes, hence exactly 0. With S = 1 the score is
  left out (one sample has no disagreement to measure).
* **Per-sequence scores.** ``eval.ood_task=lm``: a sequence is a window of
  text and each score is averaged over its tokens (next-token predictive
  entropy and MI). ``mcq``: a sequence is a multiple-choice item and the
  predictive distribution is over its four options; router scores (gate
  entropy, logit variance, temperature) are averaged over the tokens of its
  four filled-in sentences and over MoE layers. ``auto`` follows the run's task.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .. import metrics
from .. import distributed
from ..checkpoint import load_run_weights
from ..config import AppConfig, ConfigError, DataConfig
from ..data.batches import eval_batches
from ..data.corpora import Corpus, load_corpus
from ..data.mcq_datasets import LetterTensors, encode_questions, load_questions
from ..data.mcq import MCQTensors, shuffle_words_within_sentences, split_items, split_text, text_items
from ..device import synchronize
from ..model import build_model, build_tokenizer
from ..model.backbone import Backbone
from ..model.routers import Routing, router_class

Windows = list[tuple[torch.Tensor, torch.Tensor]]


@dataclass
class ScoredSet:
    """Predictive distributions for calibration and per-sequence OOD scores of one text set."""

    probs_NC: torch.Tensor  # the single pass with routing averaged over S samples (the paper's predictive)
    labels_N: torch.Tensor
    scores: dict[str, torch.Tensor] = field(default_factory=dict)  # name -> (n_sequences,)
    tokens: int = 0
    seconds: float = 0.0
    # The mean of S single-sample passes' predictions (Bayesian model averaging); None without them.
    bma_probs_NC: torch.Tensor | None = None
    # Multiple choice: the option scores whose softmax is probs_NC (temperature scaling divides them).
    logits_NC: torch.Tensor | None = None


def check_eval_inputs(app: AppConfig) -> None:
    """Refuse missing or empty OOD files before any work (and before training, with eval.at_end)."""
    for path_str in app.eval.ood_text:
        path = Path(path_str).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.ood_text: {path_str} is not a file; give text files, "
                              "e.g. eval.ood_text=[notes.txt]")
        try:
            text = path.read_text(encoding="utf-8", errors="replace")
        except OSError as exc:
            raise ConfigError(f"eval.ood_text: cannot read {path_str}: {exc.strerror}") from None
        if not text.strip():
            raise ConfigError(f"eval.ood_text: {path_str} is empty; give a file with text in it")


def load_model(state: dict[str, Any], app: AppConfig, run: str | Path, device: torch.device) -> Backbone:
    """The checkpoint's weights in a model built from ``app``, in evaluation mode."""
    model = build_model(app)
    load_run_weights(model, state, "run", run, app)
    return model.to(device).eval()


def single_sample_copy(model: Backbone, app: AppConfig) -> Backbone:
    """The same weights with routers that draw one routing sample per pass (for MI)."""
    copy = build_model(dataclasses.replace(app, router=dataclasses.replace(app.router, samples=1)))
    copy.load_state_dict(model.state_dict())
    return copy.to(next(model.parameters()).device).eval()


@dataclass
class EvalContext:
    app: AppConfig
    run_dir: Path
    state: dict[str, Any]
    device: torch.device
    model: Backbone
    sampler: Backbone | None  # the single-sample copy for mutual information (None when S = 1)
    corpus: Corpus
    unit: str  # "lm" or "mcq": what a sequence is for the OOD scores
    lm_sets: dict[str, Windows]
    mcq_sets: dict[str, "MCQTensors | LetterTensors"]  # "in" is the test split
    calibration_set: "MCQTensors | LetterTensors"  # what temperature scaling fits on
    _scored: dict[tuple[str, str], ScoredSet] = field(default_factory=dict)

    @classmethod
    def build(cls, run_dir: Path, app: AppConfig, state: dict[str, Any], device: torch.device) -> "EvalContext":
        check_eval_inputs(app)
        model = load_model(state, app, run_dir, device)
        sampler = single_sample_copy(model, app) if app.router.samples > 1 else None
        unit = app.task.name if app.eval.ood_task == "auto" else app.eval.ood_task
        corpus = load_corpus(app.data, min_tokens=app.model.seq_len + 2, tokenizer=build_tokenizer(app))
        tokenizer = corpus.tokenizer
        lm_sets = {"in": windows(corpus.val, app, app.eval.windows, "the validation split", device)}
        mcq_sets = {"in": split_items(app, corpus, "test", app.eval.mcq_items, "eval.mcq_items (test split)")}
        calibration_set = split_items(app, corpus, "calibration", app.eval.calibration_items,
                                      "eval.calibration_items (calibration split)")
        if unit == "mcq" and corpus.questions is not None:  # OOD sets: other multiple-choice datasets
            for name in app.eval.ood_mcq:
                questions = load_questions(name, app.data.mcq_eval_split)[:app.eval.mcq_items]
                mcq_sets[Path(name).stem] = encode_questions(questions, tokenizer, app.model.seq_len,
                                                             f"eval.ood_mcq: {name}")
        else:
            in_text = tokenizer.decode(corpus.val) if unit == "lm" else split_text(corpus, "test")
            for name, (key, text) in ood_texts(app, in_text).items():
                if unit == "lm":
                    lm_sets[name] = windows(tokenizer.encode(text), app, app.eval.windows, key, device)
                else:
                    mcq_sets[name] = text_items(app, text, app.eval.mcq_items, key, tokenizer)
        return cls(app, Path(run_dir), state, device, model, sampler, corpus, unit, lm_sets, mcq_sets,
                   calibration_set)

    @property
    def samples(self) -> int:
        return self.app.router.samples

    @property
    def uncertainty_name(self) -> str:
        """The OOD-score name of the configured router's own uncertainty signal."""
        return router_class(self.app.router.name).uncertainty_signal or "router_uncertainty"

    def set_names(self) -> list[str]:
        return list(self.lm_sets if self.unit == "lm" else self.mcq_sets)

    @property
    def predictives(self) -> tuple[str, ...]:
        """The predictives ``eval.predictive`` asks for: routing_mean, bma or both."""
        chosen = self.app.eval.predictive
        return ("routing_mean", "bma") if chosen == "both" else (chosen,)

    def scored(self, name: str, kind: str) -> ScoredSet:
        """Set ``name`` scored as ``kind`` ("lm" windows or "mcq" items; "calibration" is the
        calibration split's items), computed once. The S single-sample passes (mutual information
        and the BMA predictive) run for the OOD unit's sets and, when the BMA is asked for, for the
        in-distribution set of either kind; never for the calibration split."""
        if (name, kind) not in self._scored:
            torch.manual_seed(self.app.seed)  # each set's sampling noise is independent of the order of sets
            sampled = name != "calibration" and (kind == self.unit or (name == "in" and "bma" in self.predictives))
            with_mi = self.sampler if sampled else None
            here = distributed.env()  # under torchrun each rank scores its block of batches
            if kind == "lm":
                batches = self.lm_sets[name]
                result = score_windows(self.model, with_mi, batches[here.block(len(batches))], self.samples,
                                       self.uncertainty_name)
            else:
                items = self.calibration_set if name == "calibration" else self.mcq_sets[name]
                index = list(torch.arange(len(items)).split(self.app.eval.batch_size))
                result = score_items(self.model, with_mi, items, index[here.block(len(index))],
                                     self.samples, self.uncertainty_name, self.device)
            self._scored[(name, kind)] = merge(distributed.gather_objects(result)) if here.enabled else result
        return self._scored[(name, kind)]


def ood_texts(app: AppConfig, in_text: str) -> dict[str, tuple[str, str]]:
    """name -> (config key for errors, text): near (``in_text`` with its words shuffled in each
    sentence), far and the user's files."""
    far_name = "python_source" if app.data.name != "python_source" else "stdlib_docs"
    far = load_corpus(DataConfig(name=far_name, val_fraction=app.data.val_fraction, cache_dir=app.data.cache_dir))
    sets = {"near": ("near (word-shuffled in-distribution text)", shuffle_words_within_sentences(in_text)),
            "far": (f"far ({far_name})", far.tokenizer.decode(far.val))}
    for path_str in app.eval.ood_text:
        name = base = Path(path_str).stem or "ood"
        n = 2
        while name in sets or name in ("in", "scores", "predictions"):
            name, n = f"{base}_{n}", n + 1
        sets[name] = (f"eval.ood_text: {path_str}",
                      Path(path_str).expanduser().read_text(encoding="utf-8", errors="replace"))
    return sets


def windows(data: torch.Tensor, app: AppConfig, n_windows: int, key: str, device: torch.device) -> Windows:
    """Evenly spaced windows of ``model.seq_len`` tokens over ``data``, in batches of ``eval.batch_size``."""
    seq_len = app.model.seq_len
    if len(data) < seq_len + 1:
        raise ConfigError(f"{key} has {len(data)} tokens, fewer than one window of model.seq_len + 1 = "
                          f"{seq_len + 1}; give more text")
    x, y = next(eval_batches(data, n_windows, seq_len, 1, device))
    return list(zip(x.split(app.eval.batch_size), y.split(app.eval.batch_size)))


# ---------------------------------------------------------------------------
# Scoring sequences
# ---------------------------------------------------------------------------

def merge(parts: list[ScoredSet]) -> ScoredSet:
    """The ranks' scored blocks, in rank order: the whole set as one process scores it."""
    parts = [p for p in parts if len(p.labels_N)]
    joined = lambda name: (None if getattr(parts[0], name) is None  # noqa: E731
                           else torch.cat([getattr(p, name) for p in parts]))
    return ScoredSet(torch.cat([p.probs_NC for p in parts]), torch.cat([p.labels_N for p in parts]),
                     {k: torch.cat([p.scores[k] for p in parts]) for k in parts[0].scores},
                     sum(p.tokens for p in parts), max(p.seconds for p in parts),
                     joined("bma_probs_NC"), joined("logits_NC"))


def router_token_scores(routings: list[Routing], uncertainty_name: str) -> dict[str, torch.Tensor]:
    """Per-token router scores averaged over MoE layers: gate entropy, and the router's own
    uncertainty over the layers that report one (none for a dense model)."""
    if not routings:
        return {}
    out = {"gate_entropy": torch.stack([metrics.entropy(r.probs_TE) for r in routings]).mean(0)}
    own = [r.uncertainty_T.double() for r in routings if r.uncertainty_T is not None]
    if own:
        out[uncertainty_name] = torch.stack(own).mean(0)
    return out


def _timed(model: Backbone, x: torch.Tensor):
    synchronize(x.device)
    start = time.perf_counter()
    out = model(x)
    synchronize(x.device)
    return out, time.perf_counter() - start


def _append(store: dict[str, list[torch.Tensor]], values: dict[str, torch.Tensor]) -> None:
    for name, value in values.items():
        store.setdefault(name, []).append(value.detach().double().cpu())


@torch.no_grad()
def score_windows(model: Backbone, sampler: Backbone | None, windows: Windows, samples: int,
                  uncertainty_name: str) -> ScoredSet:
    """Next-token predictions on text windows; a sequence is a window (scores are token means)."""
    probs, labels, scores, bma = [], [], {}, []
    tokens, seconds = 0, 0.0
    for x, y in windows:
        out, dt = _timed(model, x)
        seconds += dt
        tokens += x.numel()
        p_BLV = out.logits_BLV.float().softmax(-1)
        probs.append(p_BLV.reshape(-1, p_BLV.shape[-1]).cpu())
        labels.append(y.reshape(-1).cpu())
        per_token = {"predictive_entropy": metrics.entropy(p_BLV)}
        per_token.update({k: v.reshape(x.shape) for k, v in router_token_scores(out.routings, uncertainty_name).items()})
        if sampler is not None:
            p_SBLV = torch.stack([sampler(x).logits_BLV.float().softmax(-1) for _ in range(samples)])
            bma_BLV = p_SBLV.mean(0)
            bma.append(bma_BLV.reshape(-1, bma_BLV.shape[-1]).cpu())
            per_token["predictive_entropy_bma"] = metrics.entropy(bma_BLV)
            per_token["mutual_information"] = metrics.mutual_information(p_SBLV)
        _append(scores, {k: v.mean(-1) for k, v in per_token.items()})
    if not probs:  # a rank with no batch of this set (more ranks than batches)
        return ScoredSet(torch.zeros(0), torch.zeros(0, dtype=torch.long), {}, 0, 0.0)
    return ScoredSet(torch.cat(probs), torch.cat(labels), {k: torch.cat(v) for k, v in scores.items()},
                     tokens, seconds, torch.cat(bma) if bma else None)


@torch.no_grad()
def score_items(model: Backbone, sampler: Backbone | None, items: MCQTensors, index_batches: list[torch.Tensor],
                samples: int, uncertainty_name: str, device: torch.device) -> ScoredSet:
    """4-way multiple-choice predictions of the items in ``index_batches``; a sequence is an item
    (router scores are averaged over the real tokens of its four filled-in sentences)."""
    probs, labels, scores, bma, logits = [], [], {}, [], []
    tokens, seconds = 0, 0.0
    for index in index_batches:
        batch = items.batch(index, device)
        out, dt = _timed(model, batch.inputs_NL)
        seconds += dt
        mask = batch.token_mask_NL.reshape(batch.n_items, -1).double()
        tokens += int(mask.sum())
        logits_BO = batch.option_scores(out.logits_BLV)
        p_BO = logits_BO.softmax(-1)
        logits.append(logits_BO.cpu())
        probs.append(p_BO.cpu())
        labels.append(batch.answers_B.cpu())
        per_item = {"predictive_entropy": metrics.entropy(p_BO)}
        for name, value_T in router_token_scores(out.routings, uncertainty_name).items():
            per_item[name] = (value_T.reshape(batch.n_items, -1) * mask).sum(-1) / mask.sum(-1).clamp_min(1)
        if sampler is not None:
            p_SBO = torch.stack([batch.option_scores(sampler(batch.inputs_NL).logits_BLV).softmax(-1)
                                 for _ in range(samples)])
            bma.append(p_SBO.mean(0).cpu())
            per_item["predictive_entropy_bma"] = metrics.entropy(bma[-1])
            per_item["mutual_information"] = metrics.mutual_information(p_SBO)
        _append(scores, per_item)
    if not probs:  # a rank with no batch of this set (more ranks than batches)
        return ScoredSet(torch.zeros(0), torch.zeros(0, dtype=torch.long), {}, 0, 0.0)
    return ScoredSet(torch.cat(probs), torch.cat(labels), {k: torch.cat(v) for k, v in scores.items()},
                     tokens, seconds, torch.cat(bma) if bma else None, torch.cat(logits))
