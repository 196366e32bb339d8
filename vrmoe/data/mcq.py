"""A 4-way multiple-choice task made from any text (the paper's regime at small scale).

An item is a sentence with one word removed and four candidate words: the
removed one and three distractors from the same text's vocabulary, of similar
length (+-1 character) and similar frequency, so neither a unigram prior nor
the byte count gives the answer away. The model answers with the softmax over
the four options' scores, each score being the log-likelihood of the sentence
with that candidate filled in. The tokens before the blank are the same in all
four sentences, so only the candidate and what follows it are summed: the
softmax over the full-sentence log-likelihoods is exactly the same.

Items are deterministic: the same text, count, length and seed always give the
same list. ``vrmoe.tasks.mcq.MCQTask`` is the fine-tuning task for the training loop
(``vrmoe train task=mcq``): a cross-entropy over the four option scores.
"""

from __future__ import annotations

import bisect
import math
import random
import re
from collections import Counter
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from ..config import ConfigError
from .mcq_datasets import LetterTensors, MCQQuestion, encode_questions
from .tokenizers import ByteTokenizer, Tokenizer, encode_prompt

if TYPE_CHECKING:  # pragma: no cover
    from ..config import AppConfig
    from .corpora import Corpus

N_OPTIONS = 4
BLANK = "____"
# A word: a letter then letters, digits or underscores (identifiers in code), 3 characters or more,
# not glued to other word characters.
WORD = re.compile(r"(?<![A-Za-z0-9_])[A-Za-z][A-Za-z0-9_]{2,}(?![A-Za-z0-9_])")
_PARAGRAPH_BREAK = re.compile(r"\n[ \t]*\n")
_SENTENCE_END = re.compile(r"(?<=[.!?])\s+")
_MIN_WORDS = 4
# Distractors are drawn from this many vocabulary words nearest in log-frequency.
_NEIGHBOURS = 12
_ITEM_SEED = "vrmoe-mcq"


@dataclass(frozen=True)
class MCQItem:
    prefix: str  # the sentence up to the blank (never empty)
    suffix: str  # the sentence after the blank
    options: tuple[str, ...]  # N_OPTIONS distinct words
    answer: int  # index of the removed word in options

    def filled(self, option: int) -> str:
        return self.prefix + self.options[option] + self.suffix

    @property
    def question(self) -> str:
        return self.prefix + BLANK + self.suffix


# ---------------------------------------------------------------------------
# Text: sentences and the word-shuffled near-OOD domain
# ---------------------------------------------------------------------------

def _sentence_spans(text: str) -> list[str]:
    """Paragraphs split at sentence ends, whitespace kept (joined back they give ``text``)."""
    pieces: list[str] = []
    for paragraph in re.split(r"(\n[ \t]*\n)", text):
        pieces.extend(re.split(r"((?<=[.!?])\s+)", paragraph))
    return pieces


def sentences(text: str) -> list[str]:
    """The text's sentences, whitespace collapsed to single spaces, with at least 4 words."""
    out = []
    for paragraph in _PARAGRAPH_BREAK.split(text):
        for sentence in _SENTENCE_END.split(paragraph):
            sentence = " ".join(sentence.split())
            if len(sentence.split(" ")) >= _MIN_WORDS:
                out.append(sentence)
    return out


def shuffle_words_within_sentences(text: str, seed: int = 0) -> str:
    """The near-OOD domain: every sentence's words permuted, its whitespace layout kept.

    Vocabulary, word frequencies and line structure stay those of the
    in-distribution text; only the word order (the syntax) is destroyed."""
    rng = random.Random(f"{_ITEM_SEED}-shuffle-{seed}")
    out = []
    for span in _sentence_spans(text):
        parts = re.split(r"(\s+)", span)
        words = parts[0::2]
        nonempty = [w for w in words if w]
        rng.shuffle(nonempty)
        it = iter(nonempty)
        parts[0::2] = [next(it) if w else w for w in words]
        out.append("".join(parts))
    return "".join(out)


