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
