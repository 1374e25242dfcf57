"""Cross-layer analyses (routing paths, layer transitions, co-activation) against pandas, numpy and scikit-learn.

The fixture has what real runs have: 3 MoE layers, a probe dataset (CoNLL text) recorded into the same `valid`
split as the run's own WikiText tokens, sparse train traces (two recorded steps, a tokens table of those tokens
only), OOV tokens (`<unk>`, pos_tag UNK) and tokens without a POS tag (NULL), and tokens an expert-choice-like
layer left unrouted (no complete path). A second run has 2 layers and top-1 routing.
"""
from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest
from sklearn.metrics import adjusted_mutual_info_score, mutual_info_score, normalized_mutual_info_score

from moe_lens import analysis as A
from moe_lens.errors import MoeLensError
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

TOL = dict(rtol=1e-9, atol=1e-9)
GROUP = ["run", "dataset", "split", "epoch"]


def _rewrite(path: Path, fn) -> None:
    pq.write_table(fn(pq.read_table(path).to_pandas()).pipe(pa.Table.from_pandas, preserve_index=False), path)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("depth")
    a = write_synthetic_run(root, "a", layers=3, num_tokens=400, top_k=2, num_experts=4, epochs=2,
                            steps_per_epoch=4, seed=1, specialization=2.0)
    write_synthetic_run(root, "b", layers=2, num_tokens=300, top_k=1, num_experts=3, epochs=1, seed=2)
    probe = write_synthetic_run(root / "tmp", "p", layers=3, num_tokens=250, top_k=2, num_experts=4, epochs=2,
                                dataset="conll2003", splits=("valid",), seed=3)
    for table in ("tokens", "routing"):  # the probe dataset, recorded into the same split of run a
        shutil.copytree(probe / table / "dataset=conll2003", a / table / "dataset=conll2003")
    shutil.rmtree(root / "tmp")
    # sparse train traces: two recorded steps, and a tokens table with only their tokens
    train = a / "routing" / "dataset=wikitext2" / "split=train"
    for part in train.glob("epoch=*/*.parquet"):
        _rewrite(part, lambda d: d[d["step"].isin([1, 6])])
    kept = ds.dataset(train, format="parquet", partitioning="hive").to_table().to_pandas()["token_idx"].unique()
    _rewrite(a / "tokens" / "dataset=wikitext2" / "split=train" / "part-00000.parquet",
             lambda d: d[d["token_idx"].isin(kept)])

    def oov(d: pd.DataFrame) -> pd.DataFrame:  # OOV tokens, and tokens with no POS tag
        d = d.copy()
        d.loc[d["token_idx"] % 7 == 0, ["token", "pos_tag"]] = ["<unk>", "UNK"]
        d.loc[d["token_idx"] % 11 == 0, "pos_tag"] = None
        return d

    _rewrite(a / "tokens" / "dataset=wikitext2" / "split=valid" / "part-00000.parquet", oov)
    for part in (a / "routing" / "dataset=wikitext2" / "split=valid" / "epoch=1").glob("*.parquet"):  # unrouted at 2
        _rewrite(part, lambda d: d[~((d["layer"] == 2) & (d["token_idx"] % 13 == 0))])
    return root


def _table(root: Path, run: str, table: str) -> pd.DataFrame:
    return ds.dataset(root / run / table, format="parquet", partitioning="hive").to_table().to_pandas()


def _last_top1(root: Path, run: str, split: str) -> pd.DataFrame:
    r = _table(root, run, "routing")
    r = r[(r["split"] == split) & (r["rank"] == 0)]
    return r[r["epoch"] == r["epoch"].max()].assign(run=run)


