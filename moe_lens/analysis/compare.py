"""Comparison across runs: the final metrics and every analysis at each run's last epoch, one row per run.

Joins `runs` (mode, dataset, router, num_experts, top_k, capacity_factor, status) with the last value of each
scalar in metrics.parquet and the balance, collapse, confidence, specialization, stability and capacity
numbers of the eval split's last recorded epoch on the run's own dataset (their formulas: the modules they come
from), and the capacity drop rate of the last recorded train epoch (eval never drops). Rows are ranked by the
AMI of expert and attribute (or by MI, `rank_by="mi"`): AMI is comparable across runs with different numbers of
experts in use, where I / H(E) rewards a collapsed router.
"""
from __future__ import annotations

import duckdb
import pandas as pd

from moe_lens.analysis._query import Runs, last_epochs, query, resolve_runs, sql_text
from moe_lens.analysis.balance import capacity, collapse, load_balance, router_confidence
from moe_lens.analysis.specialization import specialization
from moe_lens.analysis.stability import stability
from moe_lens.errors import MoeLensError

_RUN_COLS = ["run", "mode", "dataset", "router", "expert_type", "num_experts", "top_k", "capacity_factor", "status"]


def final_metrics(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str | None = None) -> pd.DataFrame:
    """Last value of each scalar metric per (run, split, name), with its step and epoch."""
    df = query(con, sql_text("final_metrics"), dict(runs=resolve_runs(con, runs)))
    return df if split is None else df[df["split"] == split].reset_index(drop=True)


def metric_curves(con: duckdb.DuckDBPyConnection, runs: Runs = None, *,
                  names: list[str] | tuple[str, ...] | None = None) -> pd.DataFrame:
    """Scalar metric curves (layer and expert NULL) of `runs`, long format: (run, split, name, step, epoch,
    value), one row per logged step, ordered by (run, split, name, step); `names` keeps only those metrics."""
    params = dict(runs=resolve_runs(con, runs), names=list(names) if names is not None else None)
    return query(con, sql_text("metric_curves"), params)


def compare(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid", layer: int = 0,
            attribute: str = "pos_tag", rank_by: str = "ami") -> pd.DataFrame:
    """One row per run: config, final `<split>_<metric>` values and the analyses at its last epoch on its own
    dataset, `train_dropped_rate`, ranked by `<rank_by>_<attribute>` ('ami' or 'mi'), best first (`rank`)."""
    if rank_by not in ("ami", "mi"):
        raise MoeLensError(f"rank_by={rank_by!r}; allowed: ami, mi")
    names = resolve_runs(con, runs)
    out = con.execute("SELECT * FROM runs WHERE list_contains($runs, run)", {"runs": names}).df()[_RUN_COLS]
    fm = final_metrics(con, names)
    if not fm.empty:
        wide = fm.assign(col=fm["split"] + "_" + fm["name"]).pivot(index="run", columns="col", values="value")
        out = out.merge(wide.reset_index(), on="run", how="left")
    by_epoch: dict[int, list[str]] = {}
    for key in last_epochs(con, names, split, None):
        run, _, epoch = key.rsplit("|", 2)
        by_epoch.setdefault(int(epoch), []).append(run)
    if by_epoch:  # else no run has routing in this split yet
        frames = [_analyses(con, group, epoch, split, layer, attribute) for epoch, group in by_epoch.items()]
        out = out.merge(pd.concat(frames, ignore_index=True), on="run", how="left")
    cap = capacity(con, names, split="train", layer=layer)
    if not cap.empty:
        out = out.merge(_last(cap, ["dropped_rate"]).rename(columns={"dropped_rate": "train_dropped_rate"}),
                        on="run", how="left")
    key = f"{rank_by}_{attribute}"
    if key in out.columns:
        out = out.sort_values(key, ascending=False, na_position="last", kind="stable").reset_index(drop=True)
        out.insert(1, "rank", range(1, len(out) + 1))
    return out


def _last(df: pd.DataFrame, cols: list[str]) -> pd.DataFrame:
    """Each run's row at its largest epoch (then step)."""
    return df.sort_values(["run", "epoch", "step"]).groupby("run", as_index=False).last()[["run", *cols]]


def _analyses(con: duckdb.DuckDBPyConnection, runs: list[str], epoch: int, split: str, layer: int,
              attribute: str) -> pd.DataFrame:
    """The analyses of `runs` at `epoch` (their common last epoch), one row per run."""
    kw = dict(split=split, layer=layer, epoch=epoch)
    frames = [
        _last(load_balance(con, runs, **kw), ["epoch", "cv2_load", "cv2_importance", "max_over_mean", "gini"]),
        _last(collapse(con, runs, by="epoch", **kw), ["norm_entropy", "effective_experts", "dead_experts",
                                                       "never_top1"]),
        _last(router_confidence(con, runs, **kw), ["top1_gate", "margin", "entropy"]),
        _last(stability(con, runs, **kw).assign(step=0), ["changed", "same_next"]),
    ]
    try:
        spec = specialization(con, runs, attribute=attribute, summary=True, **kw)
        cols = ["mi", "nmi", "ami", "uncertainty_coef", "nmi_chance", "nmi_shuffled"]
        frames.append(spec[["run", *cols]].rename(columns=lambda c: c if c == "run" else f"{c}_{attribute}"))
    except MoeLensError:  # attribute not recorded for these runs (ner_tag on WikiText): leave it out
        pass
    out = frames[0]
    for frame in frames[1:]:
        out = out.merge(frame, on="run", how="left")
    return out
