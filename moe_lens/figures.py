"""`moe-lens figure KIND`: the standard charts of moe_lens.analysis as Plotly figures, saved as PNG or HTML.

Each builder takes a connection from `moe_lens.store.connect` and returns `(figure, table)`: the table is
the analysis DataFrame the figure plots, so every number in a figure can be printed or checked.

- `collapse`        effective experts exp(H) of top-1 usage in each run's last recorded epoch, by dataset; a bar
                    averages one run's seed replicates (their number under the dataset)
- `collapse-curve`  effective experts over training steps (recorded training batches)
- `specialization`  expert x attribute-value lift heatmap of one run (POS tag, frequency band, dataset...)
- `nmi`             NMI and AMI (expert; attribute) per run next to the expected NMI under permutation (chance)
- `consecutive`, `saturation`, `vocabulary`, `fluctuation`, `coactivation`: the literature's routing analyses with
                    chance levels and bootstrap intervals (moe_lens/literature_figures.py)
- `pos-probe`       POS probe accuracy from routing per run, beside the majority-tag-per-word and majority-class
                    baselines, with bootstrap 95% intervals over test documents
- `ablation`        mean delta-loss per ablated expert (`moe-lens ablate`), bootstrap 95% intervals over documents
- `ablation-importance`  mean delta-loss against observed load share per expert, with Spearman's rho [interval]

PNG export uses kaleido, which drives a local Chrome/Chromium (`apt-get install chromium`); `.html` needs
nothing else (plotly.js inlined, opens offline).
"""
from __future__ import annotations

import argparse
from pathlib import Path

import duckdb
import numpy as np
import pandas as pd
import plotly.graph_objects as go

from moe_lens import analysis as A
from moe_lens import literature_figures
from moe_lens.analysis.registry import FIGURE_KINDS
from moe_lens.errors import MoeLensError
from moe_lens.store import connect, default_runs_dir

KINDS = tuple(FIGURE_KINDS)  # the registry's figure kinds: collapse, collapse-curve, specialization, nmi
_LAYOUT = dict(template="plotly_white", font=dict(size=13), margin=dict(l=60, r=20, t=60, b=60))


def _routed_runs(con: duckdb.DuckDBPyConnection, runs: list[str] | None,
                 modes: list[str] | None = None) -> pd.DataFrame:
    """run, dataset, mode, num_experts of `runs` (default: all) with more than one expert, of `modes` if given."""
    info = con.execute("SELECT run, dataset, mode, num_experts, top_k FROM runs ORDER BY dataset, run").df()
    if runs:
        missing = sorted(set(runs) - set(info["run"]))
        if missing:
            raise MoeLensError(f"unknown run(s) {', '.join(missing)}; available: {', '.join(info['run'])}")
        info = info[info["run"].isin(runs)]
    info = info[info["num_experts"] > 1]  # one expert: nothing routed, nothing to plot
    return info[info["mode"].isin(modes)] if modes else info


