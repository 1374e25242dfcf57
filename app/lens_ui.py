"""Shared plumbing of the app's pages: the runs directory, one cached DuckDB connection, cached analysis
calls, and charts shown with their downloads. Pages call these and `moe_lens.analysis`; they hold no SQL.

The runs directory comes from the sidebar, else `-- --runs-dir D` on the `streamlit run` line (what
`moe-lens app` passes), else the one rule of every command, `health.default_runs_dir`: $MOE_LENS_RUNS_DIR,
else `runs/` when it holds runs, else `sample_runs/`; the sidebar says which it opened and why. The
"Reload runs" button opens a new connection (a new run or a table that appeared later needs one,
docs/sql.md) and clears the cached results. Damaged files (moe_lens.health) are left out of the views and
listed in a banner on every page.
"""
from __future__ import annotations

import argparse
import hashlib
import sys
import threading
from pathlib import Path
from typing import Any

import duckdb
import pandas as pd
import plotly.graph_objects as go
import streamlit as st

from moe_lens import analysis, health, store, summarize_cli, summary
from moe_lens.errors import MoeLensError
from moe_lens.literature_figures import error_bars

HOW_TO_MAKE_RUNS = """To make runs:

```bash
moe-lens train --dataset wikitext2 --mode noisy_topk --record --epochs 1      # a real run under ./runs
python -c "from moe_lens.synthetic import write_synthetic_run as w; w('sample_runs', 'demo', with_hidden=True)"
```
then type the directory in the sidebar, or start the app with `moe-lens app --runs-dir DIR`."""


def launch_runs_dir() -> tuple[str, str]:
    """(directory, why): `--runs-dir` after `--` on the streamlit line, else `health.why_runs_dir()`."""
    if "--runs-dir" in sys.argv:
        parser = argparse.ArgumentParser(add_help=False)
        parser.add_argument("--runs-dir")
        return parser.parse_known_args(sys.argv[1:])[0].runs_dir, "--runs-dir"
    return health.why_runs_dir()


def default_runs_dir() -> str:
    return launch_runs_dir()[0]


def runs_dir() -> str:
    return str(Path(st.session_state.get("runs_dir") or default_runs_dir()).expanduser())


def _generation() -> int:
    return st.session_state.get("generation", 0)


def sidebar() -> None:
    """Runs directory, MoE layer, reload. Widget values live in session_state (shared by every page)."""
    launched, why = launch_runs_dir()
    if "runs_dir" not in st.session_state:
        st.session_state["runs_dir"] = launched
    st.sidebar.text_input("Runs directory", key="runs_dir", help="a directory of run directories")
    if st.session_state["runs_dir"] != launched:
        why = "typed above"
    st.sidebar.caption(f"Opened `{Path(runs_dir()).resolve()}` ({why}).")
    layers = recorded_layers()
    if st.session_state.get("layer") not in layers:  # a runs directory without that layer: its first one
        st.session_state["layer"] = layers[0]
    st.sidebar.selectbox("MoE layer", layers, key="layer", help="the MoE layers recorded in this runs directory")
    if st.sidebar.button("Reload runs", help="new runs, new part files: reopen the connection"):
        st.session_state["generation"] = _generation() + 1
        st.cache_data.clear()


def require_runs() -> None:
    """st.error + st.stop on a missing or empty runs directory."""
    d = Path(runs_dir())
    if not d.is_dir():
        st.error(f"Runs directory `{d}` does not exist.")
        st.markdown(HOW_TO_MAKE_RUNS)
        st.stop()
    if not store.run_dirs(d.resolve()):
        st.error(f"No runs in `{d}`: expected `<run>/config.json` or `<run>/routing/` directories.")
        st.markdown(HOW_TO_MAKE_RUNS)
        st.stop()
    try:
        connection()
    except (MoeLensError, duckdb.Error, OSError) as e:
        st.error(f"Cannot open the runs in `{d}`: {str(e).splitlines()[0]}")
        st.stop()


def damage_banner() -> None:
    """A warning on every page while any file of the directory is damaged; the pages work on the rest."""
    table = runs_table()
    if table is None or "problems" not in table:
        return
    hurt = table[table["problems"].notna()]
    if hurt.empty:
        return
    lines = [f"- `{r}`: " + "; ".join(f"`{p}`" for p in ps.split("; ")) for r, ps in zip(hurt["run"], hurt["problems"])]
    st.warning(f"Damaged files in {len(hurt)} run(s), left out of every page:\n\n" + "\n".join(lines)
               + f"\n\n`moe-lens check {runs_dir()} --fix` moves them to `<run>/quarantine/`.")


