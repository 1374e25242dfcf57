"""Causal expert importance from the ablation table that `moe-lens ablate` writes (moe_lens/ablate.py).

delta_loss of a token = its loss with one expert removed at the router minus its unablated loss (nats; the
removal rules per router in docs/moe.md). Observational routing statistics are known to predict causal
importance poorly; these functions put the two side by side.

- `ablation`             per (run, dataset, layer, expert): tokens, mean_delta = mean delta_loss over the
                         evaluated tokens, the same over the tokens that chose the expert (mean_delta_chose), and
                         share_up (tokens whose loss rose); `analysis.bootstrap(ablation, ...)` gives intervals
                         resampling documents or sentences
- `ablation_by`          mean delta_loss per expert and POS tag or frequency band; `analysis.bootstrap(ablation_by,
                         ...)` gives intervals resampling documents or sentences
- `ablation_importance`  per expert: mean_delta beside the observed load share, importance (gate-mass) share
                         and specialization KL(P(pos | expert) || P(pos)) (nats) on the same tokens at the
                         ablation's epoch; `summary=True`: the Spearman rank correlation (scipy) of mean_delta
                         with each, with a percentile-bootstrap 95% interval over documents or sentences
"""
from __future__ import annotations

from typing import Any

import duckdb
import numpy as np
import pandas as pd
from scipy.stats import rankdata

from moe_lens.analysis._query import Runs, query, resolve_runs, sql_text
from moe_lens.analysis.units import UnitTables, point_rows, unit_params, unit_tables
from moe_lens.errors import MoeLensError

GROUP = ["run", "dataset", "split", "epoch", "layer"]
BY_ATTRIBUTES = ("pos_tag", "freq_band")
MEASURES = ("load", "importance", "specialization")
SUMS = ("n", "delta_sum", "n_chose", "delta_chose", "n_up")  # per-unit sums of ablation_units.sql / ablation_by.sql  # observed statistics set against mean_delta


def _nonempty(df: pd.DataFrame, names: list[str]) -> pd.DataFrame:
    if df.empty:
        raise MoeLensError(f"no ablation rows for run(s) {', '.join(names)}: run `moe-lens ablate RUN` first "
                           "(it needs the run's checkpoint)")  # fmt: skip
    return df


def ablation_units(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, by: str | None = "document",
                   split: str = "valid", layer: int | None = None, **_: Any) -> UnitTables:
    """Per (run, dataset, split, epoch, layer, expert) group, per-unit sums (ablation_units.sql) for the bootstrap."""
    names = resolve_runs(con, runs)
    df = _nonempty(query(con, sql_text("ablation_units"), dict(runs=names, split=split, layer=layer, **unit_params(by))),
                   names)  # fmt: skip
    return unit_tables(df, [*GROUP, "expert"], [], ["n", "delta_sum", "n_chose", "delta_chose", "n_up"])


def ablation_statistic(sums: np.ndarray, labels: list, key: dict) -> dict[str, np.ndarray]:
    """mean_delta, mean_delta_chose, share_up of (n, 5) summed (n, delta_sum, n_chose, delta_chose, n_up)."""
    s = sums.reshape(sums.shape[0], -1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"tokens": s[:, 0], "mean_delta": s[:, 1] / s[:, 0], "chose": s[:, 2],
                "mean_delta_chose": np.where(s[:, 2] > 0, s[:, 3] / np.where(s[:, 2] > 0, s[:, 2], 1), np.nan),
                "share_up": s[:, 4] / s[:, 0]}  # fmt: skip


def ablation(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid",
             layer: int | None = None) -> pd.DataFrame:
    """Per (run, dataset, split, epoch, layer, expert): tokens, mean_delta, chose, mean_delta_chose, share_up."""
    df = point_rows(ablation_units(con, runs, by=None, split=split, layer=layer), ablation_statistic)
    for c in ("tokens", "chose"):
        df[c] = df[c].astype(np.int64)
    return df.sort_values([*GROUP, "expert"]).reset_index(drop=True)


