"""Clusters: the recorded hidden states in 2-D (UMAP after PCA, or PCA alone), coloured by top-1 expert,
POS, frequency band or gate. Computed once per run/dataset/split/epoch/layer and cached as Parquet in the run
directory (`moe_lens.projection`). UMAP runs in a background thread (numba compiles for ~45 s in a fresh
process): this page shows the PCA view and the progress meanwhile, and the other pages stay usable."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import streamlit as st

import lens_ui as ui
from moe_lens import projection


ALL = "all datasets"


@st.cache_resource
def _jobs() -> tuple[ThreadPoolExecutor, dict[str, tuple[Future, float]]]:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="umap"), {}


def _umap_job(x, labels, run_dir: Path, key: dict) -> None:
    projection.save(projection.compute(x, labels, "umap"), run_dir, **key, method="umap")


st.title("Clusters")
names = ui.runs_table()["run"].tolist()
c1, c2, c3, c4 = st.columns(4)
OPEN = "wikitext2-importance"  # a balanced router: its experts' clusters are visible
run = c1.selectbox("Run", names, index=names.index(OPEN) if OPEN in names else ui.first_routed(names), key="clusters_run")
keys = ui.get("hidden_keys", run)
keys = keys[keys["layer"] == ui.layer()] if keys is not None else keys
if keys is None or keys.empty:
    st.info(f"Run `{run}` has no recorded hidden states for layer {ui.layer()} (the `hidden/` table).")
    st.stop()
# a run replayed over other datasets (`moe-lens record`) also gets one sample per split/epoch of all its datasets
multi = keys.groupby(["split", "epoch", "layer"], as_index=False)["dataset"].nunique()
multi = multi[multi["dataset"] > 1].assign(dataset=ALL)
keys = pd.concat([keys, multi[keys.columns]], ignore_index=True)
labels = [f"{r.dataset} / {r.split} / epoch {r.epoch}" for r in keys.itertuples()]
# the last valid epoch: the trained router
valid = [i for i, r in enumerate(keys.itertuples()) if r.split == "valid" and r.dataset != ALL]
default = max(valid, key=lambda i: int(keys.iloc[i]["epoch"])) if valid else 0
choice = c2.selectbox("Sample", range(len(labels)), index=default, format_func=lambda i: labels[i], key="clusters_key")
method = c3.radio("Projection", ["UMAP", "PCA"], horizontal=True, key="clusters_method").lower()
colour = c4.selectbox("Colour by", ["expert", "pos_tag", "dataset", "freq_band", "gate"], key="clusters_colour")
row = keys.iloc[choice]
key = dict(dataset=row["dataset"], split=row["split"], epoch=int(row["epoch"]), layer=int(row["layer"]))
run_dir = Path(ui.runs_dir()) / run

df = projection.cached(run_dir, **key, method=method) if key["dataset"] != ALL else None
shown = method
if key["dataset"] == ALL:  # one joint PCA over every dataset's sample (computed here: n x d is small)
    con, lock = ui.connection()
    parts = []
    with lock:
        for ds in sorted(set(keys["dataset"]) - {ALL}):
            x, lab = projection.hidden_sample(con, run, **{**key, "dataset": ds})
            parts.append((x, lab.assign(dataset=ds)))
    x = np.concatenate([p[0] for p in parts])
    df = projection.compute(x, pd.concat([p[1] for p in parts], ignore_index=True), "pca")
    shown = "pca"
    if method == "umap":
        st.info("The all-datasets sample is shown in PCA (one joint projection); pick one dataset for UMAP.")
elif df is None and method == "umap":
    executor, jobs = _jobs()
    job_id = str(projection.cache_path(run_dir, **key, method="umap"))
    if job_id not in jobs or (jobs[job_id][0].done() and jobs[job_id][0].exception() is None):
        con, lock = ui.connection()
        with lock:
            x, lab = projection.hidden_sample(con, run, **key)
        jobs[job_id] = (executor.submit(_umap_job, x, lab, run_dir, key), time.time())
    future, started = jobs[job_id]
    if future.done() and future.exception() is not None:
        st.error(f"UMAP failed: {future.exception()}; showing PCA.")
        jobs.pop(job_id)
    else:
        st.info(f"UMAP is computing in the background ({time.time() - started:.0f} s; the first one in a fresh "
                "process compiles for ~45 s). Showing PCA meanwhile; this page refreshes itself when UMAP is "
                "ready, and the other pages stay usable.")
        st.progress(min(0.95, (time.time() - started) / 60.0))
    shown = "pca"

if df is None:
    df = projection.cached(run_dir, **key, method="pca")
    if df is None:
        con, lock = ui.connection()
        with lock:
            x, lab = projection.hidden_sample(con, run, **key)
        df = projection.compute(x, lab, "pca")
        projection.save(df, run_dir, **key, method="pca")

plot = df.assign(expert=df["expert"].astype("Int64").astype(str).replace("<NA>", "none"))
if "dataset" not in plot:
    plot["dataset"] = key["dataset"]
# every recorded point, drawn with WebGL (scattergl); Dark24's 24 colours stay apart where Plotly's 10 repeat
fig = px.scatter(plot, x="x", y="y", color=colour, hover_data=["token", "expert", "pos_tag", "dataset", "gate"],
                 color_continuous_scale="Viridis", color_discrete_sequence=px.colors.qualitative.Dark24,
                 render_mode="webgl",
                 category_orders={c: sorted(plot[c].dropna().unique(), key=lambda v: (len(str(v)), str(v)))
                                  for c in ("expert", "pos_tag", "freq_band", "dataset")},
                 title=f"{run}: {shown.upper()} of {len(df):,} hidden states, {key['dataset']}/{key['split']} "
                 f"epoch {key['epoch']} layer {key['layer']}, by {colour}")  # fmt: skip
fig.update_traces(marker=dict(size=4, opacity=0.7))
ui.show(fig, "clusters-scatter")

if shown != method and key["dataset"] != ALL:
    @st.fragment(run_every=3)
    def _poll() -> None:
        if projection.cached(run_dir, **key, method="umap") is not None:
            st.rerun()
    _poll()
