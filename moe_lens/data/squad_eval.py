"""SQuAD v1.1 answer scoring on text: exact match and token F1, as the official
``evaluate-v1.1.py`` (Rajpurkar et al. 2016) computes them, max over the gold answers.

Normalisation: lowercase, drop punctuation, drop the articles a/an/the, collapse whitespace.
`span_text` turns a predicted context-relative token span back into text via the split's
``extras["char_offsets"]`` (so scores are on the original characters, not on our tokens).
"""
from __future__ import annotations

import re
import string
from collections import Counter
from typing import Sequence

import numpy as np

_PUNCT = set(string.punctuation)
_ARTICLES = re.compile(r"\b(a|an|the)\b")


def normalize_answer(s: str) -> str:
    s = "".join(ch for ch in s.lower() if ch not in _PUNCT)
    return " ".join(_ARTICLES.sub(" ", s).split())


def exact_match(prediction: str, golds: Sequence[str]) -> float:
    return float(max(normalize_answer(prediction) == normalize_answer(g) for g in golds))


def f1(prediction: str, golds: Sequence[str]) -> float:
    def one(pred: str, gold: str) -> float:
        p, g = normalize_answer(pred).split(), normalize_answer(gold).split()
        common = sum((Counter(p) & Counter(g)).values())
        if common == 0:
            return 0.0
        precision, recall = common / len(p), common / len(g)
        return 2 * precision * recall / (precision + recall)

    return max(one(prediction, g) for g in golds)


def span_text(context: str, char_offsets: np.ndarray, start: int, end: int) -> str:
    """Text of context tokens start..end (inclusive) from (n_c, 2) character offsets."""
    return context[int(char_offsets[start, 0]):int(char_offsets[end, 1])]