def ablation_by_units(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, by: str | None = "document",
                      attribute: str = "pos_tag", split: str = "valid", layer: int | None = None,
                      **_: Any) -> UnitTables:
    """Per (run, dataset, split, epoch, layer, expert, value) group, per-unit sums (ablation_by.sql) for the
    bootstrap; `_` the options that change no count (min_tokens)."""
    if attribute not in BY_ATTRIBUTES:
        raise MoeLensError(f"unknown attribute {attribute!r}; allowed: {', '.join(BY_ATTRIBUTES)}")
    names = resolve_runs(con, runs)
    params = dict(runs=names, split=split, layer=layer, attribute=attribute, **unit_params(by))
    df = _nonempty(query(con, sql_text("ablation_by"), params), names)
    return unit_tables(df, [*GROUP, "expert", "value"], [], list(SUMS))


def ablation_by(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, attribute: str = "pos_tag",
                split: str = "valid", layer: int | None = None, min_tokens: int = 20) -> pd.DataFrame:
    """Per (run, dataset, split, epoch, layer, expert, value of `attribute`): n, mean_delta, n_chose,
    mean_delta_chose, share_up; values with fewer than `min_tokens` tokens left out.
    `analysis.bootstrap(ablation_by, ...)` gives their intervals resampling documents or sentences."""
    if attribute not in BY_ATTRIBUTES:
        raise MoeLensError(f"unknown attribute {attribute!r}; allowed: {', '.join(BY_ATTRIBUTES)}")
    names = resolve_runs(con, runs)
    params = dict(runs=names, split=split, layer=layer, attribute=attribute, **unit_params(None))
    df = _nonempty(query(con, sql_text("ablation_by"), params), names)  # one row per group (one unit)
    stats = ablation_statistic(df[list(SUMS)].to_numpy(np.float64), [], {})  # the statistic, row by row
    df = df.drop(columns=list(SUMS)).assign(**stats).rename(columns={"tokens": "n", "chose": "n_chose"})
    df = df[df["n"] >= min_tokens].astype({"n": np.int64, "n_chose": np.int64})
    cols = [*GROUP, "expert", "value", "n", "mean_delta", "n_chose", "mean_delta_chose", "share_up"]
    return df[cols].sort_values([*GROUP, "expert", "value"]).reset_index(drop=True)


def _observed(counts: np.ndarray, gates: np.ndarray, pos: np.ndarray) -> dict[str, np.ndarray]:
    """(..., e) load share, importance share, specialization KL(P(pos | e) || P(pos)) from counts and gates
    (..., e, v) over POS values; `pos` (v,) True where the value is a POS tag (not NULL)."""
    n_e = counts.sum(-1)  # (..., e)
    load = n_e / n_e.sum(-1, keepdims=True)
    g_e = gates.sum(-1)
    importance = g_e / g_e.sum(-1, keepdims=True)
    c = counts[..., pos]  # (..., e, v')
    with np.errstate(invalid="ignore", divide="ignore"):
        p_v_e = c / c.sum(-1, keepdims=True)  # P(pos | e)
        p_v = c.sum(-2) / c.sum((-2, -1))[..., None]  # (..., v') P(pos)
        ratio = np.where(p_v_e > 0, p_v_e / p_v[..., None, :], 1.0)
        kl = np.where(p_v_e > 0, p_v_e * np.log(ratio), 0.0).sum(-1)
    kl = np.where(c.sum(-1) > 0, kl, np.nan)
    return {"load": load, "importance": importance, "specialization": kl}


def spearman_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """(B,) Spearman's rho of each row pair of a, b (B, e): Pearson's r of the average ranks (ties averaged, as
    scipy.stats.spearmanr); NaN for a row with a NaN or a constant side."""
    ra, rb = rankdata(a, axis=1), rankdata(b, axis=1)
    ra, rb = ra - ra.mean(1, keepdims=True), rb - rb.mean(1, keepdims=True)
    den = np.sqrt((ra * ra).sum(1) * (rb * rb).sum(1))
    with np.errstate(invalid="ignore", divide="ignore"):
        rho = (ra * rb).sum(1) / den
    return np.where((den > 0) & np.isfinite(a).all(1) & np.isfinite(b).all(1), rho, np.nan)


