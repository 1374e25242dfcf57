"""The committed sample_runs/: complete, small, joinable, and what trainers/sample_runs.py writes today."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moe_lens.store import connect

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_runs"
MODES = ("dense", "naive_topk", "topk_mask", "noisy_topk", "importance", "load", "switch", "hybrid")
RUNS = [f"{d}-{m}" for d in ("wikitext2", "conll2003", "squad") for m in MODES]


def test_sample_runs_are_committed_complete_and_small() -> None:
    assert sorted(p.name for p in SAMPLE.iterdir() if p.is_dir()) == sorted(RUNS)
    size = sum(f.stat().st_size for f in SAMPLE.rglob("*") if f.is_file())
    assert size <= 30 * 2**20, f"sample_runs is {size / 2**20:.1f} MB"
    assert not list(SAMPLE.glob("*/checkpoints"))
    con = connect(SAMPLE)
    status = dict(con.execute("SELECT run, status FROM runs").fetchall())
    assert status == {r: "finished" for r in RUNS}
    unjoined = con.execute("SELECT count(*) FROM routing r ANTI JOIN tokens t USING (run, dataset, split, token_idx)").fetchall()
    assert unjoined[0][0] == 0
    dupes = con.execute("SELECT count(*) - count(DISTINCT (run, dataset, split, token_idx)) FROM tokens").fetchall()
    assert dupes[0][0] == 0
    probe = con.execute("SELECT DISTINCT dataset FROM routing WHERE run = 'wikitext2-load' ORDER BY 1").fetchall()
    assert [p[0] for p in probe] == ["conll2003", "squad", "wikitext2"]  # the cross-dataset replay
    for table in ("routing", "hidden", "metrics"):
        runs_with = {r[0] for r in con.execute(f"SELECT DISTINCT run FROM {table}").fetchall()}
        assert runs_with == set(RUNS), table


def _schema(run_dir: Path) -> dict[str, object]:
    """Column names and Arrow types of every table of a run, and the keys of its JSON files."""
    out: dict[str, object] = {}
    for table in ("tokens", "routing", "hidden"):
        part = sorted((run_dir / table).rglob("part-*.parquet"))[0]
        out[table] = [(f.name, str(f.type)) for f in pq.read_schema(part)]
    out["metrics"] = [(f.name, str(f.type)) for f in pq.read_schema(run_dir / "metrics.parquet")]
    out["metric_names"] = sorted(set(pq.read_table(run_dir / "metrics.parquet").column("name").to_pylist()))
    for name in ("config.json", "run.json"):
        out[name] = sorted(json.loads((run_dir / name).read_text()))
    return out


@pytest.mark.integration
def test_regenerated_run_has_the_committed_schema(real_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "regen"
    cmd = [sys.executable, str(REPO / "trainers" / "sample_runs.py"), "--out", str(out), "--data-dir", str(real_data_dir),
           "--only", "conll2003", "--modes", "naive_topk", "--epochs", "1", "--epoch-steps", "4", "--no-probe",
           "--jobs", "1"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    fresh, committed = _schema(out / "conll2003-naive_topk"), _schema(SAMPLE / "conll2003-naive_topk")
    for key in committed:
        assert fresh[key] == committed[key], key
    assert not (out / "conll2003-naive_topk" / "checkpoints").exists()


def test_readme_sql_examples_run_on_sample_runs(capsys: pytest.CaptureFixture) -> None:
    """Every `moe-lens sql --runs-dir sample_runs "..."` line of the README answers on the committed runs."""
    import re
    import shlex

    from moe_lens.cli import main

    lines = [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("moe-lens sql --runs-dir sample_runs")]
    assert lines
    for line in lines:
        argv = shlex.split(re.sub(r"\s+#.*$", "", line))[1:]
        assert main([*argv[:2], str(SAMPLE), *argv[3:]]) == 0, line
        assert "conll2003-load" in capsys.readouterr().out
