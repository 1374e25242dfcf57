r"""SQuAD v1.1 reader (Rajpurkar et al. 2016): regex tokenisation and answer token spans.

Tokenisation rule (one rule for contexts and questions, character offsets kept)::

    TOKEN_RE = r"(?i)\w+(?=n['’]t\b)|n['’]t\b|['’](?:s|re|ve|ll|d|m)\b|\w+|[^\w\s]"

i.e. runs of word characters, every other non-space character alone (so ``two-man`` is
``two - man`` and ``1,000`` is ``1 , 000``), with Penn-Treebank-style clitics split off
(``Laden's`` -> ``Laden 's``, ``don't`` -> ``do n't``) so the POS tagger sees familiar tokens.
Splitting at hyphens and apostrophes matters: joining them (``\w+(?:[-']\w+)*``) maps only 98.8%
of dev answers exactly, this rule 99.8% (the rest start or end inside a word: ``[Japan]ese``).
An answer ``[answer_start, answer_start + len(text))`` (surrounding spaces stripped) maps to the
tokens it overlaps; the mapping is *exact* when the first token starts and the last token ends
on the span's boundaries (`span_exact_share`: 0.99+ on dev).

Splits: with ``train-v1.1.json`` present, train = that file and valid (= test, alias dev) = the
official dev file (``meta["squad_source"] = "official"``). With only ``dev-v1.1.json``, dev is
split by ARTICLE: titles sorted, every 5th (sorted index % 5 == 4) goes to valid, the rest to
train, no test split (``meta["squad_source"] = "dev-split"``).
"""
from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import pandas as pd

from moe_lens.data.paths import read_text
from moe_lens.data.split import Parsed
from moe_lens.errors import InputError, MoeLensError

SUBDIR = "squad-v1.1"
TRAIN_FILE, DEV_FILE = "train-v1.1.json", "dev-v1.1.json"
TOKEN_RE = re.compile(r"(?i)\w+(?=n['’]t\b)|n['’]t\b|['’](?:s|re|ve|ll|d|m)\b|\w+|[^\w\s]")
TOKENISER_VERSION = "squad-regex-v2"
SEGMENTS = ["question", "context"]
SPLIT_RULE = "dev articles by sorted title, index % 5 == 4 -> valid, rest -> train"


def tokenize(text: str) -> tuple[list[str], np.ndarray]:
    """Tokens of `text` and their (n, 2) int64 [start, end) character offsets."""
    matches = list(TOKEN_RE.finditer(text))
    offsets = np.array([m.span() for m in matches], dtype=np.int64).reshape(-1, 2)  # (n, 2)
    return [m.group() for m in matches], offsets


@dataclass
class SquadFile:
    """One SQuAD JSON file, tokenised; paragraphs and questions indexed over the whole file."""

    path: Path
    sha256: str
    titles: list[str] = field(default_factory=list)
    contexts: list[str] = field(default_factory=list)  # per paragraph
    ctx_article: list[int] = field(default_factory=list)
    ctx_tokens: list[list[str]] = field(default_factory=list)
    ctx_offsets: list[np.ndarray] = field(default_factory=list)  # (n_c, 2) each
    q_ids: list[str] = field(default_factory=list)
    questions: list[str] = field(default_factory=list)
    q_tokens: list[list[str]] = field(default_factory=list)
    q_context: list[int] = field(default_factory=list)  # paragraph index of each question
    answers: list[list[str]] = field(default_factory=list)
    ans_span: list[tuple[int, int]] = field(default_factory=list)  # first answer, context tokens, inclusive
    ans_exact: list[list[bool]] = field(default_factory=list)  # every answer: maps exactly?


def _get(obj: object, key: str, path: Path, where: str, kind: type) -> object:
    if not isinstance(obj, dict) or not isinstance(obj.get(key), kind):
        raise InputError(path, None, f"entry {where}: missing or non-{kind.__name__} field {key!r}")
    return obj[key]


