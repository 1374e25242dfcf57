"""Percentile-bootstrap intervals for the headline numbers of the analyses, resampling documents or sentences.

`bootstrap(fn, con, runs, by="document", n=200, seed=0, **options)` returns `fn(con, runs, **options)` with
`<metric>_lo`, `<metric>_hi` (a 95% interval: the 2.5% and 97.5% quantiles of the replicates, numpy's linear
method) and `units` beside each bootstrapped metric of every output row. The tokens are not independent (a
document is about one thing), so the resampling unit is a document or a sentence (units.py), drawn with
replacement within each output group (Efron & Tibshirani 1993, the percentile interval).

Fast by construction: the analysis's SQL runs ONCE and returns per-unit counts (units.py); replicate b is then
the statistic of W[b] @ S_g, W[b] the multiplicities of the units drawn (all n replicates in one product; each
distinct W[b] computed once).
Draws: `rng = np.random.default_rng(seed)`; for each group in key order, `rng.integers(0, U_g, (n, U_g))`.

A bootstrappable analysis is registered in RESAMPLERS: its per-unit SQL (`units`), a numpy `statistic` of summed
counts and the metrics it gives (docs/sql.md, "Intervals").
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import duckdb
import numpy as np
import pandas as pd

from moe_lens import information
from moe_lens.analysis import literature
from moe_lens.analysis.ablation import ablation_by_units, ablation_statistic, ablation_units
from moe_lens.analysis._query import (Runs, check_by, last_epochs, oov_params, query, resolve_runs, run_datasets,
                                      sql_text)
from moe_lens.analysis.specialization import ATTRIBUTES
from moe_lens.analysis.units import UnitTables, summed, unit_params, unit_tables
from moe_lens.errors import MoeLensError


class Resampler(NamedTuple):
    units: Callable[..., UnitTables]  # units(con, runs, by=..., **options of the analysis) -> UnitTables
    statistic: Callable[..., dict[str, np.ndarray]]  # statistic(sums (n, *shape), labels, key) -> metric: (n,)
    metrics: tuple[str, ...]          # the metrics given an interval
    options: tuple[str, ...] = ()     # options of the analysis its statistic takes too (vocabulary's min_count)
    point: Callable[..., pd.DataFrame] | None = None  # the analysis's table from the same unit counts (no 2nd query)


DEDUP_UNITS = 10  # intervals(): groups of at most this many units compute each distinct draw once


def draw_weights(rng: np.random.Generator, units: int, n: int) -> np.ndarray:
    """(n, units) multiplicities of `units` units drawn with replacement, n times."""
    idx = rng.integers(0, units, size=(n, units))  # (n, U)
    flat = (idx + units * np.arange(n)[:, None]).ravel()
    return np.bincount(flat, minlength=n * units).reshape(n, units)


def bootstrap(fn: Callable[..., pd.DataFrame] | str, con: duckdb.DuckDBPyConnection, runs: Runs = None, *,
              by: str = "document", n: int = 200, seed: int = 0, level: float = 0.95,
              fn_options: dict[str, Any] | None = None, **options: Any) -> pd.DataFrame:
    """`fn`'s table with a `level` percentile interval per bootstrapped metric and output row, resampling
    `by` = 'document' or 'sentence' units `n` times (seeded). `options` go to fn; `fn_options` holds those whose
    name clashes with bootstrap's own (collapse's by='step'|'epoch': fn_options={"by": "epoch"})."""
    name = fn if isinstance(fn, str) else getattr(fn, "__name__", str(fn))
    if name not in RESAMPLERS:
        raise MoeLensError(f"bootstrap: {name!r} has no resampler; bootstrappable: {', '.join(RESAMPLERS)}")
    if by not in ("document", "sentence"):
        raise MoeLensError(f"bootstrap: by={by!r}; allowed: document, sentence")
    if n < 1 or not 0 < level < 1:
        raise MoeLensError(f"bootstrap: n={n} must be >= 1 and level={level} in (0, 1)")
    from moe_lens.analysis.registry import analysis  # the registry imports every analysis module
    call = analysis(name).fn if isinstance(fn, str) else fn
    opts = {**options, **dict(fn_options or {})}
    r = RESAMPLERS[name]
    t = r.units(con, runs, by=by, **{("fn_by" if k == "by" else k): v for k, v in opts.items()})
    point = r.point(t) if r.point is not None else call(con, runs, **opts)
    ci = intervals(t, r, n=n, seed=seed, level=level, **{k: v for k, v in opts.items() if k in r.options})
    keys = [c for c in t.keys.columns if c in point.columns]
    return point.merge(ci, on=keys, how="left")


def intervals(t: UnitTables, r: Resampler, *, n: int, seed: int, level: float = 0.95, **options: Any) -> pd.DataFrame:
    """Per group of `t`: its keys, `units`, and `<metric>_lo`, `<metric>_hi` over n replicates."""
    rng = np.random.default_rng(seed)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    rows = []
    for g, key in enumerate(t.keys.to_dict("records")):
        u = t.tables[g].shape[0]
        w = draw_weights(rng, u, n)
        # identical draws give identical replicates: with few units (5 documents: ~80 distinct multisets in 200
        # draws; 1 unit: 1) the statistic of each distinct draw once; with more, repeats are rare and the search not
        # worth its cost
        distinct, inverse = np.unique(w, axis=0, return_inverse=True) if u <= DEDUP_UNITS else (w, np.arange(n))
        stats = r.statistic(summed(t, g, distinct), t.labels[g], key, **options)
        row = {**key, "units": u}
        for m in r.metrics:
            v = np.asarray(stats[m], dtype=np.float64)[inverse.reshape(-1)]
            lo, hi = np.nanquantile(v, q) if np.isfinite(v).any() else (np.nan, np.nan)
            row[f"{m}_lo"], row[f"{m}_hi"] = float(lo), float(hi)
        rows.append(row)
    return pd.DataFrame(rows, columns=[*t.keys.columns, "units", *(f"{m}_{s}" for m in r.metrics for s in ("lo", "hi"))])


# --- collapse: effective experts exp(H) -------------------------------------------------------------------------

def collapse_units(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, by: str | None = "document",
                   split: str = "train", epoch: int | None = None, layer: int | None = None, all_ranks: bool = False,
                   dataset: str | None = None, fn_by: str = "step", **_: Any) -> UnitTables:
    """collapse's groups with per-unit expert counts (collapse_units.sql); `fn_by` is collapse's own `by`
    ('step' or 'epoch'), `_` its options that change no count (threshold)."""
    time_by = fn_by
    names = resolve_runs(con, runs)
    params = dict(runs=names, split=split, by_step=check_by(time_by), epoch=epoch, layer=layer, all_ranks=all_ranks,
                  run_datasets=run_datasets(con, names, split, dataset), **unit_params(by))
    df = query(con, sql_text("collapse_units"), params)
    sizes = con.execute("SELECT run, num_experts FROM runs").df()
    df = df.merge(sizes, on="run", how="left")  # as load_balance.sql: the config's, at least max expert + 1
    seen = df.groupby("run")["expert"].transform("max") + 1
    df["num_experts"] = np.maximum(df["num_experts"].fillna(0), seen).astype("int64")
    keys = ["run", "dataset", "split", "epoch", *(["step"] if time_by == "step" else []), "layer", "num_experts"]
    return unit_tables(df, keys, ["expert"], ["n"])


def collapse_statistic(sums: np.ndarray, labels: list, key: dict) -> dict[str, np.ndarray]:
    """entropy, norm_entropy, effective_experts of (n, experts, 1) counts."""
    c = sums[..., 0]  # (n, e)
    p = c / c.sum(1, keepdims=True)
    h = -np.where(p > 0, p * np.log(np.where(p > 0, p, 1.0)), 0.0).sum(1)  # (n,)
    e = key.get("num_experts")
    norm = h / np.log(e) if e is not None and np.isfinite(e) and e > 1 else np.full_like(h, np.nan)
    return {"entropy": h, "norm_entropy": norm, "effective_experts": np.exp(h)}


# --- specialization: MI, NMI, AMI of expert x attribute -----------------------------------------------------------

def specialization_units(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, by: str | None = "document",
                         attribute: str = "pos_tag", split: str = "valid", epoch: int | None = None,
                         layer: int | None = None, all_ranks: bool = False, dataset: str | None = None,
                         include_oov: bool = False, **_: Any) -> UnitTables:
    """specialization's groups (run, dataset, layer) with per-unit (value, expert) counts (specialization_units.sql)."""
    if attribute not in ATTRIBUTES:
        raise MoeLensError(f"unknown attribute {attribute!r}; allowed: {', '.join(ATTRIBUTES)}")
    names = resolve_runs(con, runs)
    if attribute == "dataset" and dataset is None:
        dataset = "*"
    params = dict(runs=names, keys=last_epochs(con, names, split, epoch, dataset), split=split, layer=layer,
                  all_ranks=all_ranks, attribute=attribute, **oov_params(con, names, include_oov), **unit_params(by))
    df = query(con, sql_text("specialization_units"), params)
    return unit_tables(df, ["run", "dataset", "layer"], ["value", "expert"], ["n"],
                       unit_cols=["unit_ds", "unit_doc", "unit_sent"])


