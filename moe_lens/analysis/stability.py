"""Stability of routing: across epochs, along the token stream, and between two runs.

  changed   = share of tokens whose top-1 expert differs from the previous recorded epoch
  same_next = share of adjacent tokens of one sequence (same doc_id, sent_id) with the same top-1 expert
  agreement = share of tokens two runs send to the same top-1 expert; expert labels are arbitrary across
              runs, so also `matched_agreement` (after the best one-to-one relabelling, Hungarian algorithm
              on the contingency table), `mi`, `nmi` = I(A; B) / ((H(A) + H(B)) / 2) and `ami`
              (moe_lens/information.py).
A token is (dataset, token_idx): every comparison stays within one dataset (`dataset=None`: the run's own,
a name: a probe dataset, '*': each recorded dataset on its own rows; stability only).
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd
from scipy.optimize import linear_sum_assignment

from moe_lens import information
from moe_lens.analysis._query import Runs, keyed, last_epochs, nonempty, query, resolve_runs, run_datasets, sql_text
from moe_lens.errors import MoeLensError


def stability(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid",
              epoch: int | None = None, layer: int | None = None, dataset: str | None = None) -> pd.DataFrame:
    """Per (run, dataset, split, layer, epoch): `changed` (vs the previous recorded epoch, NULL for the first),
    `tokens_compared`, `same_next` and `pairs` (adjacent same-sequence token pairs). `epoch=None`: every
    recorded epoch; an epoch: that one only (compared with the epoch recorded before it). `layer=None`: every
    recorded MoE layer of each run, one set of rows each."""
    names = resolve_runs(con, runs)
    frames = []
    for key in run_datasets(con, names, split, dataset):
        run, ds = key.rsplit("|", 1)
        epochs = query(con, keyed(con, [run], sql_text("epochs")), dict(run=run, dataset=ds, split=split))["epoch"].tolist()
        if epoch is not None:
            i = epochs.index(epoch) if epoch in epochs else None
            epochs = [] if i is None else epochs[max(i - 1, 0):i + 1]
        for lay in _layers(con, run, layer) if epochs else []:
            params = dict(run=run, dataset=ds, split=split, layer=lay, epochs=epochs)
            df = query(con, sql_text(_stability_sql(con, params)), params)
            frames.append(df if epoch is None else df[df["epoch"] == epoch])
    df = pd.concat(frames, ignore_index=True) if frames else pd.DataFrame()
    return nonempty(df, names, f"split={split!r}, layer={layer}, epoch={epoch}")


def _layers(con: duckdb.DuckDBPyConnection, run: str, layer: int | None) -> list[int]:
    """[layer], or every MoE layer recorded for `run` when layer is None."""
    if layer is not None:
        return [int(layer)]
    return [int(x) for x in query(con, keyed(con, [run], sql_text("recorded_layers")), dict(runs=[run]))["layer"]]


def _stability_sql(con: duckdb.DuckDBPyConnection, params: dict) -> str:
    """`stability` (experts packed into a HUGEINT per token, no sort) when the packing fits, else
    `stability_sorted` (lag windows over the sorted trace); both give the same numbers. Sets params["bits"]."""
    sql = keyed(con, [params["run"]], "SELECT min(expert), max(expert) FROM trace_keys WHERE run = $run AND dataset = "
                "$dataset AND split = $split AND layer = $layer AND rank = 0 AND list_contains($epochs, epoch)")
    lo, hi = con.execute(sql, params).fetchall()[0]
    params["bits"] = bits = max(int(hi if hi is not None else 0) + 1, 1).bit_length()
    return "stability" if (lo is None or lo >= 0) and bits * len(params["epochs"]) <= 126 else "stability_sorted"


def agreement(con: duckdb.DuckDBPyConnection, run_a: str, run_b: str, *, split: str = "valid",
              epoch_a: int | None = None, epoch_b: int | None = None, layer: int | None = None,
              dataset: str | None = None) -> pd.DataFrame:
    """How often runs A and B pick the same top-1 expert for the same tokens of one dataset (`dataset=None`:
    run A's own; default epochs: each run's last recorded one on that dataset), one row per MoE layer both
    runs recorded (`layer=None`) or for `layer`. Columns `dataset`, `layer`, `tokens`, `agreement`,
    `matched_agreement`, `mi` (nats), `nmi`, `ami`."""
    if dataset == "*":
        raise MoeLensError("agreement: dataset='*' is not supported; name one dataset (default: run A's own)")
    (a, ds, ea), = (k.rsplit("|", 2) for k in last_epochs(con, resolve_runs(con, run_a), split, epoch_a, dataset))
    found = [k.rsplit("|", 2) for k in last_epochs(con, resolve_runs(con, run_b), split, epoch_b, ds)]
    if not found:
        raise MoeLensError(f"run {run_b!r} has no routing on dataset {ds!r} in split={split!r}")
    (b, _, eb), = found
    layers = [lay for lay in _layers(con, a, layer) if layer is not None or lay in _layers(con, b, None)]
    rows = []
    for lay in layers:
        table = query(con, sql_text("agreement"), dict(run_a=a, run_b=b, epoch_a=int(ea), epoch_b=int(eb),
                                                         dataset=ds, split=split, layer=lay))
        if not table.empty:
            rows.append({"run_a": a, "run_b": b, "dataset": ds, "epoch_a": int(ea), "epoch_b": int(eb), "layer": lay,
                         **agreement_scores(table)})
    if not rows:
        raise MoeLensError(f"runs {run_a!r} and {run_b!r} share no routed tokens in split={split!r}, layer={layer}")
    return pd.DataFrame(rows)


def agreement_scores(table: pd.DataFrame) -> dict[str, float]:
    """Scores of a contingency table with columns expert_a, expert_b, n (small: e x e)."""
    m = table.pivot_table(index="expert_a", columns="expert_b", values="n", fill_value=0, aggfunc="sum")
    c = m.to_numpy(dtype=np.float64)  # (e_a, e_b)
    total = c.sum()
    same = sum(m.at[i, i] for i in m.index if i in m.columns)
    s = information.scores(c)
    return {"tokens": int(total), "agreement": float(same / total), "matched_agreement": _matched(c) / total,
            "mi": s.mi, "nmi": s.nmi, "ami": s.ami}


def _matched(c: np.ndarray) -> float:
    """Largest sum of a one-to-one matching of rows to columns (tokens agreeing after relabelling):
    the Hungarian algorithm (scipy's linear_sum_assignment), exact for any table."""
    rows, cols = linear_sum_assignment(c, maximize=True)
    return float(c[rows, cols].sum())
