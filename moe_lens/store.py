"""DuckDB views over a runs directory (the layout of docs/traces.md), and `moe-lens sql`.

`connect(runs_dir)` returns an in-memory DuckDB connection with seven views (and `routing_subwords`, below):

    runs     one row per run: run.json (status, step, epoch, timings) + config.json (RunConfig fields)
    tokens   runs/*/tokens/dataset=D/split=S/part-*.parquet
    routing  runs/*/routing/dataset=D/split=S/epoch=E/part-*.parquet
    probs    runs/*/probs/...    (empty, with its columns, when no run recorded probabilities)
    hidden   runs/*/hidden/...
    metrics  runs/*/metrics.parquet
    ablation runs/*/ablation/dataset=D/split=S/part-*.parquet   (`moe-lens ablate`; empty when none ran)

Runs captured from Hugging Face models (moe_lens/capture, docs/capture.md) store routing per subword; their
`routing`/`probs` rows read as the first subword of each word with token_idx = the word's token_idx (so every
analysis joins `tokens` unchanged), and `routing_subwords` has every subword row (token_idx = subword position,
word_idx the word's).

A torchrun run's trace tables have one more partition level, `.../ddp_rank=R/part-*.parquet` (docs/distributed.md);
the four trace views expose it as `ddp_rank`, NULL for single-process runs.

Every view has a `run` column, the run directory name. It is taken from DuckDB's `filename`
column with `regexp_extract(filename, '([^/]+)/<table>/', 1)`; the expression reads only the
per-file constant, so `WHERE run = ?` prunes whole files before any is opened (like a hive key).
Parquet files are read with `hive_partitioning` (dataset, split, epoch from the path) and
`union_by_name`, and every column of the contract is present in each view: a column that no file has
yet (`ner_tag` in a WikiText-only directory, `router_probs` with no `--record-probs`) is a typed NULL.

Which tables exist is decided when `connect` runs; new part files of an existing table appear at
query time, a table that appears later (or a new run's `runs` row) needs a new connection.

A damaged directory still opens (`moe_lens.health`): `connect` reads every part file's footer (cached per
path, size and mtime), leaves each damaged file out with one warning line on stderr naming it, and the
`runs` view's `problems` column lists them per run, with any invalid run.json/config.json (file and line).
A table with a damaged file is read from the explicit list of its good files, so its new part files
appear only after a new connection; a healthy table keeps its glob.
"""
from __future__ import annotations

import argparse
import json
import sys
from dataclasses import fields
from pathlib import Path
from typing import Any

import duckdb
import pyarrow as pa
import pyarrow.dataset as pads

from moe_lens import health, summary
from moe_lens.config import RunConfig
from moe_lens.data.paths import resolve_cache_dir
from moe_lens.errors import MoeLensError

