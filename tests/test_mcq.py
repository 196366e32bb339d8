"""The multiple-choice task: deterministic, well-formed items; scores; the fine-tuning task."""

from __future__ import annotations

import json
import math
import re
from collections import Counter

import pytest
import torch

from vrmoe.config import ConfigError
from vrmoe.data.mcq import (BLANK, N_OPTIONS, WORD, build_items, encode_items, make_batch,
                            option_scores, sentences, shuffle_words_within_sentences)
from vrmoe.tasks.mcq import MCQTask
from vrmoe.data import load_corpus
from vrmoe.data.tokenizers import ByteTokenizer
from vrmoe.model import build_model
from vrmoe.train import train

from conftest import TINY, make_config

PROSE = " ".join(
    f"The {a} parser reads every {b} value from the {c} stream and returns a new {d} object. "
    f"Each {b} handler calls the {a} method before the {c} buffer is closed.\n\n"
    for a, b, c, d in zip(["simple", "strict", "lazy", "quick", "plain", "small"] * 4,
                          ["string", "number", "header", "record", "option", "column"] * 4,
                          ["input", "output", "socket", "binary", "stdin", "stdout"] * 4,
                          ["list", "dict", "tuple", "frame", "table", "block"] * 4))


@pytest.fixture(scope="module")
def docs_val_text(corpus_cache) -> str:
    cfg = make_config("model=tiny")
    return bytes(load_corpus(cfg.data).val.numpy().tobytes()).decode("utf-8", errors="replace")


def test_items_are_deterministic_and_depend_on_the_seed(docs_val_text):
    a = build_items(docs_val_text, 50, 64)
    assert a == build_items(docs_val_text, 50, 64)
    assert a != build_items(docs_val_text, 50, 64, seed=1)
    assert len(a) == 50


def test_items_are_well_formed(docs_val_text):
    items = build_items(docs_val_text, 200, 64)
    source = set(sentences(docs_val_text))
    counts = Counter(WORD.findall(docs_val_text))
    answers = Counter(item.answer for item in items)
    for item in items:
        options = item.options
        answer = options[item.answer]
        assert len(options) == N_OPTIONS and len({o.lower() for o in options}) == N_OPTIONS  # 4 distinct
        assert all(WORD.fullmatch(o) and counts[o] > 0 for o in options)  # real words of this text
        assert all(abs(len(o) - len(answer)) <= 1 for o in options)  # similar length
        # The blank really removes the answer: the question holds the blank where the word was,
        # and filling it back gives a piece of one of the text's sentences.
        assert item.question == item.prefix + BLANK + item.suffix and item.prefix
        assert not re.search(r"[A-Za-z0-9_]$", item.prefix) and not re.match(r"[A-Za-z0-9_]", item.suffix)
        assert any(item.filled(item.answer) in s for s in source)
        assert all(len(item.filled(o).encode()) <= 64 for o in range(N_OPTIONS))
    # The right answer's position is spread over the four slots, not always the same one.
    assert len(answers) == N_OPTIONS and min(answers.values()) > len(items) / 10


def test_distractors_have_similar_frequency(docs_val_text):
    counts = Counter(WORD.findall(docs_val_text))
    items = build_items(docs_val_text, 200, 64)
    gaps = [abs(math.log(counts[o]) - math.log(counts[item.options[item.answer]]))
            for item in items for o in item.options]
    assert sorted(gaps)[int(0.9 * len(gaps))] < math.log(8)  # 90% within a factor of 8 in frequency


def test_shuffled_near_domain_keeps_words_and_layout_but_not_order():
    shuffled = shuffle_words_within_sentences(PROSE)
    assert shuffled == shuffle_words_within_sentences(PROSE)
    assert Counter(PROSE.split()) == Counter(shuffled.split())
    assert re.findall(r"\s+", PROSE) == re.findall(r"\s+", shuffled)  # same whitespace skeleton
    assert shuffled != PROSE
    # Words stay inside their own sentence: each paragraph keeps its own multiset of words.
    for before, after in zip(PROSE.split("\n\n"), shuffled.split("\n\n")):
        assert Counter(before.split()) == Counter(after.split())


@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_text_without_items_is_a_config_error(fmt):
    from vrmoe.data.mcq import text_items

    app = make_config(*TINY, "task=mcq", f"task.format={fmt}", "model.seq_len=128")
    with pytest.raises(ConfigError, match=r"^eval.ood_text: x.txt: the text yields no multiple-choice item"):
        text_items(app, "too short", 10, "eval.ood_text: x.txt", ByteTokenizer())