def collapse_bars(con: duckdb.DuckDBPyConnection, runs: list[str] | None = None, *, split: str = "valid",
                  modes: list[str] | None = None) -> tuple[go.Figure, pd.DataFrame]:
    """Effective experts (top-1, layer 0, last recorded epoch of `split`) per dataset and mode. A bar averages
    the seed replicates of one run only (`replicate`: the run name without a trailing `-seed<N>`), their number
    under the dataset's name and their min-max range as error bars (each bar's runs in its hover); a run that is no seed of another (conll2003-load-ablate, a smaller
    model) is a bar of its own, named `mode: run`. Runs of another depth than the default (`num_layers` 2,
    `moe_layers` "1") are left out: the Layers page shows them."""
    info = _routed_runs(con, runs, modes)
    depth = con.execute("SELECT run, num_layers, moe_layers FROM runs").df().set_index("run")
    default = depth["num_layers"].fillna(2).eq(2) & depth["moe_layers"].fillna("1").astype(str).eq("1")
    info = info[info["run"].map(default).fillna(True).astype(bool)]
    df = A.collapse(con, info["run"].tolist(), split=split, by="epoch", layer=0)
    df = df.sort_values("epoch").groupby("run", as_index=False).last().drop(columns="dataset")
    df = df.merge(info[["run", "dataset", "mode"]], on="run")
    df["replicate"] = df["run"].str.replace(r"-seed\d+$", "", regex=True)
    size = df.groupby("replicate")["run"].transform("size")
    # the bar named by the mode alone: the (dataset, mode)'s replicate with most runs (ties: the shortest name)
    main = df.assign(size=size, length=df["replicate"].str.len()).sort_values(["size", "length"], ascending=[False, True])
    main = main.groupby(["dataset", "mode"])["replicate"].first()
    main_of = df.set_index(["dataset", "mode"]).index.map(main)
    df["bar"] = df["mode"].where(df["replicate"].to_numpy() == main_of.to_numpy(), df["mode"] + ": " + df["replicate"])
    agg = df.groupby(["dataset", "bar"], sort=False).agg(
        mean=("effective_experts", "mean"), lo=("effective_experts", "min"), hi=("effective_experts", "max"),
        runs=("run", "size"), names=("run", ", ".join),
        dead=("dead_experts", lambda x: f"{x.min()}-{x.max()}" if x.nunique() > 1 else str(x.iloc[0]))
    ).reset_index()
    df["runs_in_bar"] = df.groupby(["dataset", "bar"])["run"].transform("size")
    order = [m for mode in (modes or list(dict.fromkeys(info["mode"])))
             for m in dict.fromkeys(df.loc[df["mode"] == mode, "bar"].sort_values(key=lambda b: b.str.len()))]
    fig = go.Figure()
    for bar in order:
        d = agg[agg["bar"] == bar]
        fig.add_bar(name=bar, x=d["dataset"], y=d["mean"], text=d["mean"].round(1), textposition="outside",
                    error_y=literature_figures.error_bars(d, "mean", lo="lo", hi="hi"),
                    customdata=d[["runs", "lo", "hi", "dead", "names"]],
                    hovertemplate=f"{bar}: mean %{{y:.2f}} effective experts over %{{customdata[0]}} run(s) "
                                  "%{customdata[4]} (min %{customdata[1]:.2f}, max %{customdata[2]:.2f}), "
                                  "dead %{customdata[3]}<extra></extra>")  # fmt: skip
    e = int(df["num_experts"].max()) if len(df) else 0
    fig.add_hline(y=e, line_dash="dot", annotation_text=f"all {e} experts used equally", annotation_position="top left")
    # the number of seeds under each dataset (the bars named by a mode alone; a lone run's bar is named by its run)
    seeds = agg[agg["bar"].isin(df["mode"].unique())].groupby("dataset", sort=False)["runs"].agg(lambda n: sorted(set(n)))
    ticks = [f"{ds}<br>{' or '.join(map(str, n))} seeds a bar" if max(n) > 1 else ds for ds, n in seeds.items()]
    fig.update_xaxes(tickvals=list(seeds.index), ticktext=ticks)
    note = "<br><sup>a bar: the mean over one run's seeds (their number under the dataset; min-max error bars); " \
        "a run that is no seed of another has a bar of its own</sup>" if (agg["runs"] > 1).any() else ""
    fig.update_layout(barmode="group", title=f"Effective experts exp(H) of top-1 routing ({split}, last epoch){note}",
                      yaxis_title="effective experts", xaxis_title="dataset", legend_title="mode", **_LAYOUT)  # fmt: skip
    return fig, df[["run", "dataset", "mode", "bar", "runs_in_bar", "epoch", "step", "effective_experts",
                    "dead_experts", "never_top1", "norm_entropy"]]


