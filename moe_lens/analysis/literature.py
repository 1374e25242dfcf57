"""The routing analyses of the MoE literature, each next to its chance level (docs/sql.md defines each once).

- `consecutive`  Jiang et al. 2024 (Mixtral, Table 5): share of consecutive token pairs of one document (or
                 sentence) with the same top-1 expert, and whose left top-1 is among the right token's top-2;
                 chance = the exact expectation were pairs matched at random with the observed frequencies
                 (sum_i p_i p'_i, i.e. sum p_i^2, and its top-2 equivalent).
- `saturation`   Muennighoff et al. 2024 (OLMoE, section 5): each earlier epoch's top-1 match and top-k overlap
                 |S ∩ S_final| / k with the final epoch on the same tokens; chance from the two epochs' frequencies.
- `vocabulary`   OLMoE's vocabulary specialization: for each token type seen >= min_count times, the share of its
                 occurrences routed to its most frequent expert; chance = the same with experts drawn from p.
- `fluctuation`  Dai et al. 2022 (StableMoE): the last epoch each token's top-1 changed; the share still changing
                 after 20/50/80% of training; chance = a router redrawing each epoch from the final frequencies.

Each runs ONE SQL aggregation returning per-unit counts (analysis/units.py) and a numpy statistic of their sum;
`analysis.bootstrap` resamples the units of the same counts (RESAMPLERS below).
Every row is keyed by (run, dataset, split, epoch, layer); `dataset` follows the dataset rule (docs/sql.md).
"""
from __future__ import annotations

from typing import Any

import duckdb
import numpy as np
import pandas as pd

from moe_lens.analysis._query import Runs, last_epochs, nonempty, oov_params, query, resolve_runs, run_datasets, sql_text
from moe_lens.analysis.units import UnitTables, point_rows, unit_params, unit_tables
from moe_lens.errors import MoeLensError

KEYS = ["run", "dataset", "split", "epoch", "layer"]
FRACTIONS = (0.2, 0.5, 0.8)  # fluctuation: share still changing after these fractions of training


def _check(df: pd.DataFrame, names: list[str], what: str) -> pd.DataFrame:
    return nonempty(df, names, what)


# --- 1. consecutive-token routing ---------------------------------------------------------------------------

def consecutive_units(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, by: str | None = None,
                      split: str = "valid", epoch: int | None = None, layer: int | None = None,
                      dataset: str | None = None, within: str = "document", **_: Any) -> UnitTables:
    """consecutive.sql's per-unit counts (a, same, in2, b, c per expert) of each (run, dataset, split, epoch, layer)."""
    if within not in ("document", "sentence"):
        raise MoeLensError(f"within={within!r}; allowed: document, sentence")
    names = resolve_runs(con, runs)
    params = dict(runs=names, keys=last_epochs(con, names, split, epoch, dataset), split=split, layer=layer,
                  within=within, **unit_params(by))
    df = _check(query(con, sql_text("consecutive"), params), names, f"split={split!r}, layer={layer}, epoch={epoch}")
    return unit_tables(df, KEYS, ["expert"], ["a", "same", "in2", "b", "c"])


def consecutive_statistic(sums: np.ndarray, labels: list, key: dict) -> dict[str, np.ndarray]:
    """(n, experts, 5) sums of (a, same, in2, b, c) -> the rates and their chance levels, each (n,)."""
    a, same, in2, b, c = (sums[..., j] for j in range(5))  # (n, e) each
    pairs = a.sum(1)  # (n,)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"pairs": pairs, "same_top1": same.sum(1) / pairs, "same_top1_chance": (a * b).sum(1) / pairs**2,
                "top1_in_next_top2": in2.sum(1) / pairs, "top1_in_next_top2_chance": (a * c).sum(1) / pairs**2}


def consecutive(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid",
                epoch: int | None = None, layer: int | None = None, dataset: str | None = None,
                within: str = "document") -> pd.DataFrame:
    """Consecutive-token routing (Mixtral, Table 5) per (run, dataset, split, epoch, layer) of one epoch (default:
    the last recorded): `pairs` (tokens t, t + 1 routed at the same step, same document, or same sentence with
    within='sentence'), `same_top1` (equal top-1 experts), `top1_in_next_top2` (t's top-1 among t + 1's top-2; the
    top-1 alone for top-1 routers), and `same_top1_chance` = sum_i p_i p'_i, `top1_in_next_top2_chance` =
    sum_i p_i q'_i (p, p' the left and right top-1 frequencies of the pairs, q' the share of right tokens with i in
    their top-2): the exact expectations were the pairs matched at random (sum p_i^2 when p = p')."""
    return consecutive_table(consecutive_units(con, runs, split=split, epoch=epoch, layer=layer, dataset=dataset,
                                               within=within))


