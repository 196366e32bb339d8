"""Multiple-choice datasets (data=mcq): the standard formats from local files, the answer-letter
prompt and its scoring, and a fine-tuning and evaluation run on them (nothing is downloaded)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from vrmoe.config import ConfigError
from vrmoe.data.mcq_datasets import (LETTERS, UNLABELLED, MCQQuestion, encode_questions, letter_tokens,
                                     load_questions, questions_text)
from vrmoe.data.tokenizers import ByteTokenizer

from conftest import TINY, make_config

# A few hand-written items per format, as the datasets publish them.
FORMATS = {
    "openbookqa": {"id": "7-980", "question_stem": "The sun is responsible for",
                   "choices": {"text": ["puppies learning new tricks", "children growing up and getting old",
                                        "flowers wilting in a vase", "plants sprouting, blooming and wilting"],
                               "label": ["A", "B", "C", "D"]}, "answerKey": "D"},
    "arc": {"id": "Mercury_7175875", "question": "An astronomer observes that a planet rotates faster after a "
            "meteorite impact. Which is the most likely effect of this increase in rotation?",
            "choices": {"text": ["Planetary density will decrease.", "Planetary years will become longer.",
                                 "Planetary days will become shorter.", "Planetary gravity will become stronger."],
                        "label": ["A", "B", "C", "D"]}, "answerKey": "C"},
    "sciq": {"question": "What type of organism is commonly used in preparation of foods such as cheese and "
             "yogurt?", "distractor1": "viruses", "distractor2": "protozoa", "distractor3": "gymnosperms",
             "correct_answer": "mesophilic organisms", "support": ""},
    "medmcqa": {"question": "Which vitamin is supplied from only animal source:", "opa": "Vitamin C",
                "opb": "Vitamin B7", "opc": "Vitamin B12", "opd": "Vitamin D", "cop": 2},
    "mmlu": {"question": "Which of the following is a legal contract?", "subject": "professional_law",
             "choices": ["a promise to give a gift", "a sale of goods for a price", "an offer never accepted",
                         "an agreement to commit a crime"], "answer": 1},
}
ANSWERS = {"openbookqa": "plants sprouting, blooming and wilting", "arc": "Planetary days will become shorter.",
           "sciq": "mesophilic organisms", "medmcqa": "Vitamin B12", "mmlu": "a sale of goods for a price"}


def write_jsonl(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("fmt", list(FORMATS))
def test_each_format_reads_to_the_right_answer(tmp_path, fmt):
    [question] = load_questions(str(write_jsonl(tmp_path / "x.jsonl", [FORMATS[fmt]])), "train")
    assert len(question.options) == 4 and question.options[question.answer] == ANSWERS[fmt]
    prompt = question.prompt()
    assert prompt.startswith("Question: ") and prompt.endswith("\nAnswer:")
    assert all(f"\n{letter}. " in prompt for letter in LETTERS)


def test_parquet_save_to_disk_and_split_files(tmp_path):
    datasets = pytest.importorskip("datasets")
    rows = [FORMATS["mmlu"]] * 3
    ds = datasets.Dataset.from_list(rows)
    ds.to_parquet(str(tmp_path / "q.parquet"))
    datasets.DatasetDict({"test": ds}).save_to_disk(str(tmp_path / "saved"))
    (tmp_path / "splits").mkdir()
    write_jsonl(tmp_path / "splits" / "validation.jsonl", rows)
    for source, split in ((tmp_path / "q.parquet", "train"), (tmp_path / "saved", "test"),
                          (tmp_path / "splits", "validation")):
        assert len(load_questions(str(source), split)) == 3


@pytest.mark.parametrize("rows, words", [
    ([{"question": "q", "text": "no options"}], ["columns", "match no multiple-choice format"]),
    ([{**FORMATS["mmlu"], "choices": ["a", "b", "c"]}], ["exactly 4 options"]),
])
def test_a_dataset_without_the_expected_columns_is_one_line(tmp_path, rows, words):
    with pytest.raises(ConfigError) as info:
        load_questions(str(write_jsonl(tmp_path / "bad.jsonl", rows)), "train")
    assert all(w in str(info.value) for w in words) and "\n" not in str(info.value)


def test_a_missing_split_file_or_directory_is_one_line(tmp_path):
    write_jsonl(tmp_path / "train.jsonl", [FORMATS["mmlu"]])
    with pytest.raises(ConfigError, match="no validation.jsonl or validation.parquet"):
        load_questions(str(tmp_path), "validation")
    with pytest.raises(ConfigError, match="no such file or directory"):
        load_questions(str(tmp_path / "nope"), "train")


def test_letter_scores_are_the_letter_logits_at_the_answer_position():
    tokenizer = ByteTokenizer()
    prefix, letters = letter_tokens(tokenizer)
    assert prefix.tolist() == [ord(" ")] and letters.tolist() == [ord(c) for c in LETTERS]
    questions = [MCQQuestion("Two plus two?", ("1", "4", "3", "5"), 1), MCQQuestion("Sky?", ("red", "g", "b", "blue"), 3)]
    items = encode_questions(questions, tokenizer, 256, "test")
    batch = items.batch(torch.arange(2))
    assert batch.inputs_NL[0, batch.lengths_B[0] - 1] == ord(" ")  # the answer position follows "Answer:"
    logits = torch.randn(2, batch.inputs_NL.shape[1], 256)
    scores = batch.option_scores(logits)
    for n in range(2):
        torch.testing.assert_close(scores[n], logits[n, batch.lengths_B[n] - 1, letters])


def make_dataset(root: Path, n: int, offset: int = 0) -> Path:
    """A small arithmetic dataset in MMLU's format, split into train and validation files."""
    root.mkdir(parents=True, exist_ok=True)
    for split, start in (("train", 0), ("validation", n)):
        rows = []
        for i in range(start, start + n):
            a, b = i % 7 + offset, i % 5 + 1
            options = [str(a + b + d) for d in (0, 1, 2, 3)]
            rows.append({"question": f"What is {a} plus {b}?", "choices": options, "answer": 0})
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


