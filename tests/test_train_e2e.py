"""End to end on the real datasets: every mode on every dataset trains and records readable traces."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from moe_lens.config import MODES, RunConfig
from moe_lens.store import connect
from moe_lens.train import train

pytestmark = pytest.mark.integration

TINY = dict(d_embed=16, d_model=16, expert_hidden=16, num_experts=4, batch_size=16, warmup_steps=2,
            record=True, record_every=1, pos_tags=False, hidden_sample=50)  # fmt: skip
DATA_ARGS = {"wikitext2": dict(vocab_size=500, bptt=12), "conll2003": {}, "squad": dict(max_len=64)}


def tiny_cfg(real_data_dir: Path, runs: Path, dataset: str, mode: str, **kw) -> RunConfig:
    top_k = {"dense": 1, "switch": 1, "hybrid": 1, "hash": 1}.get(mode, 2)
    base = {**TINY, "num_experts": 1 if mode == "dense" else 4, "top_k": top_k}
    return RunConfig.for_mode(mode, dataset=dataset, data_dir=str(real_data_dir), runs_dir=str(runs),
                              run_name=f"{dataset}-{mode}", **{**base, **DATA_ARGS[dataset], **kw})  # fmt: skip


def check_traces(runs: Path, run: str, cfg: RunConfig) -> None:
    con = connect(runs)
    for view in ("runs", "tokens", "routing", "metrics"):  # hidden: the full-split test below
        assert con.execute(f"SELECT count(*) FROM {view} WHERE run = ?", [run]).fetchall()[0][0] > 0, view
    per_batch = con.execute(
        """SELECT split, step, count(*) AS rows, count(DISTINCT token_idx) AS toks,
                  count(DISTINCT (token_idx, layer, rank)) AS keys
           FROM routing WHERE run = ? GROUP BY split, step""", [run]).df()  # fmt: skip
    assert set(per_batch["split"]) == {"train", "valid"}
    assert (per_batch["rows"] == per_batch["keys"]).all()  # no duplicate rows: padding would repeat token 0
    if cfg.router != "expert_choice":
        assert (per_batch["rows"] == per_batch["toks"] * cfg.top_k).all()  # tokens x layers x k
    unjoined = con.execute(
        """SELECT count(*) FROM routing r ANTI JOIN tokens t USING (run, dataset, split, token_idx)
           WHERE r.run = ?""", [run]).fetchall()[0][0]  # fmt: skip
    assert unjoined == 0
    experts = con.execute("SELECT min(expert), max(expert) FROM routing WHERE run = ?", [run]).fetchall()[0]
    assert 0 <= experts[0] and experts[1] < cfg.num_experts


@pytest.mark.parametrize("dataset", ["wikitext2", "conll2003", "squad"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_every_mode_on_every_dataset_trains_and_records(real_data_dir: Path, tmp_path: Path, dataset: str,
                                                        mode: str) -> None:
    cfg = tiny_cfg(real_data_dir, tmp_path, dataset, mode, max_steps=3, max_eval_batches=2)
    run_dir = train(cfg, progress=False)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    for f in run_dir.rglob("*.parquet"):
        pq.read_table(f)  # every file is complete and readable
    check_traces(tmp_path, run_dir.name, cfg)


def test_full_validation_split_is_recorded_once_per_token(real_data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny_cfg(real_data_dir, tmp_path, "conll2003", "noisy_topk", max_steps=2)
    train(cfg, progress=False)
    con = connect(tmp_path)
    n_tokens, n_rows, n_distinct = con.execute(
        """SELECT (SELECT count(*) FROM tokens WHERE split = 'valid'), count(*), count(DISTINCT token_idx)
           FROM routing WHERE split = 'valid'""").fetchall()[0]  # fmt: skip
    assert n_tokens == 51_362  # CoNLL-2003 valid
    assert n_distinct == n_tokens and n_rows == 2 * n_tokens
    hidden = con.execute("SELECT count(DISTINCT token_idx), max(len(hidden)) FROM hidden").fetchall()[0]
    assert hidden == (50, 32)  # the fixed sample; BiLSTM states are 2 * d_model wide


def test_same_seed_gives_identical_traces_on_cpu(real_data_dir: Path, tmp_path: Path) -> None:
    tables = []
    for name in ("a", "b"):
        cfg = tiny_cfg(real_data_dir, tmp_path / name, "conll2003", "noisy_topk", max_steps=4, max_eval_batches=3)
        run_dir = train(cfg, progress=False)
        t = pq.read_table(run_dir / "routing").to_pandas()
        tables.append(t.sort_values(["split", "step", "token_idx", "rank"]).reset_index(drop=True))
    assert len(tables[0]) > 0
    assert tables[0].equals(tables[1])


def test_sigkill_while_recording_leaves_readable_files_and_resume_has_no_duplicates(
    real_data_dir: Path, tmp_path: Path
) -> None:
    args = [sys.executable, "-m", "moe_lens.cli", "train", "--dataset", "conll2003", "--mode", "noisy_topk",
            "--data-dir", str(real_data_dir), "--runs-dir", str(tmp_path), "--run-name", "k", "--epochs", "2",
            "--batch-size", "256", "--d-embed", "16", "--d-model", "16", "--expert-hidden", "16", "--record",
            "--record-every", "1", "--record-flush-rows", "300", "--no-pos-tags", "--no-progress"]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.Popen(args, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    run = tmp_path / "k"
    deadline = time.time() + 240
    while time.time() < deadline and proc.poll() is None:
        if (run / "checkpoints" / "epoch-0.pt").exists() and list(run.glob("routing/*/split=train/epoch=1/*.parquet")):
            break
        time.sleep(0.05)
    assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    for f in run.rglob("*.parquet"):
        pq.read_table(f)  # nothing half-written
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "running" and state["step"] > 0 and state["epoch"] == 0  # how far it got
    done = subprocess.run([*args, "--resume"], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    routing = pq.read_table(run / "routing").to_pandas()
    keys = ["dataset", "split", "epoch", "step", "token_idx", "layer", "rank"]
    assert not routing.duplicated(keys).any()
    train_steps = np.sort(routing.loc[routing["split"] == "train", "step"].unique())
    assert np.array_equal(train_steps, np.arange(1, train_steps.max() + 1))  # every step once, none lost
    metrics = pq.read_table(run / "metrics.parquet").to_pandas()
    assert not metrics.duplicated(["step", "split", "name", "expert"]).any()