MEMORY_LIMIT = "4GB"  # DuckDB's memory_limit on every connection (issue 25: analyses spill rather than fail)
_PARTS = {"dataset": "VARCHAR", "split": "VARCHAR", "epoch": "INTEGER"}
_DDP = {"ddp_rank": "INTEGER"}  # the torchrun rank that recorded the row (NULL: a single-process run)
_KEYS = {"step": "BIGINT", "token_idx": "BIGINT", "layer": "SMALLINT"}
SCHEMAS: dict[str, dict[str, str]] = {
    "tokens": {"dataset": "VARCHAR", "split": "VARCHAR", "token_idx": "BIGINT", "token_id": "INTEGER",
               "token": "VARCHAR", "pos_tag": "VARCHAR", "freq_rank": "INTEGER", "freq_band": "VARCHAR",
               "doc_id": "INTEGER", "sent_id": "INTEGER", "position": "INTEGER", "ner_tag": "VARCHAR",
               "segment": "VARCHAR", "in_answer": "BOOLEAN", "in_vocab": "BOOLEAN", **_DDP},
    "routing": {**_PARTS, **_KEYS, "rank": "TINYINT", "expert": "SMALLINT", "gate": "FLOAT",
                "entropy": "FLOAT", "dropped": "BOOLEAN", **_DDP},
    "probs": {**_PARTS, **_KEYS, "router_probs": "FLOAT[]", **_DDP},
    "hidden": {**_PARTS, **_KEYS, "hidden": "FLOAT[]", **_DDP},
    "metrics": {"step": "BIGINT", "epoch": "INTEGER", "split": "VARCHAR", "name": "VARCHAR",
                "layer": "SMALLINT", "expert": "SMALLINT", "value": "DOUBLE"},
    "ablation": {"dataset": "VARCHAR", "split": "VARCHAR", "token_idx": "BIGINT", "layer": "SMALLINT",
                 "expert": "SMALLINT", "epoch": "INTEGER", "loss": "FLOAT", "base_loss": "FLOAT",
                 "delta_loss": "FLOAT", "chose": "BOOLEAN"},
}
GLOBS = health.GLOBS
_RUN_JSON = {"status": "VARCHAR", "step": "BIGINT", "epoch": "BIGINT", "started_at": "VARCHAR",
             "updated_at": "VARCHAR", "finished_at": "VARCHAR", "error": "VARCHAR", "problems": "VARCHAR"}
_SUBWORD_TABLES = ("routing", "probs")  # per-subword rows in captured runs (word_idx, subword columns)
_FIRST_SUBWORD = " WHERE coalesce(subword, 0) = 0"
_PA = {"VARCHAR": pa.string(), "BIGINT": pa.int64(), "DOUBLE": pa.float64(), "BOOLEAN": pa.bool_()}


# A token's value of a specialization attribute (analysis.specialization.ATTRIBUTES), written once for every SQL
# that groups by one (specialization.sql, specialization_units.sql): `token_value($attribute, pos_tag, freq_band,
# dataset, ner_tag, segment, token, in_answer, position)`; position_band buckets position into
# analysis.specialization.POSITION_BANDS. NULL for an unknown attribute (the Python callers check the name).
TOKEN_VALUE_MACRO = """CREATE OR REPLACE MACRO token_value(attribute, pos_tag, freq_band, dataset, ner_tag, segment,
                                              token, in_answer, position) AS
    CASE attribute
        WHEN 'pos_tag' THEN pos_tag WHEN 'freq_band' THEN freq_band WHEN 'dataset' THEN dataset
        WHEN 'ner_tag' THEN ner_tag WHEN 'segment' THEN segment WHEN 'token' THEN token
        WHEN 'in_answer' THEN CAST(in_answer AS VARCHAR)
        WHEN 'position_band' THEN CASE WHEN position = 0 THEN '0' WHEN position < 5 THEN '1-4'
            WHEN position < 10 THEN '5-9' WHEN position < 20 THEN '10-19' WHEN position < 50 THEN '20-49'
            WHEN position >= 50 THEN '50+' END
    END"""


