"""Load balance: each expert's share of the routing over steps (heatmap and lines) and CV^2 over time,
chosen runs side by side (`analysis.load_balance`, Shazeer et al. 2017)."""
from __future__ import annotations

import plotly.express as px
import streamlit as st

import lens_ui as ui

st.title("Load balance")
runs = ui.pick_runs(key="runs_balance", limit=3, prefer=ui.STORY_RUNS)  # opens on a collapse beside a balance
c1, c2, c3 = st.columns(3)
split = c1.selectbox("Split", ["train", "valid", "test"], key="balance_split")
by = c2.radio("Over", ["step", "epoch"], horizontal=True, key="balance_by")
all_ranks = c3.toggle("All k ranks", value=True, key="balance_ranks", help="off: top-1 expert only")
kw = dict(split=split, by=by, layer=ui.layer(), all_ranks=all_ranks)

summary = ui.get("load_balance", runs, **kw)
if summary is None:
    st.stop()
fig = px.line(summary.sort_values(["run", by]), x=by, y="cv2_load", color="run", markers=True, log_y=False,
              title="CV² of expert load (0 = perfectly balanced)")
ui.show(fig, "balance-cv2")

per = ui.get("load_balance", runs, per_expert=True, **kw)
if per is None:
    st.stop()
grid = st.columns(min(len(runs), 3))
for i, run in enumerate(runs):
    df = per[per["run"] == run]
    if df.empty:
        grid[i % len(grid)].info(f"`{run}`: no routing rows in {split}.")
        continue
    z = df.pivot_table(index="expert", columns=by, values="share", aggfunc="sum").fillna(0.0)
    heat = px.imshow(z, aspect="auto", origin="lower", color_continuous_scale="Viridis",
                     labels=dict(x=by, y="expert", color="share"), title=f"{run}: expert share")
    lines = px.line(df.sort_values(by), x=by, y="share", color=df["expert"].astype(str), range_y=[0, 1],
                    markers=df[by].nunique() <= 30, labels={"color": "expert"}, title=f"{run}: expert share")
    with grid[i % len(grid)]:
        ui.show(heat, f"balance-heat-{run}")
        ui.show(lines, f"balance-lines-{run}")

st.subheader("Causal importance: the loss when an expert is removed")
st.caption("From `moe-lens ablate RUN` (needs the run's checkpoint): per-token delta-loss with each expert removed "
           "at the router; does the load say which experts matter?")
if st.toggle("Show the ablation of the chosen runs", value=False, key="balance_ablation"):
    abl = ui.get("ablation", runs, split=split)
    if abl is not None:
        imp = ui.get("ablation_importance", runs, split=split, summary=False)
        rho = ui.get("ablation_importance", runs, split=split)
        pos = ui.get("ablation_by", runs, split=split, attribute="pos_tag")
        bars = px.bar(abl, x=abl["expert"].astype(str), y="mean_delta", color="run", barmode="group",
                      facet_col="layer", labels={"x": "ablated expert"}, title="Mean delta loss per ablated expert")
        ui.show(bars, "balance-ablation")
        if imp is not None and rho is not None:
            ui.show(px.scatter(imp, x="load", y="mean_delta", color="run", symbol="layer", text="expert",
                               title="Causal importance vs observed load share"), "balance-ablation-load")
            st.dataframe(rho, hide_index=True)
        if pos is not None:
            z = pos.pivot_table(index="value", columns="expert", values="mean_delta", aggfunc="mean")
            ui.show(px.imshow(z, aspect="auto", color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0,
                              title="Mean delta loss per POS tag (rows) and ablated expert"), "balance-ablation-pos")
