"""Per-run routing summaries (moe_lens/summary.py): every summarised analysis gives the same result from the
summary files as from a full scan of the trace (the independent reference: the same analysis on a connection with
summaries off), a new part file invalidates the summary, and runs still running, damaged runs and the sandbox scan."""
from __future__ import annotations

import ast
import base64
import json
import os
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

import moe_lens.analysis as A
from moe_lens import summary
from moe_lens.analysis import _query
from moe_lens.cli import main
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
CALLS = [  # (analysis, kwargs) for every analysis that reads `counts`, over its branches
    ("load_balance", {}), ("load_balance", dict(split="train", by="step")),
    ("load_balance", dict(per_expert=True, all_ranks=False)), ("load_balance", dict(epoch=0, layer=1)),
    ("collapse", {}), ("collapse", dict(by="epoch", all_ranks=True, threshold=3.0)),
    ("router_confidence", {}), ("router_confidence", dict(split="train", by="step", layer=0)),
    ("capacity", {}), ("capacity", dict(split="valid")),
]


@pytest.fixture(autouse=True)
def cache(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Path:
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))
    monkeypatch.delenv("MOE_LENS_SUMMARIES", raising=False)
    return tmp_path / "cache"


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    write_synthetic_run(d, "a", num_tokens=600, layers=2, num_experts=4, top_k=2, epochs=3, capacity_factor=1.0,
                        drop_rate=0.1, skew=1.0, dead_experts=1)
    write_synthetic_run(d, "b", num_tokens=300, num_experts=3, top_k=1, epochs=2, seed=1, dataset="conll2003",
                        chunk_tokens=128, rows_per_part=100)
    return d


def assert_same(got: pd.DataFrame, want: pd.DataFrame) -> None:
    """Integers and strings equal; floats equal up to summation order (sums of gates)."""
    assert list(got.columns) == list(want.columns) and len(got) == len(want)
    for col in want.columns:
        if pd.api.types.is_float_dtype(want[col]):
            np.testing.assert_allclose(got[col].to_numpy(float), want[col].to_numpy(float), rtol=1e-12, atol=0,
                                       err_msg=col)
        else:
            pd.testing.assert_series_equal(got[col], want[col], check_names=False, obj=col)


def both(root: Path, names: list[str] | None, calls=CALLS) -> None:
    fast, scan = connect(root), connect(root, summaries=False)
    for name, kw in calls:
        assert_same(getattr(A, name)(fast, names, **kw), getattr(A, name)(scan, names, **kw))


def test_summarised_analyses_equal_the_scan(runs: Path, cache: Path) -> None:
    both(runs, None)
    assert len(list((cache / "summaries").rglob("routing_counts-*.parquet"))) == 2  # one per run, used above


def test_summarised_analyses_equal_the_scan_on_sample_runs() -> None:
    names = ["wikitext2-load-3layer", "wikitext2-switch", "conll2003-noisy_topk", "squad-hybrid"]
    both(ROOT / "sample_runs", names, CALLS[:1] + CALLS[4:5] + CALLS[6:7] + CALLS[8:9])
    fast = connect(ROOT / "sample_runs")
    A.load_balance(fast, names)
    assert summary.counts_source(fast, names) is not None  # the sample runs are summarised (nothing written there)


def test_a_new_part_file_rebuilds_the_summary(runs: Path) -> None:
    con = connect(runs)
    before = A.load_balance(con, "a", per_expert=True)
    old = summary.summary_path(runs / "a")
    assert old.exists()
    part = runs / "a/routing/dataset=wikitext2/split=valid/epoch=2"
    shutil.copy(part / "part-00000.parquet", part / "part-00001.parquet")  # the epoch's rows recorded twice
    new = summary.summary_path(runs / "a")
    assert new != old and not new.exists()
    after = A.load_balance(con, "a", per_expert=True)
    assert new.exists() and not old.exists()  # rebuilt, the stale file removed
    last = after["epoch"] == 2
    assert (after.loc[last, "tokens"].to_numpy() == 2 * before.loc[last, "tokens"].to_numpy()).all()
    assert_same(after, A.load_balance(connect(runs, summaries=False), "a", per_expert=True))


