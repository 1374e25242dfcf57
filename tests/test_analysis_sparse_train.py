"""The literature analyses on a SPARSE train trace, against the pandas references of tests/literature_ref.py (1e-9).

A trainer records train routing only every `record_every` steps, so a train trace holds a few steps, each with its
own batch of tokens, and the tokens table only those steps' tokens. The fixture (a synthetic run filtered as
tests/test_analysis_depth.py does) keeps steps 1, 5, 6, 13 and 14 of 4 epochs x 4 steps (600 tokens, 150 a step):

    epoch 0  step 1        tokens 150-299
    epoch 1  steps 5, 6    tokens 150-299, 300-449
    epoch 2  (nothing recorded)
    epoch 3  steps 13, 14  tokens 150-299, 300-449

so two epochs share only some tokens, one epoch is missing, tokens 0-149 and 450-599 never appear, and token 299
(step 13) and 300 (step 14) are neighbours routed at different steps: not a consecutive pair. Each analysis that
takes split="train" (consecutive, saturation, vocabulary, fluctuation, collapse per step) runs on it; the
coactivation and the specialization scores on sparse train traces are tested in tests/test_analysis_depth.py and
tests/test_analysis_real_shapes.py.
"""
from __future__ import annotations

from pathlib import Path

import literature_ref as ref
import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from moe_lens import analysis as A
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

KEPT = [1, 5, 6, 13, 14]  # recorded train steps (steps_per_epoch 4: step = 4 * epoch + chunk)
EXPERTS, LAYERS = 4, 2


