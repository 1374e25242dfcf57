"""Specialization of experts by token attribute: P(expert | value), lift and mutual information.

With n_ve the routing rows of attribute value v sent to expert e (rank 0 unless all_ranks), N = sum n_ve:
  P(e | v) = n_ve / n_v,  lift = P(e | v) / P(e),  mi = I(E; A) = sum n_ve/N ln(n_ve N / (n_v n_e))  (nats),
  nmi = I / ((H(E) + H(A)) / 2),  ami = adjusted for chance,  uncertainty_coef = I / H(E)
  (moe_lens/information.py; nmi and ami equal scikit-learn's). I / H(E) alone rewards collapse: a router that
  sends nearly everything to one expert has a tiny H(E).
Chance level, two ways: `nmi_chance` = the exact expected NMI when A is permuted against E (the hypergeometric
expected MI behind AMI, Vinh et al. 2010), and `nmi_shuffled`, the NMI of one such permutation computed in SQL
on these very routing rows (within the routed tokens of each (run, dataset, split, epoch, layer)).
Tokens the model saw as `<unk>` (in_vocab = false) are left out unless include_oov=True: their surface word's
POS is a property of text the model never saw.
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from moe_lens import information
from moe_lens.analysis._query import Runs, last_epochs, nonempty, oov_params, query, resolve_runs, sql_text
from moe_lens.errors import MoeLensError

ATTRIBUTES = ("pos_tag", "freq_band", "dataset", "ner_tag", "segment", "in_answer", "position_band", "token")
POSITION_BANDS = ("0", "1-4", "5-9", "10-19", "20-49", "50+")
_GROUP = ["run", "dataset", "layer"]
_MEASURES = ["rows", "num_values", "h_expert", "h_value", "mi", "nmi", "ami", "uncertainty_coef", "nmi_chance",
             "nmi_shuffled"]
_SUMMARY = [*_GROUP, *_MEASURES]


def specialization(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, attribute: str = "pos_tag",
                   split: str = "valid", epoch: int | None = None, layer: int | None = None, all_ranks: bool = False,
                   seed: int = 0, top: int | None = None, order_by: str = "count", min_count: int = 1,
                   summary: bool = False, shuffled: bool = True, dataset: str | None = None,
                   include_oov: bool = False) -> pd.DataFrame:
    """Expert x attribute-value table of one epoch per (run, dataset) (default: its last recorded epoch).

    Rows (run, dataset, layer, value, expert) with n > 0: `n`, `n_value`, `p_expert_given_value`, `p_expert`,
    `lift`, and the group's `rows`, `num_values`, `h_expert`, `h_value`, `mi`, `nmi`, `ami`, `uncertainty_coef`,
    `nmi_chance`, `nmi_shuffled` repeated. `top=N` keeps each expert's N values with the largest `order_by`
    ('count' or 'lift') among values seen at least `min_count` times (top tokens: attribute='token',
    order_by='lift', min_count=20). `summary=True`: one row per (run, dataset, layer).
    `attribute` is one of ATTRIBUTES; position_band buckets `position` into POSITION_BANDS.
    `dataset`: None = each run's own dataset, a name = that probe dataset, '*' = each dataset on its own rows;
    attribute='dataset' pools the datasets (default all of them; `dataset` column '*').
    `include_oov=False` leaves out tokens outside the model's vocabulary (in_vocab false; where in_vocab is NULL,
    token_id = the run's `<unk>` id). `shuffled=False` skips the permuted counts (`nmi_shuffled` NULL; every
    other column unchanged), about half the work. For attribute='dataset' the permutation runs within each
    (run, dataset) and cannot break the association, so `nmi_shuffled` is NULL there; compare with `nmi_chance`.
    """
    if attribute not in ATTRIBUTES:
        raise MoeLensError(f"unknown attribute {attribute!r}; allowed: {', '.join(ATTRIBUTES)}")
    if order_by not in ("count", "lift"):
        raise MoeLensError(f"order_by={order_by!r}; allowed: count, lift")
    names = resolve_runs(con, runs)
    if attribute == "dataset" and dataset is None:
        dataset = "*"
    params = dict(runs=names, keys=last_epochs(con, names, split, epoch, dataset), split=split, layer=layer,
                  all_ranks=all_ranks, attribute=attribute, seed=seed, **oov_params(con, names, include_oov),
                  shuffled=bool(shuffled) and attribute != "dataset")
    counts = query(con, sql_text("specialization"), params)
    nonempty(counts, names, f"split={split!r}, layer={layer}, epoch={epoch} and a non-NULL {attribute}")
    df = _table(counts)
    if summary:
        return df[_SUMMARY].drop_duplicates(_GROUP).reset_index(drop=True)
    if top is not None:
        df = _top(df, top, order_by, min_count)
    return df.reset_index(drop=True)


def _table(counts: pd.DataFrame) -> pd.DataFrame:
    """Per-cell shares and lift, and each group's information measures, from the SQL counts."""
    real = counts[~counts["is_shuffled"]].drop(columns="is_shuffled").reset_index(drop=True)
    total = real.groupby(_GROUP, sort=False)["n"].transform("sum")
    real["n_value"] = real.groupby([*_GROUP, "value"], sort=False)["n"].transform("sum").astype("int64")
    n_expert = real.groupby([*_GROUP, "expert"], sort=False)["n"].transform("sum")
    real["p_expert_given_value"] = real["n"] / real["n_value"]
    real["p_expert"] = n_expert / total
    real["lift"] = real["p_expert_given_value"] / real["p_expert"]
    shuffled = counts[counts["is_shuffled"]].reset_index(drop=True)
    shuffled_groups = shuffled.groupby(_GROUP, sort=False).indices
    rows = []
    for key, idx in real.groupby(_GROUP, sort=False).indices.items():
        s = information.scores(_crosstab(real.iloc[idx]))
        j = shuffled_groups.get(key)
        rows.append({**dict(zip(_GROUP, key)), "num_values": int(real["value"].iloc[idx].nunique()),
                     "nmi_shuffled": information.normalized_mutual_info(_crosstab(shuffled.iloc[j])) if j is not None else np.nan,
                     **s._asdict()})
    out = real.merge(pd.DataFrame(rows), on=_GROUP, how="left")
    if (out["h_expert"] == 0).any():  # one expert used: no normalised measure says anything
        out.loc[out["h_expert"] == 0, ["nmi", "ami", "uncertainty_coef", "nmi_chance", "nmi_shuffled"]] = np.nan
    return out.sort_values([*_GROUP, "expert", "n", "value"], ascending=[True, True, True, True, False, True])