def test_native_model_fine_tunes_and_evaluates_on_a_dataset_with_ood_datasets(tmp_path, capsys):
    from vrmoe.eval.run import evaluate_run
    from vrmoe.train import train

    data = make_dataset(tmp_path / "arith", 24)
    # Two test items without an answer: in-distribution sequences for the OOD scores, not calibration ones.
    rows = [json.loads(line) for line in (data / "validation.jsonl").read_text().splitlines()]
    rows[0]["answer"], rows[10]["answer"] = None, -1
    write_jsonl(data / "validation.jsonl", rows)
    other, medmcqa = make_dataset(tmp_path / "other", 8, offset=40), make_medmcqa(tmp_path / "medmcqa")
    app = make_config(*TINY, "model.seq_len=96", "data=mcq", f"data.mcq_name={data}", "task=mcq",
                      "train.max_steps=3", "S=2", "router=variational", "eval.windows=2",
                      "eval.stability_windows=1", "eval.gammas=[0.01]",
                      f"eval.ood_mcq=[{other},{medmcqa}:test,{medmcqa}]")
    summary = train(app, tmp_path / "run")
    assert summary["status"] == "completed" and 0 <= summary["final_val_loss"]
    capsys.readouterr()
    result = evaluate_run(tmp_path / "run", app)
    # eval.mcq_items=null: every test item; the two without an answer are left out of calibration.
    report = result["calibration"]["mcq"]
    assert report["accuracy"] >= 0 and sum(report["reliability"]["bin_count"]) == 22
    assert len(result["calibration"]["predictions"]["mcq"]["labels"]) == 22
    assert len(result["ood"]["scores"]["in"]["predictive_entropy"]) == 24
    # Sets are named by their dataset; a second split of the same one by both.
    assert set(result["ood"]) == {"other", "medmcqa", "medmcqa:validation", "scores", "predictions"}
    for name in ("other", "medmcqa", "medmcqa:validation"):
        assert {"predictive_entropy", "mutual_information", "gate_entropy", "logit_variance"} <= \
            set(result["ood"][name]["auroc"])
    assert result["items"] == {"prompt_len": 96, "sets": {
        "in": {"items": 24, "unlabelled": 2, "too_long": 0},
        "calibration": {"items": 5, "unlabelled": 0, "too_long": 0},
        "other": {"items": 8, "unlabelled": 0, "too_long": 0},
        "medmcqa": {"items": 6, "unlabelled": 6, "too_long": 0},
        "medmcqa:validation": {"items": 6, "unlabelled": 0, "too_long": 0}}}
    assert ("multiple-choice items: in 24 (2 without an answer, OOD scores only), calibration 5, other 8, "
            "medmcqa 6 (6 without an answer, OOD scores only), medmcqa:validation 6") in capsys.readouterr().err
    assert "What is" in questions_text(load_questions(str(data), "train"))
    with pytest.raises(ConfigError, match="data.mcq_eval_split=validation: none of the test items scored has an"):
        evaluate_run(tmp_path / "run", make_config(*TINY, "model.seq_len=96", "data=mcq", f"data.mcq_name={data}",
                                                   "task=mcq", "S=2", "router=variational", "eval.mcq_items=1"))


