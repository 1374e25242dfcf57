"""The app over a damaged runs directory (issue 19, items 3, 6, 7, 11), through AppTest: every page renders
on the readable rest with a banner naming every damaged file, a dead run shows as `killed`, and the SQL
console refuses anything but a read, so one session cannot break the shared views of another."""
from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from streamlit.runtime.pages_manager import PagesManager
from streamlit.testing.v1 import AppTest

from moe_lens.app_pages import NAMES as PAGES, page as registered
from moe_lens.synthetic import write_synthetic_run

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "app" / "main.py")


@pytest.fixture(autouse=True)
def entrypoint_runs_on_every_page(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run app/main.py on every page, as the server does once st.navigation has run.

    AppTest builds a new PagesManager per run, which sees app/pages/ and takes the app for a pages-directory
    app: after switch_page it runs the page file alone, without main.py's sidebar and banner. A server does
    that only until the first st.navigation call sets `uses_pages_directory = False` for the process."""
    init = PagesManager.__init__

    def v2_init(self, *args, **kwargs) -> None:
        init(self, *args, **kwargs)
        PagesManager.uses_pages_directory = False

    monkeypatch.setattr(PagesManager, "__init__", v2_init)


@pytest.fixture(scope="module")
def damaged_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """a-good; b-hurt with a truncated routing part and garbage metrics; c-badjson; d-killed (a dead pid)."""
    d = tmp_path_factory.mktemp("damaged")
    write_synthetic_run(d, "a-good", num_tokens=600, with_hidden=True)
    write_synthetic_run(d, "b-hurt", num_tokens=600, with_hidden=True, seed=1, mode="switch", top_k=1)
    part = sorted((d / "b-hurt" / "routing").glob("**/part-*.parquet"))[0]
    part.write_bytes(part.read_bytes()[:100])
    (d / "b-hurt" / "metrics.parquet").write_bytes(b"garbage" * 20)
    write_synthetic_run(d, "c-badjson", num_tokens=300, seed=2)
    (d / "c-badjson" / "config.json").write_text('{\n  "mode": "load",\n    }\n')
    write_synthetic_run(d, "d-killed", num_tokens=300, seed=3, status="running")
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    state = json.loads((d / "d-killed" / "run.json").read_text())
    (d / "d-killed" / "run.json").write_text(json.dumps(state | {"pid": p.pid, "host": socket.gethostname()}))
    return d


def _app(runs_dir: Path, page: str) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["runs_dir"] = str(runs_dir)
    at.session_state["clusters_method"] = "PCA"
    at.run()
    if not registered(page).default:
        at.switch_page(registered(page).file).run()
    return at


@pytest.mark.parametrize("page", PAGES)
def test_every_page_works_and_shows_the_damage_banner(damaged_dir: Path, page: str) -> None:
    at = _app(damaged_dir, page)
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    assert at.title[0].value
    banner = [w.value for w in at.warning if w.value.startswith("Damaged files")]
    assert len(banner) == 1
    part = sorted((damaged_dir / "b-hurt" / "routing").glob("**/part-*.parquet"))[0]
    for name in (part.relative_to(damaged_dir / "b-hurt").as_posix(), "metrics.parquet",
                 "config.json:3: Expecting property name enclosed in double quotes (column 5)"):
        assert name in banner[0]
    assert "d-killed" not in banner[0] and "a-good" not in banner[0]
    if page == "runs":  # the rest is there, and the dead process shows as killed
        table = at.dataframe[0].value.set_index("run")
        assert list(table.index) == ["a-good", "b-hurt", "c-badjson", "d-killed"]
        assert table.loc["d-killed", "status"] == "killed" and table.loc["a-good", "status"] == "finished"


def _rows(runs_dir: Path) -> int:
    return sum(pq.read_metadata(f).num_rows for f in runs_dir.glob("*/routing/**/part-*.parquet"))


@pytest.mark.parametrize("statement", ["DROP VIEW routing", "CREATE TABLE t AS SELECT 1",
                                       "SELECT 1; CREATE TEMP VIEW routing AS SELECT 1 AS x",
                                       "EXPLAIN ANALYZE CREATE TABLE t2 AS SELECT 1", "BEGIN"])
def test_sql_console_refuses_ddl_so_other_sessions_keep_their_views(tmp_path: Path, statement: str) -> None:
    write_synthetic_run(tmp_path, "a", num_tokens=300)
    write_synthetic_run(tmp_path, "b", num_tokens=200, seed=1)
    count = "SELECT count(*) AS n FROM routing"
    one, two = _app(tmp_path, "sql"), _app(tmp_path, "sql")  # two browser sessions, one shared connection
    one.text_area(key="sql_query").input(statement)
    one.button(key="sql_run").click().run()
    assert not one.exception
    assert len(one.error) == 1 and one.error[0].value.startswith("refused, read-only:"), [e.value for e in one.error]
    assert "\n" not in one.error[0].value
    two.text_area(key="sql_query").input(count)
    two.button(key="sql_run").click().run()
    assert not two.exception and not two.error, [e.value for e in two.error]
    assert int(two.dataframe[0].value["n"].iloc[0]) == _rows(tmp_path)
    one.text_area(key="sql_query").input("EXPLAIN ANALYZE SELECT count(*) FROM routing")  # reads still run
    one.button(key="sql_run").click().run()
    assert not one.exception and not one.error and len(one.dataframe[0].value)
