"""Pandas references for the literature analyses (consecutive, saturation, vocabulary, fluctuation, the POS probe's
held-out split and scikit-learn fit) and collapse,
computed from the raw Parquet rows (pyarrow, no DuckDB), shared by tests/test_analysis_literature.py,
tests/test_analysis_trace_shapes.py, tests/test_analysis_sparse_train.py and tests/test_analysis.py.

Each reference takes one run's rows of one split and dataset and returns a frame keyed like the analysis's
(layer, or epoch and layer). They hold for any trace: a token's occurrences are matched on token_idx within its
epoch and step, so a sparse train trace (a few recorded steps, a different set of tokens per epoch) needs nothing
special.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.dataset as ds

FRACTIONS = (20, 50, 80)  # fluctuation: percent of training
CONSECUTIVE = ["pairs", "same_top1", "top1_in_next_top2", "same_top1_chance", "top1_in_next_top2_chance"]
SATURATION = ["tokens", "final_epoch", "top1_match", "topk_overlap", "top1_match_chance", "topk_overlap_chance"]
VOCABULARY = ["types", "mean_share", "token_share", "median_share"]
FLUCTUATION = ["tokens", "never_changed", *(f"{w}_{f}" for f in FRACTIONS for w in ("changing_after", "chance_after"))]
TOL = {"rtol": 1e-9, "atol": 1e-9}


def read(run_dir: Path, table: str, split: str = "valid") -> pd.DataFrame:
    """One run's `table` (partition columns as str/int) restricted to `split`."""
    df = ds.dataset(run_dir / table, format="parquet", partitioning="hive").to_table().to_pandas()
    for c in ("dataset", "split"):
        if c in df:
            df[c] = df[c].astype(str)
    if "epoch" in df:
        df["epoch"] = df["epoch"].astype(int)
    return df[df["split"] == split].reset_index(drop=True)


def close(got: pd.DataFrame, want: pd.DataFrame, cols: list[str]) -> None:
    """got's rows are want's (same keys in the index) and equal them column by column (1e-9)."""
    assert sorted(got.index) == sorted(want.index), (sorted(got.index), sorted(want.index))
    for c in cols:
        np.testing.assert_allclose(got.loc[want.index, c].to_numpy(float), want[c].to_numpy(float), **TOL, err_msg=c)


def top(rout: pd.DataFrame) -> pd.DataFrame:
    """One row per (epoch, step, layer, token_idx): e0, e1 (NaN without rank 1) and the expert set s."""
    e = rout[rout["rank"] < 2].pivot_table(index=["epoch", "step", "layer", "token_idx"], columns="rank",
                                           values="expert", aggfunc="first")  # fmt: skip
    e = e.rename(columns={0: "e0", 1: "e1"}).reset_index()
    if "e1" not in e:
        e["e1"] = np.nan
    sets = rout.groupby(["epoch", "step", "layer", "token_idx"])["expert"].agg(frozenset).rename("s").reset_index()
    return e.merge(sets, on=["epoch", "step", "layer", "token_idx"])


def consecutive(tok: pd.DataFrame, rout: pd.DataFrame, within: str = "document") -> pd.DataFrame:
    """Per layer of the last epoch: pairs (t, t + 1 routed at the same step, same document or sentence),
    same_top1, top1_in_next_top2 and their chance levels sum_i p_i p'_i, sum_i p_i q'_i."""
    t = top(rout)
    t = t[t["epoch"] == t["epoch"].max()].merge(tok[["token_idx", "doc_id", "sent_id"]], on="token_idx")
    rows = []
    for layer, d in t.groupby("layer"):
        d = d.set_index("token_idx")
        nxt = d.reindex(d.index + 1)
        nxt.index = d.index
        ok = nxt["e0"].notna() & (nxt["step"] == d["step"]) & (nxt["doc_id"] == d["doc_id"])
        if within == "sentence":
            ok &= nxt["sent_id"] == d["sent_id"]
        left, right = d[ok], nxt[ok]
        p = len(left)
        in2 = (left["e0"] == right["e0"]) | (left["e0"] == right["e1"])
        pl, pr = left["e0"].value_counts() / p, right["e0"].value_counts() / p
        q = pd.concat([right["e0"], right["e1"].dropna()]).value_counts() / p
        rows.append({"layer": layer, "pairs": p, "same_top1": (left["e0"] == right["e0"]).mean(),
                     "top1_in_next_top2": in2.mean(), "same_top1_chance": (pl * pr).fillna(0).sum(),
                     "top1_in_next_top2_chance": (pl * q).fillna(0).sum()})
    return pd.DataFrame(rows).set_index("layer")


