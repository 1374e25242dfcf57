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
    assert np.array_equal(train_steps, np.arange(0, train_steps.max() + 1))  # every step once from 0, none lost
    metrics = pq.read_table(run / "metrics.parquet").to_pandas()
    assert not metrics.duplicated(["step", "split", "name", "layer", "expert"]).any()


def test_nan_guard_stops_with_a_clear_message_and_keeps_what_was_written(
    real_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from moe_lens.errors import MoeLensError
    from moe_lens.tasks.ner import NERTask

    real_forward = NERTask.forward
    calls = {"n": 0}

    def poisoned(self, model, batch, state):
        fwd = real_forward(self, model, batch, state)
        calls["n"] += 1
        if calls["n"] == 60:  # a loss that went non-finite mid-epoch
            fwd.loss = fwd.loss * float("nan")
        return fwd

    monkeypatch.setattr(NERTask, "forward", poisoned)
    cfg = tiny_cfg(real_data_dir, tmp_path, "conll2003", "noisy_topk", max_steps=200, record_flush_rows=500)
    with pytest.raises(MoeLensError, match="non-finite training loss .* at step 100"):
        train(cfg, progress=False)
    run = tmp_path / "conll2003-noisy_topk"
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed" and "non-finite" in state["error"]
    metrics = pq.read_table(run / "metrics.parquet").to_pandas()
    assert metrics["step"].max() == 50  # the last good log is kept
    for f in run.rglob("*.parquet"):
        pq.read_table(f)
    assert len(list(run.glob("routing/**/*.parquet"))) > 0


def test_record_replays_a_wikitext_model_over_conll_and_squad(real_data_dir: Path, tmp_path: Path) -> None:
    from moe_lens.probe import record_run

    cfg = tiny_cfg(real_data_dir, tmp_path, "wikitext2", "noisy_topk", max_steps=3, max_eval_batches=2)
    run_dir = train(cfg, progress=False)
    vm = record_run(run_dir, "conll2003", "valid", data_dir=str(real_data_dir))
    assert vm["ppl"] > 1
    record_run(run_dir, "conll2003", "valid", data_dir=str(real_data_dir))  # again: replaces, no duplicates
    con = connect(tmp_path)
    rows = con.execute("""SELECT dataset, count(*), count(DISTINCT (token_idx, rank)) FROM routing
                          WHERE split = 'valid' GROUP BY dataset ORDER BY dataset""").fetchall()  # fmt: skip
    conll = rows[0]
    assert conll[0] == "conll2003" and conll[1] == conll[2]
    assert conll[1] == 2 * 16 * (51_362 // 16 - 1)  # one stream cut into 16 rows; the last step is only a target
    unjoined = con.execute("""SELECT count(*) FROM routing r ANTI JOIN tokens t USING (run, dataset, split, token_idx)
                              WHERE r.dataset = 'conll2003'""").fetchall()[0][0]  # fmt: skip
    assert unjoined == 0
    ner = con.execute("SELECT count(*) FROM tokens WHERE dataset = 'conll2003' AND ner_tag IS NOT NULL").fetchall()
    assert ner[0][0] == 51_362
    probe = pq.read_table(run_dir / "metrics.parquet").to_pandas()
    assert (probe["split"] == "probe:conll2003:valid").sum() == 2  # loss and ppl, once


def test_tensorboard_mirrors_the_metrics(real_data_dir: Path, tmp_path: Path) -> None:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    cfg = tiny_cfg(real_data_dir, tmp_path, "conll2003", "switch", max_steps=3, max_eval_batches=2, tensorboard=True)
    run_dir = train(cfg, progress=False)
    events = EventAccumulator(str(run_dir / "tensorboard"))
    events.Reload()
    tags = set(events.Tags()["scalars"])
    assert {"train/loss", "train/aux_loss", "valid/f1", "valid/accuracy", "train/load/layer0/expert0",
            "train/aux_loss/layer0"} <= tags
    metrics = pq.read_table(run_dir / "metrics.parquet").to_pandas()
    f1 = metrics.loc[(metrics["split"] == "valid") & (metrics["name"] == "f1"), "value"].iloc[0]
    assert events.Scalars("valid/f1")[0].value == pytest.approx(f1, rel=1e-6)
