"""Standard multiple-choice QA datasets, asked in the paper's answer-letter form.

``data=mcq data.mcq_name=<name or path>`` reads OpenBookQA, ARC-Easy/Challenge, SciQ,
MedMCQA and MMLU (question, choices, answer key): by a short name (fetched with
``datasets`` from the hub, or its cache), by a hub id, or from a local ``save_to_disk``
directory, a ``.jsonl`` or ``.parquet`` file, or a directory of ``<split>.jsonl`` /
``<split>.parquet`` files. The format is recognised by its columns; items without exactly
four options are left out (the answer letters are A-D). Items without an answer (MedMCQA's test
split, ARC/OpenBookQA rows with an empty ``answerKey``) are left out of the splits trained,
calibrated and tested on, and kept, answer ``UNLABELLED``, where only OOD scores are asked of
them (``eval.ood_mcq``, whose entries may name their split: ``medmcqa:test``).

The prompt lists the question and the lettered options and ends with ``Answer:``; the
prediction is the softmax over the four letter tokens' logits at that position, as the
paper's softmax over A-D.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable

import torch

from ..config import ConfigError
from ..console import log_line
from .tokenizers import ByteTokenizer, Tokenizer, encode_prompt

LETTERS = ("A", "B", "C", "D")
#: The answer of an item its dataset publishes without one (OOD scores need none).
UNLABELLED = -1
# Short names: (hub id, subset).
KNOWN = {
    "openbookqa": ("allenai/openbookqa", "main"),
    "arc_easy": ("allenai/ai2_arc", "ARC-Easy"),
    "arc_challenge": ("allenai/ai2_arc", "ARC-Challenge"),
    "sciq": ("allenai/sciq", None),
    "medmcqa": ("openlifescienceai/medmcqa", None),
    "mmlu": ("cais/mmlu", "all"),
    "mmlu_law": ("cais/mmlu", "professional_law"),
}


@dataclass(frozen=True)
class MCQQuestion:
    question: str
    options: tuple[str, ...]
    answer: int  # index into options; UNLABELLED when the dataset gives none

    @property
    def labelled(self) -> bool:
        return self.answer != UNLABELLED

    def prompt(self) -> str:
        lines = [f"Question: {self.question.strip()}"]
        lines += [f"{letter}. {option.strip()}" for letter, option in zip(LETTERS, self.options)]
        return "\n".join(lines) + "\nAnswer:"


# ---------------------------------------------------------------------------
# Reading the formats
# ---------------------------------------------------------------------------

def _missing(value: Any) -> bool:
    """An answer field the dataset left empty: absent, null, "" or -1 (MedMCQA's test split)."""
    return value is None or (isinstance(value, str) and not value.strip()) or value == UNLABELLED


def _keyed(row: dict[str, Any]) -> MCQQuestion | None:
    """OpenBookQA (question_stem) and ARC (question): choices {text, label}, answerKey."""
    choices = row.get("choices")
    if not isinstance(choices, dict):
        return None
    labels, texts = list(choices.get("label", [])), list(choices.get("text", []))
    question = str(row.get("question_stem") or row.get("question"))
    if _missing(row.get("answerKey")):
        return MCQQuestion(question, tuple(texts), UNLABELLED)
    key = str(row["answerKey"]).strip()
    if key not in labels:
        return None
    return MCQQuestion(question, tuple(texts), labels.index(key))


def _sciq(row: dict[str, Any]) -> MCQQuestion:
    """SciQ: the correct answer and three distractors; its place among them is fixed by a hash of
    the question, so the answer letter is balanced and the same in every run."""
    options = [row["distractor1"], row["distractor2"], row["distractor3"]]
    place = int(hashlib.sha1(str(row["question"]).encode("utf-8")).hexdigest(), 16) % 4
    options.insert(place, row["correct_answer"])
    return MCQQuestion(str(row["question"]), tuple(str(o) for o in options), place)


def _medmcqa(row: dict[str, Any]) -> MCQQuestion:
    """MedMCQA: opa-opd and ``cop``, the correct option's index (-1 or absent in its test split)."""
    cop = row.get("cop")
    return MCQQuestion(str(row["question"]), tuple(str(row[k]) for k in ("opa", "opb", "opc", "opd")),
                       UNLABELLED if _missing(cop) else int(cop))


def _mmlu(row: dict[str, Any]) -> MCQQuestion:
    answer = row.get("answer")
    if _missing(answer):
        answer = UNLABELLED
    else:
        answer = LETTERS.index(answer) if isinstance(answer, str) and answer in LETTERS else int(answer)
    return MCQQuestion(str(row["question"]), tuple(str(c) for c in row["choices"]), answer)


FORMATS = (  # (name, columns it needs, reader)
    ("openbookqa/arc", {"choices", "answerKey"}, _keyed),
    ("sciq", {"question", "correct_answer", "distractor1", "distractor2", "distractor3"}, _sciq),
    # No "cop": a file of MedMCQA's test split may leave the column out altogether.
    ("medmcqa", {"question", "opa", "opb", "opc", "opd"}, _medmcqa),
    ("mmlu", {"question", "choices", "answer"}, _mmlu),
)


def questions_from_rows(rows: Iterable[dict[str, Any]], columns: set[str], where: str,
                        unlabelled: bool = False) -> list[MCQQuestion]:
    """The four-option items of ``rows``; ``where`` begins every error message (the key and the
    value the rows come from). Items without an answer are kept (answer ``UNLABELLED``) only with
    ``unlabelled``; without it they are left out, and a console line says how many."""
    reader = next((read for _, needs, read in FORMATS if needs <= columns), None)
    if reader is None:
        known = "; ".join(f"{name}: {', '.join(sorted(needs))}" for name, needs, _ in FORMATS)
        raise ConfigError(f"{where}: columns {', '.join(sorted(columns))} match no multiple-choice "
                          f"format; expected one of ({known})")
    questions, without_answer = [], 0
    for row in rows:
        try:
            item = reader(row)
        except (KeyError, ValueError, TypeError):
            continue
        if item is None or len(item.options) != len(LETTERS):
            continue
        if not item.labelled:
            without_answer += 1
            if unlabelled:
                questions.append(item)
        elif 0 <= item.answer < len(LETTERS):
            questions.append(item)
    if not questions and without_answer:
        raise ConfigError(f"{where}: none of its {without_answer} items has an answer (as in MedMCQA's test split); "
                          "fine-tuning, calibration and the test split need answers: name a labelled split "
                          "(data.mcq_eval_split=validation), and score this one as an OOD set, "
                          "eval.ood_mcq=[name:split]")
    if not questions:
        raise ConfigError(f"{where}: no item with exactly {len(LETTERS)} options and a valid answer")
    if without_answer and not unlabelled:  # the counts matter for a study: say so
        log_line(f"[yellow]warning:[/] {where}: {without_answer} of {len(questions) + without_answer} items have no "
                 "answer and were left out")
    return questions


def _rows_from_file(path: Path, where: str) -> list[dict[str, Any]]:
    if path.suffix == ".jsonl":
        try:
            return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
        except (OSError, ValueError) as exc:
            raise ConfigError(f"{where}: {path.name} is not a JSON-lines file ({type(exc).__name__})") from None
    if path.suffix == ".parquet":
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ConfigError("reading parquet needs pyarrow: pip install 'vrmoe[hf]'") from None
        return pq.read_table(path).to_pylist()
    raise ConfigError(f"{where}: give a .jsonl or .parquet file, a directory, or a dataset name")


def split_entry(entry: str, default_split: str) -> tuple[str, str, bool]:
    """An ``eval.ood_mcq`` entry as (dataset, split, whether the entry named the split):
    ``medmcqa:test`` names its split, ``medmcqa`` takes ``default_split``. A path that exists is
    taken whole, so a file or directory whose name holds a colon still reads."""
    name, colon, split = entry.rpartition(":")
    if not colon or not name or not split or "/" in split or "\\" in split or Path(entry).expanduser().exists():
        return entry, default_split, False
    return name, split, True


def split_files(path: Path) -> list[str]:
    """The splits of a directory of ``<split>.jsonl`` / ``<split>.parquet`` files."""
    return sorted({p.stem for p in path.iterdir() if p.suffix in (".jsonl", ".parquet") and p.is_file()})


def saved_splits(path: Path) -> list[str] | None:
    """The splits of a ``save_to_disk`` DatasetDict directory; None for anything else."""
    try:
        splits = json.loads((path / "dataset_dict.json").read_text(encoding="utf-8")).get("splits")
    except (OSError, ValueError, AttributeError):
        return None
    return [str(s) for s in splits] if isinstance(splits, list) else None


def check_split(name: str, split: str, where: str) -> None:
    """Refuse a split a local dataset directory does not have, in one line that lists those it has
    (before any model is loaded). A single file has no splits; a hub dataset's splits are checked
    where it is loaded (its error lists them)."""
    path = Path(name).expanduser()
    if not path.is_dir():
        return
    files = split_files(path)
    if files and split not in files:
        raise ConfigError(f"{where}: no split {split!r} (no {split}.jsonl or {split}.parquet there); "
                          f"its splits are {', '.join(files)}")
    saved = None if files else saved_splits(path)
    if saved is not None and split not in saved:
        raise ConfigError(f"{where}: no split {split!r}; its splits are {', '.join(saved)}")


def load_questions(name: str, split: str, unlabelled: bool = False, where: str | None = None) -> list[MCQQuestion]:
    """The questions of one split of a multiple-choice dataset (see the module doc for sources).
    ``unlabelled`` keeps items without an answer (answer ``UNLABELLED``); ``where`` begins every
    error message (by default ``data.mcq_name=<name>``)."""
    where = where or f"data.mcq_name={name}"
    path = Path(name).expanduser()
    if path.is_file():
        rows = _rows_from_file(path, where)
        return questions_from_rows(rows, set().union(*(r.keys() for r in rows)) if rows else set(), where, unlabelled)
    if path.is_dir():
        for suffix in (".jsonl", ".parquet"):
            if (path / f"{split}{suffix}").is_file():
                return load_questions(str(path / f"{split}{suffix}"), split, unlabelled, f"{where} (split {split})")
        check_split(name, split, where)
        return _from_datasets(name, split, local=True, unlabelled=unlabelled, where=where)
    if name.startswith((".", "/", "~")):
        raise ConfigError(f"{where}: no such file or directory")
    return _from_datasets(name, split, local=False, unlabelled=unlabelled, where=where)


def _from_datasets(name: str, split: str, local: bool, unlabelled: bool, where: str) -> list[MCQQuestion]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data=mcq with a dataset name or a save_to_disk directory needs the datasets "
                          "package: pip install 'vrmoe[hf]'") from None
    try:
        if local:
            ds = datasets.load_from_disk(name)
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"{where}: no split {split!r}; its splits are {', '.join(ds)}")
                ds = ds[split]
        else:
            hub_id, subset = KNOWN.get(name, (name, None))
            ds = datasets.load_dataset(hub_id, subset, split=split)
    except ConfigError:
        raise
    except Exception as exc:  # offline, unknown name, missing split (the message lists the splits)
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise ConfigError(f"{where} (split {split}) could not be loaded: {first}") from None
    return questions_from_rows(ds, set(ds.column_names), f"{where} (split {split})", unlabelled)