def test_routing_paths_match_sklearn(runs: Path) -> None:
    con = connect(runs)
    for split in ("valid", "train"):
        got = A.routing_paths(con, split=split, dataset="*", include_oov=True)
        seen = 0
        for run in ("a", "b"):
            r = _last_top1(runs, run, split)
            tok = _table(runs, run, "tokens")
            for dataset, g in r.groupby("dataset"):
                wide = g.pivot_table(index=["step", "token_idx"], columns="layer", values="expert").dropna()
                layers = sorted(g["layer"].unique())
                path = wide[layers].astype(int).astype(str).agg("-".join, axis=1)
                t = tok[(tok["dataset"] == dataset) & (tok["split"] == split)].set_index("token_idx")["pos_tag"]
                pos = t.reindex(wide.index.get_level_values("token_idx")).to_numpy()
                has = pd.notna(pos)
                mine = got[(got["run"] == run) & (got["dataset"] == dataset)]
                assert set(mine["epoch"]) == {g["epoch"].max()}
                assert list(mine["layer"].astype("float").fillna(-1)) == [-1] + layers
                for layer, labels in [(None, path.to_numpy())] + [(l, wide[l].to_numpy()) for l in layers]:
                    row = mine[mine["layer"].isna()] if layer is None else mine[mine["layer"] == layer]
                    (row,) = row.to_dict("records")
                    _, counts = np.unique(labels, return_counts=True)
                    p = counts / counts.sum()
                    assert row["tokens"] == len(labels) and row["distinct"] == len(counts)
                    assert row["num_layers"] == len(layers) and row["tokens_with_value"] == has.sum()
                    np.testing.assert_allclose(row["entropy"], -(p * np.log(p)).sum(), **TOL)
                    x, y = labels[has].astype(str), pos[has].astype(str)
                    np.testing.assert_allclose(row["mi"], mutual_info_score(x, y), **TOL)
                    np.testing.assert_allclose(row["nmi"], normalized_mutual_info_score(x, y), **TOL)
                    np.testing.assert_allclose(row["ami"], adjusted_mutual_info_score(x, y), **TOL)
                    seen += 1
        assert seen == len(got)
    valid = A.routing_paths(con, split="valid", dataset="*")
    assert set(valid["dataset"]) == {"wikitext2", "conll2003"}  # the probe is its own group
    incomplete = valid[(valid["run"] == "a") & (valid["dataset"] == "wikitext2") & valid["layer"].isna()]
    assert int(incomplete["tokens"].iloc[0]) == 400 - len(range(0, 400, 13))  # unrouted at layer 2: no path


def test_paths_table_counts_paths(runs: Path) -> None:
    con = connect(runs)
    got = A.routing_paths(con, "a", split="valid", summary=False, top=None, dataset="*")
    r = _last_top1(runs, "a", "valid")
    for dataset, g in r.groupby("dataset"):
        wide = g.pivot_table(index=["step", "token_idx"], columns="layer", values="expert").dropna()
        want = wide.astype(int).astype(str).agg("-".join, axis=1).value_counts()
        mine = got[got["dataset"] == dataset].set_index("path")["n"]
        assert mine.to_dict() == want.to_dict()
        np.testing.assert_allclose(got[got["dataset"] == dataset]["share"].sum(), 1.0, **TOL)
    top = A.routing_paths(con, "a", split="valid", summary=False, top=3, dataset="*")
    assert top.groupby("dataset").size().max() == 3
    assert (top.groupby("dataset")["n"].apply(lambda s: s.is_monotonic_decreasing)).all()