def collapse_curves(con: duckdb.DuckDBPyConnection, runs: list[str] | None = None, *, split: str = "train",
                    modes: list[str] | None = None) -> tuple[go.Figure, pd.DataFrame]:
    """Effective experts of each recorded training batch against the step, one line per run."""
    info = _routed_runs(con, runs, modes)
    df = A.collapse(con, info["run"].tolist(), split=split, by="step", layer=0).merge(info[["run", "mode"]], on="run")
    fig = go.Figure()
    for run, d in df.sort_values("step").groupby("run", sort=False):
        fig.add_scatter(x=d["step"], y=d["effective_experts"], mode="lines+markers", name=d["mode"].iloc[0] + f" ({run})")
    fig.update_layout(title=f"Effective experts over training ({split} batches)", xaxis_title="step",
                      yaxis_title="effective experts exp(H)", legend_title="run", **_LAYOUT)  # fmt: skip
    return fig, df[["run", "mode", "epoch", "step", "tokens", "effective_experts", "dead_experts", "never_top1"]]


def specialization_heatmap(con: duckdb.DuckDBPyConnection, run: str, *, attribute: str = "pos_tag",
                           split: str = "valid", top_values: int = 16,
                           include_oov: bool = False) -> tuple[go.Figure, pd.DataFrame]:
    """Lift P(expert | value) / P(expert) for the `top_values` most frequent values of `attribute` (rows) x experts."""
    df = A.specialization(con, run, attribute=attribute, split=split, shuffled=False, include_oov=include_oov,
                          layer=0)
    counts = df.groupby("value")["n_value"].first().sort_values(ascending=False)
    keep = counts.index[:top_values]
    d = df[df["value"].isin(keep)]
    lift = d.pivot_table(index="value", columns="expert", values="lift", fill_value=0.0).reindex(keep)
    z = np.log2(lift.clip(lower=1 / 8).values)  # (values, experts); 0 = chance, +1 = twice as likely
    fig = go.Figure(go.Heatmap(z=z, x=[f"e{c}" for c in lift.columns], y=[f"{v} ({counts[v]:,})" for v in keep],
                               customdata=lift.values, colorscale="RdBu_r", zmid=0.0, zmin=-3, zmax=3,
                               colorbar=dict(title="log2 lift", tickvals=[-3, -2, -1, 0, 1, 2, 3],
                                             ticktext=["1/8", "1/4", "1/2", "1", "2", "4", "8"]),
                               hovertemplate="%{y} -> %{x}: lift %{customdata:.2f}<extra></extra>"))  # fmt: skip
    nmi = df["nmi"].iloc[0]
    fig.update_layout(title=f"{run}: expert x {attribute} lift ({split}, top-1; NMI {nmi:.3f})", xaxis_title="expert",
                      yaxis=dict(autorange="reversed"), height=max(340, 120 + 28 * len(keep)), **_LAYOUT)  # fmt: skip
    return fig, d[["run", "value", "expert", "n", "n_value", "p_expert_given_value", "p_expert", "lift"]]


def nmi_bars(con: duckdb.DuckDBPyConnection, runs: list[str] | None = None, *, attribute: str = "pos_tag",
             split: str = "valid", include_oov: bool = False) -> tuple[go.Figure, pd.DataFrame]:
    """NMI and AMI (top-1 expert; attribute) per run, with the expected NMI under permutation (chance) beside them."""
    info = _routed_runs(con, runs)
    df = A.specialization(con, info["run"].tolist(), attribute=attribute, split=split, summary=True,
                          include_oov=include_oov, layer=0)
    df = df.drop(columns="dataset").merge(info[["run", "dataset", "mode"]], on="run").sort_values(["dataset", "run"])
    fig = go.Figure()
    fig.add_bar(name="NMI", x=df["run"], y=df["nmi"])
    fig.add_bar(name="AMI", x=df["run"], y=df["ami"])
    fig.add_bar(name="expected NMI, attribute permuted (chance)", x=df["run"], y=df["nmi_chance"])
    fig.update_layout(barmode="group", title=f"How much the top-1 expert says about {attribute} ({split})",
                      yaxis_title="NMI, AMI (expert; attribute)", **_LAYOUT)  # fmt: skip
    return fig, df[["run", "dataset", "mode", "rows", "mi", "nmi", "ami", "nmi_chance", "nmi_shuffled"]]