def map_span(offsets: np.ndarray, context: str, start: int, text: str, path: Path,
             where: str) -> tuple[int, int, bool]:
    """(first, last) token indices covering the answer and whether they match it exactly."""
    end = start + len(text)
    if start < 0 or end > len(context) or not text:
        raise InputError(path, None, f"entry {where}: answer span [{start}, {end}) is outside its context "
                                     f"(length {len(context)}) or empty")
    while start < end and context[start].isspace():
        start += 1
    while end > start and context[end - 1].isspace():
        end -= 1
    first = int(np.searchsorted(offsets[:, 1], start, side="right"))  # first token ending after start
    last = int(np.searchsorted(offsets[:, 0], end, side="left")) - 1  # last token starting before end
    if first >= len(offsets):
        first = last = len(offsets) - 1
    last = max(first, last)
    exact = bool(offsets[first, 0] == start and offsets[last, 1] == end and context[start:end] == text.strip())
    return first, last, exact


def read_squad(path: Path) -> SquadFile:
    """Parse and tokenise a SQuAD v1.1 JSON file; `InputError` names the line or entry on bad input."""
    text, sha = read_text(path)
    try:
        data = json.loads(text)
    except json.JSONDecodeError as e:
        raise InputError(path, e.lineno, f"bad JSON: {e.msg} (column {e.colno})") from None
    sf = SquadFile(path=Path(path), sha256=sha)
    for a, article in enumerate(_get(data, "data", path, "<root>", list)):
        sf.titles.append(str(_get(article, "title", path, f"data[{a}]", str)))
        for p, para in enumerate(_get(article, "paragraphs", path, f"data[{a}]", list)):
            where = f"data[{a}].paragraphs[{p}]"
            _read_paragraph(sf, para, a, path, where)
    if not sf.questions:
        raise InputError(path, None, "no questions found")
    return sf


def _read_paragraph(sf: SquadFile, para: object, article: int, path: Path, where: str) -> None:
    context = _get(para, "context", path, where, str)
    toks, offsets = tokenize(context)
    ci = len(sf.contexts)
    sf.contexts.append(context)
    sf.ctx_article.append(article)
    sf.ctx_tokens.append(toks)
    sf.ctx_offsets.append(offsets)
    for q, qa in enumerate(_get(para, "qas", path, where, list)):
        w = f"{where}.qas[{q}]"
        answers = _get(qa, "answers", path, w, list)
        if not answers:
            raise InputError(path, None, f"entry {w}: no answers")
        spans, texts = [], []
        for k, ans in enumerate(answers):
            texts.append(_get(ans, "text", path, f"{w}.answers[{k}]", str))
            start = _get(ans, "answer_start", path, f"{w}.answers[{k}]", int)
            spans.append(map_span(offsets, context, start, texts[-1], path, f"{w}.answers[{k}]"))
        sf.q_ids.append(str(qa.get("id", f"{ci}-{q}")))
        sf.questions.append(_get(qa, "question", path, w, str))
        sf.q_tokens.append(tokenize(sf.questions[-1])[0])
        sf.q_context.append(ci)
        sf.answers.append(texts)
        sf.ans_span.append(spans[0][:2])
        sf.ans_exact.append([s[2] for s in spans])


def squad_files(data_dir: Path) -> tuple[Path | None, Path]:
    """(train file or None, dev file); MoeLensError when dev is missing."""
    d = Path(data_dir) / SUBDIR
    dev = d / DEV_FILE
    if not dev.is_file():
        raise MoeLensError(f"SQuAD v1.1 not found at {dev}: run `moe-lens data download squad` "
                           "or pass --data-dir / set MOE_LENS_DATA")
    train = d / TRAIN_FILE
    return (train if train.is_file() else None), dev


def dev_split_articles(titles: list[str]) -> dict[str, list[int]]:
    """The deterministic article-level split of dev: {'train': [...], 'valid': [...]} (file order)."""
    order = sorted(range(len(titles)), key=lambda a: (titles[a], a))
    valid = sorted(a for rank, a in enumerate(order) if rank % 5 == 4)
    vset = set(valid)
    return {"train": [a for a in range(len(titles)) if a not in vset], "valid": valid}


def tagger_sentences(sf: SquadFile) -> list[list[str]]:
    """What the POS tagger sees: every paragraph, then every question (file order)."""
    return [*sf.ctx_tokens, *sf.q_tokens]


