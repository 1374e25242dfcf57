"""`moe-lens record` with another task's model, a replay that fails part-way, and a full disk."""
from __future__ import annotations

import errno
import functools
import json
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest

from moe_lens import probe
from moe_lens.cli import main
from moe_lens.config import RunConfig
from moe_lens.errors import MoeLensError
from moe_lens.store import connect
from moe_lens.tasks.ner import NERTask
from moe_lens.train import evaluate, train

TINY = dict(dataset="conll2003", d_embed=16, d_model=16, expert_hidden=16, num_experts=4, batch_size=16,
            pos_tags=False, hidden_sample=50, max_steps=2, max_eval_batches=1, record=True, record_every=1)  # fmt: skip


@pytest.fixture(scope="module")
def tagger(real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    return train(RunConfig.for_mode("load", data_dir=str(real_data_dir), runs_dir=str(runs), run_name="tagger",
                                    **TINY), progress=False)  # fmt: skip


def short_replays(monkeypatch: pytest.MonkeyPatch, batches: int = 8) -> None:
    """The replay reads the split's first `batches` batches only (SQuAD's dev set is 1.5M tokens)."""
    monkeypatch.setattr(probe, "evaluate", functools.partial(evaluate, max_batches=batches))


@pytest.mark.parametrize("dataset", ["wikitext2", "squad"])
def test_a_tagger_over_other_text_records_routing_and_skips_f1(tagger: Path, real_data_dir: Path, dataset: str,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    short_replays(monkeypatch)
    warnings: list[str] = []
    vm = probe.record_run(tagger, dataset, "valid", data_dir=str(real_data_dir), warn=warnings.append)
    assert vm == {}  # the old code raised TypeError in entity_f1
    assert len(warnings) == 1 and "no NER labels" in warnings[0] and "routing is recorded" in warnings[0]
    part = tagger / "routing" / f"dataset={dataset}" / "split=valid"
    routing = pq.read_table(part).to_pandas()
    tokens = pq.read_table(tagger / "tokens" / f"dataset={dataset}" / "split=valid").to_pandas()
    assert len(routing) > 0
    assert np.isin(routing["token_idx"], tokens["token_idx"]).all()
    per_token = routing.groupby("token_idx").size()
    assert (per_token == 2).all()  # top_k = 2 rows for every routed token, once
    metrics = pq.read_table(tagger / "metrics.parquet").to_pandas()
    assert not (metrics["split"] == f"probe:{dataset}:valid").any()  # no metric that does not apply


def test_record_cli_says_so_in_one_line(tagger: Path, real_data_dir: Path, monkeypatch: pytest.MonkeyPatch,
                                        capsys: pytest.CaptureFixture) -> None:
    short_replays(monkeypatch)
    rc = main(["record", str(tagger), "--dataset", "wikitext2", "--data-dir", str(real_data_dir)])
    out = capsys.readouterr()
    assert rc == 0
    assert out.err.strip().startswith("moe-lens record: warning: a conll2003 tagger over wikitext2 text")
    assert len(out.err.strip().splitlines()) == 1


def test_a_failed_replay_leaves_no_partial_partition(tagger: Path, real_data_dir: Path,
                                                     monkeypatch: pytest.MonkeyPatch) -> None:
    real, seen = NERTask.forward, {"n": 0}

    def forward(self, model, batch, state):
        seen["n"] += 1
        if seen["n"] == 4:
            raise RuntimeError("out of memory (simulated)")
        return real(self, model, batch, state)

    monkeypatch.setattr(NERTask, "forward", forward)
    monkeypatch.setattr(probe, "Recorder", functools.partial(probe.Recorder, flush_rows=100))  # parts on disk early
    with pytest.raises(MoeLensError, match=r"failed part-way \(out of memory \(simulated\)\); removed its partial"):
        probe.record_run(tagger, "conll2003", "test", data_dir=str(real_data_dir))
    for table in ("routing", "probs", "hidden"):
        assert not (tagger / table / "dataset=conll2003" / "split=test").exists() or not any(
            (tagger / table / "dataset=conll2003" / "split=test").rglob("*.parquet"))
    assert connect(tagger.parent).execute("SELECT count(*) FROM routing WHERE split = 'test'").fetchone()[0] == 0


def test_disk_full_while_training_is_one_line_and_files_stay_readable(real_data_dir: Path, tmp_path: Path,
                                                                      monkeypatch: pytest.MonkeyPatch,
                                                                      capsys: pytest.CaptureFixture) -> None:
    """The 6th Parquet write finds the disk full after writing half its temporary file."""
    real_write, calls = pq.write_table, {"n": 0}

    def write_table(table, where, **kw):
        calls["n"] += 1
        if calls["n"] >= 6:
            Path(where).write_bytes(b"PAR1 half a file")
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(table, where, **kw)

    monkeypatch.setattr(pq, "write_table", write_table)
    rc = main(["train", "--dataset", "conll2003", "--data-dir", str(real_data_dir), "--runs-dir", str(tmp_path),
               "--run-name", "full", "--d-embed", "16", "--d-model", "16", "--expert-hidden", "16", "--batch-size",
               "16", "--no-pos-tags", "--max-steps", "20", "--record", "--record-every", "1", "--record-flush-rows",
               "200", "--no-progress"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1, err
    assert err.startswith(f"moe-lens train: error: disk full writing {tmp_path / 'full'}")
    assert err.endswith("(No space left on device)")
    monkeypatch.undo()
    run = tmp_path / "full"
    state = json.loads((run / "run.json").read_text())
    assert state["status"] == "failed" and state["error"].startswith("disk full writing")
    assert list(run.rglob("*.tmp")) == []
    files = list(run.rglob("*.parquet"))
    assert 2 <= len(files) <= 5  # what was written before the disk filled up (tokens tables first)
    for f in files:
        pq.read_table(f)