# ---------------------------------------------------------------------------
# Tensors: prompts, the answer position and the letter tokens
# ---------------------------------------------------------------------------

def letter_tokens(tokenizer: Tokenizer) -> tuple[torch.Tensor, torch.Tensor]:
    """(tokens every answer starts with after ``Answer:``, the four letters' tokens). A letter is
    " A" as one token for most subword tokenizers; for bytes the space is the shared prefix.
    The letters are continuations, so they are encoded without a BOS in front."""
    encoded = [tokenizer.encode(f" {letter}") for letter in LETTERS]
    prefixes = {tuple(ids[:-1].tolist()) for ids in encoded}
    last = torch.stack([ids[-1] for ids in encoded])
    if len(prefixes) != 1 or len(set(last.tolist())) != len(LETTERS):
        raise ConfigError("this tokenizer does not give the answer letters A-D distinct last tokens after a "
                          "shared prefix; the answer-letter format cannot be scored with it")
    return torch.tensor(next(iter(prefixes)), dtype=torch.long), last


@dataclass
class LetterTensors:
    """Prompts as right-padded tokens: prompt n is ``tokens_NL[n, :lengths_N[n]]``."""

    tokens_NL: torch.Tensor
    lengths_N: torch.Tensor
    answers_N: torch.Tensor
    letter_ids_O: torch.Tensor

    def __len__(self) -> int:
        return self.answers_N.shape[0]

    @property
    def tokens_per_item(self) -> int:
        """Model positions one item takes (its prompt, padded)."""
        return self.tokens_NL.shape[1]

    def batch(self, index: torch.Tensor, device: torch.device | str = "cpu") -> "LetterBatch":
        lengths = self.lengths_N[index]
        width = int(lengths.max())
        real = torch.arange(width) < lengths[:, None]
        return LetterBatch(self.tokens_NL[index, :width].to(device), real.to(device), lengths.to(device),
                           self.answers_N[index].to(device), self.letter_ids_O.to(device))


