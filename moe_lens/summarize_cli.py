"""`moe-lens summarize`: write each run's routing summary (moe_lens/summary.py) and the stored per-token results the
app's layers page reads by default, ahead of time (after training, or for existing runs), so that no page pays a
scan of the trace on its first open. Both are also written on first use; both are keyed by the run's files."""
from __future__ import annotations

import argparse

import duckdb

from moe_lens import analysis, summary
from moe_lens.errors import MoeLensError


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("summarize", help="write the per-run routing summaries the analyses read",
                              description="Build (or refresh) each run's routing summary and the layers page's "
                                          "stored results in the cache directory (docs/sql.md, 'Summaries'); the "
                                          "analyses also build them on first use.")
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
    return 0
