"""Length-bucketed batches of variable-length sequences (no Python loop over tokens)."""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np

from moe_lens.distributed import Shard


def bucket_batches(lengths: np.ndarray, batch_size: int, *, shuffle: bool, seed: int) -> Iterator[np.ndarray]:
    """Index arrays of sequences of similar length. In training, lengths are jittered before the
    sort (so batches differ across epochs) and the batch order is shuffled."""
    rng = np.random.default_rng(seed)
    key = lengths + (rng.uniform(0, 1.5, size=len(lengths)) if shuffle else 0.0)
    order = np.argsort(key, kind="stable")
    batches = [order[i : i + batch_size] for i in range(0, len(order), batch_size)]
    for j in rng.permutation(len(batches)) if shuffle else range(len(batches)):
        yield batches[j]


def gather_padded(flat: np.ndarray, starts: np.ndarray, lengths: np.ndarray, pad: int) -> np.ndarray:
    """(b, max_len) array of flat[starts[i] : starts[i] + lengths[i]], right-padded with `pad`."""
    width = int(lengths.max()) if len(lengths) else 0
    pos = np.arange(width)
    valid = pos[None, :] < lengths[:, None]  # (b, t)
    idx = np.where(valid, starts[:, None] + pos[None, :], 0)
    return np.where(valid, flat[idx], pad)


def shard_batches(batches: Iterator[np.ndarray], shard: Shard, *, train: bool) -> Iterator[np.ndarray]:
    """This rank's contiguous part of each global batch. In training a batch with fewer sequences than
    ranks is skipped by every rank (each must take part in each step); in evaluation a rank with an empty
    part just skips it. No index is repeated, so no token is seen (or recorded) twice."""
    for sel in batches:
        if not shard.enabled:
            yield sel
            continue
        if train and len(sel) < shard.world:
            continue
        part = shard.take(sel)
        if len(part):
            yield part
