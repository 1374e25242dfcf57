"""Length-bucketed batches of variable-length sequences (no Python loop over tokens), and the sampler that
gives each data-parallel rank its share of them (`DistributedBucketSampler`, with `set_epoch`)."""
from __future__ import annotations

import itertools
from collections.abc import Iterator

import numpy as np

from moe_lens.distributed import SINGLE, Shard


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


class DistributedBucketSampler:
    """This rank's share of an epoch's length-bucketed global batches, with `set_epoch` as torch's
    `DistributedSampler` (call it before every epoch; the shuffle of epoch e uses seed + e on every rank).

    Every rank draws the same global batches (`bucket_batches`, the single-process ones) and yields its
    contiguous part of each (`shard_batches`), so `--batch-size` stays the global batch and the union of the
    ranks' parts of a batch is that batch. Nothing is padded by repeating an index, so no token is seen or
    recorded twice. The one thing dropped: in training, a global batch with fewer sequences than ranks (only the
    epoch's last, shortest chunk can be one) is skipped by every rank, as each rank must take part in each step;
    in a single process nothing is dropped. `set_epoch(e, start=k)` resumes after the rank's first k batches of
    epoch e, in the same order."""

    def __init__(self, lengths: np.ndarray, batch_size: int, shard: Shard = SINGLE, *, shuffle: bool,
                 seed: int = 0) -> None:
        self.lengths, self.batch_size, self.shard = np.asarray(lengths), batch_size, shard
        self.shuffle, self.seed = shuffle, seed
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        """The epoch to draw next (its shuffle seed is seed + epoch), from this rank's batch `start` on."""
        self.epoch, self.start = epoch, start

    def global_batches(self) -> list[np.ndarray]:
        """The epoch's global batches (index arrays into `lengths`), the same on every rank."""
        return list(bucket_batches(self.lengths, self.batch_size, shuffle=self.shuffle, seed=self.seed + self.epoch))

    def __iter__(self) -> Iterator[np.ndarray]:
        return itertools.islice(shard_batches(iter(self.global_batches()), self.shard, train=self.shuffle),
                                self.start, None)  # fmt: skip

    def __len__(self) -> int:
        """Batches this rank yields in a whole epoch (the same count every epoch)."""
        n, b, w = len(self.lengths), self.batch_size, self.shard.world
        sizes = [b] * (n // b) + ([n % b] if n % b else [])
        return sum(1 for m in sizes if (m >= w if self.shuffle else m > self.shard.rank))
