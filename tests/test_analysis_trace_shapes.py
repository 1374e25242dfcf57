"""The literature and causal analyses on every trace shape, against pandas on the raw Parquet rows (1e-9):

- a run with several MoE layers (3 here): consecutive, saturation, vocabulary, fluctuation and coactivation give
  one row (group) per layer, pos_probe takes every layer's experts and gates as features, ablation / ablation_by
  one row per (layer, expert);
- the same run in torchrun's layout (docs/distributed.md): tokens and routing split into `ddp_rank=0/` and
  `ddp_rank=1/` partitions, each token on exactly one rank (shards of 100 consecutive tokens, as a distributed
  sampler hands out batches), the ablation table single-process as `moe-lens ablate` writes it. Every analysis
  equals the one-process run's and counts each token exactly once (pairs, tokens, n_i, test tokens, delta rows).
"""
from __future__ import annotations

import shutil
from pathlib import Path

import literature_ref as ref
import numpy as np
import pandas as pd
import pyarrow.compute as pc
import pyarrow.parquet as pq
import pytest

from moe_lens import analysis as A
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_ablation, write_synthetic_run

TOL = {"rtol": 1e-9, "atol": 1e-9}
SHAPES = ["flat", "ddp"]  # "flat": one process, 3 MoE layers; "ddp": the same files in two ranks' partitions
LAYERS, EXPERTS = 3, 4


