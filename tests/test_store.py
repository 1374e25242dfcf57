"""The views of moe_lens.store over runs directories: columns, run ids, optional tables, runs, sandbox, CLI."""
from __future__ import annotations

import json
from pathlib import Path

import duckdb
import pytest

from moe_lens.cli import main
from moe_lens.errors import MoeLensError
from moe_lens.store import SCHEMAS, connect
from moe_lens.synthetic import write_synthetic_run


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    write_synthetic_run(tmp_path, "wiki", num_tokens=40, epochs=2, layers=2)  # no probs, hidden, NER
    write_synthetic_run(tmp_path, "ner", dataset="conll2003", num_tokens=30, with_probs=True, with_hidden=True)
    return tmp_path


def test_views_have_the_contract_columns(runs_dir: Path) -> None:
    con = connect(runs_dir)
    for table, schema in SCHEMAS.items():
        cols = con.execute(f"DESCRIBE {table}").fetchall()
        assert [c[0] for c in cols][: len(schema) + 1] == ["run", *schema]
        assert [c[1] for c in cols][1: len(schema) + 1] == list(schema.values())
    counts = dict(con.execute("SELECT run, count(*) FROM routing GROUP BY run").fetchall())
    assert counts == {"wiki": 2 * 2 * 2 * 40 * 2, "ner": 2 * 2 * 30 * 2}  # splits x epochs x layers x n x k
    assert con.execute("SELECT count(*) FROM tokens WHERE run = ? AND ner_tag IS NOT NULL", ["wiki"]).fetchone()[0] == 0
    assert con.execute("SELECT count(DISTINCT run) FROM probs").fetchone()[0] == 1
    assert sorted(r[0] for r in con.execute("SELECT DISTINCT run FROM metrics").fetchall()) == ["ner", "wiki"]
    assert con.execute("SELECT DISTINCT typeof(epoch) FROM routing").fetchall() == [("INTEGER",)]


def test_missing_optional_tables_are_empty_views(tmp_path: Path) -> None:
    write_synthetic_run(tmp_path, "wiki", num_tokens=10)
    con = connect(tmp_path)
    assert con.execute("SELECT count(*) FROM probs").fetchone()[0] == 0
    assert con.execute("SELECT count(*) FROM hidden WHERE run = ?", ["wiki"]).fetchone()[0] == 0
    assert con.execute("SELECT count(ner_tag), count(segment), count(in_answer) FROM tokens").fetchone() == (0, 0, 0)
    q = "SELECT r.run, avg(len(p.router_probs)) FROM routing r LEFT JOIN probs p USING (run, token_idx) GROUP BY r.run"
    assert con.execute(q).fetchall()[0][0] == "wiki"


def test_runs_table_and_half_written_runs(runs_dir: Path) -> None:
    (runs_dir / "crashed").mkdir()
    (runs_dir / "crashed" / "config.json").write_text(json.dumps({"mode": "switch", "num_experts": 4}))
    (runs_dir / "crashed" / "run.json").write_text('{"status": "runn')  # half-written
    (runs_dir / "notarun").mkdir()
    con = connect(runs_dir)
    rows = con.execute("SELECT run, status, mode, num_experts, epoch FROM runs ORDER BY run").fetchall()
    assert rows == [("crashed", "unknown", "switch", 4, None), ("ner", "finished", "noisy_topk", 8, 1),
                    ("wiki", "finished", "noisy_topk", 8, 1)]


def test_empty_or_missing_dir_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(MoeLensError, match="no runs in"):
        connect(tmp_path)
    with pytest.raises(MoeLensError, match="does not exist"):
        connect(tmp_path / "nope")


def test_sandbox_reads_views_but_no_files(runs_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> None:
    con = connect(runs_dir, read_only_sandbox=True)
    assert con.execute("SELECT count(*) FROM routing WHERE run = 'ner'").fetchone()[0] == 240
    assert con.execute("SELECT count(ner_tag) FROM tokens").fetchone()[0] == 60
    out = tmp_path_factory.mktemp("out")
    for bad in (f"COPY (SELECT 1) TO '{out / 'x.csv'}'", "SELECT * FROM read_csv('/etc/passwd')",
                f"COPY routing TO '{runs_dir / 'x.parquet'}' (FORMAT parquet)",
                f"SELECT * FROM read_parquet('{runs_dir}/wiki/metrics.parquet')",
                f"ATTACH '{runs_dir / 'x.db'}'", "SET enable_external_access = true"):
        with pytest.raises(duckdb.Error):
            con.execute(bad)
    assert not (out / "x.csv").exists() and not (runs_dir / "x.parquet").exists() and not (runs_dir / "x.db").exists()


def test_sql_command(runs_dir: Path, capsys: pytest.CaptureFixture, tmp_path_factory: pytest.TempPathFactory) -> None:
    q = "SELECT run, count(*) AS n FROM routing GROUP BY run ORDER BY run"
    assert main(["sql", q, "--runs-dir", str(runs_dir), "--format", "csv"]) == 0
    assert capsys.readouterr().out.splitlines() == ["run,n", "ner,240", "wiki,640"]
    assert main(["sql", q, "--runs-dir", str(runs_dir), "--format", "json"]) == 0
    assert json.loads(capsys.readouterr().out.splitlines()[0]) == {"run": "ner", "n": 240}
    out = tmp_path_factory.mktemp("o") / "r.parquet"
    assert main(["sql", q, "--runs-dir", str(runs_dir), "--format", "parquet", "--out", str(out)]) == 0
    assert duckdb.sql(f"SELECT sum(n) FROM '{out}'").fetchall() == [(880,)]
    assert main(["sql", q, "--runs-dir", str(runs_dir)]) == 0
    assert "wiki" in capsys.readouterr().out
    assert main(["sql", "SELEC oops", "--runs-dir", str(runs_dir)]) == 2
    err = capsys.readouterr().err
    assert err.startswith("moe-lens sql: error:") and len(err.strip().splitlines()) == 1
    assert main(["sql", "SELECT 1", "--runs-dir", str(runs_dir / "nope")]) == 2
