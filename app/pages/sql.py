"""SQL: a read-only console over the views (runs, tokens, routing, probs, hidden, metrics, routing_counts). The connection
is `store.connect(..., read_only_sandbox=True)`: it reads no file outside the views and writes none. It is
shared by every browser session, so `store.check_read_only` refuses anything but a read (DROP VIEW, CREATE,
SET, BEGIN ...) in one line before it runs: one session cannot break the views of another."""
from __future__ import annotations

import duckdb
import streamlit as st

import lens_ui as ui
from moe_lens import store
from moe_lens.errors import MoeLensError

MAX_ROWS = 100_000
# Top-1 routing rows per (run, split, expert): the same numbers as count(*) over `routing` WHERE rank = 0, read
# from `routing_counts` (per-run summaries, moe_lens/summary.py), a few thousand rows where the trace has 10^8.
EXAMPLE = """SELECT run, split, expert, CAST(sum(n) AS BIGINT) AS n
FROM routing_counts WHERE rank = 0
GROUP BY ALL ORDER BY run, split, expert"""

st.title("SQL")
st.caption("Views: `runs`, `tokens`, `routing`, `probs`, `hidden`, `metrics`, and `routing_counts` (routing rows "
           "counted per run, dataset, split, epoch, step, layer, expert, rank: `n`, `gates`, `entropies`, `dropped`, "
           "`known_drop`; the fast way to count) (docs/sql.md). Read-only: "
           f"{store.READ_STATEMENTS}; the connection cannot open or write files. At most {MAX_ROWS:,} rows are fetched.")
query = st.text_area("Query", value=EXAMPLE, height=160, key="sql_query")
if st.button("Run", type="primary", key="sql_run"):
    try:
        store.check_read_only(query)
    except MoeLensError as e:
        st.session_state.pop("sql_result", None)
        st.error(str(e))
        st.stop()
    con, lock = ui.connection(sandbox=True)
    try:
        with lock:
            rel = con.sql(query)
            st.session_state["sql_result"] = rel.limit(MAX_ROWS).df() if rel is not None else None
    except duckdb.Error as e:
        st.session_state.pop("sql_result", None)
        st.error(f"Query failed: {str(e).splitlines()[0]}")
        st.stop()
if "sql_result" in st.session_state:
    df = st.session_state["sql_result"]
    if df is None:
        st.success("Done (the statement returned no rows).")
    else:
        st.write(f"{len(df):,} rows" + (" (truncated)" if len(df) == MAX_ROWS else ""))
        st.dataframe(df, hide_index=True, key="sql_table")
        st.download_button("Download CSV", data=lambda: df.to_csv(index=False), file_name="query.csv",
                           mime="text/csv", key="sql_csv", on_click="ignore")