def probe_bars(con: duckdb.DuckDBPyConnection, runs: list[str] | None = None, *, split: str = "valid"
               ) -> tuple[go.Figure, pd.DataFrame]:  # fmt: skip
    """POS probe accuracy per run and predictor (probe, majority_word, majority_class) with 95% intervals."""
    info = _routed_runs(con, runs)
    df = A.pos_probe(con, info["run"].tolist(), split=split)
    fig = go.Figure()
    for method, d in df.groupby("method", sort=False):
        fig.add_bar(name=method, x=d["run"], y=d["accuracy"],
                    error_y=literature_figures.error_bars(d, "accuracy"))
    fig.update_layout(barmode="group", title=f"POS from routing: probe accuracy vs baselines ({split}, held-out documents)",
                      yaxis_title="accuracy", legend_title="predictor", **_LAYOUT)  # fmt: skip
    return fig, df


def ablation_bars(con: duckdb.DuckDBPyConnection, runs: list[str] | None = None, *, split: str = "valid"
                  ) -> tuple[go.Figure, pd.DataFrame]:  # fmt: skip
    """Mean delta-loss per ablated expert, one bar group per (run, layer), 95% intervals over documents."""
    df = A.bootstrap(A.ablation, con, runs, split=split)
    fig = go.Figure()
    for (run, layer), d in df.groupby(["run", "layer"], sort=True):
        fig.add_bar(name=f"{run} layer {layer}", x=[f"e{e}" for e in d["expert"]], y=d["mean_delta"],
                    error_y=literature_figures.error_bars(d, "mean_delta"))
    fig.update_layout(barmode="group", title=f"Loss increase when each expert is removed ({split}, nats/token)",
                      xaxis_title="ablated expert", yaxis_title="mean delta loss", **_LAYOUT)  # fmt: skip
    return fig, df


def ablation_scatter(con: duckdb.DuckDBPyConnection, runs: list[str] | None = None, *, split: str = "valid"
                     ) -> tuple[go.Figure, pd.DataFrame]:  # fmt: skip
    """Per expert: observed load share (x) against mean delta-loss (y); Spearman's rho with its interval in the legend."""
    per = A.ablation_importance(con, runs, split=split, summary=False)
    rho = A.ablation_importance(con, runs, split=split)
    fig = go.Figure()
    for (run, layer), d in per.groupby(["run", "layer"], sort=True):
        r = rho[(rho["run"] == run) & (rho["layer"] == layer) & (rho["measure"] == "load")].iloc[0]
        fig.add_scatter(x=d["load"], y=d["mean_delta"], mode="markers+text", text=[f"e{e}" for e in d["expert"]],
                        textposition="top center",
                        name=f"{run} L{layer}: rho {r['rho']:.2f} [{r['rho_lo']:.2f}, {r['rho_hi']:.2f}]")  # fmt: skip
    fig.update_layout(title=f"Causal importance vs observed load ({split})", xaxis_title="load share (top-k assignments)",
                      yaxis_title="mean delta loss when removed", **_LAYOUT)  # fmt: skip
    return fig, per.merge(rho.pivot_table(index=["run", "layer"], columns="measure", values="rho").add_prefix("rho_")
                          .reset_index(), on=["run", "layer"])  # fmt: skip


