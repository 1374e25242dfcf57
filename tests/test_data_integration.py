"""Counts over the real datasets (MOE_LENS_DATA): every number shared/data/README.md publishes."""
from __future__ import annotations

import os

import pytest

from moe_lens.data import build_vocab, load_split, pos
from moe_lens.data.conll import entity_counts
from moe_lens.data.squad import DEV_FILE, SUBDIR, read_squad

pytestmark = pytest.mark.integration


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))  # never write beside the shared data


@pytest.mark.parametrize("split,lines,tokens,unk,articles", [
    ("train", 36718, 2088628, 54625, 600), ("valid", 3760, 217646, 11718, 60), ("test", 4358, 245569, 15218, 60)])
def test_wikitext_counts(real_data_dir, split, lines, tokens, unk, articles):
    s = load_split("wikitext2", split, real_data_dir, pos=False, progress=False)
    assert len(s) == tokens and s.num_sequences == lines and s.tokens.shape == (tokens, 15)
    assert int((s.tokens["token"] == "<unk>").sum()) == unk
    assert s.tokens["doc_id"].nunique() == articles and s.meta["articles"] == articles
    assert len(s.vocab) == 33278


def test_wikitext_vocab_and_cap(real_data_dir):
    assert len(build_vocab("wikitext2", real_data_dir)) == 33278
    v = build_vocab("wikitext2", real_data_dir, vocab_size=10000)
    assert len(v) == 10001 and v.itos[-1] == "<unk>" and v.itos[0] == "the"


@pytest.mark.parametrize("split,docs,sents,tokens,ents", [
    ("train", 946, 14041, 203621, dict(PER=6600, LOC=7140, ORG=6321, MISC=3438)),
    ("valid", 216, 3250, 51362, dict(PER=1842, LOC=1837, ORG=1341, MISC=922)),
    ("test", 231, 3453, 46435, dict(PER=1617, LOC=1668, ORG=1661, MISC=702))])
def test_conll_counts(real_data_dir, split, docs, sents, tokens, ents):
    s = load_split("conll2003", split, real_data_dir, pos=False, progress=False)
    assert s.num_sequences == sents and len(s) == tokens and s.labels.shape == (tokens,)
    assert s.tokens["doc_id"].nunique() == docs
    assert entity_counts(s.tokens["ner_tag"]) == ents
    assert s.tokens["pos_tag"].nunique() <= 47 and s.tokens["pos_tag"].notna().all()


def test_squad_counts_spans_and_split(real_data_dir):
    sf = read_squad(real_data_dir / SUBDIR / DEV_FILE)
    answers = [e for x in sf.ans_exact for e in x]
    assert (len(sf.titles), len(sf.contexts), len(sf.questions), len(answers)) == (48, 2067, 10570, 34726)
    share = sum(answers) / len(answers)
    print(f"SQuAD dev exact span share: {share:.4f} of {len(answers)} answers")
    assert share >= 0.99
    tr = load_split("squad", "train", real_data_dir, pos=False, progress=False)
    va = load_split("squad", "valid", real_data_dir, vocab=tr.vocab, pos=False, progress=False)
    assert tr.meta["squad_source"] == va.meta["squad_source"] == "dev-split"
    assert tr.num_sequences + va.num_sequences == 10570
    assert tr.meta["articles"] + va.meta["articles"] == 48 and va.meta["articles"] == 9
    assert not set(tr.tokens["doc_id"].unique()) & set(va.tokens["doc_id"].unique())
    assert not set(tr.meta["titles"]) & set(va.meta["titles"])
    ex = va.extras
    for i in range(0, va.num_sequences, 97):  # answer token spans read back as the gold text
        offs, a, b = ex["char_offsets"][i], ex["ans_start"][i], ex["ans_end"][i]
        if ex["span_exact"][i]:
            assert ex["contexts"][i][offs[a, 0]:offs[b, 1]] == ex["answers"][i][0].strip()
    assert int(va.tokens["in_answer"].sum()) == int((ex["ans_end"] - ex["ans_start"] + 1).sum())


@pytest.mark.skipif(pos.load_tagger() is None and os.environ.get("CI", "").lower() != "true",
                                 reason="no spaCy English model installed (in CI it must be: never skipped)")
def test_pos_on_slices(real_data_dir):
    r = pos.conll_pos_agreement(real_data_dir, "test", max_sentences=400)
    print(f"spaCy vs CoNLL gold POS (first 400 test sentences, {r['tokens']} tokens): "
          f"raw {r['raw']:.3f}, mapped {r['mapped']:.3f}")
    assert r["mapped"] > 0.85 and r["mapped"] > r["raw"]
    lines = (real_data_dir / "wikitext-2" / "wiki.valid.tokens").read_text().split("\n")[:40]
    tags = pos.tag_sentences([line.split() for line in lines if line.strip()])
    flat = [t for s in tags for t in s]
    assert flat.count("NNP") > 10 and flat.count("DT") > 10


def test_cached_wikitext_train_load_never_retags(real_data_dir, monkeypatch):
    """The cache path: a fake tagger fills the cache, the second load reads it and must not tag (its speed,
    cold vs cached, is benchmarks/bench_data.py's figure, never a timed assertion here)."""
    monkeypatch.setattr(pos, "find_model", lambda: ("fake_model", "0"))
    monkeypatch.setattr(pos, "tag_sentences", lambda sents, **k: [["NN"] * len(s) for s in sents])
    load_split("wikitext2", "train", real_data_dir, progress=False)

    def boom(*a, **k):
        raise AssertionError("re-tagged although cached")

    monkeypatch.setattr(pos, "tag_sentences", boom)
    s = load_split("wikitext2", "train", real_data_dir, progress=False)
    assert s.tokens["pos_tag"].notna().all() and int((s.tokens["pos_tag"] == "EOS").sum()) == 36718


def test_glove_subset_coverage(real_data_dir):
    from moe_lens.data import load_glove

    v = build_vocab("wikitext2", real_data_dir)
    emb, coverage = load_glove(real_data_dir / "glove" / "glove.6B.50d.subset.txt", v)
    assert emb.shape == (33278, 50) and 0.95 < coverage < 1.0
    assert abs(float(emb[v.stoi["the"]][0]) - 0.418) < 1e-6  # the first value of GloVe's 'the' line
