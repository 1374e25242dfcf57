"""`moe-lens figure` kinds of the literature's routing analyses, each with its chance level and 95% bootstrap
intervals over documents (`analysis.bootstrap`, n=200, seed 0):

- `consecutive`   same top-1 for consecutive tokens and top-1 in the next token's top-2 (Mixtral, Table 5)
- `saturation`    top-1 match with the final epoch's routing, per earlier epoch (OLMoE router saturation)
- `vocabulary`    share of a token type's occurrences on its most frequent expert (OLMoE)
- `fluctuation`   share of tokens still changing top-1 after 20/50/80% of training (StableMoE)
- `coactivation`  heatmap P(j | i) of expert pairs within a token's top-k (one run)

Each builder returns `(figure, table)` like moe_lens/figures.py.
"""
from __future__ import annotations

import duckdb
import pandas as pd
import plotly.graph_objects as go

from moe_lens import analysis as A
from moe_lens.errors import MoeLensError

_LAYOUT = dict(template="plotly_white", font=dict(size=13), margin=dict(l=60, r=20, t=60, b=60))
BOOT = dict(by="document", n=200, seed=0)


def error_bars(df: pd.DataFrame, m: str, *, lo: str | None = None, hi: str | None = None) -> dict | None:
    """Plotly `error_y` of column `m` from its interval columns (default `<m>_lo`, `<m>_hi`, as analysis.bootstrap
    names them); None when `df` has no interval. The one place the asymmetric error-bar dict is written (the
    figures, literature figures and app pages use it)."""
    lo, hi = lo or f"{m}_lo", hi or f"{m}_hi"
    if lo not in df or hi not in df:
        return None
    return dict(type="data", symmetric=False, array=df[hi] - df[m], arrayminus=df[m] - df[lo])


def _label(df: pd.DataFrame) -> pd.Series:
    """The run, and " L<layer>" for runs with several layers."""
    many = df.groupby("run")["layer"].transform("nunique") > 1
    return df["run"] + df["layer"].map(lambda x: f" L{x}").where(many, "")


def consecutive_bars(con: duckdb.DuckDBPyConnection, runs: list[str] | None, *, split: str = "valid",
                     within: str = "document") -> tuple[go.Figure, pd.DataFrame]:
    df = A.bootstrap(A.consecutive, con, runs, split=split, within=within, **BOOT)
    x = _label(df)
    fig = go.Figure()
    for m, name in (("same_top1", "same top-1"), ("same_top1_chance", "chance: sum p_i^2"),
                    ("top1_in_next_top2", "top-1 in next token's top-2"), ("top1_in_next_top2_chance", "chance (top-2)")):
        fig.add_bar(name=name, x=x, y=df[m], error_y=error_bars(df, m), marker_pattern_shape="/" if "chance" in m else "")
    fig.update_layout(barmode="group", title=f"Consecutive tokens (same {within}) routed alike ({split}, last epoch; "
                      "95% intervals over documents)", yaxis_title="share of pairs", **_LAYOUT)
    return fig, df


def saturation_lines(con: duckdb.DuckDBPyConnection, runs: list[str] | None, *,
                     split: str = "valid") -> tuple[go.Figure, pd.DataFrame]:
    df = A.bootstrap(A.saturation, con, runs, split=split, **BOOT)
    df = df.assign(label=_label(df))
    fig = go.Figure()
    for label, d in df.groupby("label", sort=True):
        fig.add_scatter(x=d["epoch"], y=d["top1_match"], error_y=error_bars(d, "top1_match"), mode="lines+markers",
                        name=f"{label}")
        fig.add_scatter(x=d["epoch"], y=d["top1_match_chance"], mode="lines", line_dash="dot", name=f"{label} chance")
    fig.update_layout(title=f"Router saturation: top-1 match with the final epoch ({split}; 95% intervals)",
                      xaxis_title="epoch", yaxis_title="top-1 match", **_LAYOUT)
    return fig, df.drop(columns="label")


def vocabulary_bars(con: duckdb.DuckDBPyConnection, runs: list[str] | None, *, split: str = "valid",
                    min_count: int = 20) -> tuple[go.Figure, pd.DataFrame]:
    df = A.bootstrap(A.vocabulary, con, runs, split=split, min_count=min_count, **BOOT)
    x = _label(df)
    fig = go.Figure()
    fig.add_bar(name="share on the most frequent expert (mean over types)", x=x, y=df["mean_share"],
                error_y=error_bars(df, "mean_share"))
    fig.add_bar(name="chance: experts drawn from p", x=x, y=df["mean_share_chance"], marker_pattern_shape="/")
    fig.update_layout(barmode="group", title=f"Vocabulary specialization, types seen >= {min_count} times ({split})",
                      yaxis_title="share", **_LAYOUT)
    return fig, df


def fluctuation_bars(con: duckdb.DuckDBPyConnection, runs: list[str] | None, *,
                     split: str = "valid") -> tuple[go.Figure, pd.DataFrame]:
    df = A.fluctuation(con, runs, split=split)
    x = _label(df)
    fig = go.Figure()
    for f in (20, 50, 80):
        fig.add_bar(name=f"still changing after {f}%", x=x, y=df[f"changing_after_{f}"])
        fig.add_scatter(name=f"chance after {f}%", x=x, y=df[f"chance_after_{f}"], mode="markers",
                        marker_symbol="line-ew-open", marker_size=18)
    fig.update_layout(barmode="group", title=f"Routing fluctuation: tokens whose top-1 still changes ({split})",
                      yaxis_title="share of tokens", **_LAYOUT)
    return fig, df


def coactivation_figure(df: pd.DataFrame, title: str) -> go.Figure:
    """Heatmap of P(j | i) from a `coactivation` frame (one layer): the figure kind and the app's pages."""
    z = df.pivot_table(index="expert_i", columns="expert_j", values="p_j_given_i", fill_value=0.0)
    fig = go.Figure(go.Heatmap(z=z.values, x=[f"e{c}" for c in z.columns], y=[f"e{r}" for r in z.index],
                               colorscale="Viridis", zmin=0, zmax=1, colorbar=dict(title="P(j | i)")))
    fig.update_layout(title=title, xaxis_title="expert j", yaxis_title="expert i", **_LAYOUT)
    return fig


def coactivation_heatmap(con: duckdb.DuckDBPyConnection, run: str, *, split: str = "valid",
                         layer: int = 0) -> tuple[go.Figure, pd.DataFrame]:
    df = A.coactivation(con, run, split=split, layer=layer)
    if df.empty:
        raise MoeLensError(f"figure coactivation: run {run!r} routes each token to one expert (no pairs)")
    title = f"{run}: co-activation P(j in the top-k | i in the top-k), layer {layer} ({split})"
    return coactivation_figure(df, title), df


def build(con: duckdb.DuckDBPyConnection, kind: str, runs: list[str] | None, *,
          split: str | None = None) -> tuple[go.Figure, pd.DataFrame]:
    split = split or "valid"
    if kind == "consecutive":
        return consecutive_bars(con, runs, split=split)
    if kind == "saturation":
        return saturation_lines(con, runs, split=split)
    if kind == "vocabulary":
        return vocabulary_bars(con, runs, split=split)
    if kind == "fluctuation":
        return fluctuation_bars(con, runs, split=split)
    if kind == "coactivation":
        if not runs or len(runs) != 1:
            raise MoeLensError("figure coactivation needs exactly one run: --runs RUN")
        return coactivation_heatmap(con, runs[0], split=split)
    raise MoeLensError(f"unknown figure {kind!r}")


KINDS = ("consecutive", "saturation", "vocabulary", "fluctuation", "coactivation")
