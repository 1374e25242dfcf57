"""`moe-lens summarize`: write each run's routing summary (moe_lens/summary.py), the stored per-token results the
app's layers page reads by default, the stored tables of the Literature page's default view (its analyses and
bootstrap intervals, `stored_analysis`) and the Collapse and Specialization pages' default intervals, ahead of time (after training, or for existing runs), so that no page pays
a scan of the trace on its first open. All are also written on first use; all are keyed by the runs' files."""
from __future__ import annotations

import argparse
from typing import Any

import duckdb
import pandas as pd

from moe_lens import analysis, summary
from moe_lens.errors import MoeLensError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("summarize", help="write the per-run routing summaries the analyses read",
                              description="Build (or refresh) each run's routing summary, the layers page's "
                                          "stored results and (without run names) the literature page's stored "
                                          "tables in the cache directory (docs/traces.md, 'Per-run summaries'); "
                                          "the analyses and the app also build them on first use.")
    p.add_argument("runs", nargs="*", help="run names (default: every run)")
    p.add_argument("--runs-dir", default=None, help="runs directory (default: as `moe-lens sql`)")
    p.set_defaults(func=_summarize_command)


def store_layers_results(con: duckdb.DuckDBPyConnection, run: str) -> int:
    """The per-token analyses the layers page calls by default (app/pages/layers.py: routing paths, the transitions
    from the first recorded layer to the second, co-activation at the first), for every split recorded, run once
    so their results are stored (summary.cached_result). Returns how many calls ran."""
    layers = analysis.recorded_layers(con, run)["layer"].tolist()
    counts = summary.counts_source(con, [run]) or "SELECT * FROM routing"  # the run's summary: no scan
    splits = [s for (s,) in con.execute(f"SELECT DISTINCT split FROM ({counts}) WHERE run = $run ORDER BY split",
                                        {"run": run}).fetchall()]
    calls = []
    for split in splits:
        calls.append(lambda split=split: analysis.routing_paths(con, run, split=split))
        if len(layers) > 1:
            calls.append(lambda split=split: analysis.layer_transitions(con, run, split=split, layer_a=layers[0],
                                                                        layer_b=layers[1]))
        if layers:
            calls.append(lambda split=split: analysis.coactivation(con, run, split=split, layer=layers[0]))
    done = 0
    for call in calls:
        try:
            call()
            done += 1
        except MoeLensError:  # nothing recorded for that split/epoch: the page shows the same message
            pass
    return done


# The README's story: a router that collapses beside one a balancing loss keeps balanced (the app's opening screens).
STORY_RUNS = ("wikitext2-naive_topk", "wikitext2-importance")
LITERATURE = {"split": "valid", "by": "document", "n": 200, "within": "document", "min_count": 20}  # page defaults
PAGE_BOOTSTRAP_N = 200  # replicates of the Collapse/Specialization/Load balance pages' intervals (app/lens_ui.py)
FEW_RUNS = 8  # those pages' interval checkboxes default on up to this many runs


def default_runs(table: pd.DataFrame, limit: int | None = 4, prefer: tuple[str, ...] = ()) -> list[str]:
    """The app's default run selection from the `runs` view: `prefer` when all are present, else the first `limit`
    runs of the first dataset (one task's variants side by side), else the first `limit` runs."""
    names = table["run"].tolist()
    datasets = table.get("dataset")
    if prefer and all(r in names for r in prefer):
        return list(prefer)
    if datasets is not None and datasets.notna().any():
        first = datasets.dropna().iloc[0]
        return [r for r, d in zip(names, datasets) if d == first][:limit]
    return names[:limit]


def stored_analysis(con: duckdb.DuckDBPyConnection, name: str, runs: list[str], **kw: Any) -> pd.DataFrame:
    """`analysis.<name>(con, runs, **kw)`, for name 'bootstrap' `analysis.bootstrap(kw["fn"], con, runs, ...)`, from
    its stored table when current (summary.stored_frame: exactly the frame the call returns, keyed by the runs'
    files and the code), else computed (and stored where the runs allow it)."""
    kw = dict(kw)
    if name == "bootstrap":
        fn = kw.pop("fn")
        return summary.stored_frame(con, runs, f"bootstrap.{fn}", kw, lambda: analysis.bootstrap(fn, con, runs, **kw))
    return summary.stored_frame(con, runs, name, kw, lambda: getattr(analysis, name)(con, runs, **kw))


