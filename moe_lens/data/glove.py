"""GloVe word vectors (Pennington, Socher & Manning 2014) for a `Vocab`.

File format: one word per line, then its `dim` floats, separated by single spaces (the
``glove.6B.*.txt`` layout). Lookup: the word itself, else its lowercase form (GloVe 6B is
uncased while our vocabularies keep case). Misses get N(0, 0.1^2) (seeded), ``<pad>`` gets zeros.
Coverage = share of vocabulary entries (``<pad>`` excluded) that found a vector.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np

from moe_lens.data.vocab import Vocab
from moe_lens.errors import InputError, MoeLensError


def load_glove(path: str | Path, vocab: Vocab, dim: int | None = None, *,
               seed: int = 0) -> tuple[np.ndarray, float]:
    """((len(vocab), dim) float32 embedding matrix, coverage share)."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise MoeLensError(f"GloVe file not found: {path}")
    wanted: dict[str, list[int]] = {}
    for i, w in enumerate(vocab.itos):
        wanted.setdefault(w, []).append(i)
    lower: dict[str, list[int]] = {}
    for i, w in enumerate(vocab.itos):
        lower.setdefault(w.lower(), []).append(i)
    exact: dict[int, np.ndarray] = {}
    folded: dict[int, np.ndarray] = {}
    with open(path, "rb") as f:
        for lineno, raw in enumerate(f, start=1):
            word_b, _, rest = raw.rstrip(b"\r\n").partition(b" ")
            try:
                word = word_b.decode("utf-8")
            except UnicodeDecodeError:
                raise InputError(path, lineno, "not UTF-8") from None
            if word not in wanted and word not in lower:
                continue  # most lines: skip without parsing floats
            vec = _parse_vector(rest, path, lineno)
            if dim is None:
                dim = len(vec)
            if len(vec) != dim:
                raise InputError(path, lineno, f"expected {dim} values, got {len(vec)}")
            for i in wanted.get(word, ()):
                exact[i] = vec
            for i in lower.get(word, ()):
                folded.setdefault(i, vec)
    if dim is None:
        raise InputError(path, None, "no vector for any vocabulary word; cannot infer the dimension (pass dim)")
    rng = np.random.default_rng(seed)
    emb = rng.normal(0.0, 0.1, size=(len(vocab), dim)).astype(np.float32)  # (v, d)
    for i in range(len(vocab)):
        vec = exact.get(i, folded.get(i))
        if vec is not None:
            emb[i] = vec
    if vocab.pad_id is not None:
        emb[vocab.pad_id] = 0.0
    found = sum(1 for i in range(len(vocab)) if i != vocab.pad_id and (i in exact or i in folded))
    denom = len(vocab) - (vocab.pad_id is not None)
    return emb, found / max(denom, 1)


def _parse_vector(rest: bytes, path: Path, lineno: int) -> np.ndarray:
    try:
        return np.array(rest.split(b" "), dtype=np.float32)
    except ValueError:
        raise InputError(path, lineno, "values are not numbers") from None