def saturation(rout: pd.DataFrame) -> pd.DataFrame:
    """Per (epoch < final, layer) with a token routed in both: tokens, final_epoch, top1_match, topk_overlap =
    sum |S & S_final| / sum |S_final| and their chance levels (the two epochs' routings independent)."""
    t = top(rout)
    final = t["epoch"].max()
    f = t[t["epoch"] == final][["layer", "token_idx", "e0", "s"]]
    rows = []
    for (epoch, layer), d in t[t["epoch"] < final].groupby(["epoch", "layer"]):
        m = d.merge(f, on=["layer", "token_idx"], suffixes=("", "_f"))  # the tokens routed in both epochs
        n = len(m)
        if n == 0:
            continue
        kf = m["s_f"].map(len).sum()
        c = pd.Series([e for s in m["s"] for e in s]).value_counts()
        cf = pd.Series([e for s in m["s_f"] for e in s]).value_counts()
        rows.append({"epoch": epoch, "layer": layer, "tokens": n, "final_epoch": final,
                     "top1_match": (m["e0"] == m["e0_f"]).mean(),
                     "topk_overlap": sum(len(a & b) for a, b in zip(m["s"], m["s_f"])) / kf,
                     "top1_match_chance": (m["e0"].value_counts() * m["e0_f"].value_counts()).fillna(0).sum() / n**2,
                     "topk_overlap_chance": (c * cf).fillna(0).sum() / (n * kf)})
    return pd.DataFrame(rows).set_index(["epoch", "layer"])


def vocabulary(tok: pd.DataFrame, rout: pd.DataFrame, min_count: int) -> tuple[pd.DataFrame, dict[int, pd.DataFrame]]:
    """Per layer of the last epoch's top-1 rows (in-vocabulary tokens where the table says): types seen
    >= min_count times, mean_share, token_share, median_share; and per layer the (type x expert) counts kept."""
    r = rout[(rout["rank"] == 0) & (rout["epoch"] == rout["epoch"].max())].merge(tok, on="token_idx")
    if "in_vocab" in r:  # synthetic tokens carry no in_vocab and no <unk> id: every token is in the vocabulary
        r = r[r["in_vocab"].astype(bool)]
    rows, counts = [], {}
    for layer, d in r.groupby("layer"):
        n = d.groupby(["token", "expert"]).size().unstack(fill_value=0)
        n = n[n.sum(axis=1) >= min_count]
        total = n.sum(axis=1)
        share = n.max(axis=1) / total
        rows.append({"layer": layer, "types": len(share), "mean_share": share.mean(),
                     "token_share": n.max(axis=1).sum() / total.sum(), "median_share": share.median()})
        counts[layer] = n
    return pd.DataFrame(rows).set_index("layer"), counts


