"""Corpora: the built-in ones, text files and Hugging Face datasets, split and cached.

Nothing here downloads anything. The built-in corpora come from the running
Python's own standard library:

* ``stdlib_docs``: English prose, the docstrings of the standard library's
  modules, classes and functions (read with :mod:`ast`, nothing is imported)
  plus the ``pydoc_data`` topics;
* ``python_source``: the same modules' source with docstrings and comments
  removed (a far out-of-distribution domain for the prose model);
* ``thirdparty_docs``: the docstrings of installed third-party packages that vrmoe's core
  dependencies bring (numpy, matplotlib, rich, ...; :data:`THIRDPARTY_DISTRIBUTIONS`), read the
  same way: English prose about Python code by other authors, a near out-of-distribution domain
  for a model trained on ``stdlib_docs``.

Each is prepared once and cached as byte arrays keyed by the Python version (and, for
``thirdparty_docs``, the packages' versions). ``data.tokenizer=bpe`` trains a byte-level BPE on
a corpus's training split and caches it beside them.
"""

from __future__ import annotations

import ast
import hashlib
import os
import sys
import sysconfig
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..config import ConfigError, DataConfig
from ..tracking import atomic_write
from .mcq_datasets import MCQQuestion, load_questions, questions_text
from .tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, bpe_cache_name

DOC_SEPARATOR = "\n\n"
# Part of the cache key: bump it whenever the way a built-in corpus is made changes.
CORPUS_VERSION = 1
TEXT_SUFFIXES = {".txt", ".md", ".rst", ".py", ".json", ".csv", ".html", ".tex", ".jsonl", ""}


@dataclass
class Corpus:
    """A corpus as two arrays of token ids, split by document so no text leaks between them,
    and the tokenizer that made them (every consumer encodes and decodes through it)."""

    name: str
    train: torch.Tensor  # (N_train,) token ids (uint8 for bytes)
    val: torch.Tensor  # (N_val,)
    tokenizer: Tokenizer = field(default_factory=ByteTokenizer)
    # data=mcq: the dataset's questions by split ("finetune", "calibration", "test"); None for plain text.
    questions: dict[str, list[MCQQuestion]] | None = None

    def unigram_entropy(self) -> float:
        """Entropy (nats) of the training tokens' frequencies: the loss of a model with no context."""
        counts = torch.bincount(self.train.long(), minlength=self.tokenizer.vocab_size).double()
        p = counts[counts > 0] / counts.sum()
        return float(-(p * p.log()).sum())


# ---------------------------------------------------------------------------
# Built-in corpora from the standard library
# ---------------------------------------------------------------------------

# Test suites and vendored or generated code are not representative stdlib prose.
_SKIP_DIRS = {"test", "tests", "idlelib", "site-packages", "lib2to3", "__pycache__", "turtledemo",
              "ensurepip", "pydoc_data", "encodings", "config-3", "tkinter"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root)
        if any(part in _SKIP_DIRS or part.startswith("config-") for part in rel.parts[:-1]):
            continue
        files.append(path)
    return files


def _parse(path: Path) -> ast.Module | None:
    try:
        return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    except (SyntaxError, UnicodeDecodeError, ValueError):
        return None


def _docstrings(tree: ast.Module) -> list[str]:
    docs = []
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            doc = ast.get_docstring(node, clean=True)
            if doc and len(doc) >= 40:
                docs.append(doc)
    return docs


def _strip_docstrings(tree: ast.Module) -> ast.Module:
    for node in ast.walk(tree):
        if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
            body = node.body
            if body and isinstance(body[0], ast.Expr) and isinstance(getattr(body[0], "value", None), ast.Constant) \
                    and isinstance(body[0].value.value, str):
                node.body = body[1:] or [ast.Pass()]
    return tree


def _stdlib_trees():
    """(file name, syntax tree) of every parseable standard-library module."""
    for path in stdlib_files():
        tree = _parse(path)
        if tree is not None:
            yield path.name, tree


def stdlib_docs_documents() -> list[tuple[str, str]]:
    """(document id, text): one document per module's docstrings, one per pydoc topic."""
    docs = [(name, DOC_SEPARATOR.join(_docstrings(tree))) for name, tree in _stdlib_trees()]
    docs = [(name, text) for name, text in docs if text]
    try:
        from pydoc_data.topics import topics
        docs.extend((f"topic:{key}", value.strip()) for key, value in sorted(topics.items()))
    except ImportError:  # some distributions ship without pydoc_data
        pass
    return docs


