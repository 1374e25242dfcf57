"""The literature's routing analyses (consecutive, saturation, vocabulary, fluctuation) against pandas on the
sample runs (1e-9), and on hand-built traces whose answer is known: a router that gives every token of a document
the same expert (consecutive rate 1), one drawing experts at random (the chance level inside the interval), a
router fixed across epochs (saturation 1, nothing fluctuates), one that is a function of the token (vocabulary 1).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
import pytest

from moe_lens import analysis as A
from moe_lens.errors import MoeLensError
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_runs"
RUNS = ["wikitext2-load-3layer", "conll2003-hybrid-seed1", "squad-noisy_topk"]  # 3 layers top-2; top-1; top-2
TOL = {"rtol": 1e-9, "atol": 1e-9}


def read(run: str, table: str, split: str = "valid") -> pd.DataFrame:
    df = ds.dataset(SAMPLE / run / table, format="parquet", partitioning="hive").to_table().to_pandas()
    for c in ("dataset", "split"):
        df[c] = df[c].astype(str)
    if "epoch" in df:
        df["epoch"] = df["epoch"].astype(int)
    return df[df["split"] == split]


@pytest.fixture(scope="module")
def con():
    return connect(SAMPLE)


def _top(rout: pd.DataFrame) -> pd.DataFrame:
    """One row per (epoch, step, layer, token_idx): e0, e1 (NaN without rank 1) and the expert set."""
    r = rout[rout["rank"] < 2]
    e = r.pivot_table(index=["epoch", "step", "layer", "token_idx"], columns="rank", values="expert", aggfunc="first")
    e = e.rename(columns={0: "e0", 1: "e1"}).reset_index()
    if "e1" not in e:
        e["e1"] = np.nan
    sets = rout.groupby(["epoch", "layer", "token_idx"])["expert"].agg(frozenset).rename("s").reset_index()
    return e.merge(sets, on=["epoch", "layer", "token_idx"])


@pytest.mark.parametrize("run", RUNS)
@pytest.mark.parametrize("within", ["document", "sentence"])
def test_consecutive_equals_pandas(con, run: str, within: str) -> None:
    got = A.consecutive(con, run, within=within).set_index("layer")
    tok, top = read(run, "tokens"), _top(read(run, "routing"))
    top = top[top["epoch"] == top["epoch"].max()].merge(tok[["token_idx", "doc_id", "sent_id"]], on="token_idx")
    for layer, d in top.groupby("layer"):
        d = d.set_index("token_idx")
        nxt = d.reindex(d.index + 1)
        nxt.index = d.index
        ok = nxt["e0"].notna() & (nxt["step"] == d["step"]) & (nxt["doc_id"] == d["doc_id"])
        if within == "sentence":
            ok &= nxt["sent_id"] == d["sent_id"]
        left, right = d[ok], nxt[ok]
        p = len(left)
        in2 = (left["e0"] == right["e0"]) | (left["e0"] == right["e1"])
        pl = left["e0"].value_counts() / p
        pr = right["e0"].value_counts() / p
        q = pd.concat([right["e0"], right["e1"].dropna()]).value_counts() / p
        row = got.loc[layer]
        assert row["pairs"] == p
        np.testing.assert_allclose(row["same_top1"], (left["e0"] == right["e0"]).mean(), **TOL)
        np.testing.assert_allclose(row["top1_in_next_top2"], in2.mean(), **TOL)
        np.testing.assert_allclose(row["same_top1_chance"], (pl * pr).fillna(0).sum(), **TOL)
        np.testing.assert_allclose(row["top1_in_next_top2_chance"], (pl * q).fillna(0).sum(), **TOL)


@pytest.mark.parametrize("run", RUNS)
def test_saturation_equals_pandas(con, run: str) -> None:
    got = A.saturation(con, run).set_index(["epoch", "layer"])
    top = _top(read(run, "routing"))
    final = top["epoch"].max()
    f = top[top["epoch"] == final][["layer", "token_idx", "e0", "s"]]
    assert len(got) == top.loc[top["epoch"] < final, ["epoch", "layer"]].drop_duplicates().shape[0]
    for (epoch, layer), d in top[top["epoch"] < final].groupby(["epoch", "layer"]):
        m = d.merge(f, on=["layer", "token_idx"], suffixes=("", "_f"))
        t = len(m)
        inter = sum(len(a & b) for a, b in zip(m["s"], m["s_f"]))
        kf = m["s_f"].map(len).sum()
        c = pd.Series([e for s in m["s"] for e in s]).value_counts()
        dd = pd.Series([e for s in m["s_f"] for e in s]).value_counts()
        row = got.loc[(epoch, layer)]
        assert row["tokens"] == t and row["final_epoch"] == final
        np.testing.assert_allclose(row["top1_match"], (m["e0"] == m["e0_f"]).mean(), **TOL)
        np.testing.assert_allclose(row["topk_overlap"], inter / kf, **TOL)
        chance = (m["e0"].value_counts() * m["e0_f"].value_counts()).fillna(0).sum() / t**2
        np.testing.assert_allclose(row["top1_match_chance"], chance, **TOL)
        np.testing.assert_allclose(row["topk_overlap_chance"], (c * dd).fillna(0).sum() / (t * kf), **TOL)


@pytest.mark.parametrize("run", RUNS)
def test_vocabulary_equals_pandas(con, run: str) -> None:
    got = A.vocabulary(con, run, min_count=10).set_index("layer")
    table = A.vocabulary(con, run, min_count=10, summary=False)
    tok, rout = read(run, "tokens"), read(run, "routing")
    r = rout[(rout["rank"] == 0) & (rout["epoch"] == rout["epoch"].max())].merge(tok, on="token_idx")
    r = r[r["in_vocab"]]
    for layer, d in r.groupby("layer"):
        n = d.groupby(["token", "expert"]).size().unstack(fill_value=0)
        total = n.sum(axis=1)
        n, total = n[total >= 10], total[total >= 10]
        share = n.max(axis=1) / total
        row = got.loc[layer]
        assert row["types"] == len(share)
        np.testing.assert_allclose(row["mean_share"], share.mean(), **TOL)
        np.testing.assert_allclose(row["token_share"], n.max(axis=1).sum() / total.sum(), **TOL)
        np.testing.assert_allclose(row["median_share"], share.median(), **TOL)
        assert row["mean_share_chance"] < row["mean_share"] or row["mean_share"] > 0.99
        t = table[table["layer"] == layer].set_index("token")
        np.testing.assert_allclose(t.loc[share.index, "share"].to_numpy(), share.to_numpy(), **TOL)
        assert (t.loc[n.index, "expert"].to_numpy() == n.idxmax(axis=1).to_numpy()).all()


@pytest.mark.parametrize("run", ["conll2003-hybrid", "wikitext2-load-3layer"])
def test_fluctuation_equals_pandas(con, run: str) -> None:
    got = A.fluctuation(con, run).set_index("layer")
    dist = A.fluctuation(con, run, summary=False)
    rout = read(run, "routing")
    r = rout[rout["rank"] == 0].sort_values(["layer", "token_idx", "epoch"])
    steps = rout.groupby("epoch")["step"].max()
    progress = steps / steps.max()
    for layer, d in r.groupby("layer"):
        changed = d.groupby("token_idx")["expert"].diff().fillna(0).ne(0)
        last = d.assign(c=changed).loc[lambda x: x["c"]].groupby("token_idx")["epoch"].max()
        last = last.reindex(d["token_idx"].unique(), fill_value=-1)
        row = got.loc[layer]
        assert row["tokens"] == len(last)
        np.testing.assert_allclose(row["never_changed"], (last == -1).mean(), **TOL)
        p = d[d["epoch"] == d["epoch"].max()]["expert"].value_counts(normalize=True)
        for f in (20, 50, 80):
            late = last.map(lambda e, f=f: e >= 0 and progress[e] > f / 100)
            np.testing.assert_allclose(row[f"changing_after_{f}"], late.mean(), **TOL)
            m = int((progress.iloc[1:] > f / 100).sum())
            np.testing.assert_allclose(row[f"chance_after_{f}"], 1 - (p**2).sum() ** m, **TOL)
        dl = dist[dist["layer"] == layer].set_index("last_change")["tokens"]
        assert dl.to_dict() == last.value_counts().to_dict()


# --- hand-built traces ----------------------------------------------------------------------------------------

def _hand_run(root: Path, name: str, route, *, top_k: int = 1, experts: int = 4, epochs: int = 3,
              tokens: int = 3000, seed: int = 0) -> None:
    """A synthetic run's valid trace with rank-0 experts replaced by route(tokens frame, epoch, rng) (n,)."""
    run = write_synthetic_run(root, name, num_tokens=tokens, num_experts=experts, top_k=top_k, epochs=epochs,
                              splits=("valid",), seed=seed)
    tok = pq.read_table(next((run / "tokens").rglob("*.parquet"))).to_pandas().set_index("token_idx")
    rng = np.random.default_rng(seed)
    for part in sorted((run / "routing").rglob("*.parquet")):
        epoch = int(part.parent.name.split("=")[1])
        t = pq.read_table(part).to_pandas()
        first = route(tok, epoch, rng)  # (n,) top-1 expert of each token
        e0 = first[t["token_idx"].to_numpy()]
        t["expert"] = np.where(t["rank"] == 0, e0, (e0 + 1) % experts).astype(t["expert"].dtype)
        pq.write_table(pa.Table.from_pandas(t, preserve_index=False), part)


