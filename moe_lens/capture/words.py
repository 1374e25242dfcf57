"""Subwords to words: the model's token stream over a split, each subword pointing at its word.

The dataset's `tokens` table is word-level (POS, frequency band, NER, segment; docs/traces.md). A fast tokenizer
is given each sequence of the split already split into words (`is_split_into_words=True`); its `word_ids()` say
which word each subword came from. The result is three (m,) arrays over the split's subword stream:
  ids        the model's token ids
  word_idx   the word's `token_idx` in the dataset's `tokens` table (the join key)
  subword    0 for the first subword of its word, 1 for the second, ...
A word the tokenizer maps to no subword gets no routing row. The one Python loop is over sequences (lines,
sentences, SQuAD examples), never over tokens.

`train_tokenizer` builds a small WordPiece tokenizer from a split's words with the `tokenizers` package (no
download), for tests and for models without a tokenizer of their own.
"""
from __future__ import annotations

import itertools
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np


class SubwordStream(NamedTuple):
    ids: np.ndarray  # (m,) int64 model token ids
    word_idx: np.ndarray  # (m,) int64 token_idx of the word in the split's `tokens` table
    subword: np.ndarray  # (m,) int16 rank of the subword within its word (0 = first)


def subword_stream(tokenizer: Any, words: list[str], seq_offsets: np.ndarray, *, max_tokens: int | None = None,
                   chunk: int = 512) -> SubwordStream:
    """Tokenize the split's sequences in order until `max_tokens` subwords (all of them when None)."""
    ids, word_idx = [], []
    total = 0
    for start in range(0, len(seq_offsets) - 1, chunk):
        bounds = seq_offsets[start:start + chunk + 1]
        seqs = [words[a:b] for a, b in itertools.pairwise(bounds) if b > a]
        firsts = [a for a, b in itertools.pairwise(bounds) if b > a]
        if not seqs:
            continue
        enc = tokenizer(seqs, is_split_into_words=True, add_special_tokens=False)
        for i, first in enumerate(firsts):
            w = np.asarray([-1 if x is None else x for x in enc.word_ids(i)], dtype=np.int64)  # (len,)
            keep = w >= 0
            ids.append(np.asarray(enc["input_ids"][i], dtype=np.int64)[keep])
            word_idx.append(w[keep] + first)
            total += int(keep.sum())
        if max_tokens is not None and total >= max_tokens:
            break
    ids_a = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    wid = np.concatenate(word_idx) if word_idx else np.zeros(0, dtype=np.int64)
    if max_tokens is not None:
        ids_a, wid = ids_a[:max_tokens], wid[:max_tokens]
    return SubwordStream(ids_a, wid, subword_ranks(wid))


def subword_ranks(word_idx: np.ndarray) -> np.ndarray:
    """(m,) position of each subword within its word, for a non-decreasing (m,) word_idx."""
    m = len(word_idx)
    pos = np.arange(m)
    starts = np.ones(m, dtype=bool)
    starts[1:] = word_idx[1:] != word_idx[:-1]
    first = np.maximum.accumulate(np.where(starts, pos, 0))  # (m,) index of the word's first subword
    return (pos - first).astype(np.int16)


def train_tokenizer(words: list[str], out_dir: str | Path, *, vocab_size: int = 2000) -> Path:
    """A WordPiece tokenizer (whitespace pre-split, `##` continuations) trained on `words`, saved as a
    transformers tokenizer directory at `out_dir` (reused when already there)."""
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    out = Path(out_dir)
    if (out / "tokenizer.json").is_file():
        return out
    tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    trainer = trainers.WordPieceTrainer(vocab_size=vocab_size, special_tokens=["[UNK]", "[BOS]"])
    tok.train_from_iterator((" ".join(words[i:i + 1000]) for i in range(0, len(words), 1000)), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", bos_token="[BOS]")
    fast.save_pretrained(str(out))
    return out
