"""Evaluation metrics, vectorised with numpy.

- `entity_f1`: entity-level precision/recall/F1 with exact span match, per type and micro, as the
  CoNLL-2003 `conlleval` script counts chunks (an I-X that does not continue an X chunk starts one).
- `squad_scores`: mean exact match and F1 over examples, each scored by `data.squad_eval` (the
  official SQuAD v1.1 normalisation, max over the gold answers).
"""
from __future__ import annotations

import numpy as np

from moe_lens.data.squad_eval import exact_match
from moe_lens.data.squad_eval import f1 as token_f1


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


def squad_scores(predictions: list[str], answers: list[list[str]]) -> dict[str, float]:
    """Official SQuAD v1.1 EM and F1 (in %), each the max over an example's gold answers."""
    em = [exact_match(p, gs) for p, gs in zip(predictions, answers)]
    f1 = [token_f1(p, gs) for p, gs in zip(predictions, answers)]
    n = max(len(predictions), 1)
    return {"em": 100 * sum(em) / n, "f1": 100 * sum(f1) / n}
