"""Unit tests of the dataset readers, vocabularies and tokens table on tiny fixtures."""
from __future__ import annotations

import shutil
from collections import Counter
from pathlib import Path

import numpy as np
import pytest

from moe_lens.data import TOKEN_COLUMNS, Vocab, build_vocab, load_glove, load_split, resolve_data_dir
from moe_lens.data.conll import to_iob2
from moe_lens.data.squad import dev_split_articles, tokenize
from moe_lens.data.vocab import band_codes, FREQ_BANDS

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))


def test_resolve_data_dir(monkeypatch, tmp_path):
    monkeypatch.delenv("MOE_LENS_DATA", raising=False)
    assert resolve_data_dir() == Path("~/.cache/moe-lens/data").expanduser()
    monkeypatch.setenv("MOE_LENS_DATA", str(tmp_path))
    assert resolve_data_dir() == tmp_path
    assert resolve_data_dir(FIX) == FIX


def test_wikitext_tokens_structure():
    s = load_split("wikitext2", "train", FIX, pos=False)
    lines = (FIX / "wikitext-2/wiki.train.tokens").read_text().split("\n")[:-1]
    expected = [w for line in lines for w in line.split() + ["<eos>"]]  # pytorch/examples rule
    df = s.tokens
    assert list(df.columns) == list(TOKEN_COLUMNS)
    assert df["token"].tolist() == expected
    assert s.token_ids.shape == (len(expected),) and s.token_ids.dtype == np.int64
    assert s.seq_offsets.shape == (len(lines) + 1,) and s.seq_offsets[-1] == len(expected)
    assert (df["token_idx"].to_numpy() == np.arange(len(expected))).all()
    # 3 articles; the section '= = History = =' and '= = = Usage = = =' keep the doc id
    doc_of_line = df.groupby("sent_id")["doc_id"].first().tolist()
    assert doc_of_line == [0] * 9 + [1] * 8 + [2] * 3  # heading lines 1, 9, 17 of 20
    assert df["doc_id"].max() == 2
    first = df[df.sent_id == 3]  # ' Alpha is a <unk> of the first @-@ class . '
    assert first["position"].tolist() == list(range(11))
    assert first["token"].iloc[-1] == "<eos>"
    assert df["ner_tag"].isna().all() and df["segment"].isna().all() and df["in_answer"].isna().all()
    assert s.labels is None


def test_wikitext_vocab_all_splits_and_cap():
    v = build_vocab("wikitext2", FIX)
    assert v.pad_id is None and v.itos[v.unk_id] == "<unk>"
    assert v.itos[:3] == ["<eos>", "=", "Alpha"]  # first-appearance order, as pytorch/examples
    assert "Epsilon" in v.stoi and "Zeta" in v.stoi  # valid and test words too
    capped = build_vocab("wikitext2", FIX, vocab_size=5)
    assert len(capped) == 6 and capped.itos[-1] == "<unk>"
    s = load_split("wikitext2", "valid", FIX, vocab=capped, pos=False)
    assert (s.token_ids[s.tokens["token"].astype(str) == "Epsilon"] == capped.unk_id).all()


def test_freq_rank_and_bands_against_counter():
    s = load_split("wikitext2", "test", FIX, pos=False)
    train = (FIX / "wikitext-2/wiki.train.tokens").read_text().split("\n")[:-1]
    counts = Counter(w for line in train for w in line.split() + ["<eos>"])
    rank = {w: r for r, (w, _) in enumerate(counts.most_common(), 1)}
    for tok, r, band in zip(s.tokens["token"], s.tokens["freq_rank"], s.tokens["freq_band"]):
        assert r == rank.get(tok, 0)
        assert band == ("unseen" if r == 0 else "1-10" if r <= 10 else "11-100")
    ranks = np.array([0, 1, 10, 11, 100, 101, 1000, 1001, 10000, 10001, 99999])
    names = [FREQ_BANDS[c] for c in band_codes(ranks)]
    assert names == ["unseen", "1-10", "1-10", "11-100", "11-100", "101-1k", "101-1k", "1k-10k", "1k-10k",
                     "10k+", "10k+"]


def test_conll_iob1_to_iob2_docs_and_last_sentence():
    s = load_split("conll2003", "train", FIX, pos=False)
    df = s.tokens
    assert s.num_sequences == 4 and len(df) == 16  # the last sentence has no final newline
    assert df.groupby("sent_id")["doc_id"].first().tolist() == [0, 0, 1, 1]
    last = df[df.sent_id == 3]
    assert last["ner_tag"].tolist() == ["B-ORG", "I-ORG", "B-ORG", "I-ORG", "O", "B-LOC", "O"]
    assert df["ner_tag"].iloc[:5].tolist() == ["B-ORG", "O", "B-MISC", "O", "O"]
    assert s.label_names[0] == "O" and s.labels.shape == (16,)
    assert [s.label_names[i] for i in s.labels] == df["ner_tag"].tolist()
    assert df["pos_tag"].tolist()[:3] == ["NNP", "VBZ", "JJ"]  # gold column
    assert s.vocab.itos[:2] == ["<pad>", "<unk>"] and s.vocab.pad_id == 0 and s.vocab.unk_id == 1
    assert to_iob2(["B-PER", "I-PER", "O", "B-PER"]) == ["B-PER", "I-PER", "O", "B-PER"]  # IOB2 unchanged


def test_conll_original_file_names(tmp_path):
    (tmp_path / "conll2003").mkdir()
    for a, b in [("train.txt", "eng.train"), ("valid.txt", "eng.testa"), ("test.txt", "eng.testb")]:
        shutil.copy(FIX / "conll2003" / a, tmp_path / "conll2003" / b)
    s = load_split("conll2003", "test", tmp_path, pos=False)
    assert s.num_sequences == 2 and len(s) == 4
    assert s.tokens["ner_tag"].tolist() == ["B-ORG", "O", "B-LOC", "I-LOC"]