def test_a_dataset_has_three_disjoint_splits(tmp_path):
    from vrmoe.config import DataConfig
    from vrmoe.data.corpora import mcq_splits

    data = make_dataset(tmp_path / "arith", 20)
    write_jsonl(data / "test.jsonl", [{"question": "What is 1 plus 1?", "choices": ["2", "3", "4", "5"], "answer": 0}])
    # No calibration split named: the train split's last fifth, which fine-tuning never sees.
    splits = mcq_splits(DataConfig(name="mcq", mcq_name=str(data)))
    train = load_questions(str(data), "train")
    assert splits["finetune"] == train[:16] and splits["calibration"] == train[16:]
    assert splits["test"] == load_questions(str(data), "validation")
    named = mcq_splits(DataConfig(name="mcq", mcq_name=str(data), mcq_calibration_split="validation",
                                  mcq_eval_split="test"))
    assert named["finetune"] == train and named["calibration"] == splits["test"] and len(named["test"]) == 1
    with pytest.raises(ConfigError, match="calibration and test items must be disjoint"):
        make_config(*TINY, "data=mcq", f"data.mcq_name={data}", "data.mcq_calibration_split=validation")
    with pytest.raises(ConfigError, match="task.format=cloze needs a text corpus"):
        make_config(*TINY, "data=mcq", f"data.mcq_name={data}", "task=mcq", "task.format=cloze")


def test_prompts_longer_than_the_model_are_left_out_and_said(capsys):
    short = MCQQuestion("Two?", ("a", "b", "c", "d"), 1)
    long = MCQQuestion("A question far too long for a sixty-four byte context " * 3, ("a", "b", "c", "d"), 0)
    tensors = encode_questions([short, long, short], ByteTokenizer(), 64, "task.fit_split=finetune")
    assert len(tensors) == 2 and tensors.answers_N.tolist() == [1, 1]
    assert ("task.fit_split=finetune: 1 of 3 prompts are longer than model.seq_len=64 tokens and were left out"
            in " ".join(capsys.readouterr().err.split()))


# MedMCQA as published: its test split has no answers ("cop" -1 on the hub; absent or null in exports).
MEDMCQA_COLUMNS = {"id": "", "question": "", "opa": "", "opb": "", "opc": "", "opd": "", "cop": 0,
                   "choice_type": "single", "exp": "", "subject_name": "Anatomy", "topic_name": ""}


def make_medmcqa(root: Path, n: int = 6) -> Path:
    """A directory of train/validation/test.jsonl in MedMCQA's columns; the test split unlabelled
    in each of the ways an export leaves the answer out."""
    root.mkdir(parents=True, exist_ok=True)
    organs = ["heart", "liver", "kidney", "lung", "spleen", "brain", "skin", "bone"]
    for split in ("train", "validation", "test"):
        rows = []
        for i in range(n):
            organ = organs[i % len(organs)]
            rows.append({**MEDMCQA_COLUMNS, "id": f"{split}-{i}", "question": f"Which nerve supplies the {organ}?",
                         "opa": "Vagus", "opb": "Phrenic", "opc": "Median", "opd": "Ulnar", "cop": i % 4})
        if split == "test":
            for i, row in enumerate(rows):
                if i % 3 == 0:
                    row["cop"] = -1
                elif i % 3 == 1:
                    row["cop"] = None
                else:
                    del row["cop"]
        write_jsonl(root / f"{split}.jsonl", rows)
    return root


# Fact patterns of MMLU professional_law's kind, from a line to a paragraph.
LAW_FACTS = ["A buyer sued.", "A tenant stopped paying rent after the landlord cut the heat.",
             "A driver ran a red light and struck a cyclist.",
             "A seller promised in writing to deliver goods by March; the buyer, relying on the promise, "
             "turned down another offer, and the seller delivered in May.",
             "An employee signed a covenant not to compete for five years anywhere in the country; after she "
             "was fired without cause she opened a shop across the street from her former employer, who "
             "sued to enforce the covenant and for damages for the customers she took with her.",
             "A homeowner hired a contractor to build a deck. The contract required work to start in June and "
             "finish in July. The contractor started in August, used cheaper lumber than specified, and left "
             "the job unfinished when the homeowner withheld the second payment; each now sues the other."]


