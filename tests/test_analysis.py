"""Balance, collapse, confidence and capacity against independent numpy/pandas on synthetic traces.

The reference reads the Parquet part files with pyarrow (no DuckDB) and recomputes each formula its own
way (pairwise Gini, per-token margins, a loop for the collapse step: literature_ref.collapse); agreement is
required to 1e-9.
"""
from __future__ import annotations

import tempfile
from pathlib import Path

import literature_ref as ref
import numpy as np
import pandas as pd
import pyarrow.dataset as ds
import pytest
from hypothesis import HealthCheck, given, settings, strategies as st

from moe_lens import analysis as A
from moe_lens.errors import MoeLensError
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

TOL = dict(rtol=1e-9, atol=1e-9)
SETTINGS = settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def load(root: Path, table: str) -> pd.DataFrame:
    """A whole (small) table of one run, partition columns included."""
    return ds.dataset(root / table, format="parquet", partitioning="hive").to_table().to_pandas()


@st.composite
def shapes(draw: st.DrawFn) -> dict:
    e = draw(st.integers(1, 6))
    dead = draw(st.integers(0, e - 1))
    return dict(num_experts=e, dead_experts=dead, top_k=draw(st.integers(1, min(3, e - dead))),
                num_tokens=draw(st.integers(1, 300)), epochs=draw(st.integers(1, 3)),
                steps_per_epoch=draw(st.integers(1, 4)), layers=draw(st.integers(1, 2)),
                skew=draw(st.sampled_from([0.0, 1.0, 4.0])), seed=draw(st.integers(0, 10**6)),
                collapse_step=draw(st.one_of(st.none(), st.integers(0, 6))),
                drop_rate=draw(st.sampled_from([0.0, 0.3])))


def make(tmp: str, **kw) -> tuple[Path, object]:
    cf = 1.25 if kw.get("drop_rate") else None
    root = write_synthetic_run(tmp, "r", capacity_factor=cf, **kw)
    return root, connect(tmp)


def ref_balance(r: pd.DataFrame, e: int, all_ranks: bool) -> pd.DataFrame:
    rows = []
    sel = r if all_ranks else r[r["rank"] == 0]
    for (split, epoch, layer), g in sel.groupby(["split", "epoch", "layer"]):
        n = np.bincount(g["expert"], minlength=e).astype(float)
        imp = np.bincount(g["expert"], weights=g["gate"].astype(np.float64), minlength=e)
        gini = np.abs(n[:, None] - n[None, :]).sum() / (2 * e * e * n.mean())
        rows.append(dict(split=split, epoch=epoch, layer=layer, tokens=n.sum(), cv2_load=n.var() / n.mean() ** 2,
                         cv2_importance=imp.var() / imp.mean() ** 2, max_over_mean=n.max() / n.mean(), gini=gini))
    return pd.DataFrame(rows)


@SETTINGS
@given(shape=shapes(), all_ranks=st.booleans())
def test_load_balance_matches_numpy(shape: dict, all_ranks: bool) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, con = make(tmp, **shape)
        r = load(root, "routing")
        for layer in range(shape["layers"]):
            for split in ("train", "valid"):
                got = A.load_balance(con, "r", split=split, layer=layer, all_ranks=all_ranks)
                want = ref_balance(r[(r["split"] == split) & (r["layer"] == layer)], shape["num_experts"], all_ranks)
                got, want = got.sort_values("epoch"), want.sort_values("epoch")
                for col in ("tokens", "cv2_load", "cv2_importance", "max_over_mean", "gini"):
                    np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), **TOL, err_msg=col)
        per = A.load_balance(con, "r", per_expert=True, all_ranks=all_ranks)  # every layer by default
        assert len(per) == shape["num_experts"] * shape["epochs"] * shape["layers"]  # every expert, zeros included
        np.testing.assert_allclose(per.groupby(["epoch", "layer"])["share"].sum(), 1.0, **TOL)