def test_squad_tokenize_offsets():
    toks, off = tokenize("Laden's two-man team don't, 1,000.")
    assert toks == ["Laden", "'s", "two", "-", "man", "team", "do", "n't", ",", "1", ",", "000", "."]
    text = "Laden's two-man team don't, 1,000."
    assert [text[a:b] for a, b in off] == toks and off.shape == (len(toks), 2)


def test_squad_dev_split_examples_and_spans():
    tr = load_split("squad", "train", FIX, pos=False)
    va = load_split("squad", "valid", FIX, vocab=tr.vocab, pos=False)
    assert tr.meta["squad_source"] == "dev-split" == va.meta["squad_source"]
    assert set(tr.tokens["doc_id"]) == {0, 1, 3, 4, 5} and set(va.tokens["doc_id"]) == {2}  # 'Mango'
    assert dev_split_articles(["b", "a", "c", "e", "d"]) == {"train": [0, 1, 2, 4], "valid": [3]}  # 5th sorted: "e"
    assert tr.num_sequences == 11 and va.num_sequences == 2
    assert tr.meta["span_exact_share"] == 1.0
    ex = tr.extras
    for i in range(tr.num_sequences):
        q = tr.tokens.iloc[ex["q_start"][i]:ex["q_end"][i]]
        c = tr.tokens.iloc[ex["c_start"][i]:ex["c_end"][i]]
        assert ex["q_end"][i] == ex["c_start"][i] and (q.segment == "question").all() and (c.segment == "context").all()
        assert q["position"].tolist() == list(range(len(q))) and c["position"].tolist() == list(range(len(c)))
        assert (tr.tokens.iloc[tr.seq_offsets[i]:tr.seq_offsets[i + 1]]["sent_id"] == i).all()
        a, b = ex["ans_start"][i], ex["ans_end"][i]
        offs = ex["char_offsets"][i]
        assert ex["contexts"][i][offs[a, 0]:offs[b, 1]] == ex["answers"][i][0]
        assert c["in_answer"].tolist() == [a <= j <= b for j in range(len(c))]
        assert not q["in_answer"].any()
    assert ex["answers"][0] == ["1900", "in 1900"]
    with pytest.raises(Exception, match="allowed: train, valid"):
        load_split("squad", "test", FIX, pos=False)


def test_vocab_encode_and_roundtrip():
    v = Vocab(itos=["<pad>", "<unk>", "a", "b"], stoi={}, pad_id=0, unk_id=1)
    assert v.encode(["a", "zz", "b", "a"]).tolist() == [2, 1, 3, 2]
    assert v.encode([]).shape == (0,)
    assert Vocab.from_dict(v.to_dict()).stoi == v.stoi


def test_load_glove(tmp_path):
    g = tmp_path / "g.txt"
    g.write_text("the 0.1 0.2 0.3\nalpha 1 2 3\nzeta -1 -2 -3\n")
    v = Vocab(itos=["<pad>", "<unk>", "the", "Alpha", "missing"], stoi={}, pad_id=0, unk_id=1)
    emb, cov = load_glove(g, v)
    assert emb.shape == (5, 3) and emb.dtype == np.float32
    assert np.allclose(emb[2], [0.1, 0.2, 0.3]) and np.allclose(emb[3], [1, 2, 3])  # lowercase fallback
    assert (emb[0] == 0).all() and cov == pytest.approx(2 / 4)
    assert 0 < np.abs(emb[4]).max() < 1  # random N(0, 0.1) for a miss


def test_squad_eval_on_gold_spans():
    from moe_lens.data.squad_eval import exact_match, f1, normalize_answer, span_text

    assert normalize_answer("The  Denver, Broncos!") == "denver broncos"
    assert exact_match("the Broncos", ["Broncos", "x"]) == 1.0
    assert f1("Denver Broncos team", ["Denver Broncos"]) == pytest.approx(0.8)
    s = load_split("squad", "train", FIX, pos=False)
    ex = s.extras
    for i in range(s.num_sequences):  # the gold token span scores EM 1 against its own answers
        text = span_text(ex["contexts"][i], ex["char_offsets"][i], ex["ans_start"][i], ex["ans_end"][i])
        assert exact_match(text, ex["answers"][i]) == 1.0


@pytest.mark.parametrize("dataset", ["wikitext2", "conll2003", "squad"])
def test_tokens_table_types_in_duckdb(tmp_path, dataset):
    """Written as the recorder does, every column has the docs/traces.md type, even when all NULL."""
    import duckdb
    import pyarrow as pa
    import pyarrow.parquet as pq

    s = load_split(dataset, "train", FIX, pos=False)
    pq.write_table(pa.Table.from_pandas(s.tokens, preserve_index=False), tmp_path / "t.parquet")
    types = dict(duckdb.sql(f"DESCRIBE SELECT * FROM '{tmp_path / 't.parquet'}'").fetchall()[i][:2]
                 for i in range(len(TOKEN_COLUMNS)))
    assert types == {"token_idx": "BIGINT", "token_id": "INTEGER", "token": "VARCHAR", "pos_tag": "VARCHAR",
                     "freq_rank": "INTEGER", "freq_band": "VARCHAR", "dataset": "VARCHAR", "split": "VARCHAR",
                     "doc_id": "INTEGER", "sent_id": "INTEGER", "position": "INTEGER", "ner_tag": "VARCHAR",
                     "segment": "VARCHAR", "in_answer": "BOOLEAN", "in_vocab": "BOOLEAN"}
