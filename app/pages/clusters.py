"""Clusters: the recorded hidden states in 2-D (UMAP after PCA, or PCA alone), coloured by top-1 expert,
POS, frequency band or gate. Computed once per run/dataset/split/epoch/layer and cached as Parquet in the run
directory (`moe_lens.projection`). UMAP runs in a background thread (numba compiles for ~45 s in a fresh
process): this page shows the PCA view and the progress meanwhile, and the other pages stay usable."""
from __future__ import annotations

import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import plotly.express as px
import streamlit as st

import lens_ui as ui
from moe_lens import projection


@st.cache_resource
def _jobs() -> tuple[ThreadPoolExecutor, dict[str, tuple[Future, float]]]:
    return ThreadPoolExecutor(max_workers=1, thread_name_prefix="umap"), {}


def _umap_job(x, labels, run_dir: Path, key: dict) -> None:
    projection.save(projection.compute(x, labels, "umap"), run_dir, **key, method="umap")


st.title("Clusters")
names = ui.runs_table()["run"].tolist()
c1, c2, c3, c4 = st.columns(4)
run = c1.selectbox("Run", names, index=ui.first_routed(names), key="clusters_run")
keys = ui.get("hidden_keys", run)
keys = keys[keys["layer"] == ui.layer()] if keys is not None else keys
if keys is None or keys.empty:
    st.info(f"Run `{run}` has no recorded hidden states for layer {ui.layer()} (the `hidden/` table).")
    st.stop()
labels = [f"{r.dataset} / {r.split} / epoch {r.epoch}" for r in keys.itertuples()]
default = next((i for i, r in enumerate(keys.itertuples()) if r.split == "valid"), 0)
choice = c2.selectbox("Sample", range(len(labels)), index=default, format_func=lambda i: labels[i], key="clusters_key")
method = c3.radio("Projection", ["UMAP", "PCA"], horizontal=True, key="clusters_method").lower()
colour = c4.selectbox("Colour by", ["expert", "pos_tag", "freq_band", "gate"], key="clusters_colour")
row = keys.iloc[choice]
key = dict(dataset=row["dataset"], split=row["split"], epoch=int(row["epoch"]), layer=int(row["layer"]))
run_dir = Path(ui.runs_dir()) / run

df = projection.cached(run_dir, **key, method=method)
shown = method
if df is None and method == "umap":
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
fig = px.scatter(plot, x="x", y="y", color=colour, hover_data=["token", "expert", "pos_tag", "freq_band", "gate"],
                 color_continuous_scale="Viridis",
                 category_orders={c: sorted(plot[c].dropna().unique(), key=lambda v: (len(str(v)), str(v)))
                                  for c in ("expert", "pos_tag", "freq_band")}, title=f"{run}: {shown.upper()} of {len(df)} hidden states, "
                 f"{key['dataset']}/{key['split']} epoch {key['epoch']} layer {key['layer']}, by {colour}")
fig.update_traces(marker=dict(size=4, opacity=0.7))
ui.show(fig, "clusters-scatter")

if shown != method:
    @st.fragment(run_every=3)
    def _poll() -> None:
        if projection.cached(run_dir, **key, method="umap") is not None:
            st.rerun()
    _poll()
