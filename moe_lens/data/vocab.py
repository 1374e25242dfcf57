"""Vocabularies and training-split frequency annotations.

`Vocab` maps surface forms to ids. WikiText-2 follows pytorch/examples `word_language_model`
(`data.py`, `Dictionary`): ids in order of first appearance over train, valid, test, no padding.
CoNLL-2003 and SQuAD reserve ``<pad>`` = 0 and ``<unk>`` = 1, then the training words by
descending count. A cap keeps the most frequent N training words plus ``<unk>``.

Frequency rank: 1 = the most frequent training token; ties keep first-occurrence order
(``Counter.most_common``); 0 = never seen in training. Bands (docs/traces.md):
``1-10``, ``11-100``, ``101-1k`` (101..1000), ``1k-10k`` (1001..10000), ``10k+`` (> 10000), ``unseen``.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Iterable, Sequence

import numpy as np
import pandas as pd

PAD, UNK, EOS = "<pad>", "<unk>", "<eos>"
FREQ_BANDS = ("1-10", "11-100", "101-1k", "1k-10k", "10k+", "unseen")
_BAND_EDGES = np.array([10, 100, 1000, 10000])  # upper rank of bands 0..3


@dataclass
class Vocab:
    itos: list[str]
    stoi: dict[str, int] = field(default_factory=dict)  # filled from itos when empty
    pad_id: int | None = None
    unk_id: int = 0

    def __post_init__(self) -> None:
        if not self.stoi:
            self.stoi = {w: i for i, w in enumerate(self.itos)}
        assert len(self.stoi) == len(self.itos), "duplicate words in itos"

    def __len__(self) -> int:
        return len(self.itos)

    def encode(self, tokens: Sequence[str]) -> np.ndarray:
        """(n,) int64 ids; words not in the vocabulary get `unk_id`."""
        if len(tokens) == 0:
            return np.zeros(0, dtype=np.int64)
        codes, uniques = pd.factorize(np.asarray(tokens, dtype=object))  # hash once per type, not per token
        get, unk = self.stoi.get, self.unk_id
        return np.fromiter((get(u, unk) for u in uniques), np.int64, len(uniques))[codes]

    def to_dict(self) -> dict:
        return {"itos": list(self.itos), "pad_id": self.pad_id, "unk_id": self.unk_id}

    @classmethod
    def from_dict(cls, d: dict) -> "Vocab":
        return cls(itos=list(d["itos"]), pad_id=d["pad_id"], unk_id=d["unk_id"])


def first_appearance_vocab(streams: Iterable[Iterable[str]]) -> Vocab:
    """pytorch/examples `Dictionary`: every word of every stream, in first-appearance order."""
    itos: dict[str, None] = {}
    for s in streams:
        itos.update(dict.fromkeys(s))
    if UNK not in itos:
        itos[UNK] = None
    words = list(itos)
    return Vocab(itos=words, pad_id=None, unk_id=words.index(UNK))


def capped_vocab(counts: Counter, vocab_size: int | None, *, pad: bool) -> Vocab:
    """[<pad>, <unk>] (pad) or [..., <unk>] (no pad) around the most frequent `vocab_size` words."""
    words = [w for w, _ in counts.most_common() if w not in (PAD, UNK)]
    if vocab_size is not None:
        words = words[:vocab_size]
    if pad:
        return Vocab(itos=[PAD, UNK, *words], pad_id=0, unk_id=1)
    return Vocab(itos=[*words, UNK], pad_id=None, unk_id=len(words))


def count_tokens(tokens: Sequence[str]) -> tuple[Counter, np.ndarray, list[str]]:
    """(counts, codes (n,), types (u,)) with one hash pass; counts and types in first-appearance order,
    so ``counts.most_common()`` equals ``Counter(tokens).most_common()``."""
    codes, types = pd.factorize(np.asarray(tokens, dtype=object))
    words = list(types)
    return Counter(dict(zip(words, np.bincount(codes, minlength=len(words)).tolist()))), codes, words


def freq_ranks(counts: Counter) -> dict[str, int]:
    """word -> rank in the training counts (1 = most frequent)."""
    return {w: r for r, (w, _) in enumerate(counts.most_common(), start=1)}


def band_codes(rank: np.ndarray) -> np.ndarray:
    """(n,) int8 index into FREQ_BANDS for (n,) ranks (0 = unseen -> 'unseen')."""
    codes = np.searchsorted(_BAND_EDGES, rank, side="left").astype(np.int8)  # 10 -> 0, 11 -> 1, ...
    codes[rank <= 0] = len(FREQ_BANDS) - 1
    return codes


def freq_bands(rank: np.ndarray) -> np.ndarray:
    """(n,) object array of band names for (n,) ranks."""
    return np.asarray(FREQ_BANDS, dtype=object)[band_codes(rank)]