def ablation_importance(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid",
                        layer: int | None = None, summary: bool = True, by: str = "document", n: int = 200,
                        seed: int = 0, level: float = 0.95) -> pd.DataFrame:
    """Causal importance (mean_delta) against the observed load, importance and specialization, per expert.

    `summary=False`: per (run, dataset, split, epoch, layer, expert) mean_delta, load, importance,
    specialization. `summary=True`: per (run, dataset, split, epoch, layer) and measure, `rho` = Spearman's rank
    correlation of mean_delta with it over the experts (`spearman_rows`, equal to scipy.stats.spearmanr), `rho_lo`, `rho_hi` = the percentile interval of `n`
    replicates resampling `by` units (documents or sentences; draws as analysis.bootstrap), and `units`."""
    from moe_lens.analysis.bootstrap import (
        draw_weights,  # bootstrap imports this module
    )

    names = resolve_runs(con, runs)
    abl = ablation_units(con, names, by=by, split=split, layer=layer)
    obs = _nonempty(query(con, sql_text("ablation_routing"), dict(runs=names, split=split, layer=layer,
                                                                  **unit_params(by))), names)  # fmt: skip
    obs["pos_tag"] = obs["pos_tag"].fillna("\x00")  # NULL: counted in the load, not in the POS table
    rng = np.random.default_rng(seed)
    q = [(1 - level) / 2, 1 - (1 - level) / 2]
    rows, per_expert = [], []
    for key, g in obs.groupby(GROUP, sort=True):
        k = dict(zip(GROUP, key))
        sel = np.all([abl.keys[c] == v for c, v in k.items()], axis=0)
        units = g[["unit_doc", "unit_sent"]].drop_duplicates().sort_values(["unit_doc", "unit_sent"])
        u_index = pd.MultiIndex.from_frame(units)
        experts = sorted(int(e) for e in abl.keys.loc[sel, "expert"])
        values = sorted(g["pos_tag"].unique())
        cube = np.zeros((len(units), len(experts), len(values), 2))  # (U, e, v, [n, gate])
        ui = u_index.get_indexer(pd.MultiIndex.from_frame(g[["unit_doc", "unit_sent"]]))
        ei = np.searchsorted(experts, g["expert"].to_numpy())
        keep = np.isin(g["expert"].to_numpy(), experts)
        vi = np.searchsorted(values, g["pos_tag"].to_numpy())
        np.add.at(cube, (ui[keep], ei[keep], vi[keep]), g[["n", "gate"]].to_numpy(np.float64)[keep])
        delta = np.zeros((len(units), len(experts), 2))  # (U, e, [delta_sum, n])
        for j, gi in enumerate(np.flatnonzero(sel)):
            t = abl.tables[gi].toarray()  # (U_g, 5)
            at = u_index.get_indexer(pd.MultiIndex.from_frame(abl.units[gi][["unit_doc", "unit_sent"]]))
            delta[at[at >= 0], j] += t[at >= 0][:, [1, 0]]
        pos = np.array([v != "\x00" for v in values])
        point = _observed(cube[..., 0].sum(0), cube[..., 1].sum(0), pos)
        mean_delta = delta[..., 0].sum(0) / delta[..., 1].sum(0)
        per_expert.append(pd.DataFrame({**k, "expert": experts, "mean_delta": mean_delta, **point}))
        w = draw_weights(rng, len(units), n)  # (n, U)
        rep = _observed(np.einsum("bu,uev->bev", w, cube[..., 0]), np.einsum("bu,uev->bev", w, cube[..., 1]), pos)
        rep_delta = np.einsum("bu,ue->be", w, delta[..., 0]) / np.einsum("bu,ue->be", w, delta[..., 1])
        for m in MEASURES:
            reps = spearman_rows(rep_delta, rep[m])
            lo, hi = np.nanquantile(reps, q) if np.isfinite(reps).any() else (np.nan, np.nan)
            rho = spearman_rows(mean_delta[None], point[m][None])[0]
            rows.append({**k, "measure": m, "experts": len(experts), "rho": float(rho),
                         "rho_lo": float(lo), "rho_hi": float(hi), "units": len(units)})  # fmt: skip
    return pd.DataFrame(rows) if summary else pd.concat(per_expert, ignore_index=True)


__all__ = ["ablation", "ablation_by", "ablation_by_units", "ablation_importance", "ablation_statistic", "ablation_units"]
