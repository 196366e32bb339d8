"""Text in, token windows out: tokenizers, corpora, batches and multiple-choice items.

Nothing here downloads anything (``data=hf`` reads a dataset the user names).
"""

from .batches import derived_seed, eval_batches, train_batch
from .corpora import CORPORA, Corpus, load_corpus
from .tokenizers import ByteTokenizer, Tokenizer

__all__ = ["derived_seed", "eval_batches", "train_batch", "CORPORA", "Corpus", "load_corpus", "ByteTokenizer",
           "Tokenizer"]