def test_running_damaged_and_sandbox_scan(runs: Path) -> None:
    write_synthetic_run(runs, "live", num_tokens=100, status="running")
    con = connect(runs)
    assert summary.counts_source(con, ["live"]) is None
    assert summary.counts_source(con, ["a", "live"]) is None  # one run without a summary: all scanned
    assert summary.counts_source(connect(runs, read_only_sandbox=True), ["a"]) is None
    (runs / "b/routing/dataset=conll2003/split=valid/epoch=0/part-00000.parquet").write_bytes(b"not parquet")
    con = connect(runs, warn=False)
    assert summary.counts_source(con, ["b"]) is None
    both(runs, ["a", "b", "live"], CALLS[:2])


def test_summarize_command(runs: Path, capsys: pytest.CaptureFixture) -> None:
    write_synthetic_run(runs, "live", num_tokens=100, status="running")
    assert main(["summarize", "--runs-dir", str(runs)]) == 0
    out = capsys.readouterr().out
    assert f"a: {summary.summary_path(runs / 'a')}" in out and "live: not summarised" in out
    assert summary.summary_path(runs / "b").exists()
    stored = {p.name.split("-")[1] for p in summary.resolve_cache_dir("summaries").glob("a-*/result-*.parquet")}
    assert stored == {"routing_paths", "layer_transitions", "coactivation"}  # the layers page's defaults
    assert "(+ 6 stored layers-page results)" in out  # 3 calls x 2 splits


def test_key_lookups_from_the_summary_equal_the_scan(runs: Path) -> None:
    """run_datasets, last_epochs, epochs and recorded_layers read `trace_keys` (the summary when present): every
    analysis built on them gives the scan's result."""
    fast, scan = connect(runs), connect(runs, summaries=False)
    for split, dataset in (("valid", None), ("train", "*"), ("valid", "conll2003")):
        assert _query.run_datasets(fast, ["a", "b"], split, dataset) == _query.run_datasets(scan, ["a", "b"], split, dataset)
        assert _query.last_epochs(fast, ["a", "b"], split, None, dataset) == \
            _query.last_epochs(scan, ["a", "b"], split, None, dataset)
    both(runs, ["a", "b"], [("recorded_layers", {}), ("stability", {}), ("stability", dict(epoch=1, split="train")),
                            ("specialization", {}), ("coactivation", {})])
    both(runs, ["a"], [("routing_paths", {}), ("layer_transitions", dict(layer_a=0, layer_b=1))])
    assert_same(A.agreement(fast, "b", "b", epoch_b=0), A.agreement(scan, "b", "b", epoch_b=0))


OLD_EXAMPLE = "SELECT run, split, expert, count(*) AS n FROM routing WHERE rank = 0 GROUP BY ALL ORDER BY run, split, expert"


def test_sandbox_routing_counts_equal_the_scan(runs: Path) -> None:
    """The console's `routing_counts` view (summary files where current, the query over `routing` for the rest)
    equals routing_counts.sql over the trace, and the console's example query equals count(*) over `routing`."""
    page = ast.parse((ROOT / "app" / "pages" / "sql.py").read_text())  # the page's EXAMPLE, without running the page
    example = next(n.value.value for n in page.body if isinstance(n, ast.Assign) and n.targets[0].id == "EXAMPLE")
    scan = connect(runs, summaries=False)
    want = scan.execute(summary.counts_sql(), {"runs": ["a", "b"], "split": None}).df()
    keys = ["run", "dataset", "split", "epoch", "step", "layer", "expert", "rank"]
    want = want.sort_values(keys, ignore_index=True)
    old = scan.execute(OLD_EXAMPLE).df()
    for built in ([], ["a"], ["a", "b"]):  # no summary, one run's, both
        summary.build(connect(runs), built)
        box = connect(runs, read_only_sandbox=True)
        got = box.execute("SELECT * FROM routing_counts").df().sort_values(keys, ignore_index=True)
        assert_same(got[list(want.columns)], want)
        pd.testing.assert_frame_equal(box.execute(example).df(), old)


