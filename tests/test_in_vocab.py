"""Issue 18 item 10: the `tokens` table says which tokens the model saw as `<unk>` (`in_vocab`)."""
from __future__ import annotations

from pathlib import Path

import duckdb
import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from moe_lens.data import load_split
from moe_lens.store import SCHEMAS

FIX = Path(__file__).parent / "fixtures" / "data"


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))


# Hand-made text with known counts: "the" 7, "cat" 4, "sat" 3, "on" 2, "mat" 1, "dog" 1, WikiText's own
# <unk> 2 (and in WikiText "<eos>" 4, one per line); valid adds "bird", never seen in training.
TRAIN = ["the cat sat on the mat", "the cat sat", "the cat <unk> the dog", "the cat sat on the <unk>"]
VALID = ["the bird sat on the mat", "a cat <unk>"]
KEPT = {"conll2003": {"the", "cat", "sat"}, "wikitext2": {"the", "cat", "<eos>", "sat"}}  # the top 3 or 4


def write_data(root: Path, dataset: str) -> Path:
    if dataset == "wikitext2":
        d = root / "wikitext-2"
        d.mkdir(parents=True)
        for name, lines in (("train", TRAIN), ("valid", VALID), ("test", VALID)):
            (d / f"wiki.{name}.tokens").write_text("".join(f" {line} \n" for line in lines))
    else:
        d = root / "conll2003"
        d.mkdir(parents=True)
        for name, lines in (("train", TRAIN), ("valid", VALID), ("test", VALID)):
            sents = ["\n".join(f"{w} NN I-NP O" for w in line.split()) for line in lines]
            (d / f"{name}.txt").write_text("-DOCSTART- -X- O O\n\n" + "\n\n".join(sents) + "\n")
    return root


@pytest.mark.parametrize("dataset", ["conll2003", "wikitext2"])
def test_make_split_marks_words_outside_a_capped_vocab(dataset: str, tmp_path: Path) -> None:
    data = write_data(tmp_path / "data", dataset)
    train = load_split(dataset, "train", data, pos=False, vocab_size=len(KEPT[dataset]))
    valid = load_split(dataset, "valid", data, pos=False, vocab=train.vocab)
    for split in (train, valid):
        toks = split.tokens
        want = np.array([w in KEPT[dataset] for w in toks["token"].astype(str)])
        np.testing.assert_array_equal(toks["in_vocab"].to_numpy(), want)
        assert (~want).any() and want.any()
        # the words outside it are exactly the tokens the model sees as <unk>
        np.testing.assert_array_equal(toks["in_vocab"].to_numpy(), toks["token_id"].to_numpy() != train.vocab.unk_id)
    # without a cap: CoNLL leaves out the words never seen in training; WikiText's uncapped vocabulary
    # is every word of its three files (pytorch/examples), so only its own <unk> is out
    full = load_split(dataset, "train", data, pos=False)
    valid = load_split(dataset, "valid", data, pos=False, vocab=full.vocab)
    lines = TRAIN if dataset == "conll2003" else TRAIN + VALID
    seen = {w for line in lines for w in line.split()} - {"<unk>"} | {"<eos>"}
    want = np.array([w in seen for w in valid.tokens["token"].astype(str)])
    assert not want.all()
    np.testing.assert_array_equal(valid.tokens["in_vocab"].to_numpy(), want)


def test_in_vocab_is_a_boolean_column_of_the_tokens_view(tmp_path: Path) -> None:
    assert SCHEMAS["tokens"]["in_vocab"] == "BOOLEAN"
    s = load_split("conll2003", "train", FIX, pos=False, vocab_size=5)
    pq.write_table(pa.Table.from_pandas(s.tokens, preserve_index=False), tmp_path / "t.parquet")
    typ = dict((r[0], r[1]) for r in duckdb.sql(f"DESCRIBE SELECT * FROM '{tmp_path / 't.parquet'}'").fetchall())
    assert typ["in_vocab"] == "BOOLEAN"