def _crosstab(grp: pd.DataFrame) -> np.ndarray:
    """(values, experts) count table of one group's rows (value, expert, n)."""
    v, values = pd.factorize(grp["value"])
    e, experts = pd.factorize(grp["expert"])
    c = np.zeros((len(values), len(experts)))  # (v, e)
    np.add.at(c, (v, e), grp["n"].to_numpy(np.float64))
    return c


def _top(df: pd.DataFrame, top: int, order_by: str, min_count: int) -> pd.DataFrame:
    """Each (run, dataset, layer, expert)'s `top` values by count or lift among values seen >= min_count times."""
    df = df[df["n_value"] >= min_count]
    key = "lift" if order_by == "lift" else "n"
    ranked = df.sort_values([key, "value"], ascending=[False, True])
    kept = ranked.groupby([*_GROUP, "expert"], sort=False).head(top)
    return kept.sort_values([*_GROUP, "expert", "n", "value"], ascending=[True, True, True, True, False, True])


def contexts(con: duckdb.DuckDBPyConnection, run: str, *, split: str, layer: int, expert: int, token: str,
             n: int = 5, width: int = 8, dataset: str | None = None) -> pd.DataFrame:
    """Up to `n` occurrences of `token` whose top-1 expert was `expert` in the run's last recorded epoch of
    `split` on `dataset` (default: the run's own), each with `width` tokens of that dataset either side: rows
    (hit, token_idx, token), hit = the occurrence's token_idx, ordered by (hit, token_idx). Empty when the token
    never went to that expert."""
    if dataset is None:
        found = con.execute("SELECT dataset FROM runs WHERE run = $run", {"run": run}).fetchall()
        dataset = found[0][0] if found and found[0][0] is not None else None
    if dataset is None:
        raise MoeLensError(f"contexts: run {run!r} has no dataset in config.json; pass dataset=")
    params = dict(run=run, dataset=dataset, split=split, layer=int(layer), expert=int(expert), token=token,
                  n=int(n), width=int(width))
    return query(con, sql_text("contexts"), params)
