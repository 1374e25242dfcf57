"""`load_split` and `build_vocab`: the three readers joined to vocabularies and annotations.

Vocabularies (see vocab.py): WikiText-2 uses every word of its three splits (33,278 types) in
first-appearance order, as pytorch/examples does, unless capped (most frequent N train words +
``<unk>``). CoNLL-2003 and SQuAD use their training words (min count 1, original case) after
``<pad>`` = 0 and ``<unk>`` = 1. freq_rank / freq_band always come from the training split.
POS: CoNLL's gold column; spaCy (pos.py) for WikiText-2 and SQuAD, cached per source file.
"""
from __future__ import annotations

from collections import Counter
from pathlib import Path

import numpy as np
import pandas as pd

from moe_lens.data import conll, squad, wikitext
from moe_lens.data.paths import legacy_cache_dirs, resolve_cache_dir, resolve_data_dir
from moe_lens.data.pos import cached_tags, tagger_name
from moe_lens.data.split import Parsed, Split, make_split
from moe_lens.data.vocab import Vocab, capped_vocab, count_tokens, first_appearance_vocab, freq_ranks
from moe_lens.errors import MoeLensError

DATASET_ALIASES = {"wikitext2": "wikitext2", "wikitext-2": "wikitext2", "wikitext": "wikitext2",
                   "conll2003": "conll2003", "conll": "conll2003", "squad": "squad", "squad1.1": "squad",
                   "squad-v1.1": "squad"}
SPLITS = ("train", "valid", "test")


def canonical_dataset(name: str) -> str:
    try:
        return DATASET_ALIASES[name.lower()]
    except KeyError:
        raise MoeLensError(f"unknown dataset {name!r}; allowed: wikitext2, conll2003, squad") from None


def available_splits(dataset: str, data_dir: str | Path | None = None) -> tuple[str, ...]:
    """Splits `load_split` accepts here (SQuAD from dev only has no test split)."""
    if canonical_dataset(dataset) == "squad":
        train, _ = squad.squad_files(resolve_data_dir(data_dir))
        return SPLITS if train is not None else ("train", "valid")
    return SPLITS


def _check_split(dataset: str, split: str, data_dir: Path) -> str:
    split = "valid" if split == "dev" else split
    allowed = available_splits(dataset, data_dir)
    if split not in allowed:
        extra = " (only dev-v1.1.json is present: it is split into train/valid)" if dataset == "squad" else ""
        raise MoeLensError(f"unknown split {split!r} for {dataset}; allowed: {', '.join(allowed)}{extra}")
    return split


def build_vocab(dataset: str, data_dir: str | Path | None = None, *, vocab_size: int | None = None) -> Vocab:
    """The dataset's vocabulary (see module docstring); `vocab_size` caps it to the top N train words."""
    ds = canonical_dataset(dataset)
    d = resolve_data_dir(data_dir)
    if ds == "wikitext2" and vocab_size is None:
        return first_appearance_vocab(wikitext.read_wikitext(wikitext.split_path(d, s)).tokens for s in SPLITS)
    return capped_vocab(_train_counts(ds, d), vocab_size, pad=ds != "wikitext2")


def _train_counts(ds: str, d: Path, parsed_train: Parsed | None = None) -> Counter:
    if ds == "wikitext2":
        return Counter((parsed_train or wikitext.read_wikitext(wikitext.split_path(d, "train"))).tokens)
    if ds == "conll2003":
        return Counter((parsed_train or conll.read_conll(conll.split_path(d, "train"))).tokens)
    sf, articles = _squad_source(d, "train")
    return _squad_counts(sf, articles)


def load_split(dataset: str, split: str, data_dir: str | Path | None = None, *, vocab: Vocab | None = None,
               vocab_size: int | None = None, pos: bool = True, progress: bool = True) -> Split:
    """One annotated split. `vocab` reuses a vocabulary (e.g. train's for valid); `pos=False` skips tagging."""
    ds = canonical_dataset(dataset)
    d = resolve_data_dir(data_dir)
    split = _check_split(ds, split, d)
    load = {"wikitext2": _load_wikitext, "conll2003": _load_conll, "squad": _load_squad}[ds]
    out = load(split, d, vocab, vocab_size, pos, progress)
    out.meta.setdefault("data_dir", str(d))
    out.meta["vocab_size"] = len(out.vocab)
    return out