@pytest.fixture(scope="module")
def hand(tmp_path_factory) -> object:
    root = tmp_path_factory.mktemp("literature")
    _hand_run(root, "copy", lambda tok, e, rng: (tok["doc_id"].to_numpy() % 4))  # same expert within a document
    _hand_run(root, "random", lambda tok, e, rng: rng.choice(4, size=len(tok), p=[0.4, 0.3, 0.2, 0.1]), seed=1)
    _hand_run(root, "vocab", lambda tok, e, rng: tok["token_id"].to_numpy() % 4, top_k=2)
    _hand_run(root, "late", lambda tok, e, rng: (tok["token_id"].to_numpy() + (e == 2) * (tok.index.to_numpy() % 2)) % 4,
              epochs=3)
    return connect(root)


def test_copy_router_has_consecutive_rate_one(hand) -> None:
    df = A.bootstrap(A.consecutive, hand, "copy", n=100)
    assert (df["same_top1"] == 1.0).all() and (df["top1_in_next_top2"] == 1.0).all()
    assert (df["same_top1_lo"] == 1.0).all()
    assert df["same_top1_chance"].between(0.2, 0.6).all()  # sum p_i^2 of the documents' experts


def test_random_router_sits_at_chance_within_its_interval(hand) -> None:
    df = A.bootstrap(A.consecutive, hand, "random", n=200, by="sentence")
    pd.testing.assert_frame_equal(df[A.consecutive(hand, "random").columns], A.consecutive(hand, "random"))
    r = df.iloc[0]
    assert r["same_top1_lo"] <= r["same_top1_chance"] <= r["same_top1_hi"], r
    np.testing.assert_allclose(r["same_top1_chance"], 0.4**2 + 0.3**2 + 0.2**2 + 0.1**2, atol=0.02)
    assert r["top1_in_next_top2_lo"] <= r["top1_in_next_top2_chance"] <= r["top1_in_next_top2_hi"], r
    sat = A.bootstrap(A.saturation, hand, "random", n=200)  # epochs redrawn independently: chance
    assert ((sat["top1_match_lo"] <= sat["top1_match_chance"]) & (sat["top1_match_chance"] <= sat["top1_match_hi"])).all()


