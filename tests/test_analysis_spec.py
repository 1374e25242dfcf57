"""Specialization, stability, agreement and comparison against independent numpy/pandas computations."""
from __future__ import annotations

import tempfile
from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from hypothesis import HealthCheck, example, given, settings, strategies as st
from sklearn.metrics import adjusted_mutual_info_score, normalized_mutual_info_score

from moe_lens import analysis as A
from moe_lens.errors import MoeLensError
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

TOL = dict(rtol=1e-9, atol=1e-9)
SETTINGS = settings(max_examples=10, deadline=None, suppress_health_check=[HealthCheck.too_slow])
BANDS = [(0, 0, "0"), (1, 4, "1-4"), (5, 9, "5-9"), (10, 19, "10-19"), (20, 49, "20-49"), (50, 10**9, "50+")]


def load(root: Path, table: str) -> pd.DataFrame:
    return ds.dataset(root / table, format="parquet", partitioning="hive").to_table().to_pandas()


def mi(a: np.ndarray, e: np.ndarray) -> tuple[float, float]:
    """(I(E; A), H(E)) in nats from paired samples."""
    c = pd.crosstab(a, e).to_numpy(float)
    p = c / c.sum()
    pa, pe = p.sum(1, keepdims=True), p.sum(0, keepdims=True)
    nz = p > 0
    return float((p[nz] * np.log(p[nz] / (pa @ pe)[nz])).sum()), float(-(pe[pe > 0] * np.log(pe[pe > 0])).sum())


def value_of(tokens: pd.DataFrame, attribute: str) -> pd.Series:
    if attribute == "position_band":
        return tokens["position"].map(lambda p: next(name for lo, hi, name in BANDS if lo <= p <= hi))
    return tokens[attribute]


@SETTINGS
@given(e=st.integers(1, 6), k=st.integers(1, 2), n=st.integers(2, 400), spec=st.sampled_from([0.0, 3.0]),
       attribute=st.sampled_from(["pos_tag", "freq_band", "position_band", "ner_tag", "token"]),
       all_ranks=st.booleans(), seed=st.integers(0, 99))
@example(e=1, k=1, n=339, spec=0.0, attribute="token", all_ranks=False, seed=0)  # one expert: H(E) = 0, NMI NULL
def test_specialization_matches_numpy(e: int, k: int, n: int, spec: float, attribute: str, all_ranks: bool,
                                      seed: int) -> None:
    k = min(k, e)
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_run(tmp, "r", num_experts=e, top_k=k, num_tokens=n, epochs=2, dataset="conll2003",
                                   specialization=spec, seed=seed)
        got = A.specialization(connect(tmp), "r", attribute=attribute, all_ranks=all_ranks, seed=seed)
        tok = load(root, "tokens")
        tok = tok[tok["split"] == "valid"].sort_values("token_idx").reset_index(drop=True)
        val = value_of(tok, attribute).to_numpy(object)
        r = load(root, "routing")
        r = r[(r["split"] == "valid") & (r["epoch"] == 1) & (r["layer"] == 0) & (all_ranks | (r["rank"] == 0))]
        r = r[pd.notna(val[r["token_idx"]])]  # rows whose value is NULL (ner_tag outside CoNLL) are left out
        kept = np.unique(r["token_idx"])  # the analysed tokens, numbered 0..m-1; each takes the value of token
        source = kept[(np.arange(len(kept)) * 1000000007 + seed) % len(kept)]  # (i * p + seed) mod m
        shuffled = pd.Series(val[source], index=kept)
        a, ex = val[r["token_idx"]], r["expert"].to_numpy()
        i, h = mi(a, ex)
        i_s, _ = mi(shuffled[r["token_idx"]].to_numpy(object), ex)
        h_a = float(-(lambda p: (p * np.log(p)).sum())(pd.Series(a).value_counts(normalize=True).to_numpy()))
        np.testing.assert_allclose(got["mi"].iloc[0], i, **TOL)
        np.testing.assert_allclose(got["h_expert"].iloc[0], h, **TOL)
        if h > 1e-12:  # one expert used: H(E) = 0 exactly (p = 1), ~1e-16 here from pandas' sums
            np.testing.assert_allclose([got["uncertainty_coef"].iloc[0], got["nmi"].iloc[0]],
                                       [i / h, i / ((h + h_a) / 2)], **TOL)
            labels = pd.factorize(a)[0]
            np.testing.assert_allclose([got["nmi"].iloc[0], got["ami"].iloc[0]],
                                       [normalized_mutual_info_score(labels, ex),
                                        adjusted_mutual_info_score(labels, ex)], **TOL)
            labels_s = pd.factorize(shuffled[r["token_idx"]].to_numpy(object))[0]
            np.testing.assert_allclose(got["nmi_shuffled"].iloc[0], normalized_mutual_info_score(labels_s, ex), **TOL)
        else:
            assert got["nmi"].isna().all()
        c = pd.crosstab(a, ex)
        lift = (c.div(c.sum(axis=1), axis=0) / (c.sum(axis=0) / c.to_numpy().sum())).stack()
        lift = lift[c.stack() > 0]
        merged = got.set_index(["value", "expert"])["lift"].sort_index()
        np.testing.assert_allclose(merged.to_numpy(), lift.sort_index().to_numpy(), **TOL)
        assert len(merged) == len(lift)