def python_source_documents() -> list[tuple[str, str]]:
    """(document id, source): the stdlib's code with docstrings and comments removed."""
    docs = []
    for name, tree in _stdlib_trees():
        try:
            docs.append((name, ast.unparse(_strip_docstrings(tree))))  # unparse drops comments
        except (ValueError, RecursionError):
            continue
    return docs


# The distributions thirdparty_docs reads: vrmoe's core dependencies and what they install, those
# with prose docstrings (plotly's and torch's are generated or too large to parse on every machine).
THIRDPARTY_DISTRIBUTIONS = ("numpy", "matplotlib", "omegaconf", "hydra-core", "rich", "pygments", "pyparsing",
                            "packaging", "python-dateutil", "pillow")


def _installed(names: tuple[str, ...]) -> list:
    """The installed distributions among ``names``, in that order (a missing one is skipped)."""
    from importlib import metadata

    found = []
    for name in names:
        try:
            found.append(metadata.distribution(name))
        except metadata.PackageNotFoundError:
            continue
    return found


def thirdparty_files(names: tuple[str, ...] = THIRDPARTY_DISTRIBUTIONS) -> list[tuple[str, Path]]:
    """(document id, path) of every .py file the distributions ``names`` installed, in a fixed
    order: by distribution, then path. Test suites are left out, and so is any file inside the
    standard library or vrmoe itself (a distribution may install into either)."""
    stdlib = Path(sysconfig.get_paths()["stdlib"]).resolve()
    own = Path(__file__).resolve().parents[1]
    out = []
    for dist in _installed(names):
        name = dist.metadata["Name"]
        for rel in sorted((f for f in (dist.files or []) if f.suffix == ".py"), key=str):
            if any(part in ("test", "tests", "testing") for part in rel.parts[:-1]):
                continue
            path = Path(dist.locate_file(rel)).resolve()
            in_stdlib = path.is_relative_to(stdlib) and not {"site-packages", "dist-packages"} & set(path.parts)
            if in_stdlib or path.is_relative_to(own):
                continue
            if path.is_file():
                out.append((f"{name}:{rel.as_posix()}", path))
    return out


def thirdparty_docs_documents(names: tuple[str, ...] = THIRDPARTY_DISTRIBUTIONS) -> list[tuple[str, str]]:
    """(document id, text): one document per module's docstrings, as ``stdlib_docs``."""
    docs = []
    for doc_id, path in thirdparty_files(names):
        tree = _parse(path)
        text = DOC_SEPARATOR.join(_docstrings(tree)) if tree is not None else ""
        if text:
            docs.append((doc_id, text))
    return docs


def thirdparty_versions(names: tuple[str, ...] = THIRDPARTY_DISTRIBUTIONS) -> str:
    """A short digest of the installed distributions' names and versions (part of the cache key)."""
    listed = ",".join(f"{d.metadata['Name']}=={d.version}" for d in _installed(names))
    return hashlib.sha1(listed.encode("utf-8")).hexdigest()[:12]


BUILTIN_CORPORA = {"stdlib_docs": stdlib_docs_documents, "python_source": python_source_documents,
                   "thirdparty_docs": thirdparty_docs_documents}
# Every corpus `data=<name>` can name: the built-in ones, the user's text or dataset, and a
# multiple-choice dataset (its questions, and their text for the next-token view).
CORPORA = (*BUILTIN_CORPORA, "text", "hf", "mcq")


# ---------------------------------------------------------------------------
# User corpora
# ---------------------------------------------------------------------------

def text_documents(path_str: str) -> list[tuple[str, str]]:
    path = Path(path_str).expanduser()
    if not path.exists():
        raise ConfigError(f"data.path={path_str!r} does not exist; give a text file or a directory of them")
    files = [path] if path.is_file() else sorted(
        p for p in path.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES
        and not any(part.startswith(".") for part in p.relative_to(path).parts))
    docs, binary = [], []
    for f in files:
        try:
            raw = f.read_bytes()
        except OSError as exc:
            raise ConfigError(f"data.path: cannot read {f}: {exc.strerror}") from None
        if looks_binary(raw):
            binary.append(f)
            continue
        text = raw.decode("utf-8", errors="replace")
        if text.strip():
            docs.append((str(f), text))
    if path.is_file() and binary:
        raise ConfigError(f"data.path={path_str!r} is not UTF-8 text (it looks binary); give a text file")
    if not docs:
        skipped = f" ({len(binary)} binary file(s) skipped)" if binary else ""
        raise ConfigError(f"data.path={path_str!r} holds no text{skipped}; give a non-empty text file or directory")
    return docs