def consecutive_table(t: UnitTables) -> pd.DataFrame:
    """consecutive's table from its unit counts (any resampling unit: the sum over units is the same)."""
    out = point_rows(t, consecutive_statistic)
    out["pairs"] = out["pairs"].astype("int64")
    return out


# --- 2. router saturation ------------------------------------------------------------------------------------

def saturation_units(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, by: str | None = None,
                     split: str = "valid", layer: int | None = None, dataset: str | None = None,
                     final_epoch: int | None = None, **_: Any) -> UnitTables:
    """saturation.sql's per-unit counts of each (run, dataset, split, epoch, layer) against the final epoch."""
    names = resolve_runs(con, runs)
    pairs = run_datasets(con, names, split, dataset)
    big = con.execute("SELECT max(expert) FROM routing WHERE list_contains($runs, run) AND split = $split",
                      {"runs": names, "split": split}).fetchone()[0]
    if big is not None and big > 126:
        raise MoeLensError(f"saturation: expert ids up to {big}; at most 127 experts are supported")
    finals = last_epochs(con, names, split, final_epoch, dataset)
    final_of = {k.rsplit("|", 1)[0]: int(k.rsplit("|", 1)[1]) for k in finals}
    params = dict(runs=names, run_datasets=pairs, final_keys=finals, final_epochs=[final_of.get(k, -1) for k in pairs],
                  split=split, layer=layer, **unit_params(by))
    df = _check(query(con, sql_text("saturation"), params), names,
                f"split={split!r}, layer={layer} and an epoch before the final one")
    return unit_tables(df, [*KEYS, "final_epoch"], ["expert"], ["a", "b", "c", "d", "match", "inter", "kf"])


def saturation_statistic(sums: np.ndarray, labels: list, key: dict) -> dict[str, np.ndarray]:
    """(n, experts, 7) sums of (a, b, c, d, match, inter, kf) -> tokens, match and overlap, their chance levels."""
    a, b, c, d, match, inter, kf = (sums[..., j] for j in range(7))
    tokens, kf = b.sum(1), kf.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return {"tokens": tokens, "top1_match": match.sum(1) / tokens, "top1_match_chance": (a * b).sum(1) / tokens**2,
                "topk_overlap": inter.sum(1) / kf, "topk_overlap_chance": (c * d).sum(1) / (tokens * kf)}


def saturation(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid", layer: int | None = None,
               dataset: str | None = None, final_epoch: int | None = None) -> pd.DataFrame:
    """Router saturation (OLMoE, section 5): per (run, dataset, split, epoch, layer), epoch < `final_epoch`
    (default: the last recorded), over the tokens routed in both: `tokens`, `top1_match` (same top-1),
    `topk_overlap` = sum |S ∩ S_final| / sum |S_final| (S the set of a token's experts, all ranks: |∩|/k for a
    fixed top-k), and `top1_match_chance` = sum_i p_i p^f_i, `topk_overlap_chance` = sum_i q_i q^f_i / k (q_i the
    share of tokens with i in S): the expectations were the two epochs' routings independent."""
    return saturation_table(saturation_units(con, runs, split=split, layer=layer, dataset=dataset,
                                             final_epoch=final_epoch))


def saturation_table(t: UnitTables) -> pd.DataFrame:
    """saturation's table from its unit counts (any resampling unit: the sum over units is the same)."""
    out = point_rows(t, saturation_statistic)
    out["tokens"] = out["tokens"].astype("int64")
    return out


# --- 4. vocabulary specialization ---------------------------------------------------------------------------

