"""Corpora, tokenizer, splits and batches."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from vrmoe.config import ConfigError, DataConfig
from vrmoe.data import ByteTokenizer, eval_batches, load_corpus, train_batch
from vrmoe.data.corpora import hf_documents, looks_binary, split_documents, text_documents


def test_tokenizer_round_trips_unicode():
    tok = ByteTokenizer()
    text = "naïve café — ∑ routing"
    ids = tok.encode(text)
    assert ids.max() < tok.vocab_size and tok.decode(ids) == text


def test_builtin_prose_corpus_is_english_docs_and_cached(corpus_cache):
    corpus = load_corpus(DataConfig(name="stdlib_docs"))
    assert len(corpus.train) > 1_000_000 and len(corpus.val) > 20_000
    text = ByteTokenizer().decode(corpus.train[:20000])
    assert " the " in text and "Return" in text
    assert list(corpus_cache.glob("stdlib_docs-*.npy"))
    again = load_corpus(DataConfig(name="stdlib_docs"))
    assert torch.equal(again.train, corpus.train)  # the cached copy is the same corpus
    assert 2.5 < corpus.unigram_entropy() < 4.0  # bytes of English: about 3.3 nats


def test_code_corpus_has_no_docstrings_or_comments():
    corpus = load_corpus(DataConfig(name="python_source"))
    text = ByteTokenizer().decode(corpus.train[:200_000])
    assert "def " in text and "return" in text
    assert "\n#" not in text and '"""' not in text


def test_split_is_deterministic_and_disjoint():
    docs = [(f"doc{i}", f"text number {i} " * 5) for i in range(200)]
    train1, val1 = split_documents(docs, 0.1)
    train2, val2 = split_documents(docs, 0.1)
    assert (train1, val1) == (train2, val2)
    val_docs = set(val1.decode().split("\n\n"))
    assert val_docs and not val_docs & set(train1.decode().split("\n\n"))


def test_text_loader_reads_files_and_dirs(tmp_path):
    (tmp_path / "a.txt").write_text("hello world " * 100)
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.md").write_text("more text " * 100)
    assert len(text_documents(str(tmp_path))) == 2
    corpus = load_corpus(DataConfig(name="text", path=str(tmp_path)), min_tokens=10)
    assert len(corpus.train) + len(corpus.val) > 1500


def test_text_loader_errors_are_one_line(tmp_path):
    for path, word in ((tmp_path / "missing.txt", "does not exist"), (tmp_path, "no text")):
        try:
            text_documents(str(path))
        except ConfigError as exc:
            assert word in str(exc) and "\n" not in str(exc)
        else:
            raise AssertionError("expected ConfigError")


def test_hf_loader_reads_a_local_save_to_disk_dataset(tmp_path):
    import datasets

    ds = datasets.Dataset.from_dict({"text": [f"sentence {i} about experts." for i in range(50)], "id": list(range(50))})
    ds.save_to_disk(str(tmp_path / "ds"))
    docs = hf_documents(str(tmp_path / "ds"), "train", "text")
    assert len(docs) == 50 and docs[3][1] == "sentence 3 about experts."
    try:
        hf_documents(str(tmp_path / "ds"), "train", "body")
    except ConfigError as exc:
        assert "hf_text_field" in str(exc) and "text" in str(exc)
    else:
        raise AssertionError("expected ConfigError")


def test_batches_are_shifted_and_reproducible():
    data = torch.arange(1000) % 256
    x, y = train_batch(data.to(torch.uint8), 4, 16, seed=1, step=7)
    x2, _ = train_batch(data.to(torch.uint8), 4, 16, seed=1, step=7)
    x3, _ = train_batch(data.to(torch.uint8), 4, 16, seed=1, step=8)
    assert torch.equal(x, x2) and not torch.equal(x, x3)
    assert torch.equal(x[:, 1:], y[:, :-1])
    windows = list(eval_batches(data.to(torch.uint8), 4, 16, 2))
    assert len(windows) == 2 and all(w[0].shape == (4, 16) for w in windows)


def test_binary_data_is_refused_not_trained_on_as_replacement_characters(tmp_path):
    blob = bytes(range(256)) * 40  # NUL bytes and invalid UTF-8
    (tmp_path / "model.bin").write_bytes(blob)
    with pytest.raises(ConfigError, match="looks binary") as info:
        text_documents(str(tmp_path / "model.bin"))
    assert "\n" not in str(info.value)
    # In a directory a binary file (no suffix, like an executable) is skipped and the text kept.
    (tmp_path / "corpus").mkdir()
    (tmp_path / "corpus" / "program").write_bytes(blob)
    (tmp_path / "corpus" / "notes.txt").write_text("café naïve résumé " * 50, encoding="utf-8")
    assert [Path(name).name for name, _ in text_documents(str(tmp_path / "corpus"))] == ["notes.txt"]
    (tmp_path / "corpus" / "notes.txt").unlink()
    with pytest.raises(ConfigError, match=r"1 binary file\(s\) skipped"):
        text_documents(str(tmp_path / "corpus"))