@pytest.mark.parametrize("layers", [(0, 1), (0, 2), (2, 1)])
def test_layer_transitions_match_sklearn(runs: Path, layers: tuple[int, int]) -> None:
    la, lb = layers
    con = connect(runs)
    got = A.layer_transitions(con, "a", split="valid", layer_a=la, layer_b=lb, dataset="*")
    r = _last_top1(runs, "a", "valid")
    for dataset, g in r.groupby("dataset"):
        a = g[g["layer"] == la].set_index(["step", "token_idx"])["expert"]
        b = g[g["layer"] == lb].set_index(["step", "token_idx"])["expert"]
        both = pd.concat([a.rename("a"), b.rename("b")], axis=1, join="inner")
        want = pd.crosstab(both["a"], both["b"])
        mine = got[got["dataset"] == dataset]
        cells = mine.pivot_table(index="expert_a", columns="expert_b", values="n", fill_value=0)
        np.testing.assert_array_equal(cells.to_numpy(), want.to_numpy())
        cond = mine.pivot_table(index="expert_a", columns="expert_b", values="p_b_given_a", fill_value=0.0)
        np.testing.assert_allclose(cond.to_numpy(), (want.T / want.sum(axis=1)).T.to_numpy(), **TOL)
        np.testing.assert_allclose(mine["mi"].iloc[0], mutual_info_score(both["a"], both["b"]), **TOL)
        np.testing.assert_allclose(mine["nmi"].iloc[0], normalized_mutual_info_score(both["a"], both["b"]), **TOL)
        np.testing.assert_allclose(mine["ami"].iloc[0], adjusted_mutual_info_score(both["a"], both["b"]), **TOL)
        assert (mine["tokens"] == len(both)).all()
    summary = A.layer_transitions(con, "a", split="valid", layer_a=la, layer_b=lb, summary=True, dataset="*")
    assert len(summary) == 2 and set(summary.columns) >= {"run", "dataset", "split", "epoch", "mi", "nmi", "ami"}
    with pytest.raises(MoeLensError, match="layer_a"):
        A.layer_transitions(con, "a", layer_a=1, layer_b=1)


def test_coactivation_matches_numpy(runs: Path) -> None:
    con = connect(runs)
    for split in ("valid", "train"):
        got = A.coactivation(con, split=split, dataset="*")
        r = _table(runs, "a", "routing")
        r = r[(r["split"] == split)]
        r = r[r["epoch"] == r["epoch"].max()]
        n = 0
        for (dataset, layer), g in r.groupby(["dataset", "layer"]):
            e = 4
            sets = g.groupby(["step", "token_idx"])["expert"].apply(lambda s: sorted(set(s)))
            n_i, n_ij = np.zeros(e), np.zeros((e, e))
            for experts in sets:
                for i in experts:
                    n_i[i] += 1
                    for j in experts:
                        if j != i:
                            n_ij[i, j] += 1
            mine = got[(got["run"] == "a") & (got["dataset"] == dataset) & (got["layer"] == layer)]
            m = np.zeros((e, e))
            m[mine["expert_i"], mine["expert_j"]] = mine["p_j_given_i"]
            want = np.divide(n_ij, n_i[:, None], out=np.zeros_like(n_ij), where=n_i[:, None] > 0)
            np.testing.assert_allclose(m, want, **TOL)
            assert (mine["n_ij"].to_numpy() == n_ij[mine["expert_i"], mine["expert_j"]]).all()
            n += len(mine)
        assert got[got["run"] == "b"].empty  # top-1: no pairs
        assert n == len(got)
    one = A.coactivation(con, "a", layer=2, dataset="*")
    assert set(one["layer"]) == {2}