def looks_binary(raw: bytes, sample: int = 8192) -> bool:
    """A NUL byte, or more than 10% of undecodable bytes, in the first ``sample`` bytes: a file
    that would be read as replacement characters rather than text. The one test of what is text,
    for the corpus (``data.path``) and for evaluation's OOD files (``eval.ood_text``)."""
    head = raw[:sample]
    if b"\x00" in head:
        return True
    # A multi-byte character cut at the sample's end is not an error in the file.
    undecodable = len(head) - len(head.decode("utf-8", errors="ignore").encode("utf-8"))
    return undecodable > 0.1 * len(head) + 3


def hf_documents(name: str, split: str, text_field: str) -> list[tuple[str, str]]:
    try:
        import datasets
    except ImportError:
        raise ConfigError("data=hf needs the `datasets` package: pip install 'vrmoe[hf]'") from None
    local = Path(name).expanduser()
    try:
        if local.exists():
            ds = datasets.load_from_disk(str(local))
            if isinstance(ds, datasets.DatasetDict):
                if split not in ds:
                    raise ConfigError(f"data.hf_split={split!r} not in {local}; available: {', '.join(ds)}")
                ds = ds[split]
        else:
            ds = datasets.load_dataset(name, split=split)
    except ConfigError:
        raise
    except Exception as exc:  # datasets raises many types; the user needs the message only
        raise ConfigError(f"data.hf_name={name!r} could not be loaded: {str(exc).splitlines()[0]}") from None
    if text_field not in ds.column_names:
        raise ConfigError(f"data.hf_text_field={text_field!r} is not a column; columns: {', '.join(ds.column_names)}")
    docs = [(f"{name}:{i}", t) for i, t in enumerate(ds[text_field]) if isinstance(t, str) and t.strip()]
    if not docs:
        raise ConfigError(f"data.hf_name={name!r} has no non-empty text in column {text_field!r}")
    return docs


# ---------------------------------------------------------------------------
# Splitting, caching and loading
# ---------------------------------------------------------------------------

def _in_validation(doc_id: str, fraction: float) -> bool:
    digest = hashlib.sha1(doc_id.encode("utf-8")).digest()
    return int.from_bytes(digest[:4], "little") / 2**32 < fraction


def split_documents(docs: list[tuple[str, str]], val_fraction: float) -> tuple[bytes, bytes]:
    """Deterministic split: by a hash of each document's id when there are enough
    documents, otherwise the tail of the concatenated text is held out."""
    if len(docs) >= 20:
        train = [t for i, t in docs if not _in_validation(i, val_fraction)]
        val = [t for i, t in docs if _in_validation(i, val_fraction)]
        if train and val:
            return DOC_SEPARATOR.join(train).encode("utf-8"), DOC_SEPARATOR.join(val).encode("utf-8")
    data = DOC_SEPARATOR.join(t for _, t in docs).encode("utf-8")
    cut = int(len(data) * (1 - val_fraction))
    return data[:cut], data[cut:]


def cache_root(cfg: DataConfig) -> Path:
    base = cfg.cache_dir or os.environ.get("VRMOE_CACHE") or Path.home() / ".cache" / "vrmoe"
    return Path(base).expanduser()


def _save_npy(path: Path, array: np.ndarray) -> None:
    with open(path, "wb") as f:  # a file object: np.save would append ".npy" to a bare path
        np.save(f, array)


