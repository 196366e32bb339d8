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
  once on the averaged selection). So the model is run S more times with its
  routers switched to a single sample (:func:`single_sample_routing`: the same
  modules and weights, one copy of the model in memory), giving
  ``p_1 .. p_S``; ``MI = H[mean_s p_s] - mean_s H[p_s]``. A deterministic
  router gives S identical passes, hence exactly 0. With S = 1 the score is
  left out (one sample has no disagreement to measure).
* **Multiple-choice sets.** Every item of a split is scored unless
  ``eval.mcq_items`` / ``eval.calibration_items`` cap the count. Items without an
  answer (an OOD dataset's unlabelled split, e.g. ``medmcqa:test``) are scored for
  OOD and left out of calibration and accuracy (label ``UNLABELLED``). A prompt
  longer than :func:`prompt_len` is left out. What was left out or is unlabelled
  is counted per set (``EvalContext.counts``, the ``items`` block of eval.json).
* **Per-sequence scores.** ``eval.ood_task=lm``: a sequence is a window of
  text and each score is averaged over its tokens (next-token predictive
  entropy and MI). ``mcq``: a sequence is a multiple-choice item and the
  predictive distribution is over its four options; router scores (gate
  entropy, logit variance, temperature) are averaged over the tokens of its
  four filled-in sentences and over MoE layers. ``auto`` follows the run's task.
"""

from __future__ import annotations

import dataclasses
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterator

import torch

from .. import metrics
from .. import distributed
from ..checkpoint import load_run_weights
from ..config import AppConfig, ConfigError, DataConfig
from ..data.batches import eval_batches
from ..data.corpora import BUILTIN_CORPORA, Corpus, load_corpus, looks_binary
from ..data.mcq_datasets import (MCQQuestion, LetterTensors, check_split, encode_questions, load_questions,
                                 split_entry)
from ..data.mcq import (MCQTensors, build_items, item_len, shuffle_words_within_sentences, split_text,
                        text_items)
from ..device import synchronize
from ..stats import fit_temperature
from ..model import build_model, build_tokenizer
from ..model.backbone import Backbone, ModelOutput
from ..model.routers import Routing, router_class
from ..tasks.mcq import calibration_items_trained_on

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
    # Multiple choice: log bma_probs_NC, computed stably from the S passes' option scores (what temperature
    # scaling of the BMA divides); None without single-sample passes.
    bma_logits_NC: torch.Tensor | None = None

    def scores_of(self, predictive: str) -> torch.Tensor | None:
        """The option scores whose softmax is ``predictive``'s distribution (routing_mean or bma); a
        set without single-sample passes (S = 1) is its own BMA."""
        if predictive == "bma" and self.bma_logits_NC is not None:
            return self.bma_logits_NC
        return self.logits_NC

    def labelled(self) -> "ScoredSet":
        """The items with an answer (label >= 0), which calibration and accuracy need; the set itself
        when every item has one (next-token sets always do)."""
        keep_N = self.labels_N >= 0
        if bool(keep_N.all()):
            return self
        pick = lambda t: None if t is None else t[keep_N]  # noqa: E731
        return ScoredSet(self.probs_NC[keep_N], self.labels_N[keep_N], {k: v[keep_N] for k, v in self.scores.items()},
                         self.tokens, self.seconds, pick(self.bma_probs_NC), pick(self.logits_NC),
                         pick(self.bma_logits_NC))


def check_eval_inputs(app: AppConfig) -> None:
    """Refuse missing, empty or binary OOD files, and a local OOD dataset's missing split, before any
    work (and before training, with eval.at_end)."""
    for entry in app.eval.ood_mcq:
        name, split, _ = split_entry(entry, app.data.mcq_eval_split)
        check_split(name, split, f"eval.ood_mcq: {entry}")
    for path_str in app.eval.ood_text:
        if path_str in BUILTIN_CORPORA:  # a built-in corpus by name (its validation split is the set)
            continue
        path = Path(path_str).expanduser()
        if not path.is_file():
            raise ConfigError(f"eval.ood_text: {path_str} is not a file; give text files or built-in corpus names "
                              f"({', '.join(BUILTIN_CORPORA)}), e.g. eval.ood_text=[notes.txt,thirdparty_docs]")
        try:
            raw = path.read_bytes()
        except OSError as exc:
            raise ConfigError(f"eval.ood_text: cannot read {path_str}: {exc.strerror}") from None
        if looks_binary(raw):  # the same test as data.path: scoring replacement characters measures nothing
            raise ConfigError(f"eval.ood_text: {path_str} is not UTF-8 text (it looks binary); give a text file")
        text = raw.decode("utf-8", errors="replace")
        if not text.strip():
            raise ConfigError(f"eval.ood_text: {path_str} is empty; give a file with text in it")


def load_model(state: dict[str, Any], app: AppConfig, run: str | Path, device: torch.device) -> Backbone:
    """The checkpoint's weights in a model built from ``app``, in evaluation mode."""
    model = build_model(app)
    load_run_weights(model, state, "run", run, app)
    return model.to(device).eval()


@contextmanager
def single_sample_routing(model: Backbone) -> Iterator[Backbone]:
    """``model`` with every router drawing one routing sample per pass (``samples=1``) inside the
    block, its own S restored after: the single-sample passes run on the same modules and weights,
    so a pretrained model is never held twice. Routers read ``self.cfg.samples`` on each forward."""
    routers = [layer.router for layer in model.moe_layers]
    configs = [router.cfg for router in routers]
    try:
        for router, cfg in zip(routers, configs):
            router.cfg = dataclasses.replace(cfg, samples=1)
        yield model
    finally:
        for router, cfg in zip(routers, configs):
            router.cfg = cfg


class SingleSample:
    """Calls ``model`` with its routers switched to one routing sample (see
    :func:`single_sample_routing`): what the S single-sample passes of MI and the BMA run."""

    def __init__(self, model: Backbone):
        self.model = model

    def __call__(self, idx_BL: torch.Tensor) -> ModelOutput:
        with single_sample_routing(self.model):
            return self.model(idx_BL)


def prompt_len(app: AppConfig) -> int:
    """The longest multiple-choice prompt evaluation scores, in tokens. The native model's context
    is model.seq_len. A pretrained model (model=hf) is fine-tuned on model.seq_len windows but reads
    its own context (the config's max_position_embeddings): cutting prompts at model.seq_len would
    leave out long ones (MMLU-Law's) and bias a set towards short questions."""
    if app.model.backbone != "hf":
        return app.model.seq_len
    from ..model.hf import hf_config

    context = getattr(hf_config(app.model.hf_name or ""), "max_position_embeddings", None)
    return context if isinstance(context, int) and context > 0 else app.model.seq_len


def _cap(n_items: int | None) -> int:
    """An item count: ``eval.*_items`` null is every item a split or text yields."""
    return sys.maxsize if n_items is None else n_items


def count_items(tensors: "MCQTensors | LetterTensors", asked: int) -> dict[str, int]:
    """What one multiple-choice set scores and leaves out: ``items`` scored, ``unlabelled`` of them
    without an answer (OOD scores only), ``too_long`` prompts left out (longer than prompt_len)."""
    return {"items": len(tensors), "unlabelled": int((tensors.answers_N < 0).sum()), "too_long": asked - len(tensors)}


def question_set(questions: list[MCQQuestion], app: AppConfig, tokenizer, key: str
                 ) -> tuple[LetterTensors, dict[str, int]]:
    """A dataset's questions as a scored set (prompts up to prompt_len tokens), and its counts."""
    tensors = encode_questions(questions, tokenizer, prompt_len(app), key)
    return tensors, count_items(tensors, len(questions))


def text_set(app: AppConfig, text: str, n_items: int | None, key: str, tokenizer, skip: int = 0
             ) -> tuple["MCQTensors | LetterTensors", dict[str, int]]:
    """Items ``skip`` .. ``skip + n_items`` made from ``text`` in the task's format (letter prompts up
    to prompt_len tokens), and their counts. The text_items path reads the prompt length from
    model.seq_len, so it gets a view of the config with the prompt length there (the items' own
    length, item_len, is capped by it in the same way)."""
    view = app
    if prompt_len(app) != app.model.seq_len:
        view = dataclasses.replace(app, model=dataclasses.replace(app.model, seq_len=prompt_len(app)))
    tensors = text_items(view, text, _cap(n_items), key, tokenizer, skip)
    if isinstance(tensors, MCQTensors):  # cloze items are built to fit: none is left out
        return tensors, count_items(tensors, len(tensors))
    return tensors, count_items(tensors, len(build_items(text, skip + _cap(n_items), item_len(view))[skip:]))


def temperature_fit_set(app: AppConfig, corpus: Corpus) -> tuple["MCQTensors | LetterTensors", dict[str, int]]:
    """What temperature scaling fits on: up to ``eval.calibration_items`` items of the calibration
    split that the run did not train on (post-hoc heads fit on its first items: those are passed
    over, so a router + TS is not scaled on what its heads were fit to), and their counts, with
    ``skipped_trained_on`` where items were passed over."""
    key = "eval.calibration_items (calibration split)"
    trained_on = calibration_items_trained_on(app, corpus)
    if corpus.questions is not None:
        questions = corpus.questions["calibration"][trained_on:trained_on + _cap(app.eval.calibration_items)]
        if not questions:
            raise ConfigError(f"{key}: the run trained on the calibration split's first {trained_on} questions and "
                              "none is left beyond them to fit temperature scaling on; fit the heads on fewer "
                              "(task.train_items) or give a larger calibration split")
        tensors, counts = question_set(questions, app, corpus.tokenizer, key)
    else:
        tensors, counts = text_set(app, split_text(corpus, "calibration"), app.eval.calibration_items, key,
                                   corpus.tokenizer, skip=trained_on)
    return tensors, {**counts, "skipped_trained_on": trained_on} if trained_on else counts


@dataclass
class EvalContext:
    app: AppConfig
    run_dir: Path
    state: dict[str, Any]
    device: torch.device
    model: Backbone
    sampler: SingleSample | None  # the model with single-sample routing, for MI and the BMA (None when S = 1)
    corpus: Corpus
    unit: str  # "lm" or "mcq": what a sequence is for the OOD scores
    lm_sets: dict[str, Windows]
    mcq_sets: dict[str, "MCQTensors | LetterTensors"]  # "in" is the test split
    calibration_set: "MCQTensors | LetterTensors"  # what temperature scaling fits on
    # Per multiple-choice set ("calibration" included): items scored, unlabelled, too_long (count_items).
    counts: dict[str, dict[str, int]] = field(default_factory=dict)
    _scored: dict[tuple[str, str], ScoredSet] = field(default_factory=dict)
    _temperatures: dict[tuple[str, str], tuple[float, int] | None] = field(default_factory=dict)

    @classmethod
    def build(cls, run_dir: Path, app: AppConfig, state: dict[str, Any], device: torch.device) -> "EvalContext":
        check_eval_inputs(app)
        model = load_model(state, app, run_dir, device)
        sampler = SingleSample(model) if app.router.samples > 1 else None
        unit = app.task.name if app.eval.ood_task == "auto" else app.eval.ood_task
        corpus = load_corpus(app.data, min_tokens=app.model.seq_len + 2, tokenizer=build_tokenizer(app))
        tokenizer = corpus.tokenizer
        lm_sets = {"in": windows(corpus.val, app, app.eval.windows, "the validation split", device)}
        built: dict[str, tuple[MCQTensors | LetterTensors, dict[str, int]]] = {}
        test_key = "eval.mcq_items (test split)"
        if corpus.questions is not None:
            built["in"] = question_set(in_distribution_questions(app)[:app.eval.mcq_items], app, tokenizer, test_key)
            if not int((built["in"][0].answers_N >= 0).sum()):
                raise ConfigError(f"data.mcq_eval_split={app.data.mcq_eval_split}: none of the test items scored has "
                                  "an answer, and calibration and accuracy need them; raise eval.mcq_items or name a "
                                  "labelled split")
        else:
            built["in"] = text_set(app, split_text(corpus, "test"), app.eval.mcq_items, test_key, tokenizer)
        built["calibration"] = temperature_fit_set(app, corpus)
        if unit == "mcq" and corpus.questions is not None:  # OOD sets: other multiple-choice datasets
            for entry in app.eval.ood_mcq:
                name, split, _ = split_entry(entry, app.data.mcq_eval_split)
                key = f"eval.ood_mcq: {entry}"
                questions = load_questions(name, split, unlabelled=True, where=key)[:app.eval.mcq_items]
                # A set is named by its dataset (medmcqa:test is "medmcqa"); a second split of one dataset by both.
                stem = Path(name).stem
                built[free_name(stem if stem not in built else f"{stem}:{split}", built)] = question_set(
                    questions, app, tokenizer, key)
        else:
            in_text = tokenizer.decode(corpus.val) if unit == "lm" else split_text(corpus, "test")
            for name, (key, text) in ood_texts(app, in_text).items():
                if unit == "lm":
                    lm_sets[name] = windows(tokenizer.encode(text), app, app.eval.windows, key, device)
                else:
                    built[name] = text_set(app, text, app.eval.mcq_items, key, tokenizer)
        counts = {name: c for name, (_, c) in built.items()}
        calibration_set = built.pop("calibration")[0]
        mcq_sets = {name: tensors for name, (tensors, _) in built.items()}
        return cls(app, Path(run_dir), state, device, model, sampler, corpus, unit, lm_sets, mcq_sets,
                   calibration_set, counts)

    @property
    def samples(self) -> int:
        return self.app.router.samples

    def temperature(self, predictive: str) -> tuple[float, int] | None:
        """(T, items fit on): temperature scaling of ``predictive`` (routing_mean or bma), one scalar
        fit by NLL on the calibration split's labelled items, computed once; None when an option
        score is not finite (a token of probability 0 has no finite temperature)."""
        key = ("temperature", predictive)
        if key not in self._temperatures:
            kind = "mcq_bma" if predictive == "bma" and self.sampler is not None else "mcq"
            fit = self.scored("calibration", kind).labelled()
            scores = fit.scores_of(predictive)
            self._temperatures[key] = (
                (fit_temperature(scores, fit.labels_N), len(fit.labels_N))
                if scores is not None and bool(torch.isfinite(scores).all()) else None)
        return self._temperatures[key]

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
        calibration split's items; "mcq_bma" the calibration split's items with the S single-sample
        passes, which temperature scaling of the BMA fits on), computed once. The S single-sample
        passes (mutual information and the BMA predictive) run for the OOD unit's sets and, when
        the BMA is asked for, for the in-distribution set of either kind."""
        if (name, kind) not in self._scored:
            torch.manual_seed(self.app.seed)  # each set's sampling noise is independent of the order of sets
            sampled = (kind == "mcq_bma" or
                       name != "calibration" and (kind == self.unit or (name == "in" and "bma" in self.predictives)))
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


RESERVED_SET_NAMES = ("in", "calibration", "scores", "predictions")


def free_name(base: str, taken: Any) -> str:
    """``base``, or ``base_2``, ``base_3``, ... when a set of that name exists or the name is one
    eval.json uses itself."""
    name, n = base or "ood", 2
    while name in taken or name in RESERVED_SET_NAMES:
        name, n = f"{base}_{n}", n + 1
    return name


def in_distribution_questions(app: AppConfig) -> list[MCQQuestion]:
    """A dataset's test split, items without an answer included: they are in-distribution sequences
    for the OOD scores all the same (calibration and accuracy leave them out)."""
    return load_questions(app.data.mcq_name or "", app.data.mcq_eval_split, unlabelled=True)


def corpus_text(app: AppConfig, name: str) -> str:
    """The validation split of built-in corpus ``name`` as text (split as ``data.val_fraction``
    splits the run's own corpus): text no model trained on, whatever the run's corpus."""
    corpus = load_corpus(DataConfig(name=name, val_fraction=app.data.val_fraction, cache_dir=app.data.cache_dir))
    return corpus.tokenizer.decode(corpus.val)


def ood_texts(app: AppConfig, in_text: str) -> dict[str, tuple[str, str]]:
    """name -> (config key for errors, text): near (``in_text`` with its words shuffled in each
    sentence: a control that keeps the vocabulary), far, and the user's ``eval.ood_text`` entries:
    files, or built-in corpora by name (``thirdparty_docs``: other packages' docstrings, the real
    near-OOD prose for a model trained on ``stdlib_docs``)."""
    far_name = "python_source" if app.data.name != "python_source" else "stdlib_docs"
    sets = {"near": ("near (word-shuffled in-distribution text)", shuffle_words_within_sentences(in_text)),
            "far": (f"far ({far_name})", corpus_text(app, far_name))}
    for entry in app.eval.ood_text:
        if entry in BUILTIN_CORPORA:
            sets[free_name(entry, sets)] = (f"eval.ood_text: {entry}", corpus_text(app, entry))
            continue
        name = free_name(Path(entry).stem or "ood", sets)
        sets[name] = (f"eval.ood_text: {entry}", Path(entry).expanduser().read_text(encoding="utf-8", errors="replace"))
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
                     joined("bma_probs_NC"), joined("logits_NC"), joined("bma_logits_NC"))


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
def score_windows(model: Backbone, sampler: "SingleSample | None", windows: Windows, samples: int,
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
            # One sample at a time: S x batch x tokens x vocabulary at once does not fit for a
            # pretrained model's vocabulary.
            running = metrics.RunningPredictive()
            for _ in range(samples):
                running.add(sampler(x).logits_BLV.float().softmax(-1))
            mean_BLV = running.mean()
            per_token["mutual_information"] = running.mutual_information(mean_BLV)
            bma_BLV = mean_BLV.float()
            del mean_BLV
            bma.append(bma_BLV.reshape(-1, bma_BLV.shape[-1]).cpu())
            per_token["predictive_entropy_bma"] = metrics.entropy(bma_BLV)
        _append(scores, {k: v.mean(-1) for k, v in per_token.items()})
    if not probs:  # a rank with no batch of this set (more ranks than batches)
        return ScoredSet(torch.zeros(0), torch.zeros(0, dtype=torch.long), {}, 0, 0.0)
    return ScoredSet(torch.cat(probs), torch.cat(labels), {k: torch.cat(v) for k, v in scores.items()},
                     tokens, seconds, torch.cat(bma) if bma else None)


@torch.no_grad()
def score_items(model: Backbone, sampler: "SingleSample | None", items: MCQTensors,
                index_batches: list[torch.Tensor], samples: int, uncertainty_name: str, device: torch.device) -> ScoredSet:
    """4-way multiple-choice predictions of the items in ``index_batches``; a sequence is an item
    (router scores are averaged over the real tokens of its four filled-in sentences)."""
    probs, labels, scores, bma, logits, bma_logits = [], [], {}, [], [], []
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
            z_SBO = torch.stack([batch.option_scores(sampler(batch.inputs_NL).logits_BLV) for _ in range(samples)])
            p_SBO = z_SBO.softmax(-1)
            bma.append(p_SBO.mean(0).cpu())
            # log of the mean of the S softmaxes, finite wherever the option scores are
            bma_logits.append((z_SBO.double().log_softmax(-1).logsumexp(0) - math.log(samples)).cpu())
            per_item["predictive_entropy_bma"] = metrics.entropy(bma[-1])
            per_item["mutual_information"] = metrics.mutual_information(p_SBO)
        _append(scores, per_item)
    if not probs:  # a rank with no batch of this set (more ranks than batches)
        return ScoredSet(torch.zeros(0), torch.zeros(0, dtype=torch.long), {}, 0, 0.0)
    return ScoredSet(torch.cat(probs), torch.cat(labels), {k: torch.cat(v) for k, v in scores.items()},
                     tokens, seconds, torch.cat(bma) if bma else None, torch.cat(logits),
                     torch.cat(bma_logits) if bma_logits else None)