@st.cache_resource(max_entries=4, show_spinner=False)
def _connect(root: str, generation: int, sandbox: bool) -> tuple[duckdb.DuckDBPyConnection, threading.Lock]:
    # One connection per directory, shared by sessions; a DuckDB connection is not for concurrent use: lock it.
    if sandbox:  # the console's `routing_counts` view reads the runs' summaries: write the missing ones first
        con, lock = _connect(root, generation, False)
        with lock:
            summary.build(con, [r for (r,) in con.execute("SELECT run FROM runs").fetchall()])
    return store.connect(root, read_only_sandbox=sandbox, threads=2), threading.Lock()


def connection(sandbox: bool = False) -> tuple[duckdb.DuckDBPyConnection, threading.Lock]:
    return _connect(runs_dir(), _generation(), sandbox)


@st.cache_data(max_entries=512, show_spinner=False)
def _call(root: str, generation: int, name: str, runs: tuple[str, ...] | None, kw: tuple,
          stored: bool = False) -> pd.DataFrame:
    con, lock = _connect(root, generation, False)
    with lock:
        if name == "runs_table":
            return con.table("runs").df()
        if stored and runs is not None:  # the stored table when current (moe_lens.summary.stored_frame)
            return summarize_cli.stored_analysis(con, name, list(runs), **{k: v for k, v in kw if k != "trace"})
        if name == "bootstrap":  # analysis.bootstrap(fn, con, runs, ...): the analysis named by `fn`
            kw = dict(kw)
            kw.pop("trace", None)  # the traces' fingerprint: part of the cache key only (bootstrap() below)
            return analysis.bootstrap(kw.pop("fn"), con, list(runs) if runs is not None else None, **kw)
        if name == "hidden_keys":
            from moe_lens import projection
            return projection.hidden_keys(con, runs[0])
        return getattr(analysis, name)(con, list(runs) if runs is not None else None, **dict(kw))


def get(name: str, runs: list[str] | str | None = None, *, stored: bool = False, **kw: Any) -> pd.DataFrame | None:
    """`moe_lens.analysis.<name>(con, runs, **kw)` cached; a MoeLensError shows as a warning and gives None.
    `stored`: read from (or write) the runs' stored table (summarize_cli.stored_analysis; the Literature page)."""
    runs_t = (runs,) if isinstance(runs, str) else (tuple(runs) if runs is not None else None)
    try:
        return _call(runs_dir(), _generation(), name, runs_t, tuple(sorted(kw.items())), stored)
    except MoeLensError as e:
        st.warning(str(e))
        return None


BOOTSTRAP_N = summarize_cli.PAGE_BOOTSTRAP_N  # replicates of the pages' intervals (the Literature page picks its own)
FEW_RUNS = summarize_cli.FEW_RUNS  # the pages' interval checkboxes default on up to this many runs (seconds per run)
TRACE_TABLES = ("routing", "tokens", "ablation")  # what a bootstrap reads: its fingerprint covers these


def trace_fingerprint(runs: list[str] | str | None) -> str:
    """Hash of the part files (relative path, size, mtime in ns) of `runs`' routing, tokens and ablation tables:
    a cached bootstrap is recomputed when a run's traces change, without the "Reload runs" button."""
    root = Path(runs_dir()).resolve()
    names = [runs] if isinstance(runs, str) else (runs if runs is not None else [d.name for d in store.run_dirs(root)])
    h = hashlib.sha256()
    for run in sorted(names):
        for table in TRACE_TABLES:
            for f in sorted((root / run / table).rglob("part-*.parquet")):
                s = f.stat()
                h.update(f"{f.relative_to(root)}\0{s.st_size}\0{s.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def bootstrap(fn: str, runs: list[str] | str | None, *, by: str = "document", n: int = BOOTSTRAP_N,
              stored: bool = False, **kw: Any) -> pd.DataFrame | None:
    """`analysis.bootstrap(fn, con, runs, by=, n=, **kw)` (fn's table with `<metric>_lo/_hi`, 95%), cached by
    st.cache_data on the runs directory, the runs, the options and the fingerprint of the runs' traces; `stored`
    as in get()."""
    return get("bootstrap", runs, stored=stored, fn=fn, by=by, n=n, trace=trace_fingerprint(runs), **kw)


