"""benchmarks/gpu_check.py end to end on the CPU (`--device cpu --tiny`), as the device command runs it, with
the packages the GPU machine lacks (duckdb, streamlit, spacy) made unimportable: the GPU call can then fail
only for GPU reasons."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]
BLOCK = """
import importlib.abc, runpy, sys
class Missing(importlib.abc.MetaPathFinder):  # not installed on the GPU machine (.library/device/KINDS.md)
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in ("duckdb", "streamlit", "spacy"):
            raise ImportError(f"{name} is not installed on the GPU machine")
sys.meta_path.insert(0, Missing())
sys.argv = ["gpu_check.py", *sys.argv[1:]]
runpy.run_path("benchmarks/gpu_check.py", run_name="__main__")
"""


def test_gpu_check_tiny_runs_end_to_end_on_the_cpu(tmp_path, real_data_dir):
    out, runs = tmp_path / "gpu", tmp_path / "runs"
    env = {**os.environ, "PYTHONPATH": str(ROOT), "PYTHONUNBUFFERED": "1", "MOE_LENS_DATA": str(real_data_dir),
           "MOE_LENS_CACHE": str(tmp_path / "cache"), "MOE_LENS_CPU_EXT": "0"}  # fmt: skip
    proc = subprocess.run([sys.executable, "-c", BLOCK, str(out), "--device", "cpu", "--tiny", "--runs", str(runs),
                           "--budget-s", "300"], check=False, cwd=ROOT, env=env, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    tables = {p.stem: json.loads(p.read_text()) for p in out.glob("*.json") if p.stem != "env"}
    assert set(tables) == {"moe_layer", "matmul_peak", "lm_step", "train_baseline", "train_hybrid"}
    layer = tables["moe_layer"]["rows"]
    assert {(r["e"], r["k"]) for r in layer} == {(4, 1), (4, 2), (8, 1), (8, 2)}
    assert all(r["same outputs"] and r["grouped ms"] > 0 for r in layer)
    assert [r["mode"] for r in tables["lm_step"]["rows"]] == ["baseline", "switch", "hybrid", "noisy_topk", "dense"]
    for mode in ("baseline", "hybrid"):
        (row,) = tables[f"train_{mode}"]["rows"]
        assert row["epoch"] == 1 and 1 < row["valid ppl"] < 1e4 and 1 < row["test ppl"] < 1e4
        assert json.loads((runs / f"gpu-{mode}" / "run.json").read_text())["status"] == "finished"
        assert pq.read_table(out / "runs-meta" / f"gpu-{mode}" / "metrics.parquet").num_rows > 0
    md = (out / "tables.md").read_text()
    assert md.count("### ") == 5  # each table once, rewritten as it grows


def test_a_failing_mode_leaves_an_error_row_and_the_other_modes(tmp_path, real_data_dir, monkeypatch):
    """One device call: a piece that raises (say a CUDA error in one mode) is written to errors.md and its
    table row, and the check goes on with the next mode."""
    import argparse

    sys.path.insert(0, str(ROOT / "benchmarks"))
    import gpu_check

    monkeypatch.setenv("MOE_LENS_CPU_EXT", "0")  # never wait for the CPU kernel's build here
    monkeypatch.setattr(gpu_check, "LM_MODES", ("switch", "dense"))
    real = gpu_check.lm_step_mode

    def failing(mode, *a, **kw):
        if mode == "switch":
            raise RuntimeError("CUDA error: an illegal memory access was encountered\nmore")
        return real(mode, *a, **kw)

    monkeypatch.setattr(gpu_check, "lm_step_mode", failing)
    out = tmp_path / "gpu"
    data = gpu_check.tiny_data(str(real_data_dir), tmp_path / "tiny-data")
    args = argparse.Namespace(out=str(out), device="cpu", tiny=True, data=str(data), budget_s=None, runs=None)
    epoch_s = gpu_check.part_lm_step(args, gpu_check.Tables(out))
    assert set(epoch_s) == {"dense"}
    rows = json.loads((out / "lm_step.json").read_text())["rows"]
    assert rows[0] == {"mode": "switch", "error": "RuntimeError: CUDA error: an illegal memory access was encountered"}
    assert rows[1]["mode"] == "dense" and rows[1]["tokens/s"] > 0
    assert "## lm_step switch" in (out / "errors.md").read_text()
