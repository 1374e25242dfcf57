"""Per-run routing summaries: small Parquet files of routing counts that the balance analyses read instead of
scanning the trace (`moe-lens summarize`, moe_lens/summarize_cli.py, writes them ahead of time).

A run's summary is `sql/routing_counts.sql` over all its routing rows: one row per (run, dataset, split, epoch,
step, layer, expert, rank) with `n`, `gates`, `entropies`, `dropped`, `known_drop`, a few thousand rows where the
trace has hundreds of millions. `load_balance`, `collapse`, `router_confidence` and `capacity` aggregate exactly
these counts (their SQL reads a `counts` relation: this summary, or the same query over `routing`), so their
results are the same either way (sums of gates up to floating-point summation order).

Where and when:
- the file is `<cache>/summaries/<run>-<hash of the run's path>/routing_counts-<key>.parquet`, in the cache directory
  (`$MOE_LENS_CACHE`, else ~/.cache/moe-lens), never in the runs directory (which may be read-only or committed);
- `key` hashes the list of the run's routing part files with their sizes and mtimes (and the query's text): a new,
  rewritten or removed part file gives a new key, so a stale summary is never read; the old file is deleted;
- it is built on first use (`counts_source`, called by the analyses: the first open of an existing run pays one
  scan), or ahead of time by `moe-lens summarize` (after training, or for existing runs);
- runs still `running`, runs with damaged files (`runs.problems`) and the app's read-only sandbox connection are
  not summarised: the analyses scan their traces as before. `MOE_LENS_SUMMARIES=0` turns summaries off.

Stored results (`cached_result`): the per-token analyses of one run (`routing_paths`, `layer_transitions`,
`coactivation`: joins over token occurrences, seconds at 10^8 rows, which no count table answers) keep the result of
their SQL for the parameters asked, in the same directory: `result-<name>-<key>-<params>.parquet`, where `key` hashes
every Parquet file of the run (routing, tokens, ...; path, size, mtime) and the SQL text, and `params` the query's
parameter values. The stored table is exactly the query's result, rows in its order; a changed trace gives a new key
(the old results of that analysis are deleted), so a stale result is never read. Same rules as the summaries:
one run at a time, not for running or damaged runs, not on the sandbox, off with `MOE_LENS_SUMMARIES=0` (or
`MOE_LENS_STORED_RESULTS=0` for the stored results alone: benchmarks/bench_sql.py times the queries so).
The app's layers page reads these (docs/sql.md, 'Summaries').

Stored calls (`stored_frame`): the same for an analysis computed in Python over several queries (the literature
analyses, their bootstrap intervals): the DataFrame `compute()` returns for one run or several, stored with its
dtypes and index (`call-<name>-<key>-<params>.parquet`; several runs share a `several-<hash>` directory), where `key`
hashes every Parquet file of every run and the moe_lens source (`code_version`: the package's .py and .sql files and
the numpy/pandas/pyarrow/duckdb versions), so a changed trace or changed analysis code is computed again. Same rules
(every run finished and undamaged, not on the sandbox, `MOE_LENS_SUMMARIES=0`, `MOE_LENS_STORED_RESULTS=0`).
The app's Literature page reads these, `moe-lens summarize` writes its defaults (moe_lens/summarize_cli.py).
"""
from __future__ import annotations

import hashlib
import json
import os
import warnings
from collections.abc import Callable
from functools import cache
from importlib import resources
from pathlib import Path

import duckdb
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

from moe_lens.atomic import write_table_atomic
from moe_lens.data.paths import resolve_cache_dir

VIEW = "routing_summary"  # the view over the summary files of the runs asked for so far on a connection
ROOT_VARIABLE = "moe_lens_runs_dir"  # set by store.connect when summaries may be used on the connection


def enabled() -> bool:
    return os.environ.get("MOE_LENS_SUMMARIES", "1") != "0"


def counts_sql() -> str:
    return resources.files("moe_lens").joinpath("sql", "routing_counts.sql").read_text()