def test_sql_page_example_from_the_summaries_equals_the_direct_query(runs: Path) -> None:
    """The SQL page's default query, rendered (AppTest), equals the count(*) query over the routing rows."""
    from streamlit.testing.v1 import AppTest

    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.session_state["runs_dir"] = str(runs)
    at.run()
    at.switch_page("pages/sql.py").run()
    at.button(key="sql_run").click().run()
    assert not at.exception and not at.error
    assert list((summary.resolve_cache_dir("summaries")).rglob("routing_counts-*.parquet"))  # built for the view
    want = connect(runs, summaries=False).execute(OLD_EXAMPLE).df()
    pd.testing.assert_frame_equal(at.dataframe[0].value.reset_index(drop=True), want, check_dtype=False)


STORED = [("routing_paths", {}), ("routing_paths", dict(summary=False, top=None)),
          ("routing_paths", dict(attribute="token", include_oov=True, epoch=1)), ("layer_transitions", {}),
          ("layer_transitions", dict(split="train", layer_a=1, layer_b=0)), ("coactivation", {}),
          ("coactivation", dict(layer=1, epoch=0))]


def test_stored_per_token_results_equal_the_scan_and_follow_the_trace(runs: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """routing_paths, layer_transitions and coactivation from their stored results equal the same call with
    summaries off (the query over the trace), on the first call (stored) and the second (read back); a rewritten
    part file (here of `tokens`) gives a new key: the next call runs the query again, removes the old result and
    equals the scan."""
    for _ in range(2):
        both(runs, ["a"], STORED)
    stored = sorted(p.name for p in summary.resolve_cache_dir("summaries").rglob("result-*.parquet"))
    assert len(stored) == 6  # routing_paths' two calls share one result
    part = sorted((runs / "a" / "tokens").rglob("part-*.parquet"))[-1]  # a table the queries join, not routing
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))  # rewritten, a second later
    both(runs, ["a"], STORED)
    again = sorted(p.name for p in summary.resolve_cache_dir("summaries").rglob("result-*.parquet"))
    assert len(again) == 6 and not set(again) & set(stored)
    assert summary.cached_result(connect(runs), ["a", "b"], "x", "SELECT 1", {}) is None  # several runs: no store
    assert summary.cached_result(connect(runs, summaries=False), ["a"], "x", "SELECT 1", {}) is None
    monkeypatch.setenv("MOE_LENS_STORED_RESULTS", "0")
    assert summary.cached_result(connect(runs), ["a"], "x", "SELECT 1", {}) is None


def direct(con, name: str, names: list[str], kw: dict) -> pd.DataFrame:
    kw = dict(kw)
    return A.bootstrap(kw.pop("fn"), con, names, **kw) if name == "bootstrap" else getattr(A, name)(con, names, **kw)


def test_stored_literature_tables_equal_the_analysis_and_follow_the_trace(runs: Path) -> None:
    """The Literature page's tables (analyses and bootstrap intervals, summary.stored_frame): the table read back is
    exactly (values, dtypes, index) the one computed and stored, and equals the analysis called directly (floats up
    to the last bit DuckDB's parallel float sums vary by from call to call); a rewritten routing part file of one
    run gives new keys: the stale tables go, the new ones equal the direct call again."""
    from moe_lens.summarize_cli import literature_calls, stored_analysis
    calls = literature_calls(["a", "b"], 0, n=20) + literature_calls(["a"], 1, by="sentence", n=20)[:1]
    con = connect(runs)

    def check() -> list[str]:
        for name, names, kw in calls:
            first = stored_analysis(con, name, names, **kw)  # computed and stored (or read back)
            pd.testing.assert_frame_equal(stored_analysis(con, name, names, **kw), first, check_exact=True)
            assert_same(first, direct(con, name, names, kw))  # the analysis itself (it never reads stored tables)
        return sorted(p.name for p in summary.resolve_cache_dir("summaries").rglob("call-*.parquet"))

    stored = check()
    assert len(stored) == len(calls)
    part = runs / "a/routing/dataset=wikitext2/split=valid/epoch=2/part-00000.parquet"
    os.utime(part, ns=(part.stat().st_atime_ns, part.stat().st_mtime_ns + 10**9))  # rewritten, a second later
    again = check()
    assert len(again) == len(calls) and not set(again) & set(stored)
    write_synthetic_run(runs, "live", num_tokens=100, status="running")
    con, kw = connect(runs), {"split": "valid", "layer": 0}
    assert_same(stored_analysis(con, "fluctuation", ["a", "live"], **kw), direct(con, "fluctuation", ["a", "live"], kw))
    assert len(list(summary.resolve_cache_dir("summaries").rglob("call-*.parquet"))) == len(calls)  # not stored


