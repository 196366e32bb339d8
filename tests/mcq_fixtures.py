"""The paper's multiple-choice datasets written locally in their real formats (nothing is downloaded).

Each is a directory of ``<split>.jsonl`` files with the columns the hub's copy has: OpenBookQA
(``question_stem``, ``choices`` {text, label}, ``answerKey``) with its real split sizes (4,957 /
500 / 500; the OOD sets are smaller than the real ones, to keep the tests short); ARC-Easy and ARC-Challenge (``question``, ``choices``, ``answerKey``); MedMCQA
(``opa``..``opd``, ``cop``) whose test split has no answers (``cop`` -1), as published; MMLU's
professional_law (``question``, ``choices``, ``answer``) with long prompts. Questions are random
words with the answer among random options: what is tested is the path, not the knowledge.
"""

from __future__ import annotations

import json
import random
from pathlib import Path

WORDS = ("the a of to and in is that for it as with was on be by this are from or have an not which "
         "one all were when there can more if no out so what up time into has two may only other new "
         "some could these than first any like over such our water light plant energy animal heat sun "
         "earth rock moon cell food force sound metal wind rain soil seed leaf tree river ocean star "
         "court contract law party claim damages evidence statute patient dose drug fever blood").split()
SIZES = {"openbookqa": {"train": 4957, "validation": 500, "test": 500},
         "arc_easy": {"test": 100}, "arc_challenge": {"test": 100},
         "medmcqa": {"validation": 50, "test": 100}, "mmlu_law": {"test": 45}}


def _words(rng: random.Random, n: int) -> str:
    return " ".join(rng.choice(WORDS) for _ in range(n))


def _row(name: str, split: str, n: int, rng: random.Random) -> dict:
    long = name == "mmlu_law"
    question = _words(rng, rng.randint(180, 260) if long and n % 3 == 0 else rng.randint(8, 16))
    options = [_words(rng, rng.randint(1, 4)) for _ in range(4)]
    answer = rng.randrange(4)
    if name in ("openbookqa", "arc_easy", "arc_challenge"):
        key = "question_stem" if name == "openbookqa" else "question"
        return {"id": f"{name}-{split}-{n}", key: question,
                "choices": {"text": options, "label": ["A", "B", "C", "D"]}, "answerKey": "ABCD"[answer]}
    if name == "medmcqa":  # the published test split carries no answers
        return {"id": f"med-{split}-{n}", "question": question, **dict(zip(("opa", "opb", "opc", "opd"), options)),
                "cop": -1 if split == "test" else answer, "choice_type": "single", "exp": None,
                "subject_name": "Medicine", "topic_name": None}
    return {"question": question, "subject": "professional_law", "choices": options, "answer": answer}


def write_paper_datasets(root: Path, seed: int = 0) -> dict[str, Path]:
    """Every dataset of the paper's protocol under ``root``: short name -> its directory."""
    rng = random.Random(seed)
    paths = {}
    for name, splits in SIZES.items():
        directory = root / name
        directory.mkdir(parents=True, exist_ok=True)
        for split, size in splits.items():
            rows = [_row(name, split, n, rng) for n in range(size)]
            (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
        paths[name] = directory
    return paths