def test_latin1_text_with_a_few_undecodable_bytes_is_still_text():
    assert not looks_binary("a line of plain text with one café in it\n".encode("latin-1") * 100)
    assert not looks_binary(("é" * 5000).encode("utf-8")[:8191])  # a character cut at the sample end
    assert looks_binary(bytes(range(128, 256)) * 64)


# ---------------------------------------------------------------------------
# Subword tokens (data.tokenizer=bpe) and the third-party docstrings (near OOD)
# ---------------------------------------------------------------------------

def _bpe_text() -> str:
    words = ["routing", "experts", "returns", "the", "value", "calibrated", "sample", "token", "layer", "mixture"]
    return "\n\n".join(" ".join(words[(i * 7 + j * 3) % len(words)] for j in range(12)) + "." for i in range(300))


def test_bpe_is_deterministic_round_trips_and_is_cached(tmp_path):
    from vrmoe.data.mcq_datasets import letter_tokens
    from vrmoe.data.tokenizers import BPETokenizer

    text = _bpe_text() + "\n\nA B C D. An answer: A, B, C or D."
    first, second = BPETokenizer.train(text, 300), BPETokenizer.train(text, 300)
    assert first.vocab_size == second.vocab_size <= 300
    sample = "routing experts naïve — ∑ unseen text\n\n  indented"
    assert torch.equal(first.encode(sample), second.encode(sample))  # the same merges, trained twice
    assert first.decode(first.encode(sample)) == sample  # every text encodes (the 256 bytes are tokens)
    assert len(first.encode("routing experts")) < len("routing experts")  # merges shorten it
    cache = tmp_path / "bpe.json"
    trained = BPETokenizer.train(text, 300, cache)
    assert cache.is_file() and torch.equal(BPETokenizer.train("other text", 300, cache).encode(sample),
                                           trained.encode(sample))  # read back, not trained again
    letter_tokens(first)  # the answer letters stay distinct tokens: the letter format is scorable


def test_bpe_corpus_is_used_by_every_consumer(tmp_path):
    from vrmoe.data.mcq import build_items, encode_items
    from vrmoe.data.tokenizers import BPETokenizer

    (tmp_path / "a.txt").write_text(_bpe_text())
    cfg = DataConfig(name="text", path=str(tmp_path / "a.txt"), tokenizer="bpe", vocab_size=300,
                     cache_dir=str(tmp_path / "cache"))
    corpus = load_corpus(cfg, min_tokens=10)
    assert isinstance(corpus.tokenizer, BPETokenizer) and corpus.train.dtype == torch.int32
    assert list((tmp_path / "cache").glob("bpe-*-v300.json"))
    assert corpus.tokenizer.decode(corpus.train).startswith(_bpe_text()[:100])
    # Cloze items: scoring starts where the four sentences' tokens part (the space joins the word).
    items = build_items(_bpe_text(), 5, 64)
    tensors = encode_items(items, corpus.tokenizer)
    for n, item in enumerate(items):
        scored = [corpus.tokenizer.decode(tensors.tokens_NOL[n, o, tensors.starts_N[n]:tensors.lengths_NO[n, o]])
                  for o in range(4)]
        assert [s.strip().startswith(option) for s, option in zip(scored, item.options)] == [True] * 4


def test_bpe_settings_are_refused_in_one_line():
    from vrmoe.compose import compose_config

    for overrides, words in ((["data.tokenizer=words"], "must be bytes or bpe"),
                             (["data.tokenizer=bpe", "model.vocab_size=300"], "set model.vocab_size=4096"),
                             (["data.tokenizer=bpe", "data.vocab_size=200", "model.vocab_size=4096"], "above 256")):
        with pytest.raises(ConfigError, match=words) as info:
            compose_config(["logger=none", *overrides])
        assert "\n" not in str(info.value)
    # The native model's vocabulary follows the tokenizer unless the command line sets it.
    assert compose_config(["logger=none"]).model.vocab_size == 256
    assert compose_config(["logger=none", "data.tokenizer=bpe", "data.vocab_size=1000"]).model.vocab_size == 1000


def test_thirdparty_docs_are_other_packages_prose_in_a_fixed_order():
    from vrmoe.data.corpora import THIRDPARTY_DISTRIBUTIONS, thirdparty_docs_documents, thirdparty_files

    assert "numpy" in THIRDPARTY_DISTRIBUTIONS and "vrmoe" not in THIRDPARTY_DISTRIBUTIONS
    files = thirdparty_files(("omegaconf", "rich", "not-installed-anywhere"))
    ids = [doc_id for doc_id, _ in files]
    assert ids == sorted(ids, key=lambda i: (not i.startswith("omegaconf"), i))  # by distribution, then path
    assert any(i.startswith("rich:") for i in ids) and not any("/tests/" in i for i in ids)
    docs = thirdparty_docs_documents(("rich",))
    assert docs == thirdparty_docs_documents(("rich",)) and len(docs) > 10
    text = "\n\n".join(t for _, t in docs)
    assert " the " in text  # English prose
