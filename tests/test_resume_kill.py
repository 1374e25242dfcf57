"""Stops at random steps by SIGKILL, SIGINT and SIGTERM, each followed by a plain `--resume`: the
finished run equals the uninterrupted one exactly (CI runs this on the real CoNLL data)."""
from __future__ import annotations

import argparse
import json
import os
import random
import signal
import subprocess
import sys
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from moe_lens.train import train
from moe_lens.train_cli import add_config_flags, config_from_args
from run_tables import assert_same_run, duplicates

pytestmark = pytest.mark.integration

# 2 epochs x 14 steps, a checkpoint every 2 steps, every training batch and 3 evaluation batches recorded
FLAGS = ["--dataset", "conll2003", "--mode", "load", "--d-embed", "16", "--d-model", "16", "--expert-hidden", "16",
         "--num-experts", "4", "--batch-size", "16", "--warmup-steps", "2", "--epochs", "2", "--epoch-steps", "14",
         "--checkpoint-every", "2", "--record", "--record-every", "1", "--record-probs", "--record-flush-rows", "300",
         "--hidden-sample", "20000", "--max-eval-batches", "3", "--no-pos-tags", "--no-progress"]  # fmt: skip

# A child `moe-lens train` that sends itself SIGNAL at the end of step STOP's optimizer update (SIGKILL dies
# there, before that step's log and checkpoint; SIGINT/SIGTERM stop at the next step boundary).
CHILD = """
import os, signal, sys
from moe_lens import train
from moe_lens.cli import main
stop, sig = int(sys.argv[1]), getattr(signal, sys.argv[2])
real = train._Loop._advance_bar
def advance(self):
    real(self)
    if self.step == stop:
        os.kill(os.getpid(), sig)
train._Loop._advance_bar = advance
sys.exit(main(sys.argv[3:]))
"""


def stops(seed: int = 19) -> list[tuple[int, str]]:
    """Six seeded random stop steps of 1..27 (three SIGKILL, two SIGINT, one SIGTERM in seeded order),
    plus SIGTERM at step 14, the epoch's last (that stop happens inside the evaluation)."""
    rng = random.Random(seed)
    steps = sorted(rng.sample([s for s in range(1, 28) if s != 14], 6))
    sigs = rng.sample(["SIGKILL"] * 3 + ["SIGINT"] * 2 + ["SIGTERM"], 6)
    return sorted([*zip(steps, sigs), (14, "SIGTERM")])


def test_stops_mix_every_signal() -> None:
    assert {s for _, s in stops()} == {"SIGKILL", "SIGINT", "SIGTERM"} and len(stops()) >= 5


def test_random_kills_and_resumes_equal_the_uninterrupted_run(real_data_dir: Path, tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    # the PyTorch expert kernel in every process: no child compiles the C++ one (and all use the same kernel)
    monkeypatch.setenv("MOE_LENS_CPU_EXT", "0")
    p = argparse.ArgumentParser()  # the reference: the same flags, in this process, never stopped
    add_config_flags(p)
    p.add_argument("--no-progress", action="store_true")
    ref_args = p.parse_args([*FLAGS, "--data-dir", str(real_data_dir), "--runs-dir", str(tmp_path / "ref"),
                             "--run-name", "k"])  # fmt: skip
    reference = train(config_from_args(ref_args), progress=False)

    runs = tmp_path / "runs"
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(sys.path)}
    where = ["--run-name", "k", "--runs-dir", str(runs)]
    first = True
    for step, sig in stops():
        args = [*FLAGS, "--data-dir", str(real_data_dir)] if first else ["--resume", "--no-progress"]
        done = subprocess.run([sys.executable, "-c", CHILD, str(step), sig, "train", *args, *where], env=env,
                              capture_output=True, text=True, timeout=300)  # fmt: skip
        first = False
        expected = {"SIGKILL": -signal.SIGKILL, "SIGINT": 130, "SIGTERM": 143}[sig]
        assert done.returncode == expected, (step, sig, done.stderr[-2000:])
        state = json.loads((runs / "k" / "run.json").read_text())
        if sig == "SIGKILL":
            assert state["status"] == "running"  # the process died; run.json could not say so
        else:
            assert state["status"] == "interrupted" and state["stopped_by"] == sig
            assert f"resume with: moe-lens train --resume --run-name k --runs-dir {runs}" in done.stderr
            assert len(done.stderr.strip().splitlines()) == 1
        for f in (runs / "k").rglob("*.parquet"):
            pq.read_table(f)  # readable after every stop
    done = subprocess.run([sys.executable, "-m", "moe_lens.cli", "train", "--resume", "--no-progress", *where],
                          env=env, capture_output=True, text=True, timeout=300)  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    run = runs / "k"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert list(run.rglob("*.tmp")) == []
    assert set(duplicates(run).values()) == {0}
    assert_same_run(reference, run)
