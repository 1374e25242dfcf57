"""Runs: one row per run (config, status, final metrics) and the training curves overlaid."""
from __future__ import annotations

import plotly.express as px
import streamlit as st

import lens_ui as ui

st.title("Runs")
table = ui.runs_table()
cols = [c for c in ("run", "dataset", "mode", "num_experts", "top_k", "num_params", "status", "epoch", "step")
        if c in table.columns]
TASK = ("valid ppl", "valid f1", "valid em", "valid accuracy", "valid loss", "train loss")  # shown first
fm = ui.get("final_metrics")
if fm is not None and not fm.empty:
    wide = fm.assign(col=fm["split"] + " " + fm["name"]).pivot(index="run", columns="col", values="value")
    task = [c for c in TASK if c in wide.columns]
    probe = [c for c in wide.columns if c.startswith("probe:")]  # replays over other data: mostly empty, last
    rest = [c for c in wide.columns if c not in task and c not in probe]
    table = table[cols[:3]].merge(wide[task].reset_index(), on="run", how="left").merge(
        table[["run", *cols[3:]]], on="run").merge(wide[rest + probe].reset_index(), on="run", how="left")
else:
    table = table[cols]
st.dataframe(table, hide_index=True, key="runs_table")
bad = table[~table["status"].isin(["finished", "running"])]
for _, r in bad.iterrows():
    st.warning(f"Run `{r['run']}` has status `{r['status']}` (a half-written, failed or interrupted run): "
               "its traces may be partial.")

st.subheader("Training curves")
runs = ui.pick_runs(key="runs_curves", limit=None)
wanted = [("train", "loss", "task loss"), ("train", "aux_loss", "aux loss"), ("valid", "ppl", "perplexity"),
          ("valid", "f1", "F1"), ("valid", "em", "EM"), ("valid", "loss", "valid loss")]
curves = ui.metric_curves(runs, names=sorted({n for _, n, _ in wanted}))
if curves.empty:
    st.info("No scalar metrics recorded for these runs yet (metrics.parquet is written at the first log).")
    st.stop()
shown = [(s, n, t) for s, n, t in wanted if ((curves["split"] == s) & (curves["name"] == n)).any()]
grid = st.columns(2)
for i, (split, name, title) in enumerate(shown):
    df = curves[(curves["split"] == split) & (curves["name"] == name)].sort_values(["run", "step"])
    few = df.groupby("run")["step"].nunique().max() <= 30  # one-point curves draw nothing without markers
    fig = px.line(df, x="step", y="value", color="run", markers=bool(split != "train" or few), title=f"{title} ({split})")
    with grid[i % 2]:
        ui.show(fig, f"curve-{split}-{name}")