def assemble(sf: SquadFile, articles: list[int], tag_codes: list[np.ndarray] | None) -> Parsed:
    """One sequence per question of `articles`: question tokens, then its context tokens.

    tag_codes: per-sentence int code arrays aligned with `tagger_sentences(sf)`, or None.
    """
    keep = set(articles)
    ex = [i for i, ci in enumerate(sf.q_context) if sf.ctx_article[ci] in keep]  # file order
    n_ctx = len(sf.contexts)
    tokens: list[str] = []
    seg_lens: list[int] = []
    pos_pieces: list[np.ndarray] = []
    for i in ex:
        ci = sf.q_context[i]
        tokens.extend(sf.q_tokens[i])
        tokens.extend(sf.ctx_tokens[ci])
        seg_lens += [len(sf.q_tokens[i]), len(sf.ctx_tokens[ci])]
        if tag_codes is not None:
            pos_pieces += [tag_codes[n_ctx + i], tag_codes[ci]]
    seg = np.asarray(seg_lens, dtype=np.int64).reshape(-1, 2)  # (n_ex, 2) question, context lengths
    bounds = np.zeros(seg.size + 1, dtype=np.int64)
    np.cumsum(seg.ravel(), out=bounds[1:])
    q_start, c_start, c_end = bounds[0:-1:2], bounds[1::2], bounds[2::2]
    n = int(bounds[-1])
    seg_lens_flat = seg.ravel()
    is_ctx = np.repeat(np.tile([False, True], len(ex)), seg_lens_flat)  # (n,)
    ans = np.asarray([sf.ans_span[i] for i in ex], dtype=np.int64).reshape(-1, 2)  # (n_ex, 2) inclusive
    in_answer = np.zeros(n, dtype=bool)
    for s, (a0, a1) in zip(c_start, ans):
        in_answer[s + a0:s + a1 + 1] = True
    ex_lens = seg.sum(axis=1)
    parsed = Parsed(
        tokens=tokens, seq_offsets=np.concatenate([[0], np.cumsum(ex_lens)]).astype(np.int64),
        doc_id=np.repeat(np.asarray([sf.ctx_article[sf.q_context[i]] for i in ex], dtype=np.int32), ex_lens),
        sent_id=np.repeat(np.arange(len(ex), dtype=np.int32), ex_lens),
        position=(np.arange(n) - np.repeat(bounds[:-1], seg_lens_flat)).astype(np.int32),
        sha256=sf.sha256,
        columns={"segment": pd.Categorical.from_codes(is_ctx.astype(np.int8), categories=SEGMENTS),
                 "in_answer": in_answer},
        extras={"q_start": q_start, "q_end": c_start.copy(), "c_start": c_start, "c_end": c_end,
                "ans_start": ans[:, 0].copy(), "ans_end": ans[:, 1].copy(),
                "answers": [sf.answers[i] for i in ex], "contexts": [sf.contexts[sf.q_context[i]] for i in ex],
                "char_offsets": [sf.ctx_offsets[sf.q_context[i]] for i in ex],
                "questions": [sf.questions[i] for i in ex], "question_ids": [sf.q_ids[i] for i in ex],
                "context_id": np.asarray([sf.q_context[i] for i in ex], dtype=np.int64),
                "span_exact": np.asarray([sf.ans_exact[i][0] for i in ex], dtype=bool)},
        meta=_span_meta(sf, ex, articles))
    if tag_codes is not None:
        parsed.columns["pos_codes"] = np.concatenate(pos_pieces) if pos_pieces else np.zeros(0, np.int64)
    return parsed


def _span_meta(sf: SquadFile, ex: list[int], articles: list[int]) -> dict:
    flat = [e for i in ex for e in sf.ans_exact[i]]
    return {"articles": len(articles), "paragraphs": len({sf.q_context[i] for i in ex}), "questions": len(ex),
            "answers": len(flat), "span_exact_share": float(np.mean(flat)) if flat else float("nan"),
            "span_exact_first_share": float(np.mean([sf.ans_exact[i][0] for i in ex])) if ex else float("nan"),
            "titles": [sf.titles[a] for a in articles]}
