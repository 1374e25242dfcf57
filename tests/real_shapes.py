"""A runs directory shaped like real recorded runs, written with pyarrow and kept in memory for the references.

What the synthetic writer lacks and real traces have: a probe dataset replayed in the same split with the same
token_idx range (0..n-1) as the run's own dataset, sparse train traces (only the recorded batches, a different
set per epoch), tokens outside the vocabulary (`<unk>` to the model: one token_id, many surface words), three
layers and a capacity factor that drops tokens in training only.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import NamedTuple

import numpy as np
import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

POS = ["NN", "VB", "DT", "IN", "JJ", ",", "."]
DATASETS = ("wikitext2", "conll2003")  # the run's own dataset, then a probe replayed with `moe-lens record`
UNK_ID = 1  # the vocabulary's <unk>
E, K, LAYERS, EPOCHS = 4, 2, 3, 2
TRAIN_BLOCKS = {0: [(0, 60), (150, 210), (300, 360)], 1: [(30, 90), (150, 210), (330, 400)]}  # recorded batches


class Shapes(NamedTuple):
    root: Path
    tokens: pd.DataFrame  # run, dataset, split, token_idx, token_id, token, pos_tag, position, in_vocab
    routing: pd.DataFrame  # run, dataset, split, epoch, step, layer, token_idx, rank, expert, gate, entropy, dropped


def _tokens(rng: np.random.Generator, dataset: str, split: str, n: int) -> pd.DataFrame:
    word = rng.zipf(1.3, n) % 300  # (n,) a skewed vocabulary of 300 surface words
    prefix = "w" if dataset == "wikitext2" else "c"  # the probe's words differ: contexts must not mix them
    oov = word >= 120  # the capped vocabulary keeps the 120 most frequent words
    position = np.arange(n) % 17  # sentences of 17 tokens
    return pd.DataFrame({
        "dataset": dataset, "split": split, "token_idx": np.arange(n, dtype=np.int64),
        "token_id": np.where(oov, UNK_ID, word + 2).astype(np.int32),
        "token": [f"{prefix}{w}" for w in word], "pos_tag": np.array(POS, dtype=object)[word % len(POS)],
        "position": position.astype(np.int32), "in_vocab": ~oov,
    })


def _routing(rng: np.random.Generator, tok: pd.DataFrame, split: str, run_shift: int, drops: bool) -> pd.DataFrame:
    """Rows of every rank for the routed tokens: all of valid, the recorded train batches."""
    ds_shift = 0 if tok["dataset"].iloc[0] == "wikitext2" else 2  # the probe routes differently
    pos = tok["pos_tag"].map({p: i for i, p in enumerate(POS)}).to_numpy()
    frames = []
    for epoch in range(EPOCHS):
        if split == "train":
            blocks = TRAIN_BLOCKS[epoch]
            idx = np.concatenate([np.arange(a, b) for a, b in blocks])
            step = np.concatenate([np.full(b - a, epoch * 10 + i) for i, (a, b) in enumerate(blocks)])
        else:
            idx, step = np.arange(len(tok)), np.full(len(tok), epoch * 10 + 9)
        for layer in range(LAYERS):
            noisy = rng.random(len(idx)) < 0.3 + 0.2 * epoch
            first = np.where(noisy, rng.integers(0, E - 1, len(idx)),
                             (pos[idx] + ds_shift + layer + run_shift) % (E - 1))  # expert E-1 never first
            second = np.where(rng.random(len(idx)) < 0.6, E - 1, (first + 1) % (E - 1))
            g0 = rng.uniform(0.5, 0.9, len(idx))
            for rank, expert, gate in ((0, first, g0), (1, second, 1 - g0)):
                frames.append(pd.DataFrame({
                    "dataset": tok["dataset"].iloc[0], "split": split, "epoch": epoch, "step": step.astype(np.int64),
                    "token_idx": idx.astype(np.int64), "layer": np.int16(layer), "rank": np.int8(rank),
                    "expert": expert.astype(np.int16), "gate": gate.astype(np.float32),
                    "entropy": rng.uniform(0.1, 1.3, len(idx)).astype(np.float32),
                    "dropped": (rng.random(len(idx)) < 0.25) if drops and split == "train" else np.zeros(len(idx), bool),
                }))
    return pd.concat(frames, ignore_index=True)


def write_run(root: Path, run: str, *, seed: int, run_shift: int = 0, with_in_vocab: bool = True,
              capacity_factor: float | None = 1.0) -> tuple[pd.DataFrame, pd.DataFrame]:
    """One run under root/run (own dataset wikitext2, probe conll2003); returns its (tokens, routing)."""
    rng = np.random.default_rng(seed)
    d = root / run
    d.mkdir(parents=True)
    cfg = {"run": run, "mode": "load", "dataset": "wikitext2", "router": "noisy_topk", "num_experts": E,
           "top_k": K, "capacity_factor": capacity_factor}
    (d / "config.json").write_text(json.dumps(cfg))
    (d / "run.json").write_text(json.dumps({"status": "finished"}))
    toks, routs = [], []
    for dataset in DATASETS:
        for split, n in (("train", 400), ("valid", 300)):
            t = _tokens(np.random.default_rng([DATASETS.index(dataset), n]), dataset, split, n)  # same in every run
            r = _routing(rng, t, split, run_shift, capacity_factor is not None)
            tdir = d / "tokens" / f"dataset={dataset}" / f"split={split}"
            tdir.mkdir(parents=True)
            cols = t.drop(columns=["dataset", "split"] + ([] if with_in_vocab else ["in_vocab"]))
            pq.write_table(pa.Table.from_pandas(cols, preserve_index=False), tdir / "part-0.parquet")
            for epoch, g in r.groupby("epoch"):
                rdir = d / "routing" / f"dataset={dataset}" / f"split={split}" / f"epoch={epoch}"
                rdir.mkdir(parents=True)
                pq.write_table(pa.Table.from_pandas(g.drop(columns=["dataset", "split", "epoch"]), preserve_index=False),
                               rdir / "part-0.parquet")
            toks.append(t.assign(run=run))
            routs.append(r.assign(run=run))
    return pd.concat(toks, ignore_index=True), pd.concat(routs, ignore_index=True)


def write_shapes(root: Path) -> Shapes:
    """Runs `a` and `b` (same tokens, different routing; both with in_vocab) and `old` (a's traces, no in_vocab)."""
    ta, ra = write_run(root, "a", seed=0)
    tb, rb = write_run(root, "b", seed=1, run_shift=1, capacity_factor=None)
    to, ro = write_run(root, "old", seed=0, with_in_vocab=False)
    return Shapes(root, pd.concat([ta, tb, to], ignore_index=True), pd.concat([ra, rb, ro], ignore_index=True))
