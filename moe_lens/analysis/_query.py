"""Shared plumbing of the analyses: load a .sql file of `moe_lens/sql`, resolve runs, run with parameters.

SQL text comes from package data (`importlib.resources`); values always travel as DuckDB named
parameters (`$runs`, `$split`, ...), never formatted into the text.
"""
from __future__ import annotations

import re
from functools import cache
from importlib import resources
from typing import Any

import duckdb
import pandas as pd

from moe_lens import summary
from moe_lens.errors import MoeLensError

Runs = list[str] | str | None


@cache
def sql_text(name: str) -> str:
    """The text of `moe_lens/sql/<name>.sql`."""
    return resources.files("moe_lens").joinpath("sql", f"{name}.sql").read_text()


def query(con: duckdb.DuckDBPyConnection, sql: str, params: dict[str, Any]) -> pd.DataFrame:
    """Run `sql` with the parameters it names (extra keys are dropped, DuckDB rejects them)."""
    used = set(re.findall(r"\$(\w+)", sql))
    missing = used - params.keys()
    assert not missing, f"SQL needs parameters {sorted(missing)}"
    try:
        return con.execute(sql, {k: v for k, v in params.items() if k in used}).df()
    except duckdb.Error as e:
        raise MoeLensError(f"query failed: {str(e).splitlines()[0]}") from None


def stored_query(con: duckdb.DuckDBPyConnection, runs: list[str], name: str, params: dict[str, Any]) -> pd.DataFrame:
    """`query(con, sql_text(name), params)` for a per-token analysis: the run's stored result when `runs` is one
    summarisable run (moe_lens.summary.cached_result: the same rows, written on first use, keyed by the run's
    files), else the query itself."""
    sql = sql_text(name)
    used = {k: v for k, v in params.items() if k in set(re.findall(r"\$(\w+)", sql))}
    try:
        df = summary.cached_result(con, runs, name, sql, used)
    except duckdb.Error as e:
        raise MoeLensError(f"query failed: {str(e).splitlines()[0]}") from None
    return df if df is not None else query(con, sql, params)


def with_cte(name: str, inner: str, outer: str) -> str:
    """`WITH name AS (inner) outer`: composes two .sql files without touching values."""
    body = "\n".join(line for line in outer.strip().splitlines() if not line.startswith("--"))
    head = f"WITH {name} AS (\n{inner.strip().rstrip(';')}\n)"
    if body[:4].upper() == "WITH":  # outer has its own CTEs: continue the list
        return f"{head},{body[4:]}"
    return f"{head}\n{body}"


def keyed(con: duckdb.DuckDBPyConnection, runs: list[str], sql: str) -> str:
    """`sql` over `trace_keys`: the runs' summary files when every one has a current summary (moe_lens.summary,
    built here on first use), else the routing view; both hold the same key tuples (run ... expert, rank)."""
    return with_cte("trace_keys", summary.counts_source(con, runs) or "SELECT * FROM routing", sql)


def resolve_runs(con: duckdb.DuckDBPyConnection, runs: Runs) -> list[str]:
    """`runs` as a list of known run names (None = every run); unknown names raise MoeLensError."""
    known = [r[0] for r in con.execute("SELECT run FROM runs ORDER BY run").fetchall()]
    if runs is None:
        return known
    wanted = [runs] if isinstance(runs, str) else list(runs)
    unknown = [r for r in wanted if r not in known]
    if unknown:
        raise MoeLensError(f"unknown run {unknown[0]!r}; available: {', '.join(known) or '(none)'}")
    return wanted


def check_by(by: str) -> bool:
    """True for by='step', False for by='epoch'."""
    if by not in ("step", "epoch"):
        raise MoeLensError(f"by={by!r}; allowed: step, epoch")
    return by == "step"


def nonempty(df: pd.DataFrame, runs: list[str], what: str) -> pd.DataFrame:
    """Raise a one-line MoeLensError when a routing analysis found no rows at all."""
    if df.empty:
        raise MoeLensError(f"no routing rows for run(s) {', '.join(runs)} with {what} "
                           "(nothing recorded yet, a half-written run, or another split/layer/epoch)")
    return df


def run_datasets(con: duckdb.DuckDBPyConnection, runs: list[str], split: str, dataset: str | None) -> list[str]:
    """'run|dataset' keys an analysis covers (run_datasets.sql): `dataset=None` each run's own dataset
    (config.json), a name that dataset, '*' every dataset recorded in `split`, each on its own rows."""
    return query(con, keyed(con, runs, sql_text("run_datasets")), dict(runs=runs, split=split, dataset=dataset))["key"].tolist()


def last_epochs(con: duckdb.DuckDBPyConnection, runs: list[str], split: str, epoch: int | None,
                dataset: str | None = None) -> list[str]:
    """'run|dataset|epoch' keys: `epoch` for every (run, dataset) of `run_datasets`, or each one's last recorded
    epoch in `split`."""
    pairs = run_datasets(con, runs, split, dataset)
    if epoch is not None:
        return [f"{k}|{epoch}" for k in pairs]
    df = query(con, keyed(con, runs, sql_text("last_epochs")), {"runs": runs, "run_datasets": pairs, "split": split})
    return [f"{r}|{d}|{e}" for r, d, e in zip(df["run"], df["dataset"], df["epoch"])]


def oov_params(con: duckdb.DuckDBPyConnection, runs: list[str], include_oov: bool) -> dict[str, Any]:
    """The in_vocab rule's SQL parameters (docs/sql.md): `include_oov`, and for runs whose tokens lack `in_vocab`
    (NULL) their `<unk>` id read by unk_ids.sql (`unk_ids[i]` for `unk_runs[i]`); none are needed with include_oov."""
    lacking = [] if include_oov else con.execute(
        "SELECT DISTINCT run FROM tokens WHERE list_contains($runs, run) AND in_vocab IS NULL", {"runs": runs}
    ).df()["run"].tolist()
    unk = query(con, sql_text("unk_ids"), {"runs": lacking}) if lacking else pd.DataFrame({"run": [], "unk_id": []})
    return dict(include_oov=bool(include_oov), unk_runs=unk["run"].astype(str).tolist(),
                unk_ids=[int(i) for i in unk["unk_id"]])
