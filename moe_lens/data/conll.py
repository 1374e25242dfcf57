"""CoNLL-2003 English NER reader (Tjong Kim Sang & De Meulder 2003).

Files: ``<data_dir>/conll2003/{train,valid,test}.txt`` or the original names
``eng.train`` / ``eng.testa`` / ``eng.testb``. Each non-blank line has exactly 4 space-separated
columns ``token POS chunk NER``; a blank line ends a sentence; ``-DOCSTART- -X- -X- O`` starts
a document (doc_id counts them from 0). The last sentence is kept when the file has no final
newline. NER tags may be IOB1 (the 2003 release: ``B-`` only between two adjacent spans of one
type) or IOB2 (every span starts with ``B-``); both are normalised to IOB2: an ``I-X`` that does
not continue an ``X`` span becomes ``B-X``. The gold POS column is the token's pos_tag.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moe_lens.data.paths import read_text
from moe_lens.data.split import Parsed
from moe_lens.errors import InputError, MoeLensError

SUBDIR = "conll2003"
SPLIT_FILES = {"train": ("train.txt", "eng.train"), "valid": ("valid.txt", "eng.testa"),
               "test": ("test.txt", "eng.testb")}
# Hugging Face `conll2003` ner_tags order, so label ids agree with that dataset.
LABELS = ["O", "B-PER", "I-PER", "B-ORG", "I-ORG", "B-LOC", "I-LOC", "B-MISC", "I-MISC"]
_LABEL_ID = {t: i for i, t in enumerate(LABELS)}
ENTITY_TYPES = ("PER", "LOC", "ORG", "MISC")


def split_path(data_dir: Path, split: str) -> Path:
    d = Path(data_dir) / SUBDIR
    for name in SPLIT_FILES[split]:
        if (d / name).is_file():
            return d / name
    raise MoeLensError(
        f"CoNLL-2003 {split} not found: expected {d / SPLIT_FILES[split][0]} (or {SPLIT_FILES[split][1]}); "
        "run `moe-lens data download conll2003` for how to obtain it")


def to_iob2(tags: list[str]) -> list[str]:
    """IOB1 or IOB2 tags of one sentence -> IOB2."""
    out = []
    prev = "O"
    for t in tags:
        if t.startswith("I-") and prev[2:] != t[2:]:  # prev is O or another type: a span starts here
            t = "B-" + t[2:]
        out.append(t)
        prev = t
    return out


def read_conll(path: Path) -> Parsed:
    """Parse one CoNLL-2003 file: tokens, gold POS, IOB2 NER, sentence and document ids."""
    text, sha = read_text(path)
    tokens: list[str] = []
    pos: list[str] = []
    ner: list[str] = []
    starts: list[int] = [0]  # sentence start offsets
    sent_doc: list[int] = []
    sent_ner: list[str] = []
    doc = -1

    def flush() -> None:
        if len(tokens) > starts[-1]:
            ner.extend(to_iob2(sent_ner))
            sent_ner.clear()
            starts.append(len(tokens))
            sent_doc.append(max(doc, 0))

    for lineno, line in enumerate(text.split("\n"), start=1):
        cols = line.split()
        if not cols:
            flush()
            continue
        if len(cols) != 4:
            raise InputError(path, lineno, f"expected 4 columns (token POS chunk NER), got {len(cols)}")
        if cols[0] == "-DOCSTART-":
            flush()
            doc += 1
            continue
        tag = cols[3]
        if tag != "O" and (tag[:2] not in ("B-", "I-") or tag[2:] not in ENTITY_TYPES):
            raise InputError(path, lineno, f"unknown NER tag {tag!r}; allowed: O, B-/I- + {', '.join(ENTITY_TYPES)}")
        tokens.append(cols[0])
        pos.append(cols[1])
        sent_ner.append(tag)
    flush()  # the files end without a newline: keep the last sentence
    if not tokens:
        raise InputError(path, None, "no sentences found")
    return _structure(tokens, pos, ner, starts, sent_doc, sha, doc + 1)


def _structure(tokens: list[str], pos: list[str], ner: list[str], starts: list[int],
               sent_doc: list[int], sha: str, docs: int) -> Parsed:
    offsets = np.asarray(starts, dtype=np.int64)  # (s+1,)
    lengths = np.diff(offsets)
    n = len(tokens)
    position = (np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    labels = np.fromiter((_LABEL_ID[t] for t in ner), np.int64, n)  # (n,)
    return Parsed(
        tokens=tokens, seq_offsets=offsets,
        doc_id=np.repeat(np.asarray(sent_doc, dtype=np.int32), lengths),
        sent_id=np.repeat(np.arange(len(lengths), dtype=np.int32), lengths), position=position, sha256=sha,
        columns={"ner_tag": pd.Categorical.from_codes(labels, categories=LABELS), "pos_tag": pd.Categorical(pos)},
        extras={"labels": labels},
        meta={"documents": docs, "sentences": len(lengths)})


def entity_counts(ner_tags: pd.Series | np.ndarray) -> dict[str, int]:
    """Number of entity mentions (B- tags, IOB2) per type."""
    tags = np.asarray(ner_tags, dtype=object)
    return {t: int(np.sum(tags == f"B-{t}")) for t in ENTITY_TYPES}
