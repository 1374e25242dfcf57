"""Cross-layer analyses of runs with several MoE layers: routing paths, layer-to-layer transitions, co-activation.

Each runs one `moe_lens/sql/*.sql` file (counts aggregated in DuckDB) and keys its rows by
(run, dataset, split, epoch), one epoch per run (default: each run's last recorded epoch of `split`); a probe
dataset recorded into the same split is its own group. Scores from the counts (`information.scores`):
MI in nats, arithmetic NMI = I / ((H(A) + H(B)) / 2), AMI (Vinh et al. 2010), as scikit-learn defines them.

- `routing_paths`      the path of a token = its top-1 experts over the layers (Mixtral / OLMoE-style depth
                       questions): H(path), distinct paths, NMI/AMI(path; attribute) beside each layer's
                       NMI/AMI(expert_l; attribute) on the same tokens; or the table of the most frequent paths
- `layer_transitions`  P(expert at layer b | expert at layer a), with the table's MI, NMI and AMI
- `coactivation`       P(j | i) over ordered pairs of experts in a token's top-k, per layer
- `recorded_layers`    the (run, layer) pairs recorded (the app's layer picker)
"""
from __future__ import annotations

import duckdb
import numpy as np
import pandas as pd

from moe_lens.analysis._query import (Runs, keyed, last_epochs, nonempty, oov_params, query, resolve_runs, sql_text,
                                     stored_query)
from moe_lens.information import scores
from moe_lens.errors import MoeLensError

PATH_ATTRIBUTES = ("pos_tag", "freq_band", "ner_tag", "segment", "token")
GROUP = ["run", "dataset", "split", "epoch"]


def routing_paths(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid",
                  epoch: int | None = None, attribute: str = "pos_tag", summary: bool = True, dataset: str | None = None,
                  top: int | None = 20, include_oov: bool = False) -> pd.DataFrame:
    """Routing paths (tuples of top-1 experts over the MoE layers) of one epoch per run.

    `summary=True`: per (run, dataset, split, epoch) one row with `layer` NULL for the path, then one row per
    layer, each with `num_layers`, `tokens` (occurrences routed at every layer), `distinct` (distinct paths, or
    experts used at the layer), `entropy` (nats), `tokens_with_value` (those with a non-NULL `attribute`) and
    `mi`, `nmi`, `ami` of (path or expert; attribute) over those: words outside the model's vocabulary have no
    value unless `include_oov` (the in_vocab rule of `specialization`, docs/sql.md). `summary=False`: the paths table,
    (run, dataset, split, epoch, path, n, share) with each group's `top` most frequent paths (None: all)."""
    if attribute not in PATH_ATTRIBUTES:
        raise MoeLensError(f"unknown attribute {attribute!r}; allowed: {', '.join(PATH_ATTRIBUTES)}")
    names = resolve_runs(con, runs)
    params = dict(runs=names, run_epochs=last_epochs(con, names, split, epoch, dataset), split=split, attribute=attribute,
                  **oov_params(con, names, include_oov))
    df = nonempty(stored_query(con, names, "routing_paths", params), names, f"split={split!r}, epoch={epoch}")
    df["layer"] = df["layer"].astype("Int64")
    if not summary:
        paths = df[df["layer"].isna()].groupby(GROUP + ["label"], as_index=False)["n"].sum()
        paths["share"] = paths["n"] / paths.groupby(GROUP)["n"].transform("sum")
        paths = paths.rename(columns={"label": "path"}).sort_values(GROUP + ["n", "path"],
                                                                  ascending=[True] * 4 + [False, True])
        if top is not None:
            paths = paths.groupby(GROUP, sort=False).head(top)
        return paths.reset_index(drop=True)
    rows = []
    for key, g in df.groupby(GROUP + ["layer"], dropna=False, sort=True):
        labels = g.groupby("label")["n"].sum().to_numpy(dtype=np.float64)
        total = labels.sum()
        p = labels / total
        with_value = g[g["value"].notna()]
        info = scores(with_value.pivot_table(index="label", columns="value", values="n", fill_value=0,
                                             aggfunc="sum").to_numpy())._asdict() if len(with_value) else {}
        rows.append(dict(zip(GROUP + ["layer"], key), tokens=int(total), distinct=len(labels),
                         entropy=float(-(p * np.log(p)).sum()), tokens_with_value=int(with_value["n"].sum()),
                         mi=info.get("mi", np.nan), nmi=info.get("nmi", np.nan), ami=info.get("ami", np.nan)))
    out = pd.DataFrame(rows)
    out["layer"] = out["layer"].astype("Int64")
    out.insert(5, "num_layers", out.groupby(GROUP)["layer"].transform("size") - 1)
    return out.sort_values(GROUP + ["layer"], na_position="first").reset_index(drop=True)