def test_fixed_router_is_saturated_and_never_fluctuates(hand) -> None:
    sat = A.saturation(hand, "vocab")
    assert (sat["top1_match"] == 1.0).all() and (sat["topk_overlap"] == 1.0).all()
    assert len(sat) == 2 and (sat["top1_match_chance"] < 0.5).all()
    fl = A.fluctuation(hand, "vocab")
    assert (fl["never_changed"] == 1.0).all() and (fl[["changing_after_20", "changing_after_80"]] == 0).all().all()


def test_late_change_is_still_fluctuating_after_80_percent(hand) -> None:
    fl = A.fluctuation(hand, "late").iloc[0]
    # odd token_idx change expert at epoch 2 (the last, progress 1.0); nothing changes at epoch 1
    np.testing.assert_allclose(fl["changing_after_80"], 0.5, atol=1e-12)
    np.testing.assert_allclose(fl["never_changed"], 0.5, atol=1e-12)
    dist = A.fluctuation(hand, "late", summary=False)
    assert dist["last_change"].tolist() == [-1, 2]


def test_token_function_router_has_vocabulary_share_one(hand) -> None:
    df = A.bootstrap(A.vocabulary, hand, "vocab", n=50, min_count=5)
    assert (df["mean_share"] == 1.0).all() and (df["token_share"] == 1.0).all() and (df["mean_share_lo"] == 1.0).all()
    assert (df["mean_share_chance"] < 0.8).all()
    top = A.vocabulary(hand, "vocab", summary=False, top=2, min_count=5)
    assert top.groupby("expert").size().max() <= 2 and (top["share"] == 1.0).all()


