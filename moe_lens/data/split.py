"""The `Split` a trainer consumes and the annotated `tokens` table it carries.

`Parsed` is what each reader returns (token stream + structure). `make_split` adds ids in a
vocabulary, training-frequency ranks and bands, POS tags, and builds the `tokens` DataFrame with
exactly the columns of docs/traces.md (`dataset` and `split` included); columns that do not apply
to a dataset are NULL (None / pandas NA).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from moe_lens.data.vocab import FREQ_BANDS, Vocab, band_codes

TOKEN_COLUMNS = ("token_idx", "token_id", "token", "pos_tag", "freq_rank", "freq_band", "dataset", "split",
                 "doc_id", "sent_id", "position", "ner_tag", "segment", "in_answer", "in_vocab")


@dataclass
class Parsed:
    """A split as a token stream plus structure; what the three readers return."""

    tokens: list[str]  # (n,)
    seq_offsets: np.ndarray  # (s+1,) int64
    doc_id: np.ndarray  # (n,) int32
    sent_id: np.ndarray  # (n,) int32
    position: np.ndarray  # (n,) int32
    sha256: str = ""
    columns: dict[str, Any] = field(default_factory=dict)  # optional (n,) columns: ner_tag, segment, in_answer, pos_tag
    extras: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)


@dataclass
class Split:
    dataset: str
    split: str
    tokens: pd.DataFrame  # (n, 15) the docs/traces.md `tokens` columns, token_idx = 0..n-1
    token_ids: np.ndarray  # (n,) int64 ids in `vocab`
    seq_offsets: np.ndarray  # (s+1,) int64: sequence i = tokens[seq_offsets[i]:seq_offsets[i+1]]
    vocab: Vocab
    labels: np.ndarray | None = None  # (n,) int64 NER label ids (CoNLL), else None
    label_names: list[str] | None = None
    extras: dict[str, Any] = field(default_factory=dict)
    meta: dict[str, Any] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_sequences(self) -> int:
        return len(self.seq_offsets) - 1


def _null_category(n: int) -> pd.Categorical:
    # typed empty categories: Parquet / DuckDB then see a string column of NULLs, not a NULL-typed column
    return pd.Categorical.from_codes(np.full(n, -1, dtype=np.int8), categories=pd.Index([], dtype="str"))


def _constant(n: int, value: str) -> pd.Categorical:
    return pd.Categorical.from_codes(np.zeros(n, dtype=np.int8), categories=[value])


def make_split(dataset: str, split: str, parsed: Parsed, vocab: Vocab, ranks: dict[str, int],
               pos_tags: pd.Categorical | None, factorized: tuple[np.ndarray, list[str]] | None = None) -> Split:
    """Annotate `parsed` and build the Split (pos_tags: (n,) categorical, or None = NULL).

    `in_vocab` is False where the token's id is `vocab`'s `<unk>`: a word outside a capped
    vocabulary, a word unseen in training, or WikiText's own `<unk>` (the model sees all three as
    the same id, so the surface word's POS says nothing about what the model saw).

    factorized: (codes, types) of `parsed.tokens` when the caller already has them (saves a pass).

    String columns are pandas Categoricals (codes + names: cheap for millions of rows; Parquet and
    DuckDB read them as plain strings).
    """
    n = len(parsed.tokens)
    codes, types = factorized or pd.factorize(np.asarray(parsed.tokens, dtype=object))  # (n,), (u,)
    get_id, unk = vocab.stoi.get, vocab.unk_id
    token_ids = np.fromiter((get_id(w, unk) for w in types), np.int64, len(types))[codes]  # (n,)
    rank = np.fromiter((ranks.get(w, 0) for w in types), np.int32, len(types))[codes]  # (n,)
    cols = parsed.columns
    in_answer = cols.get("in_answer")
    df = pd.DataFrame({
        "token_idx": np.arange(n, dtype=np.int64),
        "token_id": token_ids.astype(np.int32),
        "token": pd.Categorical.from_codes(codes, categories=types),
        "pos_tag": pos_tags if pos_tags is not None else _null_category(n),
        "freq_rank": rank,
        "freq_band": pd.Categorical.from_codes(band_codes(rank), categories=FREQ_BANDS, ordered=True),
        "dataset": _constant(n, dataset),
        "split": _constant(n, split),
        "doc_id": parsed.doc_id.astype(np.int32, copy=False),
        "sent_id": parsed.sent_id.astype(np.int32, copy=False),
        "position": parsed.position.astype(np.int32, copy=False),
        "ner_tag": cols.get("ner_tag", _null_category(n)),
        "segment": cols.get("segment", _null_category(n)),
        "in_answer": pd.arrays.BooleanArray(
            np.zeros(n, bool) if in_answer is None else np.asarray(in_answer, bool),
            np.full(n, in_answer is None)),
        "in_vocab": token_ids != unk if unk is not None else np.ones(n, bool),
    }, copy=False)
    assert list(df.columns) == list(TOKEN_COLUMNS)
    return Split(dataset=dataset, split=split, tokens=df, token_ids=token_ids,
                 seq_offsets=parsed.seq_offsets.astype(np.int64, copy=False), vocab=vocab,
                 extras=parsed.extras, meta=dict(parsed.meta))