def test_specialization_finds_structure_and_top(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "s", num_tokens=5000, specialization=3.0, noise=0.5)
    write_synthetic_run(tmp_path, "u", num_tokens=5000, specialization=0.0, seed=1)
    con = connect(tmp_path)
    summ = A.specialization(con, attribute="pos_tag", summary=True).set_index("run")
    assert summ.loc["s", "nmi"] > 10 * summ.loc["s", "nmi_shuffled"]  # far above chance
    assert summ.loc["u", "nmi"] < 0.05 and summ.loc["s", "nmi_chance"] < 0.01
    top = A.specialization(con, "s", attribute="token", top=3, order_by="lift", min_count=5)
    assert (top.groupby("expert").size() <= 3).all() and (top["n_value"] >= 5).all()
    with pytest.raises(MoeLensError, match="unknown attribute"):
        A.specialization(con, attribute="colour")
    with pytest.raises(MoeLensError, match="non-NULL ner_tag"):
        A.specialization(con, attribute="ner_tag")  # WikiText runs have no NER column


@SETTINGS
@given(e=st.integers(1, 5), n=st.integers(1, 300), epochs=st.integers(1, 4), drift=st.sampled_from([0.0, 2.0]),
       seed=st.integers(0, 99))
def test_stability_matches_numpy(e: int, n: int, epochs: int, drift: float, seed: int) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_run(tmp, "r", num_experts=e, top_k=1, num_tokens=n, epochs=epochs, drift=drift, seed=seed)
        got = A.stability(connect(tmp), "r").set_index("epoch")
        r = load(root, "routing")
        top = r[(r["split"] == "valid") & (r["rank"] == 0)].pivot(index="token_idx", columns="epoch", values="expert")
        tok = load(root, "tokens")
        pos = tok[tok["split"] == "valid"].sort_values("token_idx")["position"].to_numpy()
        for ep in range(epochs):
            x = top[ep].to_numpy()
            same = (x[1:] == x[:-1])[pos[1:] > 0]
            if len(same):
                np.testing.assert_allclose(got.loc[ep, "same_next"], same.mean(), **TOL)
            if ep == 0:
                assert pd.isna(got.loc[ep, "changed"])
            else:
                np.testing.assert_allclose(got.loc[ep, "changed"], (x != top[ep - 1].to_numpy()).mean(), **TOL)
        if epochs > 1:
            last = A.stability(connect(tmp), "r", epoch=epochs - 1)
            assert len(last) == 1 and last["changed"].iloc[0] == got.loc[epochs - 1, "changed"]


def test_agreement(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "a", num_experts=4, top_k=2, num_tokens=600, seed=3)
    write_synthetic_run(tmp_path, "b", num_experts=4, top_k=2, num_tokens=600, seed=3)
    root = write_synthetic_run(tmp_path, "c", num_experts=4, top_k=2, num_tokens=600, seed=4)
    con = connect(tmp_path)
    same = A.agreement(con, "a", "b").iloc[0]
    assert same["agreement"] == 1.0 and same["matched_agreement"] == 1.0 and abs(same["nmi"] - 1) < 1e-12
    got = A.agreement(con, "a", "c").iloc[0]
    ra, rc = (load(tmp_path / x, "routing") for x in "ac")
    pick = lambda r: r[(r["split"] == "valid") & (r["epoch"] == 1) & (r["rank"] == 0)].sort_values("token_idx")["expert"].to_numpy()
    xa, xc = pick(ra), pick(rc)
    np.testing.assert_allclose(got["agreement"], (xa == xc).mean(), **TOL)
    c = pd.crosstab(xa, xc).to_numpy()
    from scipy.optimize import linear_sum_assignment
    rows, cols = linear_sum_assignment(c, maximize=True)
    np.testing.assert_allclose(got["matched_agreement"], c[rows, cols].sum() / c.sum(), **TOL)
    i, h_c = mi(xa, xc)
    _, h_a = mi(xc, xa)
    np.testing.assert_allclose(got["nmi"], i / ((h_a + h_c) / 2), **TOL)
    assert root.name == "c"


