"""Specialization of experts by token attribute: P(expert | value), lift and normalised mutual information.

With n_ve the routing rows of attribute value v sent to expert e (rank 0 unless all_ranks), N = sum n_ve:
  P(e | v) = n_ve / n_v,  lift = P(e | v) / P(e),  I(E; A) = sum n_ve/N ln(n_ve N / (n_v n_e)),
  NMI = I(E; A) / H(E).
Chance level, two ways: `nmi_shuffled` permutes the attribute over the split's tokens deterministically in
SQL (order by hash(token_idx, seed)) and recomputes NMI on the same routing; `nmi_chance` is the analytic
bias of the plug-in estimator under independence, (|A| - 1)(|E| - 1) / (2N) / H(E) (Miller 1955).
"""
from __future__ import annotations

import duckdb
import pandas as pd

from moe_lens.analysis._query import Runs, last_epochs, nonempty, query, resolve_runs, sql_text
from moe_lens.errors import MoeLensError

ATTRIBUTES = ("pos_tag", "freq_band", "dataset", "ner_tag", "segment", "in_answer", "position_band", "token")
POSITION_BANDS = ("0", "1-4", "5-9", "10-19", "20-49", "50+")
_SUMMARY = ["run", "layer", "rows", "num_values", "h_expert", "mi", "nmi", "nmi_shuffled", "nmi_chance"]


def specialization(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, attribute: str = "pos_tag",
                   split: str = "valid", epoch: int | None = None, layer: int = 0, all_ranks: bool = False,
                   seed: int = 0, top: int | None = None, order_by: str = "count", min_count: int = 1,
                   summary: bool = False, shuffled: bool = True) -> pd.DataFrame:
    """Expert x attribute-value table of one epoch per run (default: each run's last recorded epoch).

    Rows (run, layer, value, expert) with n > 0: `n`, `n_value`, `p_expert_given_value`, `p_expert`, `lift`,
    and the run's `mi`, `h_expert`, `nmi`, `nmi_shuffled`, `nmi_chance` repeated. `top=N` keeps each expert's
    N values with the largest `order_by` ('count' or 'lift') among values seen at least `min_count` times
    (top tokens: attribute='token', order_by='lift', min_count=20). `summary=True`: one row per (run, layer).
    `attribute` is one of ATTRIBUTES; position_band buckets `position` into POSITION_BANDS.
    `shuffled=False` skips the shuffled baseline (`nmi_shuffled` NULL; every other column unchanged), about
    half the work: for callers that only read counts, shares and lift (the app's top-tokens table).
    For attribute='dataset' the permutation runs within each (run, dataset) and cannot break the association,
    so `nmi_shuffled` is NULL there (never a misleading copy of `nmi`); compare with `nmi_chance`.
    """
    if attribute not in ATTRIBUTES:
        raise MoeLensError(f"unknown attribute {attribute!r}; allowed: {', '.join(ATTRIBUTES)}")
    if order_by not in ("count", "lift"):
        raise MoeLensError(f"order_by={order_by!r}; allowed: count, lift")
    names = resolve_runs(con, runs)
    params = dict(runs=names, run_epochs=last_epochs(con, names, split, epoch), split=split, layer=layer,
                  all_ranks=all_ranks, attribute=attribute, seed=seed, top=top, by_lift=order_by == "lift",
                  min_count=min_count, shuffled=bool(shuffled) and attribute != "dataset")
    df = query(con, sql_text("specialization"), params)
    nonempty(df, names, f"split={split!r}, layer={layer}, epoch={epoch} and a non-NULL {attribute}")
    if summary:
        return df[_SUMMARY].drop_duplicates(["run", "layer"]).reset_index(drop=True)
    return df


def contexts(con: duckdb.DuckDBPyConnection, run: str, *, split: str, layer: int, expert: int, token: str,
             n: int = 5, width: int = 8) -> pd.DataFrame:
    """Up to `n` occurrences of `token` whose top-1 expert was `expert` in the run's last recorded epoch of
    `split`, each with `width` tokens either side: rows (hit, token_idx, token), hit = the occurrence's token_idx,
    ordered by (hit, token_idx). Empty when the token never went to that expert."""
    params = dict(run=run, split=split, layer=int(layer), expert=int(expert), token=token, n=int(n), width=int(width))
    return query(con, sql_text("contexts"), params)