def connect(runs_dir: str | Path, *, read_only_sandbox: bool = False, threads: int | None = None,
            memory_limit: str | None = MEMORY_LIMIT, temp_directory: str | Path | None = None, warn: bool = True,
            summaries: bool = True) -> duckdb.DuckDBPyConnection:
    """A DuckDB connection with the views `runs, tokens, routing, probs, hidden, metrics, ablation` over `runs_dir`.

    `read_only_sandbox=True` (the app's SQL console) reads the Parquet files through Arrow datasets,
    then sets `enable_external_access=false` and `lock_configuration=true`: the connection can read
    nothing outside the views and write no file (COPY, ATTACH, EXPORT and read_csv all fail).
    `warn=False` leaves out the stderr line per damaged file (the `runs.problems` column still lists it).
    `memory_limit` (default MEMORY_LIMIT; None: DuckDB's own, 80% of RAM)
    caps DuckDB's memory: larger sorts, joins and aggregates spill to `temp_directory` (default
    `<cache>/duckdb-tmp`, never the working directory) instead of failing. `summaries=True` lets the balance
    analyses read per-run summary files (moe_lens.summary); the sandbox never does.
    """
    root = Path(runs_dir).expanduser().resolve()
    if not root.is_dir():
        raise MoeLensError(f"runs directory {runs_dir} does not exist")
    found = health.scan(root)
    if not found.runs:
        raise MoeLensError(f"no runs in {runs_dir}: expected <run>/config.json or <run>/routing/ directories")
    for d in found.damaged if warn else ():
        print(f"moe-lens: warning: leaving out damaged {d.run}/{d.problem}", file=sys.stderr)
    con = duckdb.connect(config={"preserve_insertion_order": False})
    if threads:
        con.execute("SET threads = $t", {"t": threads})
    if memory_limit:
        con.execute("SET memory_limit = $m", {"m": memory_limit})
    spill = Path(temp_directory or resolve_cache_dir("duckdb-tmp")).expanduser()
    con.execute("SET temp_directory = $d", {"d": str(spill)})
    if summaries and not read_only_sandbox and summary.enabled():
        con.execute(f"SET VARIABLE {summary.ROOT_VARIABLE} = $root", {"root": str(root)})
    con.register("_runs_arrow", _runs_table(found))
    con.execute("CREATE TABLE runs AS SELECT * FROM _runs_arrow")
    con.unregister("_runs_arrow")
    for table in SCHEMAS:
        files = found.files[table]
        if not files:
            body = _empty_select(table)
        elif read_only_sandbox:
            body = _arrow_select(con, table, files, root)
        else:  # the glob while every part is readable (new parts appear at query time), else the good files
            damaged = any(d.table == table for d in found.damaged)
            body = _parquet_select(con, table, root, files, explicit=damaged)
        con.execute(f"CREATE VIEW {table} AS {body}")  # DDL: table names and paths are ours, not user values
        if table == "routing":  # every subword row of captured runs, token_idx = subword position (docs/capture.md)
            con.execute(f"CREATE VIEW routing_subwords AS {_subword_body(con, files, root, found, read_only_sandbox)}")
    con.execute(TOKEN_VALUE_MACRO)
    if read_only_sandbox:
        con.execute(f"CREATE VIEW routing_counts AS {_counts_body(con, root, found)}")
        con.execute("SET enable_external_access = false")
        con.execute("SET autoinstall_known_extensions = false")
        con.execute("SET lock_configuration = true")
    return con


run_dirs = health.run_dirs


def _subword_body(con: duckdb.DuckDBPyConnection, files: list[Path], root: Path, found: health.Scan,
                  sandbox: bool) -> str:
    if not files:
        return _empty_select("routing")
    if sandbox:
        return _arrow_select(con, "routing", files, root, subwords=True)
    damaged = any(d.table == "routing" for d in found.damaged)
    return _parquet_select(con, "routing", root, files, explicit=damaged, subwords=True)


def _runs_table(found: health.Scan) -> pa.Table:
    """One row per run; status by `health.run_status` ('unknown' where run.json is missing or damaged), and
    `problems`: every damaged file of the run, one line each joined by '; ' (NULL when none)."""
    cfg_types = {f.name: _sql_type(str(f.type)) for f in fields(RunConfig)}
    cfg_types |= {"device": "VARCHAR", "git_commit": "VARCHAR", "num_params": "BIGINT", "versions": "VARCHAR"}
    cols: dict[str, list] = {"run": [], **{k: [] for k in _RUN_JSON}, **{k: [] for k in cfg_types}}
    for d in found.runs:
        state, cfg, _ = health.read_run(d)
        problems = found.problems(d.name)
        state = state | {"status": health.run_status(state, cfg), "problems": "; ".join(problems) or None}
        cols["run"].append(d.name)
        for k, t in (_RUN_JSON | cfg_types).items():
            v = (state if k in _RUN_JSON else cfg).get(k)
            cols[k].append(_coerce(v, t))
    types = {"run": pa.string()} | {k: _PA[t] for k, t in (_RUN_JSON | cfg_types).items()}
    return pa.table({k: pa.array(v, types[k]) for k, v in cols.items()})