@dataclass
class LetterBatch:
    inputs_NL: torch.Tensor
    token_mask_NL: torch.Tensor  # bool: real (not padding) positions
    lengths_B: torch.Tensor
    answers_B: torch.Tensor
    letter_ids_O: torch.Tensor

    @property
    def n_items(self) -> int:
        return self.answers_B.shape[0]

    def option_scores(self, logits_NLV: torch.Tensor) -> torch.Tensor:
        """(B, 4): the letters' logits at the answer position; their softmax is the prediction."""
        last_BV = logits_NLV[torch.arange(self.n_items, device=logits_NLV.device), self.lengths_B - 1]
        return last_BV.float()[:, self.letter_ids_O]


def encode_questions(questions: list[MCQQuestion], tokenizer: Tokenizer | None, max_len: int,
                     key: str) -> LetterTensors:
    """Prompts that fit ``max_len`` tokens (longer ones are left out), as tensors. A prompt starts
    with the tokenizer's BOS where its checkpoint was trained with one (``encode_prompt``)."""
    tokenizer = tokenizer or ByteTokenizer()
    prefix, letters = letter_tokens(tokenizer)
    encoded, answers = [], []
    for question in questions:
        ids = torch.cat([encode_prompt(tokenizer, question.prompt()).long(), prefix])
        if len(ids) <= max_len:
            encoded.append(ids)
            answers.append(question.answer)
    if not encoded:
        raise ConfigError(f"{key}: no question fits in {max_len} tokens; raise model.seq_len")
    if len(encoded) < len(questions):  # fewer items than asked for: say so, the counts matter for a study
        log_line(f"[yellow]warning:[/] {key}: {len(questions) - len(encoded)} of {len(questions)} prompts are longer "
                 f"than model.seq_len={max_len} tokens and were left out")
    tokens = torch.zeros(len(encoded), max(len(ids) for ids in encoded), dtype=torch.long)
    for n, ids in enumerate(encoded):
        tokens[n, :len(ids)] = ids
    return LetterTensors(tokens, torch.tensor([len(ids) for ids in encoded]), torch.tensor(answers), letters)


def questions_text(questions: list[MCQQuestion]) -> str:
    """The questions as text with their answers (the LM-level view of a multiple-choice dataset)."""
    return "\n\n".join(f"{q.prompt()} {LETTERS[q.answer]}. {q.options[q.answer]}" for q in questions)
