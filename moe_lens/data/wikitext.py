"""WikiText-2 reader (Merity et al. 2016, "Pointer Sentinel Mixture Models"), word level.

Tokenisation follows pytorch/examples ``word_language_model/data.py``: for every line,
``line.split() + ['<eos>']`` (a blank line gives just ``<eos>``). This reproduces the published
counts: train 2,088,628 tokens, valid 217,646, test 245,569, 33,278 types over the three splits.

Structure: sent_id = line number in the split (0-based), position = index within the line.
An article heading `` = Title = `` (exactly one ``=`` on each side, a blank line before and
after) starts a new doc_id; section headings `` = = Section = = `` do not, nor do the few
``= Goals ; A =`` lines of flattened tables. This gives 600 / 60 / 60 articles (train / valid /
test), the published WikiText-2 article counts. Lines before the first heading belong to doc 0.
For the POS tagger, ``@-@ @,@ @.@`` (WikiText's escaped in-word hyphen, comma and point) are
shown to spaCy as ``- , .``; ``<unk>`` is tagged ``UNK`` and ``<eos>`` ``EOS`` afterwards.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from moe_lens.data.paths import read_text
from moe_lens.data.split import Parsed
from moe_lens.data.vocab import EOS, UNK
from moe_lens.errors import MoeLensError

SUBDIR = "wikitext-2"
SPLIT_FILES = {"train": "wiki.train.tokens", "valid": "wiki.valid.tokens", "test": "wiki.test.tokens"}
TAGGER_MAP = {"@-@": "-", "@,@": ",", "@.@": "."}
TOKENISER_VERSION = "wikitext-split-eos-v1"


def split_path(data_dir: Path, split: str) -> Path:
    path = Path(data_dir) / SUBDIR / SPLIT_FILES[split]
    if not path.is_file():
        raise MoeLensError(f"WikiText-2 {split} not found at {path}: run `moe-lens data download wikitext2`"
                           " or pass --data-dir / set MOE_LENS_DATA")
    return path


def is_article_heading(words: list[str]) -> bool:
    """`= Title =` with exactly one '=' on each side (sections are `= = X = =`)."""
    return len(words) >= 3 and words[0] == "=" and words[-1] == "=" and words[1] != "=" and words[-2] != "="


def _between_blanks(lines: list[list[str]], i: int) -> bool:
    """Real headings stand between blank lines; `= Goals ; A =` inside a table legend does not."""
    return (i == 0 or not lines[i - 1]) and (i + 1 >= len(lines) or not lines[i + 1])


def read_lines(path: Path) -> tuple[list[list[str]], str]:
    """Whitespace-split lines (without <eos>) and the file's sha256."""
    text, sha = read_text(path)
    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final newline ends the last line, it does not start a new one
    return [line.split() for line in lines], sha


def read_wikitext(path: Path) -> Parsed:
    """Parse one split file into tokens with <eos>, line offsets and doc ids."""
    lines, sha = read_lines(path)
    lengths = np.fromiter((len(w) + 1 for w in lines), np.int64, len(lines))  # +1 for <eos>
    offsets = np.zeros(len(lines) + 1, dtype=np.int64)
    np.cumsum(lengths, out=offsets[1:])
    tokens: list[str] = []
    line_doc = np.zeros(len(lines), dtype=np.int32)
    doc = -1
    for i, words in enumerate(lines):
        if words and words[0] == "=" and is_article_heading(words) and _between_blanks(lines, i):
            doc += 1
        line_doc[i] = max(doc, 0)
        tokens.extend(words)
        tokens.append(EOS)
    n = int(offsets[-1])
    sent_id = np.repeat(np.arange(len(lines), dtype=np.int32), lengths)  # (n,)
    position = (np.arange(n, dtype=np.int64) - np.repeat(offsets[:-1], lengths)).astype(np.int32)
    return Parsed(tokens=tokens, seq_offsets=offsets, doc_id=np.repeat(line_doc, lengths),
                  sent_id=sent_id, position=position, sha256=sha,
                  meta={"lines": len(lines), "articles": doc + 1})


def tagger_sentences(parsed: Parsed) -> list[list[str]]:
    """Lines as the tagger sees them: no <eos>, escaped markers unescaped, empty lines dropped."""
    off = parsed.seq_offsets
    toks = parsed.tokens
    out = []
    for s in range(len(off) - 1):
        a, b = int(off[s]), int(off[s + 1]) - 1  # drop the trailing <eos>
        if b > a:
            out.append([TAGGER_MAP.get(w, w) for w in toks[a:b]])
    return out


def place_tags(parsed: Parsed, codes: np.ndarray, tagset: list[str]) -> pd.Categorical:
    """(n,) PTB tags from per-word codes (words = all tokens but <eos>); EOS / UNK fixed."""
    toks = np.asarray(parsed.tokens, dtype=object)
    is_eos = np.zeros(len(toks), dtype=bool)
    is_eos[parsed.seq_offsets[1:] - 1] = True  # the last token of every line
    full = np.full(len(toks), len(tagset), dtype=np.int16)  # default EOS
    assert int((~is_eos).sum()) == len(codes), "POS cache does not match the file"
    full[~is_eos] = codes
    full[toks == UNK] = len(tagset) + 1
    return pd.Categorical.from_codes(full, categories=[*tagset, "EOS", "UNK"])