def _sql_type(annotation: str) -> str:
    base = annotation.replace(" | None", "").replace("Optional[", "").rstrip("]")
    return {"int": "BIGINT", "float": "DOUBLE", "bool": "BOOLEAN"}.get(base, "VARCHAR")


def _coerce(v: Any, t: str) -> Any:
    if v is None:
        return None
    try:
        if t == "VARCHAR":
            return v if isinstance(v, str) else json.dumps(v)
        if t == "BOOLEAN":
            return bool(v)
        return int(v) if t == "BIGINT" else float(v)
    except (TypeError, ValueError):
        return None  # a malformed field reads as NULL rather than hiding the run


def _quote(s: str) -> str:
    return "'" + s.replace("'", "''") + "'"


def _columns(table: str, present: dict[str, str], run_expr: str, *, subwords: bool = False) -> str:
    """The contract's columns in order (typed NULL where absent), then any extra columns.

    A captured run (moe_lens/capture) stores routing and probs per subword: token_idx is the subword's position
    in the model's token stream and word_idx the word's token_idx in `tokens`. Unless `subwords`, its token_idx
    reads as word_idx (the join key every analysis uses) and `subword_idx` keeps the subword position; the
    caller then keeps only first subwords (`_FIRST_SUBWORD`). Trained runs: word_idx NULL, subword_idx = token_idx.
    """
    out = [f"{run_expr} AS run"]
    captured = table in _SUBWORD_TABLES and "word_idx" in present and not subwords
    for col, typ in SCHEMAS[table].items():
        if captured and col == "token_idx":
            out += ["CAST(coalesce(word_idx, token_idx) AS BIGINT) AS token_idx", "CAST(token_idx AS BIGINT) AS subword_idx"]
        elif col not in present:
            out.append(f"CAST(NULL AS {typ}) AS {col}")
        elif present[col] != typ:
            out.append(f"CAST({col} AS {typ}) AS {col}")
        else:
            out.append(col)
    out += [f'"{c}"' for c in present if c not in SCHEMAS[table] and c not in ("filename", "run")]
    return ", ".join(out)


def _empty_select(table: str) -> str:
    return f"SELECT {_columns(table, {}, 'CAST(NULL AS VARCHAR)')} WHERE false"


def _parquet_select(con: duckdb.DuckDBPyConnection, table: str, root: Path, files: list[Path],
                    explicit: bool, *, subwords: bool = False) -> str:
    """read_parquet over the table's globs (`explicit`: over `files`, a list literal of our own paths).

    A torchrun run's part files sit one level deeper, in `ddp_rank=R/` partitions; DuckDB refuses to mix
    hive depths in one read, so those are a second read_parquet, joined UNION ALL BY NAME (ddp_rank is
    NULL for the rows of single-process runs)."""
    hive = table not in ("metrics",)
    parts = {k: v for k, v in _PARTS.items() if table not in _NO_EPOCH or k != "epoch"}
    reads = []
    for ddp in (False, True) if hive else (False,):
        mine = [f for f in files if _is_ddp(f) == ddp]
        if not mine:
            continue
        keys = parts | ({"ddp_rank": "INTEGER"} if ddp else {})
        types = "{" + ", ".join(f"{_quote(k)}: {_quote(v)}" for k, v in keys.items()) + "}"
        opts = f", hive_partitioning=true, hive_types={types}" if hive else ", hive_partitioning=false"
        if explicit:
            paths = "[" + ", ".join(_quote(f.as_posix()) for f in mine) + "]"
        else:
            paths = _quote((root / _glob(table, ddp)).as_posix())
        reads.append(f"SELECT * FROM read_parquet({paths}, union_by_name=true, filename=true{opts})")
    src = "(" + " UNION ALL BY NAME ".join(reads) + ")"
    present = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {src}").fetchall()}
    marker = "/metrics\\.parquet$" if table == "metrics" else f"/{table}/"
    run_expr = f"regexp_extract(filename, {_quote('([^/]+)' + marker)}, 1)"
    return f"SELECT {_columns(table, present, run_expr, subwords=subwords)} FROM {src}" + _where(table, present, subwords)