def make_law_split(path: Path) -> list[MCQQuestion]:
    """Law-like items in MMLU's format, prompts from a few dozen to a couple of hundred tokens, written
    to ``path``; returns them as read."""
    options = ["Guilty", "Liable", "Neither", "Both"]
    write_jsonl(path, [{"question": facts, "subject": "professional_law", "choices": options, "answer": i % 4}
                       for i, facts in enumerate(LAW_FACTS * 2)])
    return load_questions(str(path), "validation")


def test_items_without_answers_are_kept_only_where_asked_for(tmp_path, capsys):
    data = make_medmcqa(tmp_path / "medmcqa")
    assert len(load_questions(str(data), "validation")) == 6
    kept = load_questions(str(data), "test", unlabelled=True)
    assert [q.answer for q in kept] == [UNLABELLED] * 6 and not any(q.labelled for q in kept)
    arc = [{**FORMATS["arc"], "answerKey": ""}, FORMATS["arc"], {**FORMATS["arc"], "answerKey": "E"}]
    path = write_jsonl(tmp_path / "arc.jsonl", arc)
    assert [q.answer for q in load_questions(str(path), "test", unlabelled=True)] == [UNLABELLED, 2]
    capsys.readouterr()
    assert [q.answer for q in load_questions(str(path), "test")] == [2]  # an unknown key is no item at all
    assert "1 of 2 items have no answer and were left out" in " ".join(capsys.readouterr().err.split())
    # A split to fine-tune, calibrate or test on needs answers: one line says so.
    with pytest.raises(ConfigError) as info:
        load_questions(str(data), "test")
    assert "none of its 6 items has an answer" in str(info.value) and "\n" not in str(info.value)


def test_an_unlabelled_test_split_cannot_be_the_in_distribution_one(tmp_path):
    from vrmoe.config import DataConfig
    from vrmoe.data.corpora import mcq_splits

    data = make_medmcqa(tmp_path / "medmcqa")
    with pytest.raises(ConfigError, match="none of its 6 items has an answer.*data.mcq_eval_split=validation"):
        mcq_splits(DataConfig(name="mcq", mcq_name=str(data), mcq_eval_split="test"))


def test_ood_entries_name_their_split(tmp_path):
    from vrmoe.data.mcq_datasets import split_entry

    assert split_entry("medmcqa:test", "validation") == ("medmcqa", "test", True)
    assert split_entry("allenai/ai2_arc:test", "validation") == ("allenai/ai2_arc", "test", True)
    assert split_entry("arc_easy", "validation") == ("arc_easy", "validation", False)
    assert split_entry("data/sets:v2/", "validation") == ("data/sets:v2/", "validation", False)  # not a split
    odd = tmp_path / "a:b"
    odd.mkdir()
    assert split_entry(str(odd), "test") == (str(odd), "test", False)  # an existing path is taken whole


def test_an_unknown_split_is_one_line_naming_the_entry_and_the_splits(tmp_path):
    from vrmoe.eval.context import check_eval_inputs

    data, medmcqa = make_dataset(tmp_path / "arith", 8), make_medmcqa(tmp_path / "medmcqa")
    app = make_config(*TINY, "data=mcq", f"data.mcq_name={data}", f"eval.ood_mcq=[{medmcqa}:tset]")
    with pytest.raises(ConfigError) as info:
        check_eval_inputs(app)
    assert str(info.value) == (f"eval.ood_mcq: {medmcqa}:tset: no split 'tset' (no tset.jsonl or tset.parquet "
                               "there); its splits are test, train, validation")
    datasets = pytest.importorskip("datasets")
    saved = tmp_path / "saved"
    rows = [{k: v for k, v in json.loads(line).items() if k != "cop"}
            for line in (medmcqa / "test.jsonl").read_text().splitlines()]
    datasets.DatasetDict({"test": datasets.Dataset.from_list(rows)}).save_to_disk(str(saved))
    with pytest.raises(ConfigError, match=f"^eval.ood_mcq: {saved}: no split 'validation'; its splits are test$"):
        check_eval_inputs(make_config(*TINY, "data=mcq", f"data.mcq_name={data}", f"eval.ood_mcq=[{saved}]"))
    assert [q.answer for q in load_questions(str(saved), "test", unlabelled=True)] == [UNLABELLED] * 6


def test_item_counts_of_zero_or_less_are_refused_and_null_is_every_item():
    for key in ("eval.mcq_items", "eval.calibration_items"):
        with pytest.raises(ConfigError, match=f"{key}=0 must be a positive integer"):
            make_config(*TINY, f"{key}=0")
        assert getattr(make_config(*TINY).eval, key.split(".")[1]) is None
        assert getattr(make_config(*TINY, f"{key}=5").eval, key.split(".")[1]) == 5