# ---------------------------------------------------------------------------
# Building items
# ---------------------------------------------------------------------------

class _Vocabulary:
    """Word counts of a text, indexed by length and sorted by frequency for fast neighbour look-ups."""

    def __init__(self, text: str):
        self.counts = Counter(WORD.findall(text))
        self.by_length: dict[int, list[tuple[float, str]]] = {}
        for word, count in self.counts.items():
            self.by_length.setdefault(len(word), []).append((math.log(count), word))
        for entries in self.by_length.values():
            entries.sort()

    def distractors(self, answer: str, rng: random.Random) -> list[str] | None:
        """Three words of length within one of the answer's and nearest in log-frequency."""
        target = math.log(self.counts.get(answer, 1))
        near: list[tuple[float, str]] = []
        for length in (len(answer) - 1, len(answer), len(answer) + 1):
            entries = self.by_length.get(length, [])
            at = bisect.bisect_left(entries, (target, ""))
            for log_count, word in entries[max(0, at - _NEIGHBOURS): at + _NEIGHBOURS]:
                near.append((abs(log_count - target), word))
        near.sort()
        seen, pool = {answer.lower()}, []
        for _, word in near:
            if word.lower() not in seen:
                seen.add(word.lower())
                pool.append(word)
            if len(pool) == _NEIGHBOURS:
                break
        return rng.sample(pool, N_OPTIONS - 1) if len(pool) >= N_OPTIONS - 1 else None


def _fit(sentence: str, start: int, end: int, longest_option: int, max_len: int) -> tuple[str, str] | None:
    """Prefix and suffix around the blank, cut at word boundaries so the longest filled
    sentence fits ``max_len`` bytes; a quarter of the budget goes to the suffix."""
    suffix_budget = max_len // 4
    prefix_budget = max_len - suffix_budget - longest_option
    if prefix_budget < 2:
        return None
    prefix, suffix = sentence[:start], sentence[end:]
    if len(prefix) > prefix_budget:
        prefix = prefix[-prefix_budget:]
        space = prefix.find(" ")
        if 0 <= space < len(prefix) - 2:
            prefix = prefix[space + 1:]
    if len(suffix) > suffix_budget:
        suffix = suffix[:suffix_budget]
        space = suffix.rfind(" ")
        if space > 0:
            suffix = suffix[:space]
    return prefix, suffix


def build_items(text: str, n_items: int, max_len: int, seed: int = 0) -> list[MCQItem]:
    """Up to ``n_items`` items from ``text``; every filled-in sentence is at most ``max_len`` bytes."""
    vocabulary = _Vocabulary(text)
    candidates = sentences(text)
    rng = random.Random(f"{_ITEM_SEED}-{seed}")
    rng.shuffle(candidates)
    items: list[MCQItem] = []
    for sentence in candidates:
        if len(items) >= n_items:
            break
        # The blank is never the first word: the first option byte needs context to be scored.
        words = [m for m in WORD.finditer(sentence) if m.start() > 0]
        if not words:
            continue
        chosen = rng.choice(words)
        answer = chosen.group()
        distractors = vocabulary.distractors(answer, rng)
        if distractors is None:
            continue
        options = [answer, *distractors]
        rng.shuffle(options)
        cut = _fit(sentence, chosen.start(), chosen.end(), max(map(len, options)), max_len)
        if cut is None or not cut[0]:
            continue
        item = MCQItem(cut[0], cut[1], tuple(options), options.index(answer))
        if all(len(item.filled(i).encode("utf-8")) <= max_len for i in range(N_OPTIONS)):
            items.append(item)
    return items


# ---------------------------------------------------------------------------
# Tensors and scores
# ---------------------------------------------------------------------------