def test_summarize_writes_what_the_literature_page_reads(tmp_path: Path) -> None:
    """After `moe-lens summarize`, the Literature page's default render (AppTest) reads only stored tables: it
    writes none, and its consecutive-token table equals the direct bootstrap."""
    from streamlit.testing.v1 import AppTest
    d = tmp_path / "lit"
    for i, run in enumerate(["x", "y"]):
        write_synthetic_run(d, run, num_tokens=400, layers=2, num_experts=4, top_k=2, epochs=3, seed=i)
    assert main(["summarize", "--runs-dir", str(d)]) == 0
    before = sorted(summary.resolve_cache_dir("summaries").rglob("*.parquet"))
    assert sum(p.name.startswith("call-") for p in before) == 7 + 2  # the page's 7 stored calls (split valid), and
    # the Collapse and Specialization pages' default intervals (test below)
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.session_state["runs_dir"] = str(d)
    at.run()
    at.switch_page("pages/literature.py").run()
    assert not at.exception and not at.error and not at.warning
    assert sorted(summary.resolve_cache_dir("summaries").rglob("*.parquet")) == before
    want = A.bootstrap("consecutive", connect(d), ["x", "y"], by="document", n=200, split="valid",
                       layer=0, within="document")
    table = at.dataframe[0].value  # the page's first table: consecutive tokens
    assert_same(table.reset_index(drop=True), want)


def test_summarize_writes_the_collapse_and_specialization_pages_default_intervals(tmp_path: Path) -> None:
    """After `moe-lens summarize`, the Collapse and Specialization pages' default renders (intervals on: at most
    FEW_RUNS runs) read their bootstrap intervals from stored tables: they write none, and the collapse interval
    drawn equals analysis.bootstrap called directly."""
    from streamlit.testing.v1 import AppTest

    from moe_lens.summarize_cli import interval_calls
    d = tmp_path / "pages"
    for i, run in enumerate(["x", "y"]):
        write_synthetic_run(d, run, num_tokens=300, layers=1, num_experts=4, top_k=2, epochs=2, seed=i)
    assert main(["summarize", "--runs-dir", str(d)]) == 0
    stored = sorted(summary.resolve_cache_dir("summaries").rglob("call-bootstrap.*.parquet"))
    assert {p.name.split("-")[1] for p in stored} >= {"bootstrap.collapse", "bootstrap.specialization"}
    assert len(interval_calls(["x", "y"], ["x", "y"])) == 2 and interval_calls(["x"] * 9, ["x"] * 9) == []
    before = sorted(summary.resolve_cache_dir("summaries").rglob("*.parquet"))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.session_state["runs_dir"] = str(d)
    at.run()
    for page in ("collapse", "specialization"):
        at.switch_page(f"pages/{page}.py").run()
        assert not at.exception and not at.error
    assert sorted(summary.resolve_cache_dir("summaries").rglob("*.parquet")) == before  # read, nothing written
    want = A.bootstrap("collapse", connect(d), ["x", "y"], by="document", n=200, fn_options=(("by", "step"),),
                       split="train", layer=0, threshold=2.0)
    at.switch_page("pages/collapse.py").run()
    chart = next(c for c in at.get("plotly_chart") if c.key == "collapse-effective_experts")
    for t in json.loads(chart.proto.spec)["data"]:  # plotly's typed arrays: {"dtype", "bdata"}
        err = t["error_y"]["array"]
        got = np.frombuffer(base64.b64decode(err["bdata"]), dtype=np.dtype(err["dtype"])) if "bdata" in err else err
        exp = want[want["run"] == t["name"]].sort_values("step")
        np.testing.assert_allclose(got, (exp["effective_experts_hi"] - exp["effective_experts"]).to_numpy(), rtol=1e-9,
                                   atol=1e-12)  # DuckDB's parallel float sums vary in the last bits