def test_bad_options_are_one_line_errors(hand) -> None:
    with pytest.raises(MoeLensError, match="within='word'; allowed: document, sentence"):
        A.consecutive(hand, "copy", within="word")
    with pytest.raises(MoeLensError, match="unknown run 'nope'"):
        A.saturation(hand, "nope")


def test_analyze_command_prints_the_registered_analysis(con, capsys) -> None:
    from io import StringIO

    from moe_lens.cli import main
    run = "conll2003-hybrid-seed1"
    assert main(["analyze", "consecutive", run, "--runs-dir", str(SAMPLE), "--format", "csv", "--within", "sentence"]) == 0
    got = pd.read_csv(StringIO(capsys.readouterr().out))
    np.testing.assert_allclose(got["same_top1"], A.consecutive(con, run, within="sentence")["same_top1"], **TOL)
    assert main(["analyze", "vocabulary", run, "--runs-dir", str(SAMPLE), "--format", "csv", "--bootstrap", "20"]) == 0
    got = pd.read_csv(StringIO(capsys.readouterr().out))
    assert {"mean_share_lo", "mean_share_hi", "units"} <= set(got.columns)
    assert main(["analyze", "agreement", run, "conll2003-hybrid-seed2", "--runs-dir", str(SAMPLE)]) == 0
    assert "matched_agreement" in capsys.readouterr().out
    assert main(["analyze", "fluctuation", run, "--runs-dir", str(SAMPLE), "--within", "x"]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "fluctuation takes no --within" in err
    assert main(["analyze", "consecutive", run, "--runs-dir", str(SAMPLE), "--layer", "one"]) == 2
    assert "--layer='one': expected int" in capsys.readouterr().err


def test_probe_datasets_follow_the_dataset_rule(con) -> None:
    """wikitext2-load holds CoNLL and SQuAD replays recorded at one epoch: '*' gives each its own rows where the
    analysis can say something (consecutive, vocabulary), and no saturation/fluctuation row without two epochs."""
    cons = A.consecutive(con, "wikitext2-load", dataset="*")
    assert set(cons["dataset"]) == {"wikitext2", "conll2003", "squad"}
    assert set(A.saturation(con, "wikitext2-load", dataset="*")["dataset"]) == {"wikitext2"}
    assert set(A.fluctuation(con, "wikitext2-load", dataset="*")["dataset"]) == {"wikitext2"}
    with pytest.raises(MoeLensError, match="two recorded epochs"):
        A.fluctuation(con, "wikitext2-load", dataset="squad")
    own = A.consecutive(con, "wikitext2-load")
    pd.testing.assert_frame_equal(own, cons[cons["dataset"] == "wikitext2"].reset_index(drop=True))