def test_coactivation_of_expert_ids_past_127_and_255(tmp_path: Path) -> None:
    """coactivation.sql aggregates each occurrence's experts as two 128-bit masks (ids 0-255) and a list (256 and
    up): ids on both sides of 128 and 256, a NULL expert and a repeated expert count as the plain sets do."""
    run = write_synthetic_run(tmp_path, "w", layers=2, num_tokens=300, top_k=3, num_experts=4, epochs=1,
                              splits=("valid",), seed=4)
    ids = np.array([0, 127, 128, 255, 256, 700], dtype=np.int16)

    def widen(d: pd.DataFrame) -> pd.DataFrame:
        d = d.copy()
        wide = ids[(d["expert"].to_numpy() + d["token_idx"].to_numpy()) % len(ids)]
        d["expert"] = pd.array(wide, dtype="Int16")
        d.loc[d["token_idx"] % 17 == 0, "expert"] = pd.NA  # an unrouted slot
        same = (d["token_idx"] % 19 == 0) & (d["rank"] == 1)  # the expert of rank 0 again
        d.loc[same, "expert"] = d["expert"].shift(1)[same]
        return d

    for part in (run / "routing").rglob("*.parquet"):
        _rewrite(part, widen)
    got = A.coactivation(connect(tmp_path), "w").set_index(["layer", "expert_i", "expert_j"])
    r = _table(tmp_path, "w", "routing")
    want_ij, want_i = {}, {}
    for (layer, _, _), g in r.groupby(["layer", "step", "token_idx"]):
        experts = sorted(set(g["expert"].dropna().astype(int)))
        for i in experts:
            want_i[layer, i] = want_i.get((layer, i), 0) + 1
            for j in experts:
                if j != i:
                    want_ij[layer, i, j] = want_ij.get((layer, i, j), 0) + 1
    assert sorted(got.index) == sorted(want_ij) and set(got.index.get_level_values("expert_i")) >= {127, 128, 256, 700}
    for (layer, i, j), n in want_ij.items():
        row = got.loc[(layer, i, j)]
        assert row["n_ij"] == n and row["n_i"] == want_i[layer, i]
        assert row["p_j_given_i"] == pytest.approx(n / want_i[layer, i], rel=1e-12)


def test_unknown_attribute_and_empty_split_are_one_line_errors(runs: Path) -> None:
    con = connect(runs)
    with pytest.raises(MoeLensError, match="allowed"):
        A.routing_paths(con, attribute="colour")
    with pytest.raises(MoeLensError, match="no routing rows"):
        A.routing_paths(con, split="test")


@pytest.mark.parametrize("name,kw", [("load_balance", {}), ("collapse", {}), ("router_confidence", {}),
                                     ("specialization", dict(summary=True)), ("stability", {})])
def test_every_analysis_gives_per_layer_rows_by_default(runs: Path, name: str, kw: dict) -> None:
    """layer=None (the default) = every recorded layer, each layer's rows equal to asking for that layer."""
    con = connect(runs)
    fn = getattr(A, name)
    every = fn(con, "a", **kw)
    assert sorted(every["layer"].unique()) == [0, 1, 2]
    for layer in (0, 1, 2):
        one = fn(con, "a", layer=layer, **kw).reset_index(drop=True)
        mine = every[every["layer"] == layer].reset_index(drop=True)
        pd.testing.assert_frame_equal(mine[one.columns], one, check_dtype=False)


def test_agreement_per_layer(runs: Path) -> None:
    con = connect(runs)
    got = A.agreement(con, "a", "a")
    assert got["layer"].tolist() == [0, 1, 2] and (got["agreement"] == 1.0).all()
    assert A.agreement(con, "a", "a", layer=1)["layer"].tolist() == [1]


def test_routing_paths_leave_oov_words_out_like_specialization() -> None:
    """By default a word outside the vocabulary has no POS for the path statistics (the in_vocab rule): on the
    3-layer sample run, where every valid token is routed at every layer, each layer's NMI/AMI equal
    specialization's on that layer; the OOV occurrences still count in the paths."""
    con = connect(Path(__file__).resolve().parents[1] / "sample_runs")
    run = "wikitext2-load-3layer"
    got = A.routing_paths(con, run)
    every = A.routing_paths(con, run, include_oov=True)
    spec = A.specialization(con, run, summary=True).set_index("layer")
    for layer in (0, 1, 2):
        row = got[got["layer"] == layer].iloc[0]
        assert row["tokens_with_value"] == spec.loc[layer, "rows"] < every[every["layer"] == layer]["tokens_with_value"].iloc[0]
        np.testing.assert_allclose([row["nmi"], row["ami"]], spec.loc[layer, ["nmi", "ami"]].astype(float), **TOL)
    assert got["tokens"].tolist() == every["tokens"].tolist() and got["distinct"].tolist() == every["distinct"].tolist()
