"""Issue 18: which data each short epoch reads (item 7), and which step a recorded forward is labelled with."""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from moe_lens.config import RunConfig
from moe_lens.models import build_model
from moe_lens.tasks.lm import LMTask
from moe_lens.train import load_data, train

TINY = dict(d_embed=16, d_model=16, expert_hidden=16, num_experts=4, batch_size=16, warmup_steps=2, record=True,
            record_every=1, pos_tags=False, hidden_sample=0, max_eval_batches=2)  # fmt: skip
DATA = {"wikitext2": dict(vocab_size=500, bptt=12), "conll2003": {}}


def run(data_dir: Path, runs: Path, dataset: str, mode: str = "naive_topk", **kw) -> tuple[Path, RunConfig]:
    cfg = RunConfig.for_mode(mode, dataset=dataset, data_dir=str(data_dir), runs_dir=str(runs),
                             run_name=f"{dataset}-{mode}", **{**TINY, **DATA[dataset], **kw})  # fmt: skip
    return train(cfg, progress=False), cfg


def routed(run_dir: Path, split: str = "train") -> "pd.DataFrame":  # noqa: F821
    t = pq.read_table(run_dir / "routing").to_pandas()
    return t[(t["split"] == split) & (t["rank"] == 0)]


# ---- item 7: short epochs -------------------------------------------------------------------------


def lm_windows(epoch: int, epoch_steps: int | None, n: int = 1000, b: int = 4, bptt: int = 10) -> list[int]:
    """The first token_idx of row 0 of each window an LM training epoch yields."""
    task = LMTask(SimpleNamespace(batch_size=b, bptt=bptt, epoch_steps=epoch_steps))
    split = SimpleNamespace(token_ids=np.arange(n, dtype=np.int64))
    return [int(batch["token_idx"][0, 0]) for batch in task.batches(split, train=True, seed=0, epoch=epoch)]


def test_lm_epochs_continue_where_the_last_one_stopped_and_wrap() -> None:
    # 1000 tokens in 4 rows of 250: 249 predicted positions, windows start at 0, 10, ..., 240: W = 25
    every = lm_windows(0, None)
    assert every == list(range(0, 250, 10))
    w = len(every)
    for steps in (3, 7, 25, 40):
        for epoch in range(6):
            got = lm_windows(epoch, steps)
            first = (epoch * steps) % w
            assert got == every[first:] + every[:first]  # all W windows, from `first` on, wrapping
    assert lm_windows(3, None) == every  # without short epochs every epoch reads the whole stream
    # consecutive short epochs of 7 windows: 0-6, 7-13, 14-20, then 21-24 and 0-2 (wrapped)
    reads = [lm_windows(e, 7)[:7] for e in range(4)]
    assert reads[3] == every[21:] + every[:3]
    assert sorted(sum(reads[:3], [])) == every[:21]


def test_lm_short_epochs_train_on_different_windows(real_data_dir: Path, tmp_path: Path) -> None:
    run_dir, _ = run(real_data_dir, tmp_path, "wikitext2", epochs=2, epoch_steps=3)
    t = routed(run_dir)
    tokens = {e: set(t.loc[t["epoch"] == e, "token_idx"]) for e in (0, 1)}
    assert tokens[0] and tokens[1] and not tokens[0] & tokens[1]  # epoch 1 reads new text
    # it starts at the window after the last one epoch 0 read: in row 0 of the stream, positions 36-71
    assert min(tokens[1]) == 3 * 12 and min(tokens[0]) == 0


def test_ner_epochs_are_different_shuffles(real_data_dir: Path, tmp_path: Path) -> None:
    run_dir, _ = run(real_data_dir, tmp_path, "conll2003", epochs=2, epoch_steps=3)
    t = routed(run_dir)
    first = [sorted(t.loc[(t["epoch"] == e) & (t["step"] == t.loc[t["epoch"] == e, "step"].min()), "token_idx"])
             for e in (0, 1)]  # fmt: skip
    assert first[0] != first[1]
    assert set(t.loc[t["epoch"] == 0, "token_idx"]) != set(t.loc[t["epoch"] == 1, "token_idx"])


# ---- step labels -----------------------------------------------------------------------------------


def test_step_labels_name_the_weights_that_ran_the_forward(real_data_dir: Path, tmp_path: Path) -> None:
    """Train forward 0 ran the initial weights, so it is step 0; the evaluation after 2 updates is step 2.
    Checked by running the initial model (same seed, no dropout, a deterministic router) on the first
    batch and the final checkpoint on the first valid batch."""
    run_dir, cfg = run(real_data_dir, tmp_path, "wikitext2", max_steps=2, dropout=0.0)
    t, v = routed(run_dir), routed(run_dir, "valid")
    assert sorted(set(t["step"])) == [0, 1] and set(v["step"]) == {2}
    splits = load_data(cfg)
    torch.manual_seed(cfg.seed)
    model = build_model(cfg, len(splits["train"].vocab)).train()
    from moe_lens.tasks.lm import LMTask as Task

    batch = next(Task(cfg).batches(splits["train"], train=True, seed=0, epoch=0))
    with torch.no_grad():
        _, _, traces, _ = model(batch["ids"], batch["token_idx"])
    first = t[t["step"] == 0].sort_values("token_idx")
    want = traces[0].routing.expert_idx[:, 0].numpy()[np.argsort(traces[0].token_idx.numpy())]
    np.testing.assert_array_equal(first["expert"].to_numpy(), want)
    payload = torch.load(next((run_dir / "checkpoints").glob("*.pt")), weights_only=False)
    model.load_state_dict(payload["model"])
    model.eval()
    batch = next(Task(cfg).batches(splits["valid"], train=False, seed=0))
    with torch.no_grad():
        _, _, traces, _ = model(batch["ids"], batch["token_idx"])
    want = traces[0].routing.expert_idx[:, 0].numpy()[np.argsort(traces[0].token_idx.numpy())]
    got = v[v["token_idx"].isin(batch["token_idx"].reshape(-1).numpy())].sort_values("token_idx")
    np.testing.assert_array_equal(got["expert"].to_numpy(), want)


@pytest.mark.parametrize("every", [2, 3])
def test_record_every_records_the_forwards_whose_label_it_divides(real_data_dir: Path, tmp_path: Path,
                                                                   every: int) -> None:
    run_dir, _ = run(real_data_dir, tmp_path, "conll2003", max_steps=7, record_every=every)
    assert sorted(set(routed(run_dir)["step"])) == [s for s in range(7) if s % every == 0]