def _png_help(e: Exception) -> str:
    """Which of kaleido and Chromium is missing, and how to install it (one line)."""
    try:
        import kaleido  # noqa: F401
    except ImportError:
        return "PNG export needs the kaleido package, which is not installed: pip install kaleido (or write .html)"
    first = next((ln.strip() for ln in str(e).splitlines() if ln.strip()), type(e).__name__)
    if "chrome" in str(e).lower() or "browser" in str(e).lower():
        return ("PNG export needs Chrome/Chromium, which kaleido did not find: apt-get install -y chromium "
                "(Debian/Ubuntu; or set BROWSER_PATH to a Chrome binary), or run plotly_get_chrome to download one "
                f"(or write .html); kaleido said: {first}")
    return f"PNG export with kaleido failed ({first}); write .html instead"


def save(fig: go.Figure, path: str | Path, *, width: int = 1000, height: int | None = None) -> Path:
    """Write `fig` as .png (kaleido + a local Chromium) or .html (standalone)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.suffix == ".html":
        fig.write_html(path, include_plotlyjs=True)
    elif path.suffix == ".png":
        try:
            fig.write_image(path, width=width, height=height or fig.layout.height or 520, scale=1)
        except (ImportError, ValueError, RuntimeError) as e:
            raise MoeLensError(f"{path}: {_png_help(e)}") from e
    else:
        raise MoeLensError(f"{path}: unknown figure format {path.suffix!r}; allowed: .png, .html")
    return path


def build(con: duckdb.DuckDBPyConnection, kind: str, runs: list[str] | None, *, split: str | None = None,
          attribute: str = "pos_tag", modes: list[str] | None = None,
          include_oov: bool = False) -> tuple[go.Figure, pd.DataFrame]:
    """The figure `kind` (one of KINDS) and the table behind it."""
    if kind == "collapse":
        return collapse_bars(con, runs, split=split or "valid", modes=modes)
    if kind == "collapse-curve":
        return collapse_curves(con, runs, split=split or "train", modes=modes)
    if kind == "nmi":
        return nmi_bars(con, runs, attribute=attribute, split=split or "valid", include_oov=include_oov)
    if kind == "specialization":
        if not runs or len(runs) != 1:
            raise MoeLensError("figure specialization needs exactly one run: --runs RUN")
        return specialization_heatmap(con, runs[0], attribute=attribute, split=split or "valid",
                                      include_oov=include_oov)
    if kind in literature_figures.KINDS:
        return literature_figures.build(con, kind, runs, split=split)
    if kind == "pos-probe":
        return probe_bars(con, runs, split=split or "valid")
    if kind == "ablation":
        return ablation_bars(con, runs, split=split or "valid")
    if kind == "ablation-importance":
        return ablation_scatter(con, runs, split=split or "valid")
    raise MoeLensError(f"unknown figure {kind!r}; allowed: {', '.join(KINDS)}")


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("figure", help="export a standard chart (PNG/HTML) and print the numbers behind it")
    p.add_argument("kind", choices=KINDS, help="; ".join(f"{k}: from analysis.{a}" for k, a in FIGURE_KINDS.items()))
    p.add_argument("--runs-dir", default=None, help="runs directory (default: runs, else sample_runs)")
    p.add_argument("--runs", nargs="*", default=None, metavar="RUN", help="runs to include (default: all)")
    p.add_argument("--modes", nargs="*", default=None, help="only these modes, in this order")
    p.add_argument("--split", default=None, help="split (default: valid; train for collapse-curve)")
    p.add_argument("--attribute", default="pos_tag", choices=A.ATTRIBUTES)
    p.add_argument("--include-oov", action="store_true",
                   help="specialization/nmi: keep tokens outside the model's vocabulary (default: left out)")
    p.add_argument("--out", required=True, help="output file, .png or .html")
    p.set_defaults(func=_figure_command)


def _figure_command(args: argparse.Namespace) -> int:
    con = connect(args.runs_dir or default_runs_dir())
    fig, table = build(con, args.kind, args.runs, split=args.split, attribute=args.attribute, modes=args.modes,
                       include_oov=args.include_oov)
    with pd.option_context("display.width", 200, "display.max_rows", 200):
        print(table.round(4).to_string(index=False))
    print(f"wrote {save(fig, args.out)}")
    return 0