def test_option_scores_give_the_softmax_over_full_sentence_likelihoods():
    torch.manual_seed(0)
    model = build_model(make_config(*TINY)).eval()
    items = build_items(PROSE, 6, 32)
    data = encode_items(items)
    batch = make_batch(data, torch.arange(len(items)))
    with torch.no_grad():
        scores = option_scores(model(batch.inputs_NL).logits_BLV, batch)
        full = torch.zeros(len(items), N_OPTIONS)
        for n, item in enumerate(items):
            for o in range(N_OPTIONS):
                ids = torch.tensor(list(item.filled(o).encode()))[None]
                logp = torch.log_softmax(model(ids[:, :-1]).logits_BLV.float(), -1)
                full[n, o] = logp[0].gather(-1, ids[0, 1:, None]).sum()
    assert torch.allclose(scores.softmax(-1), full.softmax(-1), atol=1e-5)
    assert torch.equal(batch.answers_B, torch.tensor([item.answer for item in items]))


def test_mcq_task_batches_are_a_function_of_seed_and_step(tmp_path, corpus_cache):
    app = make_config(*TINY, "task=mcq", "task.train_items=20", "task.val_items=8")
    corpus = load_corpus(app.data, min_tokens=app.model.seq_len + 2)
    a, b = MCQTask(app, corpus), MCQTask(app, corpus)
    for step in (0, 3, 7):  # 4 items a step over 20 items: step 7 crosses into the second epoch
        assert torch.equal(a.train_batch(step, "cpu").inputs_NL, b.train_batch(step, "cpu").inputs_NL)
    epoch = torch.cat([a.train_batch(s, "cpu").answers_B for s in range(5)])
    assert len(epoch) == 20


def test_fine_tuning_on_mcq_from_a_pretrained_run_overfits_its_items(tmp_path, corpus_cache):
    base = tmp_path / "base"
    train(make_config(*TINY, "train.max_steps=2"), base)
    ft = tmp_path / "ft"
    summary = train(make_config(*TINY, "task=mcq", "task.train_items=8", "task.val_items=8",
                                f"train.init_from={base}", "train.batch_size=8", "train.max_steps=40",
                                "train.lr=3e-3", "train.eval_every=40", "train.log_every=5"), ft)
    rows = [json.loads(line) for line in (ft / "metrics.jsonl").read_text().splitlines()]
    assert rows[-1]["train/loss"] < 0.5 * rows[0]["train/loss"]  # 8 items, 40 epochs: memorised
    assert 0.0 <= rows[-1]["val/accuracy"] <= 1.0 and math.isfinite(summary["final_val_loss"])
    assert summary["config"]["task"]["name"] == "mcq"


# ---------------------------------------------------------------------------
# Three disjoint splits and the letter format
# ---------------------------------------------------------------------------

def _questions(items_tensors, tokenizer) -> set[str]:
    """The prompts (letter format) or the option-0 sentences (cloze) of a set, as text."""
    if hasattr(items_tensors, "tokens_NL"):
        rows = [items_tensors.tokens_NL[n, :items_tensors.lengths_N[n]] for n in range(len(items_tensors))]
    else:
        rows = [items_tensors.tokens_NOL[n, 0, :items_tensors.lengths_NO[n, 0]] for n in range(len(items_tensors))]
    return {tokenizer.decode(row) for row in rows}


def test_halves_cut_at_a_break_and_share_no_sentence(docs_val_text):
    from vrmoe.data.mcq import halves

    first, second = halves(docs_val_text)
    assert first + second == docs_val_text
    assert abs(len(first) - len(second)) < 0.2 * len(docs_val_text)
    assert not set(sentences(first)) & set(sentences(second))


@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_the_three_splits_are_disjoint_and_validation_never_sees_fitted_or_test_items(fmt, corpus_cache):
    from vrmoe.data.mcq import split_items

    app = make_config(*TINY, "task=mcq", f"task.format={fmt}", "model.seq_len=128", "task.train_items=40",
                      "task.val_items=16")
    corpus = load_corpus(app.data, tokenizer=None)
    sets = {split: _questions(split_items(app, corpus, split, 60, split), corpus.tokenizer)
            for split in ("finetune", "calibration", "test")}
    assert all(len(s) >= 50 for s in sets.values())
    assert not sets["finetune"] & sets["calibration"] and not sets["finetune"] & sets["test"]
    assert not sets["calibration"] & sets["test"]

    post_hoc = MCQTask(make_config(*TINY, "task=mcq", f"task.format={fmt}", "model.seq_len=128",
                                   "task.fit_split=calibration", "task.train_items=40", "task.val_items=16"), corpus)
    trained, validated = (_questions(s, corpus.tokenizer) for s in (post_hoc.train_set, post_hoc.val_set))
    assert trained <= sets["calibration"] and not trained & validated and not validated & sets["test"]
    fine_tune = MCQTask(app, corpus)
    assert _questions(fine_tune.train_set, corpus.tokenizer) <= sets["finetune"]
    assert _questions(fine_tune.val_set, corpus.tokenizer) <= sets["calibration"]