@dataclass
class MCQTensors:
    """Items as padded byte tensors: option o of item n is ``tokens_NOL[n, o, :lengths_NO[n, o]]``."""

    tokens_NOL: torch.Tensor  # long
    lengths_NO: torch.Tensor  # long
    starts_N: torch.Tensor  # long, byte offset of the blank (where scoring starts)
    answers_N: torch.Tensor  # long

    def __len__(self) -> int:
        return self.answers_N.shape[0]

    @property
    def tokens_per_item(self) -> int:
        """Model positions one item takes (its four sentences, padded)."""
        return self.tokens_NOL[0].numel()

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> "MCQBatch":
        return make_batch(self, index, device)


@dataclass
class MCQBatch:
    """B items, their N_OPTIONS filled sentences flattened to B*O model rows of length L."""

    inputs_NL: torch.Tensor
    targets_NL: torch.Tensor
    score_mask_NL: torch.Tensor  # bool: target positions inside the candidate and what follows
    token_mask_NL: torch.Tensor  # bool: real (not padding) input positions
    answers_B: torch.Tensor

    @property
    def n_items(self) -> int:
        return self.answers_B.shape[0]

    def option_scores(self, logits_NLV: torch.Tensor) -> torch.Tensor:
        """(B, O) scores whose softmax is the predictive distribution over the options."""
        return option_scores(logits_NLV, self)


def encode_items(items: list[MCQItem], tokenizer: Tokenizer | None = None) -> MCQTensors:
    """Each item's four filled-in sentences, each after the tokenizer's BOS where its checkpoint was
    trained with one (``encode_prompt``); the scoring start counts it."""
    tokenizer = tokenizer or ByteTokenizer()
    encoded = [[encode_prompt(tokenizer, item.filled(o)) for o in range(N_OPTIONS)] for item in items]
    longest = max((len(ids) for row in encoded for ids in row), default=1)
    tokens = torch.zeros(len(items), N_OPTIONS, longest, dtype=torch.long)
    lengths = torch.zeros(len(items), N_OPTIONS, dtype=torch.long)
    for n, row in enumerate(encoded):
        for o, ids in enumerate(row):
            tokens[n, o, :len(ids)] = ids
            lengths[n, o] = len(ids)
    # Scoring starts where the four sentences' tokens part: at the prefix's length for bytes, earlier
    # for a subword tokenizer that joins the space before the blank to the word in it (" reads").
    starts = torch.tensor([min(len(encode_prompt(tokenizer, item.prefix)), _shared_length(row))
                           for item, row in zip(items, encoded)], dtype=torch.long)
    answers = torch.tensor([item.answer for item in items], dtype=torch.long)
    return MCQTensors(tokens, lengths, starts, answers)


def _shared_length(rows: list[torch.Tensor]) -> int:
    """How many leading tokens the four encoded sentences have in common."""
    shortest = min(len(ids) for ids in rows)
    same = torch.stack([ids[:shortest] for ids in rows]).eq(rows[0][:shortest]).all(0)
    return int(same.long().cumprod(0).sum())


def make_batch(data: MCQTensors, index: torch.Tensor, device: torch.device | str = "cpu") -> MCQBatch:
    """The items at ``index``, trimmed to their longest sentence."""
    lengths = data.lengths_NO[index]
    width = int(lengths.max())
    tokens = data.tokens_NOL[index, :, :width]
    positions = torch.arange(width - 1)
    # Target position j predicts byte j + 1: score bytes start .. length - 1.
    score = (positions >= data.starts_N[index][:, None, None] - 1) & (positions < lengths[..., None] - 1)
    real = positions < lengths[..., None] - 1
    flat = lambda t: t.reshape(-1, width - 1).to(device, non_blocking=True)  # noqa: E731
    return MCQBatch(flat(tokens[..., :-1]), flat(tokens[..., 1:]), flat(score), flat(real),
                    data.answers_N[index].to(device))


def option_scores(logits_NLV: torch.Tensor, batch: MCQBatch) -> torch.Tensor:
    """(B, O) log-likelihood of each option's candidate word and the text after it."""
    logp = torch.log_softmax(logits_NLV.float(), dim=-1)
    token_logp = logp.gather(-1, batch.targets_NL[..., None]).squeeze(-1)
    return (token_logp * batch.score_mask_NL).sum(-1).reshape(batch.n_items, N_OPTIONS)


