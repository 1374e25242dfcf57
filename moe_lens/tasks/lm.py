"""Word-level language modelling on WikiText-2 (pytorch/examples word_language_model batching).

The token stream is cut into `batch_size` contiguous rows (b, L); batches are consecutive windows
of `bptt` steps, the LSTM state carried across windows and detached (truncated BPTT). Metric:
perplexity exp(mean cross-entropy) over every predicted token of the split.

With `epoch_steps` (short epochs), training epoch e starts at window (e * epoch_steps) mod W of the
W windows and wraps around to window 0, so each short epoch reads the text where the last one
stopped instead of the same first windows again (the LSTM state starts afresh at each epoch).
"""
from __future__ import annotations

import math
from collections.abc import Iterator

import torch
import torch.nn.functional as F

from moe_lens.distributed import SINGLE, Shard
from moe_lens.errors import MoeLensError
from moe_lens.tasks import Forward


class WindowSampler:
    """The LM's sampler: the order of the W windows (each rank reads its own rows of every window, so the ranks
    hold contiguous shards of the stream and need no index sampling). `set_epoch(e)` before each epoch: with
    `epoch_steps` (training) epoch e starts at window (e * epoch_steps) mod W and wraps around; `start=k`
    resumes after the epoch's first k windows."""

    def __init__(self, num_windows: int, epoch_steps: int | None = None) -> None:
        self.num_windows, self.epoch_steps = num_windows, epoch_steps
        self.epoch, self.start = 0, 0

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def __iter__(self) -> Iterator[int]:
        w = self.num_windows
        first = (self.epoch * self.epoch_steps) % w if self.epoch_steps and w else 0
        return (((first + j) % w) for j in range(self.start, w))

    def __len__(self) -> int:
        return self.num_windows


class LMTask:
    name = "lm"

    def __init__(self, cfg, shard: Shard = SINGLE) -> None:
        self.cfg, self.shard = cfg, shard
        if cfg.batch_size < shard.world:
            raise MoeLensError(f"--batch-size {cfg.batch_size}: the language model shares its rows among "
                               f"{shard.world} ranks, so it needs at least {shard.world}")  # fmt: skip

    def _windows(self, split) -> list[int]:
        """First position of each of the W bptt windows of a row (every row, every rank: the same W)."""
        length = len(split.token_ids) // self.cfg.batch_size  # L, the row length
        return list(range(0, length - 1, self.cfg.bptt))

    def sampler(self, split, *, train: bool, seed: int = 0) -> WindowSampler:
        """The order of the split's windows (not shuffled: `seed` is unused); `set_epoch(e)` before each epoch."""
        return WindowSampler(len(self._windows(split)), getattr(self.cfg, "epoch_steps", None) if train else None)

    def batches(self, split, *, train: bool, seed: int = 0, epoch: int = 0,
                sampler: WindowSampler | None = None) -> Iterator[dict]:
        """The W windows in order; in training with `epoch_steps`, from window (epoch * epoch_steps) mod W
        on, wrapping around (`sampler`, default a fresh one at `epoch`). Under torchrun a rank reads its
        contiguous block of the b rows (`Shard.rows`), a contiguous stretch of the token stream."""
        b = self.cfg.batch_size
        n = (len(split.token_ids) // b) * b
        mine = self.shard.rows(b)  # the rows of this rank: all of them in a single process
        ids = torch.from_numpy(split.token_ids[:n].reshape(b, -1))[mine]  # (b', L) each row a contiguous stream
        idx = torch.arange(n).reshape(b, -1)[mine]  # (b', L) token_idx of each position
        b, length = ids.shape
        starts = self._windows(split)
        if sampler is None:
            sampler = self.sampler(split, train=train, seed=seed)
            sampler.set_epoch(epoch)
        for w in sampler:
            i = starts[w]
            t = min(self.cfg.bptt, length - 1 - i)
            yield {"ids": ids[:, i : i + t], "target": ids[:, i + 1 : i + 1 + t], "token_idx": idx[:, i : i + t],
                   "ntokens": b * t}  # fmt: skip

    def loss_count(self, batch: dict) -> int:
        """How many tokens the batch's mean task loss averages over (the data-parallel loss weight)."""
        return batch["ntokens"]

    def init_state(self):
        return None

    def forward(self, model, batch: dict, state) -> Forward:
        logits, aux, traces, state = model(batch["ids"], batch["token_idx"], state)  # ModelOutput
        state = tuple(tuple(s.detach() for s in layer) for layer in state)  # truncated BPTT, per LSTM layer
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["target"].reshape(-1))
        return Forward(loss, aux, traces, state, out=None)

    def eval_update(self, acc: dict, batch: dict, fwd: Forward) -> None:
        n = batch["ntokens"]
        acc["loss_sum"] = acc.get("loss_sum", 0.0) + fwd.loss.detach().double() * n  # device tensor: no sync
        acc["count"] = acc.get("count", 0) + n

    def eval_totals(self, acc: dict, split, device: torch.device) -> dict[str, torch.Tensor]:
        z = torch.zeros((), dtype=torch.float64, device=device)
        return {"loss_sum": z + acc.get("loss_sum", 0.0), "count": z + acc.get("count", 0)}

    def eval_metrics(self, totals: dict, split) -> dict[str, float]:
        loss = float(totals["loss_sum"]) / max(float(totals["count"]), 1.0)
        return {"loss": loss, "ppl": math.exp(min(loss, 50.0))}


__all__ = ["LMTask"]