def fingerprint(run_dir: Path) -> str:
    """Hash of the run's routing part files (relative path, size, mtime in ns) and of routing_counts.sql."""
    h = hashlib.sha256(counts_sql().encode())
    for f in sorted((run_dir / "routing").rglob("part-*.parquet")):
        st = f.stat()
        h.update(f"{f.relative_to(run_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


def summary_dir(run_dir: Path) -> Path:
    tag = hashlib.sha256(str(run_dir.resolve()).encode()).hexdigest()[:12]
    return resolve_cache_dir("summaries") / f"{run_dir.name}-{tag}"


def summary_path(run_dir: Path) -> Path:
    """Where the summary of the run's current part files is (or would be) written."""
    return summary_dir(run_dir) / f"routing_counts-{fingerprint(run_dir)}.parquet"


def build(con: duckdb.DuckDBPyConnection, runs: list[str]) -> dict[str, Path]:
    """The current summary file of each of `runs` that may be summarised, written where missing (one scan each)."""
    root = _root(con)
    if root is None or not runs:
        return {}
    ok = con.execute("SELECT run FROM runs WHERE list_contains($runs, run) AND status <> 'running' "
                     "AND problems IS NULL", {"runs": list(runs)}).fetchall()
    out = {}
    for (run,) in ok:
        run_dir = root / run
        path = summary_path(run_dir)
        if not path.exists():
            table = con.sql(counts_sql(), params={"runs": [run], "split": None}).to_arrow_table()
            if summary_path(run_dir) != path:  # a part file came or went during the scan: next call rebuilds
                continue
            write_table_atomic(table, path)
            for old in path.parent.glob("routing_counts-*.parquet"):
                if old != path:
                    old.unlink(missing_ok=True)
        out[run] = path
    return out


def counts_source(con: duckdb.DuckDBPyConnection, runs: list[str]) -> str | None:
    """'SELECT * FROM routing_summary' when every run of `runs` has a current summary (built here when missing),
    with the view pointed at their files; None otherwise (the caller scans the trace with routing_counts.sql)."""
    if _root(con) is None:
        return None
    files = build(con, runs)
    if set(files) != set(runs) or not files:
        return None
    paths = ", ".join("'" + str(p).replace("'", "''") + "'" for p in files.values())
    con.execute(f"CREATE OR REPLACE TEMP VIEW {VIEW} AS SELECT * FROM read_parquet([{paths}])")  # our own paths
    return f"SELECT * FROM {VIEW}"


def run_fingerprint(run_dir: Path, sql: str) -> str:
    """Hash of every Parquet file of the run (relative path, size, mtime in ns) and of `sql`."""
    h = hashlib.sha256(sql.encode())
    for f in sorted(run_dir.rglob("*.parquet")):
        if "quarantine" in f.relative_to(run_dir).parts:
            continue
        st = f.stat()
        h.update(f"{f.relative_to(run_dir)}\0{st.st_size}\0{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:24]


ROW = "_moe_lens_row"  # the stored result's row order


def cached_result(con: duckdb.DuckDBPyConnection, runs: list[str], name: str, sql: str,
                  params: dict) -> pd.DataFrame | None:
    """`con.execute(sql, params).df()` for one run, from its stored result when current, else run once and stored;
    None where results are not stored (several runs, a running or damaged run, the sandbox, summaries off): the
    caller runs the query itself. duckdb.Error propagates as from the query."""
    root = _storable(con, runs)
    if root is None or len(runs) != 1:
        return None
    run_dir = root / runs[0]
    key = run_fingerprint(run_dir, sql)
    tag = hashlib.sha256(json.dumps(params, sort_keys=True, default=str).encode()).hexdigest()[:16]
    path = summary_dir(run_dir) / f"result-{name}-{key}-{tag}.parquet"
    if not path.exists():
        with warnings.catch_warnings():  # "an extra copy": of a small result table
            warnings.simplefilter("ignore", UserWarning)
            table = con.execute(sql, params).to_arrow_table()
        table = table.append_column(ROW, pa.array(range(table.num_rows), pa.int64()))
        if run_fingerprint(run_dir, sql) != key:  # a part file came or went during the query: do not store
            return con.execute(sql, params).df()
        write_table_atomic(table, path)
        for old in path.parent.glob(f"result-{name}-*.parquet"):
            if not old.name.startswith(f"result-{name}-{key}-"):
                old.unlink(missing_ok=True)
    return con.execute(f"SELECT * EXCLUDE ({ROW}) FROM read_parquet($p) ORDER BY {ROW}", {"p": str(path)}).df()


def _storable(con: duckdb.DuckDBPyConnection, runs: list[str] | None) -> Path | None:
    """The runs directory when results of `runs` may be stored: every run finished and undamaged, stored results on."""
    root = _root(con)
    if root is None or not runs or os.environ.get("MOE_LENS_STORED_RESULTS", "1") == "0":
        return None
    ok = con.execute("SELECT count(DISTINCT run) FROM runs WHERE list_contains($runs, run) AND status <> 'running' "
                     "AND problems IS NULL", {"runs": list(runs)}).fetchone()[0]
    return root if ok == len(set(runs)) else None


@cache
def code_version() -> str:
    """Hash of the moe_lens package's .py and .sql files and of the libraries that compute the analyses' numbers."""
    import numpy
    h = hashlib.sha256(f"{numpy.__version__} {pd.__version__} {pa.__version__} {duckdb.__version__}".encode())
    package = Path(__file__).parent
    for f in sorted([*package.rglob("*.py"), *package.rglob("*.sql")]):
        h.update(f"{f.relative_to(package)}\0".encode() + f.read_bytes())
    return h.hexdigest()[:24]


def _calls_key(dirs: list[Path], name: str) -> str:
    """Hash of the code and of every Parquet file of the runs in `dirs`."""
    text = code_version() + "".join(run_fingerprint(d, name) for d in dirs)
    return hashlib.sha256(text.encode()).hexdigest()[:24]


def stored_frame(con: duckdb.DuckDBPyConnection, runs: list[str] | None, name: str, params: dict,
                 compute: Callable[[], pd.DataFrame]) -> pd.DataFrame:
    """`compute()`, an analysis's table of `runs` called with `params`, from its stored copy when current, else
    computed and stored (dtypes and index kept: the same frame). Computed and not stored where results are not
    stored (a running or damaged run, the sandbox, summaries off); exceptions of `compute` propagate."""
    root = _storable(con, runs)
    if root is None:
        return compute()
    dirs = [root / r for r in runs]
    key = _calls_key(dirs, name)
    tag = hashlib.sha256(json.dumps([list(runs), params], sort_keys=True, default=str).encode()).hexdigest()[:16]
    if len(dirs) == 1:
        folder = summary_dir(dirs[0])
    else:
        where = "\0".join(sorted(str(d.resolve()) for d in set(dirs)))
        folder = resolve_cache_dir("summaries") / f"several-{hashlib.sha256(where.encode()).hexdigest()[:16]}"
    path = folder / f"call-{name}-{key}-{tag}.parquet"
    if path.exists():
        return pq.read_table(path).to_pandas()
    df = compute()
    if _calls_key(dirs, name) != key:  # a part file came or went meanwhile: do not store
        return df
    try:
        table = pa.Table.from_pandas(df)
    except (pa.ArrowException, TypeError, ValueError):  # a column Arrow cannot hold exactly: not stored
        return df
    write_table_atomic(table, path)
    for old in path.parent.glob(f"call-{name}-*.parquet"):
        if not old.name.startswith(f"call-{name}-{key}-"):
            old.unlink(missing_ok=True)
    return df


def _root(con: duckdb.DuckDBPyConnection) -> Path | None:
    if not enabled():
        return None
    try:
        value = con.execute(f"SELECT getvariable('{ROOT_VARIABLE}')").fetchone()[0]
    except duckdb.Error:  # a locked sandbox connection, or no variables
        return None
    return Path(value) if value else None