def intervals_toggle(n_runs: int, key: str) -> bool:
    """The pages' "confidence intervals" checkbox: on by default for at most FEW_RUNS runs."""
    return st.checkbox(f"Confidence intervals (bootstrap n={BOOTSTRAP_N})", value=n_runs <= FEW_RUNS, key=key,
                       help=f"95% percentile intervals over {BOOTSTRAP_N} resamples of the documents "
                            f"(analysis.bootstrap, seed 0); on by default for up to {FEW_RUNS} runs, since each run "
                            "adds a second or so the first time (then cached)")  # fmt: skip


def interval_bars(df: pd.DataFrame, metrics: list[tuple[str, str]], title: str, key: str, x: str = "run",
                  yaxis: str = "share") -> None:
    """Grouped bars of each (metric, label) with its `_lo`/`_hi` interval as error bars when `df` has one;
    chance columns hatched."""
    fig = go.Figure()
    for m, label in metrics:
        fig.add_bar(name=label, x=df[x].astype(str), y=df[m], error_y=error_bars(df, m),
                    marker_pattern_shape="/" if "chance" in m else None)
    fig.update_layout(barmode="group", title=title, yaxis_title=yaxis, legend_title="")
    show(fig, key)


def runs_table() -> pd.DataFrame:
    """The `runs` view (config + status, one row per run)."""
    return get("runs_table")


def metric_curves(runs: list[str], names: list[str] | None = None) -> pd.DataFrame:
    """Scalar metric curves of `runs` (`analysis.metric_curves`): run, split, name, step, epoch, value."""
    m = get("metric_curves", runs, names=tuple(names) if names is not None else None)
    return m if m is not None else pd.DataFrame(columns=["run", "split", "name", "step", "epoch", "value"])


STORY_RUNS = summarize_cli.STORY_RUNS  # the README's story: the opening screens' runs


def pick_runs(label: str = "Runs", key: str = "runs", limit: int | None = 4,
              prefer: tuple[str, ...] = ()) -> list[str]:
    """A run multiselect; by default `prefer` when all are present, else the first `limit` runs of the first
    dataset (one task's variants side by side; summarize_cli.default_runs, which `moe-lens summarize` uses too)."""
    table = runs_table()
    chosen = st.multiselect(label, table["run"].tolist(), default=summarize_cli.default_runs(table, limit, prefer), key=key)
    if not chosen:
        st.info("Choose at least one run.")
        st.stop()
    return chosen


def first_routed(names: list[str]) -> int:
    """Index of the first run in `names` with more than one expert (a dense run has nothing to show), else 0."""
    table = runs_table().set_index("run")
    for i, name in enumerate(names):
        e = table["num_experts"].get(name) if "num_experts" in table else None
        if e is not None and pd.notna(e) and e > 1:
            return i
    return 0


def recorded_layers(run: str | None = None) -> list[int]:
    """The MoE layers recorded in the runs directory (or in `run`), ascending; [0] when none is."""
    if not Path(runs_dir()).is_dir() or not store.run_dirs(Path(runs_dir()).resolve()):
        return [0]
    try:
        df = _call(runs_dir(), _generation(), "recorded_layers", (run,) if run else None, ())
    except (MoeLensError, duckdb.Error, OSError):
        return [0]
    layers = sorted(int(x) for x in df["layer"].unique())
    return layers or [0]


def layer() -> int:
    return int(st.session_state.get("layer", 0))


def show(fig: go.Figure, key: str) -> None:
    """The chart (its modebar saves a PNG) and a self-contained HTML download, built only when clicked."""
    # the title sits below the plotly toolbar (top right), which would otherwise cover it in narrow columns
    fig.update_layout(margin=dict(l=10, r=10, t=80, b=10), title=dict(yref="container", y=1, yanchor="top", pad=dict(t=34)))
    st.plotly_chart(fig, key=key, config={"toImageButtonOptions": {"format": "png", "filename": key, "scale": 2},
                                          "displaylogo": False})
    st.download_button("Download chart (HTML)", data=lambda: fig.to_html(include_plotlyjs=True, full_html=True),
                       file_name=f"{key}.html", mime="text/html", key=f"download-{key}", on_click="ignore")
