"""Compare: the same chart for each chosen run, in a grid, and optionally one summary row per run
(`analysis.compare`: final metrics and every analysis at the run's last epoch)."""
from __future__ import annotations

import plotly.express as px
import streamlit as st

import lens_ui as ui

CHARTS = {
    "Effective experts over steps": ("collapse", dict(split="train", by="step"), "step", "effective_experts"),
    "CV² of load over steps": ("load_balance", dict(split="train", by="step"), "step", "cv2_load"),
    "Expert share over steps": ("load_balance", dict(split="train", by="step", per_expert=True), "step", "share"),
    "Expert x POS share": ("specialization", dict(attribute="pos_tag"), "value", "p_expert_given_value"),
    "Router confidence (top-1 gate) per epoch": ("router_confidence", dict(), "epoch", "top1_gate"),
    "Dropped tokens per epoch (train; eval never drops)": ("capacity", dict(split="train"), "epoch", "dropped_rate"),
}

st.title("Compare")
runs = ui.pick_runs(key="runs_compare", limit=4, prefer=ui.STORY_RUNS)
c1, c2 = st.columns([3, 1])
chart = c1.selectbox("Chart", list(CHARTS), key="compare_chart")
ncols = c2.number_input("Columns", min_value=1, max_value=4, value=2, key="compare_cols")
name, kw, x, y = CHARTS[chart]
df = ui.get(name, runs, layer=ui.layer(), **kw)
if df is not None:
    # one y-range per metric for every panel, so a steady run does not look as jumpy as an unstable one
    lo, hi = float(df[y].min()), float(df[y].max())
    pad = 0.05 * (hi - lo) or 0.5
    grid = st.columns(int(ncols))
    for i, run in enumerate(runs):
        d = df[df["run"] == run]
        with grid[i % int(ncols)]:
            if d.empty:
                st.info(f"`{run}`: nothing recorded for this chart.")
                continue
            if "expert" in d.columns:
                z = d.pivot_table(index="expert", columns=x, values=y, aggfunc="sum").fillna(0.0)
                fig = px.imshow(z, aspect="auto", origin="lower", color_continuous_scale="Viridis",
                                zmin=0, zmax=1, title=run, labels=dict(x=x, y="expert", color=y))
            else:
                fig = px.line(d.sort_values(x), x=x, y=y, markers=True, title=run, range_y=[lo - pad, hi + pad])
            ui.show(fig, f"compare-{i}")

if st.toggle("Summary table (all analyses at each run's last epoch)", key="compare_table"):
    table = ui.get("compare", runs, layer=ui.layer())
    if table is not None:
        st.dataframe(table, hide_index=True, key="compare_summary")
        st.download_button("Download CSV", data=table.to_csv(index=False), file_name="compare.csv",
                           mime="text/csv", key="compare_csv")