@pytest.fixture(scope="module")
def root(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("shapes")
    flat = write_synthetic_run(d, "flat", num_tokens=1500, num_experts=EXPERTS, top_k=2, layers=LAYERS, epochs=3,
                               splits=("valid",), specialization=3.0, seed=5)  # fmt: skip
    write_synthetic_ablation(flat)
    shutil.copytree(flat, d / "ddp")
    for table in ("tokens", "routing"):
        for part in sorted((d / "ddp" / table).rglob("part-*.parquet")):
            t = pq.read_table(part)
            rank = pc.bit_wise_and(pc.divide(t["token_idx"], 100), 1)  # (n,) 0/1: shards of 100 tokens
            for r in (0, 1):
                (part.parent / f"ddp_rank={r}").mkdir(exist_ok=True)
                pq.write_table(t.filter(pc.equal(rank, r)), part.parent / f"ddp_rank={r}" / part.name)
            part.unlink()
    return d


@pytest.fixture(scope="module")
def con(root: Path):
    return connect(root)


def raw(root: Path, run: str, table: str) -> pd.DataFrame:
    return ref.read(root / run, table, "valid")


def test_the_ddp_copy_has_each_token_on_one_rank(root: Path) -> None:
    for table in ("tokens", "routing"):
        d = raw(root, "ddp", table)
        assert set(d["ddp_rank"].astype(int)) == {0, 1}
        assert d.groupby("token_idx")["ddp_rank"].nunique().max() == 1
        assert len(d) == len(raw(root, "flat", table))
    assert sorted(raw(root, "flat", "routing")["layer"].unique()) == list(range(LAYERS))


def _same(con, fn, *args, **kw) -> pd.DataFrame:
    """fn on the ddp run, checked equal (to 1e-9) to fn on the one-process run; returns the ddp table."""
    flat, ddp = fn(con, "flat", *args, **kw), fn(con, "ddp", *args, **kw)
    assert len(ddp) == len(flat) > 0
    pd.testing.assert_frame_equal(ddp.drop(columns="run").reset_index(drop=True),
                                  flat.drop(columns="run").reset_index(drop=True), check_exact=False, rtol=1e-9)
    return ddp


@pytest.mark.parametrize("run", SHAPES)
def test_consecutive(con, root: Path, run: str) -> None:
    got = _same(con, A.consecutive).set_index("layer") if run == "ddp" else A.consecutive(con, run).set_index("layer")
    assert sorted(got.index) == list(range(LAYERS))
    # pairs equal: each pair once, also across the two ranks' shards
    ref.close(got, ref.consecutive(raw(root, run, "tokens"), raw(root, run, "routing")), ref.CONSECUTIVE)


@pytest.mark.parametrize("run", SHAPES)
def test_saturation(con, root: Path, run: str) -> None:
    got = (_same(con, A.saturation) if run == "ddp" else A.saturation(con, run)).set_index(["epoch", "layer"])
    assert len(got) == 2 * LAYERS  # epochs 0 and 1 against the final epoch 2
    assert (got["tokens"] == 1500).all()  # each token once, whichever rank routed it
    ref.close(got, ref.saturation(raw(root, run, "routing")), ref.SATURATION)


@pytest.mark.parametrize("run", SHAPES)
def test_vocabulary(con, root: Path, run: str) -> None:
    got = (_same(con, A.vocabulary, min_count=10) if run == "ddp" else A.vocabulary(con, run, min_count=10))
    want, _ = ref.vocabulary(raw(root, run, "tokens"), raw(root, run, "routing"), min_count=10)
    ref.close(got.set_index("layer"), want, ref.VOCABULARY)


@pytest.mark.parametrize("run", SHAPES)
def test_fluctuation(con, root: Path, run: str) -> None:
    got = (_same(con, A.fluctuation) if run == "ddp" else A.fluctuation(con, run)).set_index("layer")
    assert (got["tokens"] == 1500).all()  # every token once
    ref.close(got, ref.fluctuation(raw(root, run, "routing"))[0], ref.FLUCTUATION)


@pytest.mark.parametrize("run", SHAPES)
def test_coactivation(con, root: Path, run: str) -> None:
    got = _same(con, A.coactivation) if run == "ddp" else A.coactivation(con, run)
    got = got.set_index(["layer", "expert_i", "expert_j"])
    rout = raw(root, run, "routing")
    r = rout[rout["epoch"] == rout["epoch"].max()]
    sets = r.groupby(["layer", "token_idx"])["expert"].agg(lambda e: sorted(set(e)))
    rows = []
    for (layer, _), s in sets.items():
        rows += [(layer, i, j) for i in s for j in s if i != j]
    n_ij = pd.DataFrame(rows, columns=["layer", "expert_i", "expert_j"]).value_counts()
    n_i = pd.Series([(layer, i) for (layer, _), s in sets.items() for i in s]).value_counts()
    assert len(got) == len(n_ij) and sorted(got.index.get_level_values("layer").unique()) == list(range(LAYERS))
    for (layer, i, j), n in n_ij.items():
        row = got.loc[(layer, i, j)]
        assert row["n_ij"] == n and row["n_i"] == n_i[(layer, i)]  # each token's set once
        np.testing.assert_allclose(row["p_j_given_i"], n / n_i[(layer, i)], **TOL)


@pytest.mark.parametrize("run", SHAPES)
def test_pos_probe(con, root: Path, run: str) -> None:
    kw = dict(by="sentence", n=30)
    got = (_same(con, A.pos_probe, **kw) if run == "ddp" else A.pos_probe(con, run, **kw)).set_index("method")
    rout, t = raw(root, run, "routing"), raw(root, run, "tokens")
    r = rout[rout["epoch"] == rout["epoch"].max()]
    t = t[t["pos_tag"].notna()].sort_values("token_idx")
    gate, test, y, pred = ref.pos_probe(r, t)
    assert gate.shape[1] == LAYERS * EXPERTS  # every layer's experts are features
    assert got.loc["probe", "accuracy"] == pytest.approx((pred == y[test]).mean(), abs=1e-9)
    assert got.loc["probe", "test_tokens"] == test.sum() and got.loc["probe", "train_tokens"] == (~test).sum()
    assert got.loc["probe", "features"] == 2 * LAYERS * EXPERTS


@pytest.mark.parametrize("run", SHAPES)
def test_ablation_views(con, root: Path, run: str) -> None:
    a = raw(root, run, "ablation").astype({"delta_loss": np.float64})
    tok = raw(root, run, "tokens")
    got = (_same(con, A.ablation) if run == "ddp" else A.ablation(con, run)).set_index(["layer", "expert"])
    want = a.groupby(["layer", "expert"]).agg(tokens=("delta_loss", "size"), mean_delta=("delta_loss", "mean"),
                                              share_up=("delta_loss", lambda d: (d > 0).mean()))  # fmt: skip
    assert len(got) == LAYERS * EXPERTS
    assert (got["tokens"] == want["tokens"]).all()  # each ablated token joins one tokens row, whatever its rank
    for c in ("mean_delta", "share_up"):
        np.testing.assert_allclose(got[c].to_numpy(), want[c].to_numpy(), **TOL)
    by = _same(con, A.ablation_by, attribute="pos_tag", min_tokens=1) if run == "ddp" else \
        A.ablation_by(con, run, attribute="pos_tag", min_tokens=1)
    m = a.merge(tok[["token_idx", "pos_tag"]], on="token_idx").groupby(["layer", "expert", "pos_tag"])["delta_loss"]
    by = by.set_index(["layer", "expert", "value"])
    np.testing.assert_allclose(by["mean_delta"].to_numpy(), m.mean().to_numpy(), **TOL)
    assert (by["n"].to_numpy() == m.size().to_numpy()).all()
    if run == "ddp":  # the intervals resample the same documents in both layouts
        boot = _same(con, lambda c, r, **k: A.bootstrap("ablation_by", c, r, **k), attribute="pos_tag", min_tokens=1,
                     n=20)  # fmt: skip
        assert (boot["mean_delta_lo"] <= boot["mean_delta"] + 1e-12).all()
        per = _same(con, A.ablation_importance, summary=False)  # load / importance / KL over the routing of both ranks
        r = raw(root, run, "routing")
        r = r[r["epoch"] == a["epoch"].astype(int).max()]
        load = r.groupby(["layer", "expert"]).size() / r.groupby("layer").size()
        np.testing.assert_allclose(per.set_index(["layer", "expert"])["load"].to_numpy(), load.to_numpy(), **TOL)
        _same(con, A.ablation_importance, n=20)
