"""Smoke test of trainers/saidl.py (the SAiDL 2024 gating study sweep) on the tiny CoNLL fixture."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest

from moe_lens.data import load_split

FIX = Path(__file__).parent / "fixtures" / "data"
SCRIPT = Path(__file__).resolve().parents[1] / "trainers" / "saidl.py"


@pytest.fixture(scope="module")
def saidl():
    spec = importlib.util.spec_from_file_location("saidl", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


@pytest.fixture()
def glove(tmp_path: Path) -> Path:
    """A 50d GloVe file holding the lowercased fixture words (random vectors)."""
    words = sorted({w.lower() for w in load_split("conll2003", "train", FIX, pos=False).tokens["token"].astype(str)})
    rng = np.random.default_rng(0)
    path = tmp_path / "glove.txt"
    path.write_text("".join(f"{w} {' '.join(f'{x:.4f}' for x in rng.normal(size=50))}\n" for w in words))
    return path


def test_configs_follow_the_report_and_our_setup(saidl) -> None:
    kw = dict(runs_dir="r", data_dir=None, embeddings="g.txt")
    rep = saidl.make_config("conll2003", "report", "importance", **kw)
    assert (rep.router, rep.num_experts, rep.top_k, rep.w_importance) == ("topk_mask", 8, 2, 0.1)
    assert rep.freeze_embeddings and not rep.case_features and rep.dropout == 0.0 and rep.weight_decay == 0.0
    assert (rep.d_embed, rep.d_model, rep.expert_hidden, rep.batch_size, rep.lr, rep.epochs, rep.max_len) == \
        (50, 128, 128, 32, 1e-3, 10, 128)
    dense = saidl.make_config("squad", "report", "dense", **kw)
    assert (dense.num_experts, dense.top_k, dense.epochs, dense.max_len) == (1, 1, 5, 256)  # one expert
    ours = saidl.make_config("conll2003", "moelens", "load", **kw)
    assert ours.case_features and not ours.freeze_embeddings and ours.w_load == 0.1 and ours.run_name == \
        "conll2003-moelens-load"
    assert not saidl.make_config("squad", "moelens", "load", **kw).case_features  # the tagger's feature only


def test_sweep_trains_records_and_prints_the_tables(saidl, tmp_path: Path, glove: Path, capsys) -> None:
    runs = tmp_path / "runs"
    args = ["--dataset", "conll2003", "--setup", "both", "--runs-dir", str(runs), "--data-dir", str(FIX),
            "--embeddings", str(glove), "--variants", "dense", "load", "--epochs", "1", "--max-steps", "1"]
    assert saidl.main(args) == 0
    text = (runs / "saidl-conll2003.md").read_text()
    assert text in capsys.readouterr().out
    assert "## setup `report`" in text and "## setup `moelens`" in text
    for line in ("| dense | finished |", "| load | finished |"):
        assert text.count(line) == 2  # one row per setup
    assert "97.08" in text and "0.1133" in text  # the report's numbers beside ours
    assert "epoch 0" in text and "| - | - |" not in text  # effective experts and dead experts filled
    cfg = json.loads((runs / "conll2003-moelens-load" / "config.json").read_text())
    assert cfg["case_features"] and cfg["num_experts"] == 8 and cfg["record"]
    before = (runs / "conll2003-report-dense" / "run.json").read_text()
    assert saidl.main(args) == 0  # a rerun skips finished runs and only prints the tables
    assert "finished, skipped" in capsys.readouterr().out
    assert (runs / "conll2003-report-dense" / "run.json").read_text() == before


def test_parallel_jobs_run_as_subprocesses(saidl, tmp_path: Path, glove: Path) -> None:
    runs = tmp_path / "runs"
    args = ["--dataset", "conll2003", "--setup", "moelens", "--runs-dir", str(runs), "--data-dir", str(FIX),
            "--embeddings", str(glove), "--variants", "dense", "noisy_topk", "--epochs", "1", "--max-steps", "1",
            "--jobs", "2"]  # fmt: skip
    assert saidl.main(args) == 0
    for v in ("dense", "noisy_topk"):
        assert json.loads((runs / f"conll2003-moelens-{v}" / "run.json").read_text())["status"] == "finished"
        assert (runs / "logs" / f"conll2003-moelens-{v}.log").is_file()
