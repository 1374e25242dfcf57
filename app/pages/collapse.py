"""Collapse: effective experts exp(H), dead experts and experts never chosen first over training, the collapse step marked, gating
variants compared (`analysis.collapse`; top-1 usage by default); exp(H) with its 95% bootstrap interval over documents
(`analysis.bootstrap`, stored per run set and trace (summary.stored_frame; `moe-lens summarize` writes the default
view's); a checkbox, on by default for a few runs)."""
from __future__ import annotations

import plotly.express as px
import streamlit as st

import lens_ui as ui

st.title("Collapse")
runs = ui.pick_runs(key="runs_collapse", limit=None, prefer=ui.STORY_RUNS)  # a collapse beside a balance
c1, c2 = st.columns(2)
split = c1.selectbox("Split", ["train", "valid", "test"], key="collapse_split")
threshold = c2.number_input("Collapsed below exp(H) =", min_value=1.0, value=2.0, step=0.5, key="collapse_threshold")
by = "step" if split == "train" else "epoch"
ci = ui.intervals_toggle(len(runs), "collapse_ci")
args = dict(split=split, layer=ui.layer(), threshold=float(threshold))
# with intervals: collapse's own table from the bootstrap (one call), plus effective_experts_lo/_hi
# (stored per run set: `moe-lens summarize` writes the default view's, summarize_cli.interval_calls)
df = (ui.bootstrap("collapse", runs, fn_options=(("by", by),), stored=True, **args) if ci
      else ui.get("collapse", runs, by=by, **args))
if df is None:
    st.stop()
modes = ui.runs_table().set_index("run")["mode"]
df = df.assign(mode=df["run"].map(modes)).sort_values(["run", by])
steps = df.groupby("run", as_index=False)[["mode", "collapse_step"]].first()
st.dataframe(steps, hide_index=True, key="collapse_steps")

for col, title in (("effective_experts", "Effective experts exp(H)"),
                   ("dead_experts", "Dead experts (under 1/(10e) of all k assignments)"),
                   ("never_top1", "Experts never chosen first (no rank-0 assignment)")):
    few = df.groupby("run")[by].nunique().max() <= 30  # short or one-point curves need markers to show at all
    bars = {}
    if col == "effective_experts" and f"{col}_lo" in df:  # the 95% interval over documents as error bars
        df = df.assign(ci_plus=df[f"{col}_hi"] - df[col], ci_minus=df[col] - df[f"{col}_lo"])
        bars = dict(error_y="ci_plus", error_y_minus="ci_minus")
        title += f" with 95% bootstrap intervals over documents (n={ui.BOOTSTRAP_N})"
    fig = px.line(df, x=by, y=col, color="run", hover_data=["mode"], title=title, markers=bool(few), **bars)
    for _, r in steps.dropna(subset=["collapse_step"]).iterrows() if by == "step" else []:
        fig.add_vline(x=float(r["collapse_step"]), line_dash="dash", annotation_text=f"collapse {r['run']}")
    if col == "effective_experts":
        fig.add_hline(y=float(threshold), line_dash="dot", line_color="grey")
    ui.show(fig, f"collapse-{col}")