@pytest.mark.parametrize("fmt", ["cloze", "letter"])
def test_temperature_scaling_fits_on_calibration_items_the_run_did_not_train_on(fmt, corpus_cache):
    """Post-hoc heads fit on the calibration split's first items: temperature scaling after them
    must not be fit on those items too (a router + TS would be scaled on what its heads learnt)."""
    from vrmoe.data.mcq import split_items
    from vrmoe.eval.context import temperature_fit_set

    common = (*TINY, "task=mcq", f"task.format={fmt}", "model.seq_len=128", "eval.calibration_items=30")
    fine_tune = make_config(*common, "task.train_items=40", "task.val_items=16")
    post_hoc = make_config(*common, "task.fit_split=calibration", "task.train_items=40", "task.val_items=16")
    corpus = load_corpus(fine_tune.data, tokenizer=None)
    calibration = [_questions(split_items(fine_tune, corpus, "calibration", n, "calibration", skip=skip),
                              corpus.tokenizer) for n, skip in ((40, 0), (30, 0), (30, 40))]

    base_fit, base_counts = temperature_fit_set(fine_tune, corpus)
    assert _questions(base_fit, corpus.tokenizer) == calibration[1] and "skipped_trained_on" not in base_counts
    heads_fit, heads_counts = temperature_fit_set(post_hoc, corpus)
    trained = _questions(MCQTask(post_hoc, corpus).train_set, corpus.tokenizer)
    assert trained == calibration[0] and heads_counts["skipped_trained_on"] == 40
    assert _questions(heads_fit, corpus.tokenizer) == calibration[2] and not trained & calibration[2]


def test_the_letter_format_asks_the_cloze_item_with_lettered_options(corpus_cache):
    app = make_config(*TINY, "task=mcq", "task.format=letter", "model.seq_len=128", "task.train_items=8",
                      "task.val_items=4")
    corpus = load_corpus(app.data)
    task = MCQTask(app, corpus)
    prompt = corpus.tokenizer.decode(task.train_set.tokens_NL[0, :task.train_set.lengths_N[0]])
    assert prompt.startswith("Question: ") and BLANK in prompt and "\nA. " in prompt and prompt.endswith("Answer: ")
    assert task.tokens_per_step == app.train.batch_size * task.train_set.tokens_NL.shape[1]
    batch = task.train_batch(0, torch.device("cpu"))
    model = build_model(app)
    out = task.forward(model, batch)
    assert batch.option_scores(out.logits_BLV).shape == (app.train.batch_size, N_OPTIONS)
    assert math.isfinite(float(out.loss.detach()))


@pytest.mark.parametrize("overrides, message", [
    (["task.format=essay"], "task.format='essay' must be auto, cloze or letter"),
    (["task.fit_split=test"], "task.fit_split='test' must be finetune or calibration"),
    (["eval.predictive=mode"], "eval.predictive='mode' must be routing_mean, bma or both"),
    (["eval.calibration_items=0"], "eval.calibration_items=0 must be a positive integer"),
])
def test_split_and_format_settings_are_checked(overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)):
        make_config(*TINY, "task=mcq", *overrides)


def _write_split(directory, split: str, n: int) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    rows = [{"question": f"question {i}", "choices": {"text": ["w", "x", "y", "z"], "label": list("ABCD")},
             "answerKey": "ABCD"[i % 4]} for i in range(n)]
    (directory / f"{split}.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))


@pytest.fixture(scope="module")
def obqa_sized(tmp_path_factory):
    """A dataset with OpenBookQA's calibration and test split sizes (and a smaller train split)."""
    root = tmp_path_factory.mktemp("obqa")
    for split, n in (("train", 300), ("validation", 500), ("test", 500)):
        _write_split(root, split, n)
    return root


def _mcq(obqa_sized, *overrides):
    app = make_config(*TINY, "model.seq_len=128", "task=mcq", "data=mcq", f"data.mcq_name={obqa_sized}",
                      "data.mcq_calibration_split=validation", "data.mcq_eval_split=test", *overrides)
    return MCQTask(app, load_corpus(app.data))


def test_a_datasets_splits_are_used_whole_by_default(obqa_sized):
    fine_tune = _mcq(obqa_sized)
    assert (len(fine_tune.train_set), len(fine_tune.val_set)) == (300, 256)
    # Post hoc on the 500-question calibration split: its last fifth validates, the rest is fit on.
    posthoc = _mcq(obqa_sized, "task.fit_split=calibration")
    assert (len(posthoc.train_set), len(posthoc.val_set)) == (400, 100)
    assert len(_mcq(obqa_sized, "task.fit_split=calibration", "task.val_items=50").train_set) == 450


@pytest.mark.parametrize("overrides, message", [
    (["task.train_items=301"], "task.train_items=301: the train split has 300 questions; give at most 300"),
    (["task.fit_split=calibration", "task.val_items=500"],
     "task.val_items=500: the calibration split has 500 questions, too few to hold that many out"),
    (["task.fit_split=calibration", "task.train_items=401"],
     "task.train_items=401: the calibration split has 500 questions and task.val_items=100 of them validate; "
     "give at most 400"),
])
def test_item_counts_a_split_cannot_hold_are_one_line(obqa_sized, overrides, message):
    with pytest.raises(ConfigError, match=re.escape(message)) as info:
        _mcq(obqa_sized, *overrides)
    assert "\n" not in str(info.value)
