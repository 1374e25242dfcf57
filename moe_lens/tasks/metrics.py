"""Evaluation metrics, vectorised with numpy.

- `entity_f1`: entity-level precision/recall/F1 with exact span match, per type and micro, as the
  CoNLL-2003 `conlleval` script counts chunks (an I-X that does not continue an X chunk starts one).
- `squad_scores`: exact match and F1 with the official SQuAD v1.1 answer normalisation (lower case,
  strip punctuation, drop the articles a/an/the, collapse whitespace), max over the gold answers.
"""
from __future__ import annotations

import re
import string
from collections import Counter

import numpy as np


def chunk_keys(labels: np.ndarray, seq_start: np.ndarray, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Chunks of an IOB2 label stream -> (keys (c,) int64 unique per (start, end, type), type ids (c,)).

    labels (n,) label ids in `names`; seq_start (n,) bool, True at each sentence's first token.
    """
    kinds = np.array([0 if t == "O" else (1 if t.startswith("B-") else 2) for t in names])
    types = sorted({t[2:] for t in names if t != "O"})
    type_of = np.array([0 if t == "O" else 1 + types.index(t[2:]) for t in names])
    kind, typ = kinds[labels], type_of[labels]  # (n,)
    n = len(labels)
    prev_typ = np.concatenate([[0], typ[:-1]])
    prev_typ[seq_start] = 0
    starts = (kind == 1) | ((kind == 2) & (prev_typ != typ))  # conlleval: I after O / other type opens a chunk
    cont = (kind == 2) & ~starts
    start_pos = np.flatnonzero(starts)
    # a chunk ends before the next position that is not a continuation
    nxt_not_cont = np.flatnonzero(~np.concatenate([cont[1:], [False]]))  # positions i where i+1 doesn't continue
    end_pos = nxt_not_cont[np.searchsorted(nxt_not_cont, start_pos)]
    t = typ[start_pos]
    return (start_pos * (n + 1) + end_pos) * (len(types) + 1) + t, t


def entity_f1(gold: np.ndarray, pred: np.ndarray, seq_start: np.ndarray, names: list[str]) -> dict[str, float]:
    """Micro and per-type precision/recall/F1 (in %) of predicted chunks against gold chunks."""
    gk, gt = chunk_keys(gold, seq_start, names)
    pk, pt = chunk_keys(pred, seq_start, names)
    hit = np.isin(pk, gk)
    types = sorted({t[2:] for t in names if t != "O"})
    out: dict[str, float] = {}

    def prf(tp: int, npred: int, ngold: int) -> tuple[float, float, float]:
        p = tp / npred if npred else 0.0
        r = tp / ngold if ngold else 0.0
        return 100 * p, 100 * r, (200 * p * r / (p + r) if p + r else 0.0)

    out["precision"], out["recall"], out["f1"] = prf(int(hit.sum()), len(pk), len(gk))
    for i, name in enumerate(types, start=1):
        out[f"f1_{name}"] = prf(int(hit[pt == i].sum()), int((pt == i).sum()), int((gt == i).sum()))[2]
    return out


def normalize_answer(s: str) -> str:
    s = s.lower()
    s = "".join(ch for ch in s if ch not in set(string.punctuation))
    s = re.sub(r"\b(a|an|the)\b", " ", s)
    return " ".join(s.split())


def _f1(pred: str, gold: str) -> float:
    p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
    common = sum((Counter(p) & Counter(g)).values())
    if common == 0:
        return 0.0
    precision, recall = common / len(p), common / len(g)
    return 2 * precision * recall / (precision + recall)


def squad_scores(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """Official SQuAD v1.1 EM and F1 (in %), each the max over an example's gold answers."""
    em = [max(float(normalize_answer(p) == normalize_answer(g)) for g in gs) for p, gs in zip(predictions, answers)]
    f1 = [max(_f1(p, g) for g in gs) for p, gs in zip(predictions, answers)]
    n = max(len(predictions), 1)
    return {"em": 100 * sum(em) / n, "f1": 100 * sum(f1) / n}