def load_corpus(cfg: DataConfig, min_tokens: int = 0, tokenizer: Tokenizer | None = None) -> Corpus:
    """Build (or read from cache) the corpus that ``cfg`` names, as the tokens of ``tokenizer``
    (bytes when None). Documents are split before tokenisation, so every tokenizer sees the
    same split; the built-in corpora are cached as text bytes."""
    if cfg.name in BUILTIN_CORPORA:
        tag = (f"{cfg.name}-c{CORPUS_VERSION}-py{sys.version_info.major}.{sys.version_info.minor}"
               f"-v{cfg.val_fraction}")
        if cfg.name == "thirdparty_docs":
            tag += f"-d{thirdparty_versions()}"
        folder = cache_root(cfg)
        train_path, val_path = folder / f"{tag}.train.npy", folder / f"{tag}.val.npy"
        if train_path.exists() and val_path.exists():
            try:
                train_np, val_np = np.load(train_path), np.load(val_path)
            except (OSError, ValueError):  # a damaged cache is rebuilt, not fatal
                train_np = val_np = None
            if train_np is not None:
                return _corpus(cfg, train_np, val_np, min_tokens, tokenizer)
        train_b, val_b = split_documents(BUILTIN_CORPORA[cfg.name](), cfg.val_fraction)
        train_np, val_np = np.frombuffer(train_b, np.uint8), np.frombuffer(val_b, np.uint8)
        try:
            folder.mkdir(parents=True, exist_ok=True)
            for path, array in ((train_path, train_np), (val_path, val_np)):
                atomic_write(path, lambda tmp, a=array: _save_npy(tmp, a))
        except OSError:  # a read-only home still trains, only without the cache
            pass
        return _corpus(cfg, train_np, val_np, min_tokens, tokenizer)
    if cfg.name == "mcq":
        questions = mcq_splits(cfg)
        train_b, val_b = (questions_text(questions[use]).encode("utf-8") for use in ("finetune", "test"))
        corpus = _corpus(cfg, np.frombuffer(train_b, np.uint8), np.frombuffer(val_b, np.uint8), min_tokens, tokenizer)
        corpus.questions = questions
        return corpus
    if cfg.name == "text":
        docs = text_documents(cfg.path or "")
    elif cfg.name == "hf":
        docs = hf_documents(cfg.hf_name or "", cfg.hf_split, cfg.hf_text_field)
    else:
        raise ConfigError(f"data={cfg.name!r} is unknown; choose one of {', '.join(CORPORA)}")
    train_b, val_b = split_documents(docs, cfg.val_fraction)
    return _corpus(cfg, np.frombuffer(train_b, np.uint8), np.frombuffer(val_b, np.uint8), min_tokens, tokenizer)


# data=mcq with no calibration split named: this share of the train split's questions (its end) is
# the calibration split, and fine-tuning uses the rest.
CALIBRATION_SHARE = 0.2


def mcq_splits(cfg: DataConfig) -> dict[str, list[MCQQuestion]]:
    """A multiple-choice dataset's three disjoint splits: finetune, calibration and test."""
    name = cfg.mcq_name or ""
    train = load_questions(name, cfg.mcq_train_split)
    if cfg.mcq_calibration_split is not None:
        calibration = load_questions(name, cfg.mcq_calibration_split)
    else:
        cut = len(train) - max(1, round(CALIBRATION_SHARE * len(train)))
        if cut < 1:
            raise ConfigError(f"data.mcq_name={name}: the {cfg.mcq_train_split} split has {len(train)} question(s), "
                              "too few to set a calibration split aside; name one with data.mcq_calibration_split")
        train, calibration = train[:cut], train[cut:]
    return {"finetune": train, "calibration": calibration, "test": load_questions(name, cfg.mcq_eval_split)}


def corpus_tokenizer(cfg: DataConfig, train_text: str, tokenizer: Tokenizer | None = None) -> Tokenizer:
    """The tokenizer of a corpus: ``tokenizer`` (a pretrained model's own) when given, else bytes,
    or with ``data.tokenizer=bpe`` a BPE of ``data.vocab_size`` tokens trained on ``train_text``
    (cached beside the corpora)."""
    if tokenizer is not None and not isinstance(tokenizer, ByteTokenizer):
        if cfg.tokenizer == "bpe":
            raise ConfigError("data.tokenizer=bpe is for the native model; model=hf reads text with its "
                              "checkpoint's own tokenizer")
        return tokenizer
    if cfg.tokenizer == "bytes":
        return ByteTokenizer()
    if cfg.tokenizer != "bpe":
        raise ConfigError(f"data.tokenizer={cfg.tokenizer!r} must be bytes or bpe")
    return BPETokenizer.train(train_text, cfg.vocab_size, cache_root(cfg) / bpe_cache_name(train_text, cfg.vocab_size))


def _corpus(cfg: DataConfig, train: np.ndarray, val: np.ndarray, min_tokens: int,
            tokenizer: Tokenizer | None = None) -> Corpus:
    """UTF-8 bytes of the two splits as the tokens of the corpus's tokenizer (:func:`corpus_tokenizer`)."""
    name = cfg.name
    decode = lambda arr: arr.tobytes().decode("utf-8", errors="replace")  # noqa: E731
    tokenizer = corpus_tokenizer(cfg, decode(train), tokenizer)
    if isinstance(tokenizer, ByteTokenizer):
        splits = [torch.from_numpy(train.copy()), torch.from_numpy(val.copy())]
    else:
        splits = [tokenizer.encode(decode(arr)).to(torch.int32) for arr in (train, val)]
    for split, tokens in zip(("training", "validation"), splits):
        if len(tokens) < min_tokens:
            raise ConfigError(f"data={name}: the {split} split has {len(tokens)} tokens, fewer than one sequence "
                              f"({min_tokens}); give more text or lower model.seq_len")
    return Corpus(name, splits[0], splits[1], tokenizer)
