"""Datasets as annotated token streams: WikiText-2, CoNLL-2003 and SQuAD v1.1.

The API a trainer calls::

    split = load_split("wikitext2", "train")          # Split: tokens table, ids, sequence offsets
    vocab = build_vocab("conll2003", vocab_size=None) # Vocab
    emb, coverage = load_glove("glove.6B.50d.txt", split.vocab)

Modules: paths.py (data / cache directories, strict reading), wikitext.py, conll.py, squad.py
(readers), vocab.py (vocabularies, frequency ranks and bands), pos.py (spaCy POS on given tokens,
cached; agreement with gold), split.py (`Split`, the `tokens` table of docs/traces.md),
loader.py (`load_split`, `build_vocab`), squad_eval.py (EM / F1 on text), glove.py, download.py and
commands.py (`moe-lens data`).
See docs/data.md.
"""
from __future__ import annotations

from moe_lens.data.glove import load_glove
from moe_lens.data.loader import available_splits, build_vocab, canonical_dataset, load_split
from moe_lens.data.paths import resolve_cache_dir, resolve_data_dir
from moe_lens.data.pos import pos_agreement
from moe_lens.data.split import TOKEN_COLUMNS, Split
from moe_lens.data.vocab import FREQ_BANDS, Vocab

__all__ = ["load_split", "build_vocab", "available_splits", "canonical_dataset", "load_glove",
           "resolve_data_dir", "resolve_cache_dir", "pos_agreement", "Split", "Vocab", "TOKEN_COLUMNS",
           "FREQ_BANDS"]
