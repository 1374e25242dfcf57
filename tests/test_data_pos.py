"""POS tags: spaCy on the given tokenisation, the on-disk cache, the no-tagger path, agreement."""
from __future__ import annotations

import os
import shutil
import warnings
from pathlib import Path

import pytest

from moe_lens.data import load_split, pos, wikitext
from moe_lens.data.pos import normalise_tag, pos_agreement

FIX = Path(__file__).parent / "fixtures" / "data"
needs_tagger = pytest.mark.skipif(pos.load_tagger() is None and os.environ.get("CI", "").lower() != "true",
                                 reason="no spaCy English model installed (in CI it must be: never skipped)")


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))


@needs_tagger
def test_wikitext_tags_aligned_and_cached(tmp_path, monkeypatch):
    s = load_split("wikitext2", "train", FIX, progress=False)
    df = s.tokens
    assert df["pos_tag"].notna().all()
    assert (df.loc[df.token == "<eos>", "pos_tag"] == "EOS").all()
    assert (df.loc[df.token == "<unk>", "pos_tag"] == "UNK").all()
    assert df.loc[df.token == "the", "pos_tag"].eq("DT").all()
    assert s.meta["pos_source"].startswith("spacy en_core_web_sm")
    assert len(list((tmp_path / "cache" / "pos").glob("pos-*.npz"))) == 1

    def boom(*a, **k):
        raise AssertionError("re-tagged although cached")

    monkeypatch.setattr(pos, "tag_sentences", boom)
    again = load_split("wikitext2", "train", FIX, progress=False)
    assert again.tokens["pos_tag"].tolist() == df["pos_tag"].tolist()


@needs_tagger
def test_pos_tagging_is_announced_once_with_its_duration(tmp_path, capfd):
    expected = sum(len(s) for s in wikitext.tagger_sentences(wikitext.read_wikitext(FIX / "wikitext-2" / "wiki.valid.tokens")))
    load_split("wikitext2", "valid", FIX, progress=True)
    err = capfd.readouterr().err
    lines = [ln for ln in err.splitlines() if "POS-tagging" in ln]
    assert len(lines) == 1, err
    seconds = max(1, round(expected / pos.TAG_RATE))
    assert f"POS-tagging {expected:,} tokens" in lines[0] and f"about {seconds} s" in lines[0]
    assert str(tmp_path / "cache" / "pos") in lines[0]
    assert "POS tagging" in err and "tok" in err  # the tqdm bar after the line
    load_split("wikitext2", "valid", FIX, progress=True)  # cached: no second announcement
    assert "POS-tagging" not in capfd.readouterr().err


@needs_tagger
@pytest.mark.parametrize("writable", [False, True], ids=["read-only", "writable"])
def test_pos_cache_never_written_into_the_data_dir(tmp_path, monkeypatch, writable):
    data = tmp_path / "data"
    shutil.copytree(FIX / "wikitext-2", data / "wikitext-2")
    monkeypatch.delenv("MOE_LENS_CACHE")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    if not writable:
        for p in (data / "wikitext-2", data):
            p.chmod(0o555)
    before = sorted(p.relative_to(data) for p in data.rglob("*"))
    try:
        s = load_split("wikitext2", "valid", data, progress=False)
    finally:
        for p in (data, data / "wikitext-2"):
            p.chmod(0o755)
    assert s.tokens["pos_tag"].notna().all()
    assert sorted(p.relative_to(data) for p in data.rglob("*")) == before
    assert len(list((tmp_path / "home" / ".cache" / "moe-lens" / "pos").glob("pos-*.npz"))) == 1


@needs_tagger
def test_legacy_pos_cache_beside_the_data_is_still_read(tmp_path, monkeypatch):
    data = tmp_path / "data"
    shutil.copytree(FIX / "wikitext-2", data / "wikitext-2")
    load_split("wikitext2", "valid", data, progress=False)
    (data / ".moe-lens-cache").mkdir()
    for f in (tmp_path / "cache" / "pos").iterdir():
        f.rename(data / ".moe-lens-cache" / f.name)  # as an earlier version left it
    monkeypatch.setattr(pos, "tag_sentences", lambda *a, **k: pytest.fail("re-tagged although cached"))
    assert load_split("wikitext2", "valid", data, progress=False).tokens["pos_tag"].notna().all()


@needs_tagger
def test_tagger_sees_unescaped_markers(monkeypatch):
    seen = []
    real = pos.tag_sentences

    def spy(sentences, **k):
        seen.extend(w for s in sentences for w in s)
        return real(sentences, **k)

    monkeypatch.setattr(pos, "tag_sentences", spy)
    load_split("wikitext2", "train", FIX, progress=False)
    assert "-" in seen and "," in seen and "@-@" not in seen and "@,@" not in seen and "<eos>" not in seen


@needs_tagger
def test_given_tokenisation_is_kept():
    tags = pos.tag_sentences([["Laden", "'s", "team", "do", "n't", "go", "."], ["New", "York"]])
    assert [len(t) for t in tags] == [7, 2]
    assert tags[0][1] == "POS" and tags[0][4] == "RB"


@needs_tagger
def test_squad_tags_cover_every_token():
    s = load_split("squad", "valid", FIX, progress=False)
    assert s.tokens["pos_tag"].notna().all()
    q = s.tokens[s.tokens.segment == "question"]
    assert q.loc[q.token == "When", "pos_tag"].eq("WRB").all()


def test_no_tagger_gives_null_and_one_warning(monkeypatch):
    import spacy

    def no_model(*a, **k):
        raise OSError("no such model")

    monkeypatch.setattr(spacy, "load", no_model)
    pos.load_tagger.cache_clear()
    try:
        with warnings.catch_warnings(record=True) as w:
            warnings.simplefilter("always")
            a = load_split("wikitext2", "valid", FIX, progress=False)
            b = load_split("squad", "train", FIX, progress=False)
        assert a.tokens["pos_tag"].isna().all() and b.tokens["pos_tag"].isna().all()
        assert a.meta["pos_source"] is None
        assert len([x for x in w if "pos_tag will be NULL" in str(x.message)]) == 1
    finally:
        pos.load_tagger.cache_clear()


def test_pos_agreement_mapping():
    assert pos_agreement(["-LRB-", "``", "NN"], ["(", '"', "NN"]) == 1.0
    assert pos_agreement(["-LRB-", "``", "NN"], ["(", '"', "NN"], map_conventions=False) == pytest.approx(1 / 3)
    assert pos_agreement(["SYM", "VB"], ["NN|SYM", "VBD"]) == 0.5
    assert normalise_tag("HYPH") == ":"
