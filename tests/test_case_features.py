"""`case_features` on CoNLL: casing classes, the `case` batch tensor, and the Tagger that reads it."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_lens.config import RunConfig
from moe_lens.data import load_split
from moe_lens.models import CASE_DIM, Tagger
from moe_lens.probe import record_run
from moe_lens.tasks.ner import CASE_CLASSES, NERTask, case_classes
from moe_lens.train import train

FIX = Path(__file__).parent / "fixtures" / "data"
TINY = dict(dataset="conll2003", data_dir=str(FIX), d_embed=12, d_model=8, expert_hidden=8, num_experts=4,
            batch_size=4, warmup_steps=1, pos_tags=False, dropout=0.0, case_features=True)  # fmt: skip


@pytest.fixture(autouse=True)
def _tmp_cache(tmp_path, monkeypatch):
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))


def test_casing_classes_of_hand_made_tokens() -> None:
    words = {"the": "lower", "a": "lower", "Paris": "title", "I": "title", "J.": "title", "New-york": "title",
             "EU": "upper", "U.S.": "upper", "NEW-YORK": "upper", "McDonald": "mixed", "iPhone": "mixed",
             "1996": "digit", "3-0": "digit", "A4": "digit", ",": "other", "--": "other", "": "other",
             "Ölberg": "title", "ÉTAT": "upper", "été": "lower"}  # fmt: skip
    got = case_classes(list(words))
    assert got.shape == (len(words),) and got.dtype == np.int64
    assert [CASE_CLASSES[c] for c in got] == list(words.values())
    assert "pad" not in {CASE_CLASSES[c] for c in got}  # 0 is left to padding


def test_batches_carry_the_casing_of_each_token() -> None:
    split = load_split("conll2003", "train", FIX, pos=False)
    task = NERTask(RunConfig.for_mode("noisy_topk", **TINY))
    words = split.tokens["token"].astype(str).to_numpy()
    expected = case_classes(words)  # one classification per token, independent of the per-type cache
    n = 0
    for batch in task.batches(split, train=True, seed=0):
        case, idx, ln = batch["case"], batch["token_idx"], batch["lengths"]
        assert case.shape == batch["ids"].shape and case.dtype == torch.int64  # (b, t)
        real = torch.arange(case.shape[1])[None, :] < ln[:, None]  # (b, t)
        assert (case[real].numpy() == expected[idx[real].numpy()]).all()
        assert (case[~real] == 0).all()
        n += int(real.sum())
    assert n == len(split)
    assert task.cases(split) is task.cases(split)  # computed once per split
    off = NERTask(RunConfig.for_mode("noisy_topk", **{**TINY, "case_features": False}))
    assert "case" not in next(off.batches(split, train=False, seed=0))


def test_tagger_logits_change_with_the_casing_of_one_token() -> None:
    torch.manual_seed(0)
    cfg = RunConfig.for_mode("noisy_topk", **TINY)
    model = Tagger(cfg, vocab_size=20, num_tags=9).eval()
    assert model.enc.lstms[0].input_size == cfg.d_embed + CASE_DIM
    ids = torch.tensor([[3, 4, 5, 6], [7, 8, 9, 0]])  # (b, t)
    idx, lengths = torch.arange(8).reshape(2, 4), torch.tensor([4, 3])
    case = torch.tensor([[2, 1, 1, 6], [3, 1, 5, 0]])
    recased = case.clone()
    recased[0, 0] = CASE_CLASSES.index("lower")  # "Apple" -> "apple": same word id, other casing
    with torch.no_grad():
        a, b = model(ids, idx, lengths, case)[0], model(ids, idx, lengths, recased)[0]  # (b, t, tags)
    assert a.shape == (2, 4, 9)
    assert not torch.allclose(a[0], b[0])  # the changed sentence sees it (BiLSTM: every position)
    torch.testing.assert_close(a[1], b[1])  # the other sentence does not
    with pytest.raises(ValueError, match="case_features"):
        model(ids, idx, lengths)
    plain = Tagger(RunConfig.for_mode("noisy_topk", **{**TINY, "case_features": False}), 20, 9)
    assert plain.case_emb is None and plain.enc.lstms[0].input_size == cfg.d_embed


def test_a_training_step_updates_the_casing_embedding() -> None:
    torch.manual_seed(0)
    cfg = RunConfig.for_mode("load", **TINY)
    split = load_split("conll2003", "train", FIX, pos=False)
    task = NERTask(cfg)
    model = Tagger(cfg, len(split.vocab), num_tags=len(split.label_names))
    before = model.case_emb.weight.detach().clone()  # (classes, CASE_DIM)
    opt = torch.optim.Adam(model.parameters(), lr=1e-2)
    batch = next(task.batches(split, train=True, seed=0))
    fwd = task.forward(model, batch, None)
    (fwd.loss + fwd.aux).backward()
    opt.step()
    seen = torch.unique(batch["case"][batch["case"] > 0])
    changed = (model.case_emb.weight.detach() != before).any(-1)  # (classes,)
    assert changed[seen].all()
    assert not changed[0]  # padding row: no gradient


def test_train_checkpoint_and_record_with_case_features(tmp_path: Path) -> None:
    cfg = RunConfig.for_mode("noisy_topk", **TINY, epochs=1, max_steps=2, record=True, record_every=1,
                             hidden_sample=5, runs_dir=str(tmp_path), run_name="case")  # fmt: skip
    run_dir = train(cfg, progress=False)
    assert json.loads((run_dir / "run.json").read_text())["status"] == "finished"
    assert json.loads((run_dir / "config.json").read_text())["case_features"] is True
    vm = record_run(run_dir, "conll2003", "valid", data_dir=str(FIX), device="cpu")  # reloads the checkpoint
    assert 0.0 <= vm["accuracy"] <= 100.0
