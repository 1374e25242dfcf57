"""--resume: config from config.json, checkpoints within an epoch, an exact continuation, .tmp cleanup."""
from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from moe_lens import resume
from moe_lens import train as train_mod
from moe_lens.cli import main
from moe_lens.config import RunConfig
from moe_lens.tasks.ner import NERTask
from moe_lens.train import train
from run_tables import assert_same_run, duplicates, read_table

TINY = dict(dataset="conll2003", d_embed=16, d_model=16, expert_hidden=16, num_experts=4, batch_size=16,
            warmup_steps=2, record=True, record_every=1, record_probs=True, pos_tags=False, hidden_sample=20000,
            max_eval_batches=2, epochs=2, epoch_steps=6, record_flush_rows=300)  # fmt: skip


def tiny(real_data_dir: Path, runs: Path, name: str, **kw) -> RunConfig:
    return RunConfig.for_mode("load", data_dir=str(real_data_dir), runs_dir=str(runs), run_name=name, **{**TINY, **kw})


def stop_at(monkeypatch: pytest.MonkeyPatch, step: int, action) -> None:
    """Call `action()` inside the training forward of step `step` (1-based), in this process only."""
    real = NERTask.forward
    seen = {"n": 0}

    def forward(self, model, batch, state):
        if model.training:
            seen["n"] += 1
            if seen["n"] == step:
                action()
        return real(self, model, batch, state)

    monkeypatch.setattr(NERTask, "forward", forward)


@pytest.mark.parametrize("checkpoint_every", [None, 4])
def test_interrupted_then_resumed_run_equals_the_uninterrupted_one(real_data_dir: Path, tmp_path: Path,
                                                                     monkeypatch: pytest.MonkeyPatch,
                                                                     checkpoint_every: int | None) -> None:
    """None: SIGINT during step 5, so the run stops at that step's end with a checkpoint. 4: a crash
    inside step 11 (epoch 1) after a checkpoint at step 8, so the resume rewinds the traces of steps 9-10."""
    full = train(tiny(real_data_dir, tmp_path / "a", "r", checkpoint_every=checkpoint_every), progress=False)
    cfg = tiny(real_data_dir, tmp_path / "b", "r", checkpoint_every=checkpoint_every)
    with monkeypatch.context() as m:
        if checkpoint_every is None:
            stop_at(m, 5, lambda: os.kill(os.getpid(), signal.SIGINT))
            with pytest.raises(resume.RunInterrupted) as stopped:
                train(cfg, progress=False)
            assert (stopped.value.step, stopped.value.exit_code) == (5, 130)
            state = json.loads((cfg_dir := tmp_path / "b" / "r" / "run.json").read_text())
            assert state["status"] == "interrupted" and state["stopped_by"] == "SIGINT", cfg_dir
        else:
            def crash():
                raise RuntimeError("simulated crash")

            stop_at(m, 11, crash)
            with pytest.raises(RuntimeError, match="simulated crash"):
                train(cfg, progress=False)
            ckpts = sorted(p.name for p in (tmp_path / "b" / "r" / "checkpoints").glob("*.pt"))
            assert ckpts == ["epoch-0.pt", "epoch-1-step-8.pt"]  # step 4's was superseded
            # flushed rows to rewind: forwards 9-10 of the run, labelled 8-9 (the updates their weights had)
            assert read_table(tmp_path / "b" / "r", "routing")["step"].max() == 9
    resumed = train(cfg, resume=True, progress=False)
    assert json.loads((resumed / "run.json").read_text())["status"] == "finished"
    assert set(duplicates(resumed).values()) == {0}
    assert_same_run(full, resumed)