def vocabulary_units(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, by: str | None = None,
                     split: str = "valid", epoch: int | None = None, layer: int | None = None,
                     dataset: str | None = None, include_oov: bool = False, **_: Any) -> UnitTables:
    """vocabulary.sql's per-unit (token, expert) counts of each (run, dataset, split, epoch, layer)."""
    names = resolve_runs(con, runs)
    params = dict(runs=names, keys=last_epochs(con, names, split, epoch, dataset), split=split, layer=layer,
                  **oov_params(con, names, include_oov), **unit_params(by))
    df = _check(query(con, sql_text("vocabulary"), params), names, f"split={split!r}, layer={layer}, epoch={epoch}")
    return unit_tables(df, KEYS, ["token", "expert"], ["n"])


def vocabulary_statistic(sums: np.ndarray, labels: list, key: dict, *, min_count: int = 20) -> dict[str, np.ndarray]:
    """(n, types, experts, 1) counts -> `types` (seen >= min_count), `mean_share` (mean over those types of
    max_e n_te / N_t) and `token_share` (sum_t max_e n_te / sum_t N_t, over the same types)."""
    c = sums[..., 0]  # (n, t, e)
    total, top = c.sum(2), c.max(2)  # (n, t)
    kept = total >= min_count
    types = kept.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        share = np.where(kept, top / np.where(total > 0, total, 1), 0.0)
        return {"types": types.astype(np.float64), "mean_share": share.sum(1) / types,
                "token_share": np.where(kept, top, 0).sum(1) / np.where(kept, total, 0).sum(1)}


def _vocabulary_chance(counts: np.ndarray, min_count: int, seed: int, draws: int = 20) -> tuple[float, float]:
    """mean_share and token_share with each occurrence's expert drawn from the group's top-1 frequencies p
    (no vocabulary specialization; > max_e p_e for small N_t), the mean of `draws` seeded draws."""
    total = counts.sum(1)  # (t,)
    kept = total[total >= min_count].astype(np.int64)
    if kept.size == 0:
        return np.nan, np.nan
    p = counts.sum(0) / counts.sum()
    rng = np.random.default_rng(seed)
    tops = np.stack([rng.multinomial(kept, p).max(1) for _ in range(draws)])  # (draws, t)
    return float((tops / kept).mean()), float(tops.sum(1).mean() / kept.sum())


def vocabulary(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid", epoch: int | None = None,
               layer: int | None = None, dataset: str | None = None, min_count: int = 20, summary: bool = True,
               top: int | None = None, include_oov: bool = False, seed: int = 0) -> pd.DataFrame:
    """Vocabulary specialization (OLMoE) of one epoch (default: the last recorded) per (run, dataset, split, epoch,
    layer), over the token types (surface `token`, top-1 routing) seen at least `min_count` times, share_t =
    max_e n_te / N_t. `summary=True`: `types`, `mean_share` (mean over types), `token_share` (weighted by N_t),
    `median_share`, and `mean_share_chance`, `token_share_chance` (the same with each occurrence's expert drawn
    from the group's top-1 frequencies, mean of 20 seeded draws). `summary=False`: the distribution, one row per
    type (`token`, `n`, `expert` = its most frequent expert, `share`); with `top=N` each expert's N types of
    largest share (then n) among the types it is the most frequent expert of. Words outside the vocabulary are
    left out unless include_oov (the in_vocab rule)."""
    t = vocabulary_units(con, runs, split=split, epoch=epoch, layer=layer, dataset=dataset, include_oov=include_oov)
    if summary:
        out = point_rows(t, vocabulary_statistic, min_count=min_count)
        extra = []
        for g in range(len(t.keys)):
            counts = np.asarray(t.tables[g].sum(0)).reshape(t.shapes[g])[..., 0]  # (types, experts)
            total = counts.sum(1)
            share = counts.max(1)[total >= min_count] / total[total >= min_count]
            extra.append((float(np.median(share)) if share.size else np.nan,
                          *_vocabulary_chance(counts, min_count, seed)))
        out[["median_share", "mean_share_chance", "token_share_chance"]] = pd.DataFrame(extra, index=out.index)
        out["types"] = out["types"].astype("int64")
        return out
    rows = []
    for g, key in enumerate(t.keys.to_dict("records")):
        counts = np.asarray(t.tables[g].sum(0)).reshape(t.shapes[g])[..., 0]  # (types, experts)
        tokens, experts = t.labels[g]
        total = counts.sum(1)
        kept = total >= min_count
        d = pd.DataFrame({**key, "token": tokens[kept], "n": total[kept].astype("int64"),
                          "expert": experts[counts[kept].argmax(1)], "share": counts[kept].max(1) / total[kept]})
        rows.append(d)
    df = pd.concat(rows, ignore_index=True) if rows else pd.DataFrame(columns=[*KEYS, "token", "n", "expert", "share"])
    df = df.sort_values([*KEYS, "share", "n", "token"], ascending=[True] * len(KEYS) + [False, False, True])
    if top is not None:
        df = df.groupby([*KEYS, "expert"], sort=False).head(top).sort_values([*KEYS, "expert", "share", "n"],
                                                                             ascending=[True] * 6 + [False, False])
    return df.reset_index(drop=True)


