"""A damaged runs directory (issue 19, items 3, 6, 7): invalid run.json/config.json named with file and line
everywhere, a dead process shown as `killed`, damaged Parquet parts left out (and named) by `connect`, `sql`,
`report` and `figure`, and `moe-lens check [--fix]`. Expected row counts come from pyarrow over the files
that remain readable, never from the code under test."""
from __future__ import annotations

import json
import shutil
import socket
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from moe_lens import health, report
from moe_lens.cli import main
from moe_lens.figures import build
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run

BAD_CONFIG = '{\n  "mode": "load",\n    }\n'  # line 3, column 5: a '}' where a property name must follow ','
WANT = "config.json:3: Expecting property name enclosed in double quotes (column 5)"


@pytest.fixture
def runs_dir(tmp_path: Path) -> Path:
    d = tmp_path / "runs"
    write_synthetic_run(d, "good", num_tokens=200)
    write_synthetic_run(d, "hurt", num_tokens=200, seed=1, mode="switch", top_k=1)
    return d


def _parts(run_dir: Path, table: str) -> list[Path]:
    return sorted(run_dir.glob(f"{table}/**/part-*.parquet"))


def _rows(files: list[Path]) -> int:
    return sum(pq.read_metadata(f).num_rows for f in files)


def _truncate(path: Path) -> None:
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])  # the footer is gone, as after a crash mid-write by other code