def test_resume_reads_config_json_and_refuses_unsafe_changes(real_data_dir: Path, tmp_path: Path,
                                                             capsys: pytest.CaptureFixture) -> None:
    base = ["train", "--dataset", "conll2003", "--mode", "load", "--data-dir", str(real_data_dir),
            "--runs-dir", str(tmp_path), "--run-name", "r", "--d-embed", "16", "--d-model", "16",
            "--expert-hidden", "16", "--num-experts", "4", "--batch-size", "16", "--no-pos-tags",
            "--epochs", "1", "--max-steps", "2", "--max-eval-batches", "1", "--no-progress"]  # fmt: skip
    assert main(base) == 0
    capsys.readouterr()
    # no training flags: the sizes come from config.json (the old code built a 256-wide model and failed)
    assert main(["train", "--resume", "--run-name", "r", "--runs-dir", str(tmp_path), "--max-steps", "4",
                 "--epochs", "2", "--no-progress"]) == 0  # fmt: skip
    state = json.loads((tmp_path / "r" / "run.json").read_text())
    assert state["status"] == "finished" and state["step"] == 4
    cfg = torch.load(tmp_path / "r" / "checkpoints" / "epoch-1.pt", weights_only=False)["config"]
    assert (cfg["d_model"], cfg["mode"], cfg["w_load"], cfg["max_steps"]) == (16, "load", 0.1, 4)
    capsys.readouterr()
    rc = main(["train", "--resume", "--run-name", "r", "--runs-dir", str(tmp_path), "--mode", "noisy_topk"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1
    assert "mode ('load' -> 'noisy_topk'), w_load (0.1 -> 0.0) differ from its config.json" in err
    assert "only epochs, max_steps, device" in err
    rc = main(["train", "--resume", "--run-name", "r", "--runs-dir", str(tmp_path), "--lr", "0.1", "--d-model", "8"])
    err = capsys.readouterr().err
    assert rc == 2 and "lr (0.002 -> 0.1), d_model (16 -> 8) differ" in err


def test_resume_config_is_config_json_plus_safe_flags(tmp_path: Path) -> None:
    saved = RunConfig.for_mode("load", dataset="conll2003", d_model=16, epochs=1)
    (tmp_path / "config.json").write_text(json.dumps({**saved.to_dict(), "versions": {}}))
    cfg = resume.resume_config(tmp_path, {"epochs": 3, "record_probs": True, "run_name": "x"})
    assert cfg == RunConfig.from_dict({**saved.to_dict(), "epochs": 3, "record_probs": True, "run_name": "x"})
    assert resume.resume_config(tmp_path, {"mode": "load", "d_model": 16}) == saved  # same values: no change
    with pytest.raises(resume.MoeLensError, match=r"^--resume: top_k \(2 -> 1\) differ"):
        resume.resume_config(tmp_path, {"top_k": 1})


def test_default_checkpoints_follow_wall_time(real_data_dir: Path, tmp_path: Path,
                                              monkeypatch: pytest.MonkeyPatch) -> None:
    """checkpoint_every=None: a checkpoint once CHECKPOINT_SECONDS of wall time passed, the clock being
    4 minutes per step here, so after steps 3 and 6 (10 minutes = 2.5 steps); only the latest is kept."""
    now = {"t": 0.0}
    monkeypatch.setattr(train_mod, "clock", lambda: now["t"])
    saved: list[str] = []
    real_save = train_mod.save_checkpoint

    def save(path, payload):
        saved.append(path.name)
        real_save(path, payload)

    monkeypatch.setattr(train_mod, "save_checkpoint", save)
    real = NERTask.forward

    def tick(self, model, batch, state):
        if model.training:
            now["t"] += 240.0
        return real(self, model, batch, state)

    monkeypatch.setattr(NERTask, "forward", tick)
    run = train(tiny(real_data_dir, tmp_path, "w", epochs=1, epoch_steps=7, record=False), progress=False)
    assert train_mod.CHECKPOINT_SECONDS == 600.0
    assert saved == ["epoch-0-step-3.pt", "epoch-0-step-6.pt", "epoch-0.pt"]
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["epoch-0.pt"]  # mid-epoch ones superseded
    with_steps = tiny(real_data_dir, tmp_path, "n", epochs=1, epoch_steps=7, record=False, checkpoint_every=2)
    saved.clear()
    train(with_steps, progress=False)
    assert saved == ["epoch-0-step-2.pt", "epoch-0-step-4.pt", "epoch-0-step-6.pt", "epoch-0.pt"]


def test_resume_removes_leftover_tmp_files(real_data_dir: Path, tmp_path: Path) -> None:
    cfg = tiny(real_data_dir, tmp_path, "t", epochs=1, max_steps=2)
    run = train(cfg, progress=False)
    part = next((run / "routing").rglob("*.parquet"))
    leftovers = [part.with_name(f".{part.name}.1a2b3c4d.tmp"), run / ".run.json.tmp",
                 run / "checkpoints" / ".epoch-0-step-2.pt.tmp"]  # what killed writers leave
    for p in leftovers:
        p.write_bytes(b"half a file")
    assert sorted(resume.remove_tmp_files(run)) == sorted(leftovers)
    for p in leftovers:
        p.write_bytes(b"half a file")
    train(RunConfig.from_dict({**cfg.to_dict(), "epochs": 2, "max_steps": 3}), resume=True, progress=False)
    assert list(run.rglob("*.tmp")) == []
    for f in run.rglob("*.parquet"):
        pq.read_table(f)


def test_rewind_keeps_training_rows_up_to_the_checkpoint(tmp_path: Path) -> None:
    """Part files spanning the checkpoint are cut at its step; later evaluation partitions go."""
    import pyarrow as pa

    from moe_lens.atomic import write_table_atomic

    def part(split: str, epoch: int, steps: list[int], name: str) -> Path:
        path = tmp_path / "routing" / "dataset=d" / f"split={split}" / f"epoch={epoch}" / name
        write_table_atomic(pa.table({"step": pa.array(steps, pa.int64()), "token_idx": list(range(len(steps)))}), path)
        return path

    a = part("train", 0, [1, 2, 3], "a.parquet")
    b = part("train", 0, [4, 5, 6, 7], "b.parquet")
    c = part("train", 0, [8, 9], "c.parquet")
    v0 = part("valid", 0, [7, 7], "v.parquet")
    v1 = part("valid", 1, [9], "v.parquet")
    resume.rewind(tmp_path, step=5, epoch=0, epoch_complete=False)
    assert pq.read_table(a)["step"].to_pylist() == [1, 2, 3]
    assert pq.ParquetFile(b).read()["step"].to_pylist() == [4, 5]
    assert not c.exists() and not v0.exists() and not v1.exists() and not v1.parent.exists()
    part("valid", 0, [7, 7], "v.parquet")
    resume.rewind(tmp_path, step=7, epoch=0, epoch_complete=True)
    assert v0.exists()
