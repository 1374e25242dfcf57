"""Casing classes of tokens: the word-shape feature of neural NER taggers (Collobert et al. 2011's caps
feature; Chiu & Nichols 2016 use similar classes), used by the tagger's `--case-features` embedding.

A data-level annotation like pos.py: models.py sizes its embedding from CASE_CLASSES and tasks/ner.py puts
`case` (b, t) in each batch, so it lives below both (tests/test_import_layers.py).
"""
from __future__ import annotations

import numpy as np
import pandas as pd

# casing classes; 0 is padding, so `case` pads like `ids`
CASE_CLASSES = ("pad", "lower", "title", "upper", "mixed", "digit", "other")


def case_classes(words) -> np.ndarray:
    """(n,) int64 class in CASE_CLASSES of each string in `words` (a sequence of str), by the first
    rule that applies: any digit -> digit ("1996", "3-0"); no letter -> other (",", "--");
    >= 2 letters, all upper -> upper ("EU", "U.S."); first char upper, rest uncased or lower -> title
    ("Paris", "I", "J."); all letters lower -> lower; else mixed ("McDonald", "iPhone")."""
    s = pd.Series(list(words), dtype=object).astype(str)
    low, up = s.str.lower(), s.str.upper()
    has_upper, has_lower = (s != low).to_numpy(), (s != up).to_numpy()  # some char changes when folded
    letters = s.str.count(r"[^\W\d_]").to_numpy()  # (n,) unicode letters
    rest = s.str[1:]
    title = (s.str[:1].str.isupper() & (rest == rest.str.lower())).to_numpy(dtype=bool)
    conds = [s.str.contains(r"\d").to_numpy(dtype=bool), letters == 0, has_upper & ~has_lower & (letters >= 2),
             title, ~has_upper]  # fmt: skip
    out = np.select(conds, [5, 6, 3, 2, 1], default=4)
    return out.astype(np.int64)


def split_cases(split) -> np.ndarray:
    """(n,) int64 casing class of every token of `split`: classified once per distinct string (the
    `token` column is categorical) and spread to the tokens by the category codes."""
    col = split.tokens["token"]
    if isinstance(col.dtype, pd.CategoricalDtype):
        cats = col.cat.categories
        return case_classes(cats)[col.cat.codes.to_numpy()] if len(cats) else np.zeros(len(col), np.int64)
    codes, uniq = pd.factorize(col.to_numpy(dtype=object))
    return case_classes(uniq)[codes]
