"""Load balance: each expert's share of the routing over steps (heatmap and lines) and CV^2 over time,
chosen runs side by side (`analysis.load_balance`, Shazeer et al. 2017); the loss when an expert is removed
(`analysis.ablation`, `ablation_by`), with 95% bootstrap intervals over documents (`analysis.bootstrap`; a checkbox,
on by default for a few runs)."""
from __future__ import annotations

import numpy as np
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
    ci = ui.intervals_toggle(len(runs), "balance_ablation_ci")
    # with intervals: the analyses' own tables from analysis.bootstrap (one call each), plus mean_delta_lo/_hi
    abl = ui.bootstrap("ablation", runs, split=split, stored=True) if ci else ui.get("ablation", runs, split=split)
    if abl is not None:
        imp = ui.get("ablation_importance", runs, split=split, summary=False)
        rho = ui.get("ablation_importance", runs, split=split)
        pos_kw = {"split": split, "attribute": "pos_tag"}
        pos = ui.bootstrap("ablation_by", runs, stored=True, **pos_kw) if ci else ui.get("ablation_by", runs, **pos_kw)
        title, bars_kw = "Mean delta loss per ablated expert", {}
        if "mean_delta_lo" in abl:  # the 95% interval over documents as error bars
            abl = abl.assign(ci_plus=abl["mean_delta_hi"] - abl["mean_delta"],
                             ci_minus=abl["mean_delta"] - abl["mean_delta_lo"])
            bars_kw = {"error_y": "ci_plus", "error_y_minus": "ci_minus",
                       "hover_data": ["mean_delta_lo", "mean_delta_hi"]}
            title += f" with 95% bootstrap intervals over documents (n={ui.BOOTSTRAP_N})"
        bars = px.bar(abl, x=abl["expert"].astype(str), y="mean_delta", color="run", barmode="group",
                      facet_col="layer", labels={"x": "ablated expert"}, title=title, **bars_kw)
        ui.show(bars, "balance-ablation")
        if imp is not None and rho is not None:
            ui.show(px.scatter(imp, x="load", y="mean_delta", color="run", symbol="layer", text="expert",
                               title="Causal importance vs observed load share"), "balance-ablation-load")
            st.dataframe(rho, hide_index=True)
        if pos is not None:
            z = pos.pivot_table(index="value", columns="expert", values="mean_delta", aggfunc="mean")
            heat = px.imshow(z, aspect="auto", color_continuous_scale="RdBu_r", color_continuous_midpoint=0.0,
                             title="Mean delta loss per POS tag (rows) and ablated expert")
            if "mean_delta_lo" in pos and len(pos.groupby(["run", "layer"])) == 1:  # one cell, one interval: hover it
                lo, hi = (pos.pivot_table(index="value", columns="expert", values=f"mean_delta_{side}").reindex_like(z)
                          for side in ("lo", "hi"))
                heat.update_traces(customdata=np.dstack([lo.to_numpy(), hi.to_numpy()]),
                                   hovertemplate="POS %{y}, expert %{x}<br>mean delta %{z:.3g}<br>"
                                                 "95% [%{customdata[0]:.3g}, %{customdata[1]:.3g}]<extra></extra>")
            ui.show(heat, "balance-ablation-pos")
            if "mean_delta_lo" in pos:  # the cells whose 95% interval excludes 0, the largest effects first
                sure = pos[(pos["mean_delta_lo"] > 0) | (pos["mean_delta_hi"] < 0)]
                sure = sure.reindex(sure["mean_delta"].abs().sort_values(ascending=False).index)
                st.caption(f"{len(sure)} of {len(pos)} (POS tag, expert) cells whose 95% bootstrap interval over "
                           f"documents (n={ui.BOOTSTRAP_N}) excludes 0, largest |mean delta| first")
                st.dataframe(sure[["run", "layer", "value", "expert", "n", "mean_delta", "mean_delta_lo",
                                   "mean_delta_hi", "units"]], hide_index=True, key="balance-ablation-pos-ci")