def specialization_statistic(sums: np.ndarray, labels: list, key: dict) -> dict[str, np.ndarray]:
    """mi, nmi, ami of each replicate's (values, experts) table (information.scores_batch, every replicate at once:
    sklearn's definitions); NaN nmi and ami where one expert has every token, as specialization() reports them."""
    out = {m: np.full(sums.shape[0], np.nan) for m in ("mi", "nmi", "ami")}
    if sums.shape[2] <= 1:  # one expert (dense): I = 0, nothing normalised to say
        out["mi"][:] = 0.0
        return out
    tables = sums[..., 0]  # (n, v, e)
    s = information.scores_batch(tables)
    spread = (tables.sum(1) > 0).sum(1) > 1  # (n,) more than one expert used
    out["mi"] = s["mi"]
    out["nmi"] = np.where(spread, s["nmi"], np.nan)
    out["ami"] = np.where(spread, s["ami"], np.nan)
    return out


RESAMPLERS: dict[str, Resampler] = {
    "collapse": Resampler(collapse_units, collapse_statistic, ("entropy", "norm_entropy", "effective_experts")),
    "specialization": Resampler(specialization_units, specialization_statistic, ("mi", "nmi", "ami")),
    "consecutive": Resampler(literature.consecutive_units, literature.consecutive_statistic,
                             ("same_top1", "same_top1_chance", "top1_in_next_top2", "top1_in_next_top2_chance"),
                             point=literature.consecutive_table),
    "saturation": Resampler(literature.saturation_units, literature.saturation_statistic,
                            ("top1_match", "top1_match_chance", "topk_overlap", "topk_overlap_chance"),
                            point=literature.saturation_table),
    "vocabulary": Resampler(literature.vocabulary_units, literature.vocabulary_statistic, ("mean_share", "token_share"),
                            options=("min_count",)),
    "ablation": Resampler(ablation_units, ablation_statistic, ("mean_delta", "mean_delta_chose", "share_up")),
    "ablation_by": Resampler(ablation_by_units, ablation_statistic, ("mean_delta", "mean_delta_chose", "share_up")),
}