def test_invalid_json_names_the_file_and_line(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    (runs_dir / "hurt" / "config.json").write_text(BAD_CONFIG)
    with pytest.raises(health.DamagedFile) as e:
        health.read_json(runs_dir / "hurt" / "config.json")
    assert str(e.value) == f"{runs_dir / 'hurt' / WANT}"
    assert "\n" not in str(e.value)
    # moe-lens runs: the run is listed, with one stderr line naming the file and line
    assert main(["runs", "--runs-dir", str(runs_dir)]) == 0
    out, err = capsys.readouterr()
    assert [line for line in err.splitlines() if "damaged" in line] == [f"moe-lens runs: damaged: {runs_dir / 'hurt' / WANT}"]
    assert any(line.startswith("hurt ") for line in out.splitlines())
    # the runs view: problems names it; the run is still there, with its run.json status
    con = connect(runs_dir)
    assert "hurt/" + WANT in capsys.readouterr().err
    rows = dict(con.execute("SELECT run, problems FROM runs").fetchall())
    assert rows == {"good": None, "hurt": WANT}
    assert con.execute("SELECT status, mode FROM runs WHERE run = 'hurt'").fetchall() == [("finished", None)]
    # report: a DAMAGED line instead of a silent mode=None
    text = report.summary(con, "hurt")
    assert f"DAMAGED:  {WANT}" in text.splitlines()
    assert "DAMAGED" not in report.summary(con, "good")
    # a damaged run.json: status unknown, named the same way
    (runs_dir / "good" / "run.json").write_text('{"status": "runn')
    con = connect(runs_dir, warn=False)
    row = con.execute("SELECT status, problems FROM runs WHERE run = 'good'").fetchall()
    assert row == [("unknown", "run.json:1: Unterminated string starting at (column 12)")]


def _dead_pid() -> int:
    p = subprocess.Popen([sys.executable, "-c", "pass"])
    p.wait()
    return p.pid


@pytest.mark.parametrize("case", ["dead-here", "alive-here", "dead-elsewhere", "dead-no-host"])
def test_a_running_run_whose_process_is_gone_is_killed(runs_dir: Path, case: str,
                                                        capsys: pytest.CaptureFixture) -> None:
    import os

    pid = os.getpid() if case == "alive-here" else _dead_pid()
    state = {"status": "running", "pid": pid, "step": 3, "epoch": 0}
    if case != "dead-no-host":
        state["host"] = "elsewhere.invalid" if case == "dead-elsewhere" else socket.gethostname()
    (runs_dir / "hurt" / "run.json").write_text(json.dumps(state))
    want = "running" if case in ("alive-here", "dead-elsewhere") else "killed"
    assert health.run_status(state) == want
    con = connect(runs_dir)
    assert dict(con.execute("SELECT run, status FROM runs").fetchall()) == {"good": "finished", "hurt": want}
    capsys.readouterr()
    assert main(["runs", "--runs-dir", str(runs_dir)]) == 0
    line = next(r for r in capsys.readouterr().out.splitlines() if r.startswith("hurt "))
    assert line.split()[3] == want


def test_connect_leaves_a_truncated_part_out_and_names_it(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    parts = _parts(runs_dir / "hurt", "routing")
    bad = parts[1]
    _truncate(bad)
    good_rows = {"good": _rows(_parts(runs_dir / "good", "routing")), "hurt": _rows(parts[:1] + parts[2:])}
    con = connect(runs_dir)  # the old code raised here (DuckDB: "No magic bytes found at end of file")
    err = [line for line in capsys.readouterr().err.splitlines() if line]
    rel = bad.relative_to(runs_dir / "hurt").as_posix()
    assert len(err) == 1 and f"hurt/{rel}: unreadable Parquet" in err[0]
    assert dict(con.execute("SELECT run, count(*) FROM routing GROUP BY run").fetchall()) == good_rows
    problems = con.execute("SELECT problems FROM runs WHERE run = 'hurt'").fetchone()[0]
    assert problems.startswith(f"{rel}: unreadable Parquet") and ";" not in problems
    # the sandbox (the app's console) leaves it out the same way
    sandbox = connect(runs_dir, read_only_sandbox=True, warn=False)
    assert dict(sandbox.execute("SELECT run, count(*) FROM routing GROUP BY run").fetchall()) == good_rows


def test_sql_works_with_a_garbage_metrics_file_and_an_empty_tokens_part(runs_dir: Path,
                                                                         capsys: pytest.CaptureFixture) -> None:
    (runs_dir / "hurt" / "metrics.parquet").write_bytes(b"this is not parquet at all" * 10)
    tokens = _parts(runs_dir / "hurt", "tokens")
    tokens[0].write_bytes(b"")
    assert main(["sql", "--runs-dir", str(runs_dir), "SELECT 1 AS one"]) == 0  # failed on the old code
    out, err = capsys.readouterr()
    assert out.split() == ["one", "1"]
    assert "hurt/metrics.parquet: unreadable Parquet" in err and "empty file (0 bytes)" in err
    assert len(err.strip().splitlines()) == 2
    q = "SELECT run, count(*) AS n FROM tokens GROUP BY run ORDER BY run"
    assert main(["sql", "--runs-dir", str(runs_dir), "--format", "csv", q]) == 0
    got = pd.read_csv(pd.io.common.StringIO(capsys.readouterr().out)).set_index("run")["n"].to_dict()
    assert got == {"good": _rows(_parts(runs_dir / "good", "tokens")), "hurt": _rows(tokens[1:])}
    con = connect(runs_dir, warn=False)
    assert con.execute("SELECT DISTINCT run FROM metrics").fetchall() == [("good",)]


def test_report_and_figure_work_around_a_damaged_part(runs_dir: Path, tmp_path: Path,
                                                     capsys: pytest.CaptureFixture) -> None:
    clean = tmp_path / "clean"
    shutil.copytree(runs_dir, clean)
    bad = _parts(runs_dir / "hurt", "routing")[0]  # train, epoch 0
    _truncate(bad)
    (clean / bad.relative_to(runs_dir)).unlink()  # the same directory without the damaged file
    assert main(["report", "hurt", "--runs-dir", str(runs_dir)]) == 0
    out = capsys.readouterr().out
    assert "DAMAGED:  routing/" in out and "balance:" in out
    # the figure's numbers are those of the directory without the damaged file
    html = tmp_path / "collapse.html"
    assert main(["figure", "collapse-curve", "--runs-dir", str(runs_dir), "--out", str(html)]) == 0
    assert html.stat().st_size > 0
    got = build(connect(runs_dir, warn=False), "collapse-curve", None)[1]
    want = build(connect(clean, warn=False), "collapse-curve", None)[1]
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want.reset_index(drop=True))
    assert report.summary(connect(runs_dir, warn=False), "good") == report.summary(connect(clean), "good")


def test_check_lists_and_fix_quarantines(runs_dir: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["check", str(runs_dir)]) == 0
    capsys.readouterr()
    bad = _parts(runs_dir / "hurt", "routing")[2]
    _truncate(bad)
    (runs_dir / "good" / "metrics.parquet").write_bytes(b"")
    (runs_dir / "good" / "config.json").write_text(BAD_CONFIG)
    rows = _rows([p for p in _parts(runs_dir / "hurt", "routing") if p != bad])
    assert main(["check", str(runs_dir)]) == 1
    out, err = capsys.readouterr()
    listed = [line for line in out.splitlines() if line.startswith("damaged: ")]
    want = [f"damaged: good/{WANT}", "damaged: good/metrics.parquet: empty file (0 bytes)",
            f"damaged: hurt/{bad.relative_to(runs_dir / 'hurt').as_posix()}: unreadable Parquet (Parquet magic bytes"]
    assert len(listed) == 3 and all(got.startswith(w) for got, w in zip(sorted(listed), sorted(want)))
    assert "3 damaged files in 2 runs: good, hurt" in err
    assert bad.exists()  # listing moves nothing
    assert main(["check", str(runs_dir), "--fix"]) == 0
    capsys.readouterr()
    moved = runs_dir / "hurt" / "quarantine" / bad.relative_to(runs_dir / "hurt")
    assert moved.is_file() and not bad.exists()
    assert (runs_dir / "good" / "quarantine" / "metrics.parquet").is_file()
    assert (runs_dir / "good" / "quarantine" / "config.json").read_text() == BAD_CONFIG
    assert main(["check", str(runs_dir)]) == 0
    con = connect(runs_dir)
    assert capsys.readouterr().err == ""
    assert con.execute("SELECT count(*) FROM routing WHERE run = 'hurt'").fetchone()[0] == rows
    assert con.execute("SELECT count(*) FROM runs WHERE problems IS NOT NULL").fetchone()[0] == 0