def test_compare_across_modes_and_missing_columns(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "w", dataset="wikitext2", num_tokens=300)  # no ner_tag/segment/in_answer
    write_synthetic_run(tmp_path, "c", dataset="conll2003", mode="switch", top_k=1, capacity_factor=1.25,
                        drop_rate=0.1, num_tokens=300, with_probs=True)
    write_synthetic_run(tmp_path, "q", dataset="squad", num_tokens=300, with_hidden=True)
    con = connect(tmp_path)
    cmp = A.compare(con).set_index("run")
    assert cmp.loc["c", "mode"] == "switch" and cmp.loc["w", "num_experts"] == 8
    assert pd.isna(cmp.loc["w", "train_dropped_rate"]) and cmp.loc["c", "train_dropped_rate"] > 0
    assert pd.isna(cmp.loc["c", "margin"]) and cmp.loc["w", "margin"] > 0
    assert {"valid_loss", "valid_ppl", "cv2_load", "nmi_pos_tag", "changed"} <= set(cmp.columns)
    seg = A.specialization(con, "q", attribute="segment", summary=True)
    assert seg["num_values"].iloc[0] == 2
    fm = A.final_metrics(con, "w", split="valid").set_index("name")
    assert np.isclose(np.exp(fm.loc["loss", "value"]), fm.loc["ppl", "value"])


@SETTINGS
@given(e=st.integers(1, 9), n=st.integers(1, 200), epochs=st.integers(1, 4), keep=st.sampled_from([1.0, 0.9, 0.5]),
       seed=st.integers(0, 99))
def test_stability_packed_equals_sorted_with_gaps(e: int, n: int, epochs: int, keep: float, seed: int) -> None:
    """The packed (no sort) stability.sql gives exactly the numbers of the lag-window stability_sorted.sql, also
    when tokens miss epochs (expert-choice routing) and runs of complete and incomplete tokens alternate."""
    import pyarrow.parquet as pq
    from moe_lens.analysis.stability import _stability_sql
    from moe_lens.analysis._query import keyed, query, sql_text
    with tempfile.TemporaryDirectory() as tmp:
        root = write_synthetic_run(tmp, "r", num_experts=e, top_k=1, num_tokens=n, epochs=epochs, seed=seed)
        rng = np.random.default_rng(seed)
        for f in sorted((root / "routing").rglob("part-*.parquet")):
            t = pq.read_table(f)
            pq.write_table(t.filter(pa_mask(rng.random(t.num_rows) < keep)), f)
        con = connect(tmp)
        if con.execute("SELECT count(*) FROM routing").fetchall()[0][0] == 0:
            return
        for ep in [None, epochs - 1]:
            try:
                got = A.stability(con, "r", epoch=ep)
            except MoeLensError:  # nothing left at rank 0 in the valid split
                got = pd.DataFrame()
            epochs_list = query(con, keyed(con, ["r"], sql_text("epochs")), dict(run="r", dataset="wikitext2", split="valid"))["epoch"].tolist()
            if ep is not None:
                i = epochs_list.index(ep) if ep in epochs_list else None
                epochs_list = [] if i is None else epochs_list[max(i - 1, 0):i + 1]
            params = dict(run="r", dataset="wikitext2", split="valid", layer=0, epochs=epochs_list)
            if got.empty:
                ref = query(con, sql_text("stability_sorted"), params) if epochs_list else pd.DataFrame()
                assert ref.empty or (ep is not None and not (ref["epoch"] == ep).any())
                continue
            assert _stability_sql(con, params) == "stability"
            ref = query(con, sql_text("stability_sorted"), params)
            ref = ref if ep is None else ref[ref["epoch"] == ep]
            pd.testing.assert_frame_equal(got.reset_index(drop=True), ref.reset_index(drop=True), check_exact=True)


def pa_mask(values: np.ndarray):
    import pyarrow as pa
    return pa.array(values)


def test_dataset_attribute_has_no_shuffled_baseline(tmp_path: Path) -> None:
    """The shuffle permutes within each (run, dataset): for attribute='dataset' it would just copy nmi."""
    from moe_lens.analysis import specialization
    from moe_lens.store import connect
    from moe_lens.synthetic import write_synthetic_run

    write_synthetic_run(tmp_path, "r", dataset="wikitext2", num_tokens=400)
    con = connect(tmp_path)
    out = specialization(con, "r", attribute="dataset", summary=True)
    assert out["nmi_shuffled"].isna().all() and out["nmi_chance"].notna().all()
    assert specialization(con, "r", attribute="pos_tag", summary=True)["nmi_shuffled"].notna().all()