def layer_transitions(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid",
                      epoch: int | None = None, layer_a: int = 0, layer_b: int = 1,
                      summary: bool = False, dataset: str | None = None) -> pd.DataFrame:
    """Transition table of top-1 experts from MoE layer `layer_a` to `layer_b` over the same token occurrences.

    Rows (run, dataset, split, epoch, layer_a, layer_b, expert_a, expert_b) with `n`, `n_a`, `p_b_given_a`
    (= P(b | a)), `p_ab`, and the group's `tokens`, `mi`, `nmi`, `ami` repeated. `summary=True`: one row per group."""
    if layer_a == layer_b:
        raise MoeLensError(f"layer_a = layer_b = {layer_a}; choose two different MoE layers")
    names = resolve_runs(con, runs)
    params = dict(runs=names, run_epochs=last_epochs(con, names, split, epoch, dataset), split=split,
                  layer_a=int(layer_a), layer_b=int(layer_b))
    df = nonempty(stored_query(con, names, "layer_transitions", params), names,
                  f"split={split!r}, epoch={epoch}, layers {layer_a} and {layer_b} both recorded")
    df.insert(4, "layer_a", int(layer_a))
    df.insert(5, "layer_b", int(layer_b))
    info = []
    for key, g in df.groupby(GROUP, sort=False):
        s = scores(g.pivot_table(index="expert_a", columns="expert_b", values="n", fill_value=0,
                                 aggfunc="sum").to_numpy())
        info.append(dict(zip(GROUP, key), tokens=s.rows, mi=s.mi, nmi=s.nmi, ami=s.ami))
    info = pd.DataFrame(info)
    if summary:
        return info.assign(layer_a=int(layer_a), layer_b=int(layer_b))[
            GROUP + ["layer_a", "layer_b", "tokens", "mi", "nmi", "ami"]]
    return df.merge(info, on=GROUP, how="left")


def coactivation(con: duckdb.DuckDBPyConnection, runs: Runs = None, *, split: str = "valid",
                 epoch: int | None = None, layer: int | None = None, dataset: str | None = None) -> pd.DataFrame:
    """P(j | i) of expert pairs in a token's experts, per (run, dataset, split, epoch, layer); every layer when
    `layer` is None. Rows (..., layer, expert_i, expert_j) with `n_ij`, `n_i`, `p_j_given_i`; empty for top-1."""
    names = resolve_runs(con, runs)
    params = dict(runs=names, run_epochs=last_epochs(con, names, split, epoch, dataset), split=split,
                  layer=None if layer is None else int(layer))
    return stored_query(con, names, "coactivation", params)


def recorded_layers(con: duckdb.DuckDBPyConnection, runs: Runs = None) -> pd.DataFrame:
    """(run, layer) for every MoE layer recorded in `runs` (None = all)."""
    names = resolve_runs(con, runs)
    return query(con, keyed(con, names, sql_text("recorded_layers")), dict(runs=names))


__all__ = ["recorded_layers", "routing_paths", "layer_transitions", "coactivation", "PATH_ATTRIBUTES"]