def _load_wikitext(split: str, d: Path, vocab: Vocab | None, vocab_size: int | None, pos: bool,
                   progress: bool) -> Split:
    parsed = {s: wikitext.read_wikitext(wikitext.split_path(d, s)) for s in SPLITS
              if s == split or s == "train" or (vocab is None and vocab_size is None)}
    counts, codes, types = count_tokens(parsed["train"].tokens)  # types: train words, first appearance
    if vocab is None:
        vocab = (first_appearance_vocab([types, parsed["valid"].tokens, parsed["test"].tokens])
                 if vocab_size is None else capped_vocab(counts, vocab_size, pad=False))
    p = parsed[split]
    tags = None
    if pos:
        got = cached_tags(resolve_cache_dir("pos"), ["wikitext2", p.sha256, wikitext.TOKENISER_VERSION],
                          lambda: wikitext.tagger_sentences(p), progress=progress, also_read=legacy_cache_dirs(d))
        tags = wikitext.place_tags(p, *got) if got is not None else None
    out = make_split("wikitext2", split, p, vocab, freq_ranks(counts), tags,
                     factorized=(codes, types) if split == "train" else None)
    out.meta["pos_source"] = tagger_name() if tags is not None else None
    return out


def _load_conll(split: str, d: Path, vocab: Vocab | None, vocab_size: int | None, pos: bool,
                progress: bool) -> Split:
    p = conll.read_conll(conll.split_path(d, split))
    counts = _train_counts("conll2003", d, p if split == "train" else None)
    vocab = vocab or capped_vocab(counts, vocab_size, pad=True)
    gold = p.columns.pop("pos_tag")  # gold tags cost nothing: kept even with pos=False
    labels = p.extras.pop("labels")
    out = make_split("conll2003", split, p, vocab, freq_ranks(counts), gold)
    out.labels, out.label_names = labels, list(conll.LABELS)
    out.meta["pos_source"] = "gold (CoNLL-2003 POS column)"
    return out


def _squad_source(d: Path, split: str) -> tuple[squad.SquadFile, list[int]]:
    train_file, dev_file = squad.squad_files(d)
    if train_file is not None:
        sf = squad.read_squad(train_file if split == "train" else dev_file)
        return sf, list(range(len(sf.titles)))
    sf = squad.read_squad(dev_file)
    return sf, squad.dev_split_articles(sf.titles)[split]


def _squad_counts(sf: squad.SquadFile, articles: list[int]) -> Counter:
    """Train counts over each paragraph once plus every question (not the per-question copies)."""
    keep = set(articles)
    counts: Counter = Counter()
    for ci, toks in enumerate(sf.ctx_tokens):
        if sf.ctx_article[ci] in keep:
            counts.update(toks)
    for i, toks in enumerate(sf.q_tokens):
        if sf.ctx_article[sf.q_context[i]] in keep:
            counts.update(toks)
    return counts


def _load_squad(split: str, d: Path, vocab: Vocab | None, vocab_size: int | None, pos: bool,
                progress: bool) -> Split:
    sf, articles = _squad_source(d, split)
    official = squad.squad_files(d)[0] is not None
    if split == "train":
        counts = _squad_counts(sf, articles)
    elif official:
        counts = _train_counts("squad", d)  # reads train-v1.1.json
    else:
        counts = _squad_counts(sf, squad.dev_split_articles(sf.titles)["train"])
    vocab = vocab or capped_vocab(counts, vocab_size, pad=True)
    codes = None
    if pos:
        got = cached_tags(resolve_cache_dir("pos"), ["squad", sf.sha256, squad.TOKENISER_VERSION],
                          lambda: squad.tagger_sentences(sf), progress=progress, also_read=legacy_cache_dirs(d))
        if got is not None:
            lens = [len(s) for s in squad.tagger_sentences(sf)]
            codes = np.split(got[0], np.cumsum(lens)[:-1])
    p = squad.assemble(sf, articles, codes)
    tags = pd.Categorical.from_codes(p.columns.pop("pos_codes"), categories=got[1]) if codes is not None else None
    out = make_split("squad", split, p, vocab, freq_ranks(counts), tags)
    out.meta.update(squad_source="official" if official else "dev-split", source_file=str(sf.path),
                    pos_source=tagger_name() if tags is not None else None)
    if not official:
        out.meta["squad_split_rule"] = squad.SPLIT_RULE
    return out

