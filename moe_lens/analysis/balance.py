"""Load balance, collapse, router confidence and capacity overflow, one DataFrame each.

Formulas (also in the .sql files and docs/sql.md); per group g = (run, dataset, split, epoch, step, layer),
tokens_e = routing rows sent to expert e, importance_e = sum of their gates (Shazeer et al. 2017),
p_e = tokens_e / sum_j tokens_j over all num_experts experts (zeros included):
  CV^2 = Var_pop(x) / mean(x)^2; max/mean = max_e x_e / mean(x);
  Gini = 2 sum_i i x_(i) / (e sum x) - (e + 1) / e (x sorted ascending);
  H = -sum_e p_e ln p_e, normalised entropy H / ln e, effective number of experts exp(H);
  dead experts: under 1 / (10 e) of all k assignments; never_top1: no token's first choice;
  collapse step = first step after which exp(H) stays < threshold.
`dataset=None` analyses each run's own dataset (config.json), a name a probe dataset, '*' each dataset apart.
"""
from __future__ import annotations

import duckdb
import pandas as pd

from moe_lens import summary
from moe_lens.analysis._query import Runs, check_by, nonempty, query, resolve_runs, run_datasets, sql_text, with_cte


def _counts(con: duckdb.DuckDBPyConnection, names: list[str], analysis_sql: str) -> str:
    """`analysis_sql` over `counts`: the runs' summary files (moe_lens.summary) when all have one, else
    routing_counts.sql over the trace; the same counts either way."""
    source = summary.counts_source(con, names) or sql_text("routing_counts")
    return with_cte("counts", source, analysis_sql)


def _per_expert_sql(con: duckdb.DuckDBPyConnection, names: list[str]) -> str:
    return _counts(con, names, sql_text("load_balance"))


def load_balance(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid", by: str = "epoch",
                 epoch: int | None = None, layer: int | None = None, all_ranks: bool = True,
                 per_expert: bool = False, dataset: str | None = None) -> pd.DataFrame:
    """Expert load balance per (run, dataset, split, epoch, step, layer); `by` = 'epoch' or 'step'.

    per_expert=False: one row per group with `cv2_load`, `cv2_importance`, `max_over_mean`, `gini`.
    per_expert=True: one row per group and expert with `tokens`, `share`, `importance`, `importance_share`,
    `assignments` (all ranks), `assignment_share`, `top1` (rank-0 rows).
    `all_ranks=True` counts every one of the k assignments (the load of Shazeer et al.); False only rank 0.
    """
    names = resolve_runs(con, runs)
    params = dict(runs=names, split=split, by_step=check_by(by), epoch=epoch, layer=layer, all_ranks=all_ranks,
                  run_datasets=run_datasets(con, names, split, dataset))
    sql = _per_expert_sql(con, names) + "\nORDER BY run, dataset, split, layer, step, expert" if per_expert else \
        with_cte("per_expert", _per_expert_sql(con, names), sql_text("load_balance_summary"))
    return nonempty(query(con, sql, params), names, f"split={split!r}, layer={layer}, epoch={epoch}")


def collapse(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "train", by: str = "step",
             epoch: int | None = None, layer: int | None = None, all_ranks: bool = False,
             threshold: float = 2.0, dataset: str | None = None) -> pd.DataFrame:
    """Collapse of expert usage per recorded step (or epoch): `entropy`, `norm_entropy` = H / ln e,
    `effective_experts` = exp(H), `dead_experts` (under 1/(10 e) of all k assignments, every rank),
    `never_top1` (experts no token chose first), and `collapse_step`, the first step after which
    `effective_experts` stays below `threshold` (NULL if it never does for good).

    Defaults: the `train` split (recorded every few steps, so a time series) and top-1 usage
    (`all_ranks=False`: with all k ranks a collapsed top-2 router still shows exp(H) >= 2).
    """
    names = resolve_runs(con, runs)
    params = dict(runs=names, split=split, by_step=check_by(by), epoch=epoch, layer=layer,
                  all_ranks=all_ranks, threshold=float(threshold), run_datasets=run_datasets(con, names, split, dataset))
    sql = with_cte("per_expert", _per_expert_sql(con, names), sql_text("collapse"))
    return nonempty(query(con, sql, params), names, f"split={split!r}, layer={layer}, epoch={epoch}")


def router_confidence(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid",
                      by: str = "epoch", epoch: int | None = None, layer: int | None = None,
                      dataset: str | None = None) -> pd.DataFrame:
    """Mean top-1 gate, mean top-1 minus top-2 gate `margin` and mean router `entropy` (nats) per token,
    per (run, dataset, split, epoch[, step], layer). `margin` is NULL where tokens lack a rank-1 row (top-1 routers)."""
    names = resolve_runs(con, runs)
    params = dict(runs=names, split=split, by_step=check_by(by), epoch=epoch, layer=layer,
                  run_datasets=run_datasets(con, names, split, dataset))
    return nonempty(query(con, _counts(con, names, sql_text("router_confidence")), params), names,
                    f"split={split!r}, layer={layer}, epoch={epoch}")


def capacity(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "train",
             epoch: int | None = None, layer: int | None = None, dataset: str | None = None) -> pd.DataFrame:
    """Dropped-token rate per (run, dataset, split, epoch, layer) for runs with a capacity factor:
    `dropped_rate` over all assignments, `dropped_top1_rate` over rank-0 rows. Empty when no selected run
    sets `capacity_factor`. Capacity applies in training only, so the default split is train; an eval split
    never drops (0)."""
    names = resolve_runs(con, runs)
    return query(con, _counts(con, names, sql_text("capacity")), dict(
        runs=names, split=split, epoch=epoch, layer=layer, run_datasets=run_datasets(con, names, split, dataset)))