@pytest.fixture(scope="module")
def sparse(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("sparse")
    run = write_synthetic_run(root, "s", num_tokens=600, num_experts=EXPERTS, top_k=2, layers=LAYERS, epochs=4,
                              steps_per_epoch=4, splits=("train",), vocab_size=30, specialization=2.0, drift=1.5,
                              seed=7)  # fmt: skip
    train = run / "routing" / "dataset=wikitext2" / "split=train"
    for part in sorted(train.glob("epoch=*/*.parquet")):
        t = pq.read_table(part).to_pandas()
        t = t[t["step"].isin(KEPT)]
        if t.empty:  # an epoch with no recorded step has no part file
            part.unlink()
            part.parent.rmdir()
        else:
            pq.write_table(pa.Table.from_pandas(t, preserve_index=False), part)
    kept = ds.dataset(train, format="parquet", partitioning="hive").to_table().to_pandas()["token_idx"].unique()
    tokens = run / "tokens" / "dataset=wikitext2" / "split=train" / "part-00000.parquet"
    t = pq.read_table(tokens).to_pandas()
    t["doc_id"] = (t["sent_id"] // 3).astype(t["doc_id"].dtype)  # short documents (CoNLL's): several per step
    pq.write_table(pa.Table.from_pandas(t[t["token_idx"].isin(kept)], preserve_index=False), tokens)
    return run


@pytest.fixture(scope="module")
def con(sparse: Path):
    return connect(sparse.parent)


@pytest.fixture(scope="module")
def rows(sparse: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    return ref.read(sparse, "tokens", "train"), ref.read(sparse, "routing", "train")


def test_the_trace_is_sparse(rows) -> None:
    tok, rout = rows
    assert sorted(rout["step"].unique()) == KEPT and sorted(rout["epoch"].unique()) == [0, 1, 3]
    assert sorted(tok["token_idx"]) == list(range(150, 450))
    per_epoch = rout.groupby("epoch")["token_idx"].agg(lambda x: (x.min(), x.max()))
    assert per_epoch.to_dict() == {0: (150, 299), 1: (150, 449), 3: (150, 449)}


@pytest.mark.parametrize("within", ["document", "sentence"])
def test_consecutive(con, rows, within: str) -> None:
    tok, rout = rows
    got = A.consecutive(con, "s", split="train", within=within).set_index("layer")
    assert (got["epoch"] == 3).all() and sorted(got.index) == list(range(LAYERS))
    want = ref.consecutive(tok, rout, within)
    assert (want["pairs"] < 298).all()  # at most 149 pairs a step (299 -> 300 crosses steps 13 and 14), fewer docs
    ref.close(got, want, ref.CONSECUTIVE)


def test_saturation(con, rows) -> None:
    got = A.saturation(con, "s", split="train").set_index(["epoch", "layer"])
    want = ref.saturation(rows[1])
    assert sorted(want.index) == [(e, la) for e in (0, 1) for la in range(LAYERS)]
    assert want.loc[0, "tokens"].eq(150).all() and want.loc[1, "tokens"].eq(300).all()  # only the shared tokens
    ref.close(got, want, ref.SATURATION)


def test_vocabulary(con, rows) -> None:
    got = A.vocabulary(con, "s", split="train", min_count=5).set_index("layer")
    want, counts = ref.vocabulary(*rows, min_count=5)
    assert (want["types"] >= 5).all()
    ref.close(got, want, ref.VOCABULARY)
    table = A.vocabulary(con, "s", split="train", min_count=5, summary=False)
    for layer, n in counts.items():
        t = table[table["layer"] == layer].set_index("token").loc[n.index]
        assert (t["n"].to_numpy() == n.sum(axis=1).to_numpy()).all()
        chosen = n.to_numpy()[np.arange(len(n)), n.columns.get_indexer(t["expert"])]  # the expert it names is a max
        assert (chosen == n.max(axis=1).to_numpy()).all()


def test_fluctuation(con, rows) -> None:
    got = A.fluctuation(con, "s", split="train").set_index("layer")
    dist = A.fluctuation(con, "s", split="train", summary=False)
    want, want_dist = ref.fluctuation(rows[1])
    assert (want["tokens"] == 150).all()  # only the tokens recorded at every recorded epoch (0, 1 and 3)
    assert (got["epoch"] == 3).all()
    ref.close(got, want, ref.FLUCTUATION)
    assert dist.set_index(["layer", "last_change"])["tokens"].sort_index().to_dict() == want_dist.sort_index().to_dict()
    steps = dist.dropna(subset=["step"]).groupby("last_change")["step"].first()
    assert steps.to_dict() == {1: 6, 3: 14}  # an epoch's step is its last recorded one


@pytest.mark.parametrize("threshold", [2.0, 3.5])
def test_collapse_per_step(con, rows, threshold: float) -> None:
    rout = rows[1]
    for layer in range(LAYERS):
        got = A.collapse(con, "s", split="train", by="step", layer=layer, threshold=threshold).sort_values("step")
        want = ref.collapse(rout[rout["layer"] == layer], EXPERTS, threshold)
        assert got["step"].tolist() == want["step"].tolist() == KEPT  # the recorded steps only
        assert got["tokens"].tolist() == want["tokens"].tolist()
        for c, w in (("entropy", "entropy"), ("norm_entropy", "norm"), ("effective_experts", "eff")):
            np.testing.assert_allclose(got[c].to_numpy(float), want[w].to_numpy(float), **ref.TOL, err_msg=c)
        assert got["dead_experts"].tolist() == want["dead"].tolist()
        assert got["never_top1"].tolist() == want["never_top1"].tolist()
        c, w = got["collapse_step"].iloc[0], want["collapse_step"].iloc[0]
        assert (pd.isna(c) and w is None) or c == w


def test_bootstrap_resamples_the_recorded_documents(con, rows) -> None:
    """analysis.bootstrap on the sparse trace: the point values are the analysis's, and each group resamples the
    documents of its own recorded tokens (collapse: the step's; saturation: those routed in both epochs)."""
    tok, rout = rows
    doc = tok.set_index("token_idx")["doc_id"]
    col = A.bootstrap("collapse", con, "s", n=50, split="train", layer=0, fn_options={"by": "step"})
    pd.testing.assert_frame_equal(col[A.collapse(con, "s", split="train", layer=0).columns],
                                  A.collapse(con, "s", split="train", layer=0))  # fmt: skip
    r0 = rout[rout["layer"] == 0]
    assert col.set_index("step")["units"].to_dict() == r0.groupby("step")["token_idx"].agg(
        lambda t: doc[t].nunique()).to_dict()
    assert (col["units"] >= 3).all()
    assert (col["effective_experts_lo"] <= col["effective_experts"] + 1e-12).all()
    assert (col["effective_experts"] <= col["effective_experts_hi"] + 1e-12).all()
    sat = A.bootstrap("saturation", con, "s", n=50, split="train").set_index(["epoch", "layer"])
    ref.close(sat, ref.saturation(rout), ref.SATURATION)
    final = set(rout.loc[rout["epoch"] == 3, "token_idx"])
    for (epoch, layer), u in sat["units"].items():
        shared = set(rout.loc[(rout["epoch"] == epoch) & (rout["layer"] == layer), "token_idx"]) & final
        assert u == doc[sorted(shared)].nunique()