def item_len(app: "AppConfig") -> int:
    """Longest filled-in sentence: the task's setting, never beyond the model's context."""
    return min(app.task.item_len, app.model.seq_len)


def _built(text: str, n_items: int, max_len: int, key: str, seed: int = 0, skip: int = 0) -> list[MCQItem]:
    """Items ``skip`` .. ``skip + n_items`` of ``text``, or a ConfigError naming ``key`` when it yields none."""
    items = build_items(text, skip + n_items, max_len, seed)[skip:]
    if not items:
        raise ConfigError(f"{key}: the text yields no multiple-choice item{' beyond the first ' + str(skip) if skip else ''}"
                          f" (it needs sentences of at least {_MIN_WORDS} words and a vocabulary with words of "
                          "similar length); give more text")
    return items


# ---------------------------------------------------------------------------
# Splits and formats
# ---------------------------------------------------------------------------

# Three disjoint splits (finetune, calibration, test): fine-tuning makes the base over-confident on
# its items; post-hoc methods (the Bayesian heads, temperature scaling) fit on calibration items; only
# evaluation scores test items.


def halves(text: str) -> tuple[str, str]:
    """``text`` cut in two at the paragraph (or sentence) break nearest its middle, so no sentence
    is in both halves."""
    middle = len(text) // 2
    for breaks in (_PARAGRAPH_BREAK, _SENTENCE_END):
        cuts = [m.end() for m in breaks.finditer(text)]
        if cuts:
            cut = min(cuts, key=lambda c: abs(c - middle))
            return text[:cut], text[cut:]
    return text[:middle], text[middle:]


def split_text(corpus: "Corpus", split: str) -> str:
    """The text a split's cloze items come from: finetune the training text; calibration and test the
    first and the second half of the validation text (text neither the LM nor fine-tuning trained on)."""
    if split == "finetune":
        return corpus.tokenizer.decode(corpus.train)
    first, second = halves(corpus.tokenizer.decode(corpus.val))
    return first if split == "calibration" else second


def as_question(item: MCQItem) -> MCQQuestion:
    """A cloze item asked in the letter form: the sentence with its blank, the four words lettered."""
    return MCQQuestion(item.question, item.options, item.answer)


def text_items(app: "AppConfig", text: str, n_items: int, key: str, tokenizer: Tokenizer,
               skip: int = 0) -> MCQTensors | LetterTensors:
    """Items ``skip`` .. ``skip + n_items`` made from ``text``, in the task's format."""
    items = _built(text, n_items, item_len(app), key, skip=skip)
    if app.task.resolved_format(app.data) == "cloze":
        return encode_items(items, tokenizer)
    return encode_questions([as_question(i) for i in items], tokenizer, app.model.seq_len, key)


def split_items(app: "AppConfig", corpus: "Corpus", split: str, n_items: int, key: str,
                skip: int = 0) -> MCQTensors | LetterTensors:
    """Items ``skip`` .. ``skip + n_items`` of one split, in the task's format: a dataset's questions
    with data=mcq, cloze items made from the split's text otherwise."""
    if corpus.questions is not None:
        questions = corpus.questions[split][skip:skip + n_items]
        if not questions:
            raise ConfigError(f"{key}: the {split} split has no question beyond the first {skip}; "
                              "lower the item counts or give a larger split")
        return encode_questions(questions, corpus.tokenizer, app.model.seq_len, key)
    return text_items(app, split_text(corpus, split), n_items, key, corpus.tokenizer, skip)


__all__ = ["MCQItem", "MCQTensors", "MCQBatch", "N_OPTIONS", "BLANK", "sentences",
           "shuffle_words_within_sentences", "build_items", "encode_items", "make_batch", "option_scores",
           "item_len", "halves", "split_text", "as_question", "text_items", "split_items"]