# --- 5. routing fluctuation ----------------------------------------------------------------------------------

def fluctuation(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid", layer: int | None = None,
                dataset: str | None = None, summary: bool = True) -> pd.DataFrame:
    """Routing fluctuation (StableMoE) per (run, dataset, split, epoch = the last recorded, layer): for each token
    routed in every recorded epoch (valid: every token), the last recorded epoch whose top-1 differs from the
    token's previous recorded epoch. `summary=True`: `tokens`,
    `never_changed` (share), `changing_after_20` / `_50` / `_80` = share of tokens whose last change came at an
    epoch whose step is > 20/50/80% of the last epoch's step, and `chance_after_*` = 1 - (sum_i p_i^2)^m, m the
    recorded epoch transitions after that point, p the final top-1 frequencies: a router that redraws each
    token's expert every epoch. (run, dataset) pairs with one recorded epoch are left out. `summary=False`: one
    row per `last_change` epoch (-1: never) with its `step`, `progress` = step / final step, `tokens`, `share`."""
    names = resolve_runs(con, runs)
    params = dict(runs=names, run_datasets=run_datasets(con, names, split, dataset), split=split, layer=layer,
                  **unit_params(None))
    steps = query(con, sql_text("epoch_steps"), params)
    hi = steps["max_expert"].max() if len(steps) else 0
    params["bits"] = bits = max(int(hi if pd.notna(hi) else 0) + 1, 1).bit_length()
    last = int(steps["epoch"].max()) if len(steps) else 0
    if bits * (last + 1) > 127:
        raise MoeLensError(f"fluctuation: {last + 1} epochs x {bits}-bit expert ids do not fit the 127-bit packing; "
                           "pass fewer runs or a trace with fewer epochs")
    keys = params["run_datasets"]
    params["epoch_lists"] = [[int(e) for e in steps.loc[(steps["run"] + "|" + steps["dataset"]) == k, "epoch"]]
                             for k in keys]
    df = _check(query(con, sql_text("fluctuation"), params), names, f"split={split!r}, layer={layer}")
    rows = []
    for key, g in df.groupby(KEYS, sort=True):
        k = dict(zip(KEYS, key))
        s = steps[(steps["run"] == k["run"]) & (steps["dataset"] == k["dataset"])].set_index("epoch")["step"]
        if len(s) < 2:  # one recorded epoch (a probe dataset replayed once): nothing can have changed
            continue
        final = float(s.max())
        dist = g.groupby("last_change")["n"].sum()
        total = dist.sum()
        p = g.groupby("final_expert")["n"].sum().to_numpy() / total
        progress = {int(e): float(s[e]) / final if final > 0 else 1.0 for e in s.index}
        if not summary:
            for e, n in dist.items():
                rows.append({**k, "last_change": int(e), "step": int(s[e]) if e >= 0 else None,
                             "progress": progress.get(int(e), np.nan) if e >= 0 else np.nan,
                             "tokens": int(n), "share": n / total})
            continue
        row = {**k, "tokens": int(total), "never_changed": float(dist.get(-1, 0) / total)}
        transitions = list(s.index)[1:]  # epochs compared with the one recorded before
        for f in FRACTIONS:
            late = [e for e in dist.index if e >= 0 and progress[int(e)] > f]
            m = sum(progress[int(e)] > f for e in transitions)
            row[f"changing_after_{round(f * 100)}"] = float(dist[late].sum() / total)
            row[f"chance_after_{round(f * 100)}"] = float(1 - (p**2).sum() ** m)
        rows.append(row)
    return nonempty(pd.DataFrame(rows), names, f"split={split!r}, layer={layer} and two recorded epochs")