@SETTINGS
@given(shape=shapes(), threshold=st.sampled_from([1.5, 2.0, 3.0]))
def test_collapse_matches_numpy(shape: dict, threshold: float) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, con = make(tmp, **shape)
        r = load(root, "routing")
        got = A.collapse(con, "r", threshold=threshold, layer=0).sort_values("step")
        want = ref.collapse(r[(r["split"] == "train") & (r["layer"] == 0)], shape["num_experts"], threshold)
        assert got["step"].tolist() == want["step"].tolist()
        np.testing.assert_allclose(got["entropy"], want["entropy"], **TOL)
        np.testing.assert_allclose(got["norm_entropy"].to_numpy(float), want["norm"].to_numpy(float), **TOL)
        np.testing.assert_allclose(got["effective_experts"], want["eff"], **TOL)
        assert got["dead_experts"].tolist() == want["dead"].tolist()
        assert got["never_top1"].tolist() == want["never_top1"].tolist()
        c = got["collapse_step"].iloc[0]
        assert (pd.isna(c) and want["collapse_step"].iloc[0] is None) or c == want["collapse_step"].iloc[0]


@SETTINGS
@given(shape=shapes())
def test_router_confidence_and_capacity_match_numpy(shape: dict) -> None:
    with tempfile.TemporaryDirectory() as tmp:
        root, con = make(tmp, **shape)
        r = load(root, "routing")
        v = r[(r["split"] == "valid") & (r["layer"] == 0)]
        got = A.router_confidence(con, "r", layer=0).sort_values("epoch")
        g = v.pivot_table(index=["epoch", "token_idx"], columns="rank", values="gate", aggfunc="first").astype(np.float64)
        top = v[v["rank"] == 0].astype({"gate": np.float64, "entropy": np.float64}).groupby("epoch")
        np.testing.assert_allclose(got["top1_gate"], top["gate"].mean(), **TOL)
        np.testing.assert_allclose(got["entropy"], top["entropy"].mean(), **TOL)
        if shape["top_k"] > 1:
            np.testing.assert_allclose(got["margin"], (g[0] - g[1]).groupby("epoch").mean(), **TOL)
        else:
            assert got["margin"].isna().all()
        cap = A.capacity(con, "r", split="valid", layer=0).sort_values("epoch")
        if shape["drop_rate"]:
            np.testing.assert_allclose(cap["dropped_rate"], v.groupby("epoch")["dropped"].mean(), **TOL)
        else:
            assert cap.empty  # no capacity factor set


def test_one_expert(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "one", num_experts=1, top_k=1, num_tokens=50)
    con = connect(tmp_path)
    b = A.load_balance(con, "one")
    assert (b["cv2_load"] == 0).all() and (b["gini"] == 0).all() and (b["max_over_mean"] == 1).all()
    c = A.collapse(con, "one")
    assert c["norm_entropy"].isna().all() and (c["effective_experts"] == 1).all() and (c["dead_experts"] == 0).all()
    assert c["collapse_step"].isna().all()  # exp(H) = 1 by construction: a dense run never "collapses"
    assert A.router_confidence(con, "one")["margin"].isna().all()


def test_dead_expert_is_counted(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "d", num_experts=4, dead_experts=1, top_k=2, num_tokens=400)
    per = A.load_balance(connect(tmp_path), "d", per_expert=True)
    assert (per.loc[per["expert"] == 3, "tokens"] == 0).all()
    assert (A.collapse(connect(tmp_path), "d", all_ranks=True)["dead_experts"] >= 1).all()


def test_collapse_step_found(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "c", num_experts=8, top_k=2, num_tokens=2000, epochs=2, steps_per_epoch=10,
                        collapse_step=7)
    c = A.collapse(connect(tmp_path), "c")
    assert c["collapse_step"].iloc[0] == 7
    assert c.loc[c["step"] < 7, "effective_experts"].min() > 4


def test_single_token(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "s", num_tokens=1, num_experts=3, top_k=2, epochs=2)
    con = connect(tmp_path)
    assert A.load_balance(con, "s")["tokens"].tolist() == [2, 2]
    assert A.router_confidence(con, "s")["tokens"].tolist() == [1, 1]


def test_errors_are_one_line(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "ok", num_tokens=10)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "config.json").write_text('{"mode": "sw')  # killed while writing
    con = connect(tmp_path)
    with pytest.raises(MoeLensError, match="no routing rows for run\\(s\\) half"):
        A.load_balance(con, "half")
    with pytest.raises(MoeLensError, match="unknown run 'nope'; available: half, ok"):
        A.collapse(con, "nope")
    with pytest.raises(MoeLensError, match="by='week'"):
        A.load_balance(con, "ok", by="week")
    with pytest.raises(MoeLensError, match="no routing rows"):
        A.load_balance(con, "ok", split="test")
