"""Tokenizers: how text becomes token ids. Bytes are the native model's tokenizer.

A tokenizer has ``vocab_size``, ``encode(text) -> LongTensor`` and
``decode(ids) -> str``; a :class:`~vrmoe.data.corpora.Corpus` carries the one
that made its tokens, and every consumer (batches, multiple-choice items, OOD
sets) encodes through it.

``encode`` never adds special tokens. A prompt (a multiple-choice item) is encoded with
:func:`encode_prompt`, which puts the tokenizer's ``bos_ids`` in front: the
beginning-of-sequence token a pretrained checkpoint was trained with, where its tokenizer
adds one (Mixtral, DeepSeek), and nothing where it does not (bytes, Granite, Qwen).
Language-model corpora are long concatenated text and are encoded without it.
"""

from __future__ import annotations

import hashlib
import re
from pathlib import Path
from typing import Protocol

import torch


class Tokenizer(Protocol):
    vocab_size: int

    def encode(self, text: str) -> torch.Tensor: ...
    def decode(self, ids: torch.Tensor | list[int]) -> str: ...


def text_to_bytes(text: str) -> torch.Tensor:
    """UTF-8 bytes of ``text`` as a uint8 tensor (how every corpus is stored)."""
    return torch.frombuffer(bytearray(text.encode("utf-8")), dtype=torch.uint8)


def bytes_to_text(data: torch.Tensor) -> str:
    """The inverse of :func:`text_to_bytes`; a window cut mid-character decodes with U+FFFD."""
    return data.to(torch.uint8).numpy().tobytes().decode("utf-8", errors="replace")


class ByteTokenizer:
    """UTF-8 bytes as tokens: a vocabulary of 256, nothing to download or train."""

    vocab_size = 256
    bos_ids: tuple[int, ...] = ()

    def encode(self, text: str) -> torch.Tensor:
        return text_to_bytes(text).long()

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return bytes_to_text(torch.as_tensor(ids))


# Part of a trained BPE's cache key: bump it whenever the way one is trained changes.
BPE_VERSION = 1


class BPETokenizer:
    """A byte-level BPE (the ``tokenizers`` library, as GPT-2's) trained on a corpus's training
    split: ``data.tokenizer=bpe data.vocab_size=N``. Its vocabulary holds the 256 bytes, so any
    text encodes, and ``decode(encode(text)) == text``. Training is deterministic (the same text
    and size give the same merges) and its result is cached as JSON beside the corpora, keyed by
    a hash of the text, the size and :data:`BPE_VERSION`."""

    bos_ids: tuple[int, ...] = ()

    def __init__(self, backend):
        self.backend = backend
        self.vocab_size = backend.get_vocab_size()

    @classmethod
    def train(cls, text: str, vocab_size: int, cache: "Path | None" = None) -> "BPETokenizer":
        from ..config import ConfigError

        try:
            from tokenizers import Tokenizer as Backend
            from tokenizers import decoders, models, pre_tokenizers, trainers
        except ImportError:
            raise ConfigError("data.tokenizer=bpe needs the tokenizers package: pip install 'vrmoe[hf]'") from None
        if cache is not None and cache.exists():
            try:
                return cls(Backend.from_file(str(cache)))
            except Exception:  # a damaged cache is trained again, not fatal
                pass
        backend = Backend(models.BPE())
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        backend.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(vocab_size=vocab_size, show_progress=False,
                                      initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
        backend.train_from_iterator(_paragraphs(text), trainer=trainer)
        if cache is not None:
            try:
                from ..tracking import atomic_write

                cache.parent.mkdir(parents=True, exist_ok=True)
                atomic_write(cache, lambda tmp: backend.save(str(tmp)))
            except OSError:  # a read-only cache folder trains again next time
                pass
        return cls(backend)

    def encode(self, text: str) -> torch.Tensor:
        return torch.tensor(self.backend.encode(text, add_special_tokens=False).ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.backend.decode(torch.as_tensor(ids).tolist(), skip_special_tokens=False)


def _paragraphs(text: str) -> list[str]:
    """``text`` cut after each blank line (what BPE training counts words in)."""
    return [p for p in re.split(r"(?<=\n\n)", text) if p]


def bpe_cache_name(text: str, vocab_size: int) -> str:
    digest = hashlib.sha1(text.encode("utf-8", errors="replace")).hexdigest()[:16]
    return f"bpe-b{BPE_VERSION}-{digest}-v{vocab_size}.json"


def encode_prompt(tokenizer: Tokenizer, text: str) -> torch.Tensor:
    """``text`` as the start of a model input: after the tokenizer's ``bos_ids`` (none unless it
    has them), never followed by an end-of-sequence token."""
    ids = tokenizer.encode(text)
    bos = getattr(tokenizer, "bos_ids", ())
    return torch.cat([torch.tensor(bos, dtype=ids.dtype), ids]) if bos else ids


class HFTokenizer:
    """A Hugging Face tokenizer (``AutoTokenizer``) from a hub id or a local directory: the
    tokenizer of a pretrained backbone (``model=hf``). ``encode`` adds no special tokens;
    ``bos_ids`` is the beginning-of-sequence token when the tokenizer itself puts one in front
    of a text encoded with its special tokens (as the checkpoint saw its training text), else
    empty (:func:`encode_prompt` uses it)."""

    def __init__(self, name: str):
        from pathlib import Path

        from ..config import ConfigError

        try:
            from transformers import AutoTokenizer
        except ImportError:
            raise ConfigError("model=hf needs the transformers package: pip install 'vrmoe[hf]'") from None
        local = Path(name).expanduser()
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(str(local) if local.exists() else name)
        except Exception as exc:  # no tokenizer files, offline, unknown id
            first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
            raise ConfigError(f"model.hf_name={name}: cannot load its tokenizer ({first}); the model's "
                              "directory must hold the tokenizer files save_pretrained writes") from None
        self.name = name
        self.vocab_size = len(self.tokenizer)
        self.bos_ids = self._bos_ids()

    def _bos_ids(self) -> tuple[int, ...]:
        # Read off the tokenizer rather than a list of families: whatever it prepends with its
        # special tokens that it does not without them, if that is its BOS (an appended EOS is ignored).
        bos = self.tokenizer.bos_token_id
        if bos is None:
            return ()
        probe = "Answer:"
        with_special = self.tokenizer(probe, add_special_tokens=True)["input_ids"]
        without = self.tokenizer(probe, add_special_tokens=False)["input_ids"]
        return (bos,) if with_special[:1] == [bos] and without[:1] != [bos] else ()

    def encode(self, text: str) -> torch.Tensor:
        backend = getattr(self.tokenizer, "backend_tokenizer", None)
        if backend is not None:  # a fast tokenizer: no warning about texts longer than the context
            ids = backend.encode(text, add_special_tokens=False).ids
        else:
            ids = self.tokenizer.encode(text, add_special_tokens=False)
        return torch.tensor(ids, dtype=torch.long)

    def decode(self, ids: torch.Tensor | list[int]) -> str:
        return self.tokenizer.decode(torch.as_tensor(ids).tolist())
