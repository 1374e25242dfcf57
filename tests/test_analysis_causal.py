"""The POS probe and the ablation analyses against independent pandas / numpy / scipy / sklearn computations on the
raw Parquet files of synthetic runs, and on traces whose answer is known:

- routing that is a function of the POS tag gives a probe near 1; routing independent of it gives a probe at the
  majority-class baseline (inside its interval);
- `ablation`, `ablation_by`, `ablation_importance` (Spearman, scipy) and `bootstrap(ablation)` (the same draws in a
  plain loop) to 1e-9; the synthetic ablation's delta grows with the expert index, so its rho with it is 1.
"""
from __future__ import annotations

from pathlib import Path

import literature_ref as ref
import numpy as np
import pandas as pd
import pyarrow.parquet as pq
import pytest
from scipy.stats import spearmanr

from moe_lens import analysis as A
from moe_lens.analysis.bootstrap import draw_weights
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_ablation, write_synthetic_run


def raw(root: Path, table: str) -> pd.DataFrame:
    return pq.read_table(root / table).to_pandas()


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("causal")
    write_synthetic_run(d, "pos", num_tokens=1500, num_experts=4, top_k=2, layers=2, specialization=6.0, noise=0.0,
                        drift=0.0, splits=("valid",), epochs=1)  # fmt: skip
    write_synthetic_run(d, "rand", num_tokens=1500, num_experts=4, top_k=2, specialization=0.0, splits=("valid",),
                        epochs=1, seed=3)  # fmt: skip
    write_synthetic_ablation(d / "pos")
    return d


def valid_last(root: Path) -> tuple[pd.DataFrame, pd.DataFrame]:
    r, t = raw(root, "routing"), raw(root, "tokens")
    r = r[(r["split"] == "valid") & (r["epoch"].astype(int) == r["epoch"].astype(int).max())]
    return r, t[t["split"] == "valid"]


def test_probe_equals_sklearn_on_a_pandas_feature_table(runs: Path) -> None:
    got = A.pos_probe(connect(runs), "pos", by="sentence", n=50).set_index("method")
    r, t = valid_last(runs / "pos")
    t = t.sort_values("token_idx").iloc[:20_000]
    _, test, y, pred = ref.pos_probe(r, t)
    assert got.loc["probe", "accuracy"] == pytest.approx((pred == y[test]).mean(), abs=1e-9)
    train = t[~test]
    majority = train["pos_tag"].value_counts().sort_index().idxmax()
    best = {}
    for w, g in train.groupby("token_id"):
        c = g["pos_tag"].value_counts()
        best[w] = min(c[c == c.max()].index)
    word = np.array([best.get(w, majority) for w in t.loc[test, "token_id"]], dtype=object)
    assert got.loc["majority_word", "accuracy"] == pytest.approx((word == y[test]).mean(), abs=1e-9)
    assert got.loc["majority_class", "accuracy"] == pytest.approx((y[test] == majority).mean(), abs=1e-9)
    assert got.loc["probe", "test_tokens"] == test.sum() and got.loc["probe", "features"] == 16


def test_probe_known_answers(runs: Path) -> None:
    con = connect(runs)
    pos = A.pos_probe(con, "pos", by="sentence").set_index("method")
    assert pos.loc["probe", "accuracy"] > 0.9 > pos.loc["majority_class", "accuracy"]  # routing = f(POS)
    rand = A.pos_probe(con, "rand", by="sentence").set_index("method")
    chance = rand.loc["majority_class", "accuracy"]
    assert rand.loc["probe", "accuracy_lo"] <= chance + 0.02 and rand.loc["probe", "accuracy"] < chance + 0.05
    for df in (pos, rand):
        assert (df["accuracy_lo"] <= df["accuracy"]).all() and (df["accuracy"] <= df["accuracy_hi"]).all()


def test_ablation_tables_equal_pandas(runs: Path) -> None:
    con = connect(runs)
    a = raw(runs / "pos", "ablation").astype({"delta_loss": np.float64})
    got = A.ablation(con, "pos").set_index(["layer", "expert"])
    want = a.groupby(["layer", "expert"]).agg(tokens=("delta_loss", "size"), mean_delta=("delta_loss", "mean"),
                                              share_up=("delta_loss", lambda d: (d > 0).mean()))  # fmt: skip
    want["mean_delta_chose"] = a[a["chose"]].groupby(["layer", "expert"])["delta_loss"].mean()
    for c in want.columns:
        np.testing.assert_allclose(got[c].to_numpy(float), want[c].to_numpy(float), rtol=1e-9, atol=1e-12)
    assert got["mean_delta"].groupby(level="layer").apply(lambda s: s.is_monotonic_increasing).all()
    t = raw(runs / "pos", "tokens")
    by = A.ablation_by(con, "pos", attribute="freq_band", min_tokens=1).set_index(["layer", "expert", "value"])
    m = a.merge(t[["token_idx", "freq_band"]], on="token_idx").groupby(["layer", "expert", "freq_band"])["delta_loss"]
    np.testing.assert_allclose(by["mean_delta"].to_numpy(), m.mean().to_numpy(), rtol=1e-9)
    assert (by["n"].to_numpy() == m.size().to_numpy()).all()