def _where(table: str, present: dict[str, str], subwords: bool) -> str:
    return _FIRST_SUBWORD if table in _SUBWORD_TABLES and "subword" in present and not subwords else ""


_NO_EPOCH = ("tokens", "ablation")  # tables partitioned by dataset and split only


def _is_ddp(f: Path) -> bool:
    return any(p.startswith("ddp_rank=") for p in f.parts)


def _glob(table: str, ddp: bool) -> str:
    """The part files of one table, single-process layout or torchrun's (docs/traces.md)."""
    if table == "metrics":
        return GLOBS["metrics"]
    keys = "dataset=*/split=*" + ("" if table in _NO_EPOCH else "/epoch=*") + ("/ddp_rank=*" if ddp else "")
    return f"*/{table}/{keys}/part-*.parquet"


def _arrow_select(con: duckdb.DuckDBPyConnection, table: str, files: list[Path], root: Path, *,
                  subwords: bool = False) -> str:
    """Sandbox: one registered Arrow dataset per run, so DuckDB itself opens no file."""
    selects = []
    for i, run in enumerate(sorted({f.relative_to(root).parts[0] for f in files})):
        mine = [str(f) for f in files if f.relative_to(root).parts[0] == run]
        part = pads.partitioning(flavor="hive") if table != "metrics" else None
        ds = pads.dataset(mine, format="parquet", partitioning=part, partition_base_dir=str(root / run / table))
        name = f"_{table}_{i}"
        con.register(name, ds)
        present = {r[0]: r[1] for r in con.execute(f"DESCRIBE SELECT * FROM {name}").fetchall()}
        cols = _columns(table, present, _quote(run), subwords=subwords)
        selects.append(f"SELECT {cols} FROM {name}" + _where(table, present, subwords))
    return " UNION ALL BY NAME ".join(selects)


def _counts_body(con: duckdb.DuckDBPyConnection, root: Path, found: health.Scan) -> str:
    """Sandbox: `routing_counts`, sql/routing_counts.sql over every run (one row per run, dataset, split, epoch,
    step, layer, expert, rank: n, gates, entropies, dropped, known_drop). A finished, undamaged run's current
    summary file (moe_lens.summary, registered as an Arrow dataset) where one exists, the query over the routing
    view for the others: the same rows either way (tests/test_summary.py)."""
    healthy = {r for (r,) in con.execute("SELECT run FROM runs WHERE status <> 'running' AND problems IS NULL"
                                         ).fetchall()}  # fmt: skip
    selects, rest = [], []
    for i, d in enumerate(found.runs):
        path = summary.summary_path(d) if summary.enabled() and d.name in healthy else None
        if path is not None and path.exists():
            con.register(f"_routing_counts_{i}", pads.dataset(str(path), format="parquet"))
            selects.append(f"SELECT * FROM _routing_counts_{i}")
        else:
            rest.append(d.name)
    if rest or not selects:  # the runs as a list literal: names of our own directories, quoted (a view has no $params)
        names = "[" + ", ".join(_quote(r) for r in rest) + "]::VARCHAR[]"
        sql = summary.counts_sql().replace("$runs", names).replace("$split", "NULL")
        selects.append(f"SELECT * FROM (\n{sql}\n)")
    return " UNION ALL BY NAME ".join(selects)


