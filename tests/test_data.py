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