def test_bootstrap_of_ablation_is_the_plain_loop(runs: Path) -> None:
    got = A.bootstrap(A.ablation, connect(runs), "pos", by="sentence", n=100, seed=4)
    a = raw(runs / "pos", "ablation").merge(raw(runs / "pos", "tokens")[["token_idx", "doc_id", "sent_id"]],
                                            on="token_idx")  # fmt: skip
    rng = np.random.default_rng(4)
    for (layer, expert), g in a.groupby(["layer", "expert"], sort=True):  # the groups in key order
        per = g.groupby(["doc_id", "sent_id"], sort=True)["delta_loss"].agg(["sum", "size"])
        w = draw_weights(rng, len(per), 100)
        reps = (w @ per["sum"].to_numpy(float)) / (w @ per["size"].to_numpy(float))
        row = got[(got["layer"] == layer) & (got["expert"] == expert)].iloc[0]
        assert row["mean_delta_lo"] == pytest.approx(np.quantile(reps, 0.025), abs=1e-9)
        assert row["mean_delta_hi"] == pytest.approx(np.quantile(reps, 0.975), abs=1e-9)


def test_ablation_importance_is_scipy_spearman(runs: Path) -> None:
    con = connect(runs)
    per = A.ablation_importance(con, "pos", summary=False).set_index(["layer", "expert"])
    rho = A.ablation_importance(con, "pos", n=50).set_index(["layer", "measure"])
    a, (r, t) = raw(runs / "pos", "ablation"), valid_last(runs / "pos")
    r = r.merge(t[["token_idx", "pos_tag"]], on="token_idx").astype({"gate": np.float64})
    for layer, g in r.groupby("layer"):
        load = g.groupby("expert").size() / len(g)
        importance = g.groupby("expert")["gate"].sum() / g["gate"].sum()
        p_v = g["pos_tag"].value_counts(normalize=True)
        kl = pd.Series({e: sum(p * np.log(p / p_v[v]) for v, p in s.value_counts(normalize=True).items())
                        for e, s in g.groupby("expert")["pos_tag"]})
        delta = a[a["layer"] == layer].groupby("expert")["delta_loss"].mean()
        for name, obs in (("load", load), ("importance", importance), ("specialization", kl)):
            np.testing.assert_allclose(per.loc[layer][name].to_numpy(), obs.to_numpy(), rtol=1e-9)
            assert rho.loc[(layer, name), "rho"] == pytest.approx(spearmanr(delta, obs).statistic, abs=1e-9)
        lo, hi = rho.loc[(layer, "load"), ["rho_lo", "rho_hi"]]
        assert lo <= rho.loc[(layer, "load"), "rho"] <= hi


def test_bootstrap_of_ablation_by_is_a_numpy_loop(runs: Path) -> None:
    """Intervals of delta-loss per frequency band: a plain numpy loop over the raw Parquet rows with the same seed
    draws the same replicate documents (groups in key order, each group's documents ascending)."""
    got = A.bootstrap(A.ablation_by, connect(runs), "pos", attribute="freq_band", min_tokens=1, n=100, seed=7)
    a = raw(runs / "pos", "ablation").merge(raw(runs / "pos", "tokens")[["token_idx", "doc_id", "freq_band"]],
                                            on="token_idx").astype({"delta_loss": np.float64})  # fmt: skip
    rng = np.random.default_rng(7)
    checked = 0
    for (layer, expert, band), g in a.groupby(["layer", "expert", "freq_band"], sort=True):
        g = g.assign(chose_delta=g["delta_loss"].where(g["chose"], 0.0), up=g["delta_loss"] > 0)
        per = g.groupby("doc_id", sort=True).agg(n=("delta_loss", "size"), d=("delta_loss", "sum"),
                                                 nc=("chose", "sum"), dc=("chose_delta", "sum"), up=("up", "sum"))
        docs = per.index.tolist()
        idx = rng.integers(0, len(docs), size=(100, len(docs)))  # replicate b draws docs[idx[b]]
        reps = {m: [] for m in ("mean_delta", "mean_delta_chose", "share_up")}
        for b in range(100):
            t = per.iloc[idx[b]].sum()  # the drawn documents' rows, summed (a document drawn twice counts twice)
            reps["mean_delta"].append(t["d"] / t["n"])
            reps["mean_delta_chose"].append(t["dc"] / t["nc"] if t["nc"] > 0 else np.nan)
            reps["share_up"].append(t["up"] / t["n"])
        row = got[(got["layer"] == layer) & (got["expert"] == expert) & (got["value"] == band)].iloc[0]
        assert row["units"] == len(docs) and row["n"] == len(g)
        assert row["mean_delta"] == pytest.approx(g["delta_loss"].mean(), abs=1e-9)
        for m, v in reps.items():
            v = np.asarray(v)
            if np.isfinite(v).any():
                lo, hi = np.nanquantile(v, [0.025, 0.975])
                assert row[f"{m}_lo"] == pytest.approx(lo, abs=1e-9) and row[f"{m}_hi"] == pytest.approx(hi, abs=1e-9)
        checked += 1
    assert checked == len(got) > 8