def fluctuation(rout: pd.DataFrame) -> tuple[pd.DataFrame, pd.DataFrame]:
    """Over the tokens whose top-1 is recorded at every recorded epoch: per layer tokens, never_changed,
    changing_after_f (last change at an epoch whose last recorded step is > f% of the final one) and chance_after_f =
    1 - (sum p_i^2)^m (p: those tokens' final top-1 frequencies, m: recorded epoch transitions past f%); and the
    distribution (layer, last_change -> tokens, -1: never)."""
    steps = rout.groupby("epoch")["step"].max()  # (epochs,) the step each recorded epoch ended at
    progress = steps / steps.max()
    r = rout[rout["rank"] == 0].sort_values(["layer", "token_idx", "epoch"])
    rows, dist = [], []
    for layer, d in r.groupby("layer"):
        d = d[d.groupby("token_idx")["epoch"].transform("size") == len(steps)]  # routed at every recorded epoch
        changed = d.groupby("token_idx")["expert"].diff().fillna(0).ne(0)
        last = d.assign(c=changed).loc[lambda x: x["c"]].groupby("token_idx")["epoch"].max()
        last = last.reindex(d["token_idx"].unique(), fill_value=-1)
        p = d[d["epoch"] == steps.index.max()]["expert"].value_counts(normalize=True)
        row = {"layer": layer, "tokens": len(last), "never_changed": (last == -1).mean()}
        for f in FRACTIONS:
            row[f"changing_after_{f}"] = last.map(lambda e, f=f: e >= 0 and progress[e] > f / 100).mean()
            m = int((progress.iloc[1:] > f / 100).sum())
            row[f"chance_after_{f}"] = 1 - (p**2).sum() ** m
        rows.append(row)
        dist += [{"layer": layer, "last_change": e, "tokens": n} for e, n in last.value_counts().items()]
    return pd.DataFrame(rows).set_index("layer"), pd.DataFrame(dist).set_index(["layer", "last_change"])["tokens"]


def collapse(r: pd.DataFrame, e: int, threshold: float) -> pd.DataFrame:
    """Per recorded step of one layer's rows: entropy of the top-1 shares, norm, eff = exp(H), dead (all k
    assignments under 1/(10e)), never_top1, and collapse_step (first step after which eff stays < threshold)."""
    rows = []
    for step, every in r.groupby("step"):
        g = every[every["rank"] == 0]
        p = np.bincount(g["expert"], minlength=e) / len(g)
        h = -sum(x * np.log(x) for x in p if x > 0)
        share_all = np.bincount(every["expert"], minlength=e) / len(every)  # all k assignments
        rows.append({"step": step, "tokens": len(g), "entropy": h, "norm": h / np.log(e) if e > 1 else np.nan,
                     "eff": np.exp(h), "dead": int((share_all < 1 / (10 * e)).sum()),
                     "never_top1": int((p == 0).sum())})
    df = pd.DataFrame(rows).sort_values("step")
    collapse_step = None
    for i in range(len(df) if e > 1 else 0):  # a loop, not the SQL's window: first step after which eff stays low
        if (df["eff"].iloc[i:] < threshold).all():
            collapse_step = df["step"].iloc[i]
            break
    return df.assign(collapse_step=collapse_step)


def pos_probe(r: pd.DataFrame, t: pd.DataFrame, held_share: float = 0.3, seed: int = 0):
    """The POS probe written out: features = per (layer, expert) [routed?, gate] of each POS-tagged token of `t`
    (sorted by token_idx) from routing rows `r`; the held-out sentences a seeded permutation of the (doc_id,
    sent_id) units; scikit-learn's LogisticRegression fitted on the rest. Returns (gate table, held-out mask,
    the tags y, the held-out predictions)."""
    from sklearn.linear_model import LogisticRegression

    gate = r.pivot_table(index="token_idx", columns=["layer", "expert"], values="gate", aggfunc="sum")
    gate = gate.reindex(t["token_idx"]).sort_index(axis=1)
    x = np.hstack([gate.notna().to_numpy(float), gate.fillna(0.0).to_numpy()])
    units = sorted(set(zip(t["doc_id"], t["sent_id"])))
    perm = np.random.default_rng(seed).permutation(len(units))
    held = {units[i] for i in perm[: round(held_share * len(units))]}
    test = np.array([u in held for u in zip(t["doc_id"], t["sent_id"])])
    y = t["pos_tag"].to_numpy(object)
    pred = LogisticRegression(max_iter=1000).fit(x[~test], y[~test]).predict(x[test])
    return gate, test, y, pred