def literature_calls(runs: list[str], layer: int, split: str = "valid", by: str = "document", n: int = 200,
                     within: str = "document", min_count: int = 20) -> list[tuple[str, list[str], dict]]:
    """(name, runs, options) of the stored calls app/pages/literature.py makes for these widget values."""
    boot = {"by": by, "n": n, "split": split, "layer": layer}
    return [("bootstrap", runs, {"fn": "consecutive", "within": within, **boot}),
            ("bootstrap", runs, {"fn": "saturation", **boot}),
            ("bootstrap", runs, {"fn": "vocabulary", "min_count": min_count, **boot}),
            ("vocabulary", runs[:1], {"split": split, "layer": layer, "min_count": min_count, "summary": False, "top": 5}),
            ("fluctuation", runs, {"split": split, "layer": layer}),
            ("bootstrap", runs, {"fn": "collapse", "fn_options": (("by", "epoch"),), **boot}),
            ("bootstrap", runs, {"fn": "specialization", "summary": True, **boot})]


def interval_calls(story: list[str], every: list[str], layer: int = 0) -> list[tuple[str, list[str], dict]]:
    """(name, runs, options) of the stored bootstrap calls the Collapse page (its default runs `story`, split train,
    by step, threshold 2) and the Specialization page (every run, pos_tag, split valid) make in their default view,
    for the pages whose interval checkbox is on by default (at most FEW_RUNS runs); `layer`: the app's layer
    picker's default, 0."""
    boot = {"by": "document", "n": PAGE_BOOTSTRAP_N, "layer": layer}
    calls = []
    if story and len(story) <= FEW_RUNS:
        calls.append(("bootstrap", story, {"fn": "collapse", "fn_options": (("by", "step"),), "split": "train",
                                           "threshold": 2.0, **boot}))
    if every and len(every) <= FEW_RUNS:
        calls.append(("bootstrap", every, {"fn": "specialization", "attribute": "pos_tag", "summary": True,
                                           "shuffled": False, "split": "valid", "include_oov": False, **boot}))
    return calls


def store_interval_results(con: duckdb.DuckDBPyConnection) -> int:
    """The Collapse and Specialization pages' default intervals (`interval_calls`), run once so their tables are
    stored (summary.stored_frame; the pages read them with `stored=True`). Returns how many calls ran."""
    table = con.table("runs").df()
    story, every = default_runs(table, None, STORY_RUNS), table["run"].tolist()
    if not every or summary.counts_source(con, every) is None:  # a running or damaged run: nothing is stored
        return 0
    done = 0
    for name, names, kw in interval_calls(story, every):
        try:
            stored_analysis(con, name, names, **kw)
            done += 1
        except MoeLensError:  # nothing recorded for that split/layer: the page shows the same message
            pass
    return done


def store_literature_results(con: duckdb.DuckDBPyConnection) -> int:
    """The Literature page's default view (its default runs, the first recorded layer, the default widgets) for the
    splits it offers that are recorded, run once so their tables are stored. Returns how many calls ran."""
    table = con.table("runs").df()
    runs = default_runs(table, None, STORY_RUNS)
    if not runs or summary.counts_source(con, runs) is None:  # a running or damaged run: nothing is stored
        return 0
    layer = int(analysis.recorded_layers(con, None)["layer"].min())
    counts = summary.counts_source(con, runs)
    recorded = {s for (s,) in con.execute(f"SELECT DISTINCT split FROM ({counts})").fetchall()}
    done = 0
    for split in [s for s in ("valid", "test") if s in recorded]:
        for name, names, kw in literature_calls(runs, layer, **{**LITERATURE, "split": split}):
            try:
                stored_analysis(con, name, names, **kw)
                done += 1
            except MoeLensError:  # nothing recorded for that split/layer: the page shows the same message
                pass
        try:
            analysis.coactivation(con, runs[0], split=split, layer=layer)  # stored per run (summary.cached_result)
            done += 1
        except MoeLensError:
            pass
    return done


def _summarize_command(args: argparse.Namespace) -> int:
    from moe_lens.store import connect, default_runs_dir
    con = connect(args.runs_dir or default_runs_dir())
    names = args.runs or [r[0] for r in con.execute("SELECT run FROM runs ORDER BY run").fetchall()]
    done = summary.build(con, names)
    for run in names:
        if run not in done:
            print(f"{run}: not summarised (running, damaged or no routing)")
            continue
        print(f"{run}: {done[run]} (+ {store_layers_results(con, run)} stored layers-page results)")
    if not args.runs:  # the page's default view spans runs: written when every run is summarised
        print(f"literature page: {store_literature_results(con)} stored results")
        print(f"collapse and specialization pages' intervals: {store_interval_results(con)} stored results")
    return 0