default_runs_dir = health.default_runs_dir
READ_STATEMENTS = "SELECT (DESCRIBE, SHOW, SUMMARIZE too) and EXPLAIN [ANALYZE] of a SELECT"


def check_read_only(sql: str) -> None:
    """Raise MoeLensError (one line) unless every statement of `sql` only reads: DuckDB's own parser decides.

    A SELECT (DuckDB parses DESCRIBE, SHOW and SUMMARIZE as one) passes, and so does EXPLAIN [ANALYZE] of a
    SELECT; DDL, DML, SET, PRAGMA, CALL, ATTACH and transactions are refused before anything runs, so a
    console that shares one connection cannot drop or shadow a view under another session.
    """
    try:
        statements = duckdb.extract_statements(sql)
    except duckdb.Error as e:
        raise MoeLensError(str(e).splitlines()[0]) from None
    for i, st in enumerate(statements, 1):
        kind = st.type
        if kind == duckdb.StatementType.EXPLAIN:
            kind = _explained(st.query)
        if kind != duckdb.StatementType.SELECT:
            name = str(kind).rsplit(".", 1)[-1] if kind is not None else "EXPLAIN of no single statement"
            where = f"statement {i} is " if len(statements) > 1 else ""
            raise MoeLensError(f"refused, read-only: {where}{name} ({st.query.strip()[:60]!r}); allowed: {READ_STATEMENTS}")


def _explained(query: str) -> duckdb.StatementType | None:
    """The type of the statement an EXPLAIN wraps: the first suffix of `query` (at a token after EXPLAIN) that
    DuckDB parses as one statement; the options before it (ANALYZE, (FORMAT JSON)) parse as none."""
    starts = [pos for pos, kind in duckdb.tokenize(query) if kind != duckdb.token_type.comment][1:]
    for pos in starts:
        try:
            inner = duckdb.extract_statements(query[pos:])
        except duckdb.Error:
            continue
        return inner[0].type if len(inner) == 1 else None
    return None


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("sql", help="run a SQL query over the recorded runs (DuckDB)",
                              description="Views: runs, tokens, routing, probs, hidden, metrics (see docs/sql.md).")
    p.add_argument("query", help='e.g. "SELECT run, count(*) FROM routing GROUP BY run"')
    p.add_argument("--runs-dir", default=None, help="runs directory (default: $MOE_LENS_RUNS_DIR, else runs/ when it holds runs, else sample_runs/)")
    p.add_argument("--format", choices=("table", "csv", "json", "parquet"), default="table")
    p.add_argument("--out", default=None, help="write the result to this file (required for parquet)")
    p.set_defaults(func=_sql_command)


def _sql_command(args: argparse.Namespace) -> int:
    con = connect(args.runs_dir or default_runs_dir())
    try:
        rel = con.sql(args.query)
    except duckdb.Error as e:
        raise MoeLensError(str(e).splitlines()[0]) from None
    if rel is None:
        return 0  # a statement without a result (SET, CREATE VIEW ...)
    if args.format == "parquet" and not args.out:
        raise MoeLensError("--format parquet needs --out FILE")
    try:
        return _emit(rel, args.format, args.out)
    except duckdb.Error as e:
        raise MoeLensError(str(e).splitlines()[0]) from None


def _emit(rel: duckdb.DuckDBPyRelation, fmt: str, out: str | None) -> int:
    if fmt == "parquet":
        rel.write_parquet(out, compression="zstd")
        return 0
    if fmt == "table":
        text = rel.df().to_string(index=False, max_rows=200)
    elif fmt == "csv":
        text = rel.df().to_csv(index=False)
    else:
        text = rel.df().to_json(orient="records", lines=True, date_format="iso")
    if out:
        Path(out).write_text(text if text.endswith("\n") else text + "\n")
    else:
        print(text.rstrip("\n"))
    return 0
