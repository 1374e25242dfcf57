"""Data-parallel training under `torchrun`: the process group, each rank's share of the data, the all-reduces.

`torchrun --nproc-per-node N -m moe_lens train ...` (or `moe-lens train --nproc N`, which launches the
same) starts N processes with RANK, LOCAL_RANK, WORLD_SIZE, MASTER_ADDR and MASTER_PORT set; `setup`
reads them and joins the group: NCCL on CUDA (device cuda:LOCAL_RANK), gloo on the CPU. Without those
variables it returns `SINGLE` and nothing in the loop changes. The model is wrapped in
DistributedDataParallel (Li et al. 2020, "PyTorch Distributed"): gradients are averaged over the ranks
during `backward()`.

What each rank reads (`Shard`, through the tasks' samplers with `set_epoch`: tasks/batching.py
`DistributedBucketSampler`, tasks/lm.py `WindowSampler`): every rank draws the same global batches (same seed
and epoch) and takes its own 1/world of each one: a contiguous block of the
LM's rows (so each rank reads a contiguous stretch of the token stream) or of a length bucket's sequences
(so its padding stays as small as the single-process batch's). No index is ever repeated to even the
ranks out, so no token is recorded twice; a training batch too small to give every rank a sequence is
skipped by all of them (DDP needs every rank in every step), an evaluation batch is not (it has no
collective).

Statistics equal one process over the union batch: `loss_scale` weights each rank's mean loss by its share of
the step's tokens (DDP's average is then the global-mean gradient) and `attach` makes each MoE layer compute
its aux losses from the all-reduced batch sums (`sum_with_grad`, differentiable). See docs/distributed.md.
"""
from __future__ import annotations

import datetime
import os
from typing import NamedTuple

import numpy as np
import torch
import torch.distributed as dist

from moe_lens.errors import MoeLensError

TIMEOUT_S = 120.0  # a collective waiting this long on a dead or stuck rank raises instead of hanging
ENV = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT")


class Shard(NamedTuple):
    """This process's place among the data-parallel ranks."""

    rank: int = 0
    world: int = 1

    @property
    def enabled(self) -> bool:
        return self.world > 1

    def rows(self, n: int) -> slice:
        """This rank's contiguous block of `n` rows (or positions), the blocks of np.array_split."""
        size, extra = divmod(n, self.world)
        start = self.rank * size + min(self.rank, extra)
        return slice(start, start + size + (1 if self.rank < extra else 0))

    def take(self, sel: np.ndarray) -> np.ndarray:
        """This rank's contiguous part of one global batch's index array (possibly empty)."""
        return np.array_split(sel, self.world)[self.rank]


SINGLE = Shard()


def launched() -> bool:
    """True inside a process started by torchrun (its environment variables are set)."""
    return all(k in os.environ for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK"))


def setup(device_name: str) -> tuple[Shard, torch.device | None]:
    """Join the process group torchrun's environment describes; (SINGLE, None) outside torchrun.

    Returns this rank's Shard and its device (cuda:LOCAL_RANK with NCCL, cpu with gloo)."""
    if not launched() or int(os.environ["WORLD_SIZE"]) <= 1:
        return SINGLE, None
    rank, world, local = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"]), int(os.environ["LOCAL_RANK"])
    use_cuda = device_name.startswith("cuda") or (device_name == "auto" and torch.cuda.is_available())
    if use_cuda:
        if not torch.cuda.is_available():
            raise MoeLensError(f"--device {device_name}: CUDA is not available on this machine; use --device cpu")
        torch.cuda.set_device(local)
        device, backend = torch.device("cuda", local), "nccl"
    else:
        device, backend = torch.device("cpu"), "gloo"
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=TIMEOUT_S))
    return Shard(rank, world), device


_STATS_GROUP = None  # a second gloo/NCCL group for the in-step statistics, apart from DDP's gradient buckets


def _stats_group():  # noqa: ANN202 - a ProcessGroup
    """The group of the step's own collectives (token counts, aux-loss sums): created once, by every rank (the
    first training step), so their order never interleaves with DDP's bucketed gradient all-reduces."""
    global _STATS_GROUP
    if _STATS_GROUP is None:
        _STATS_GROUP = dist.new_group(backend=dist.get_backend())
    return _STATS_GROUP


def sum_with_grad(t: torch.Tensor) -> torch.Tensor:
    """Sum of `t` over the ranks, differentiable: the backward sums the ranks' gradients of the result (it is
    the same function on every rank), so after DDP's average each rank's inputs get the single-process
    gradient of a loss computed from the global sums."""
    import torch.distributed.nn.functional as dist_nn  # only under torchrun

    return dist_nn.all_reduce(t, group=_stats_group())


def attach(model: torch.nn.Module, shard: Shard) -> None:
    """Make every MoE layer of `model` compute its aux losses from the global batch (`reduce_stats`)."""
    if not shard.enabled:
        return
    _stats_group()
    for m in model.modules():
        if hasattr(m, "reduce_stats"):
            m.reduce_stats = sum_with_grad


def loss_scale(count: int, shard: Shard, device: torch.device) -> torch.Tensor | None:
    """() world * count / global count: the factor that turns this rank's mean task loss into its share of
    the global mean. DDP averages gradients over the ranks, so the scaled losses give the gradient of the
    mean over ALL the step's tokens (examples for SQuAD), as one process over the union batch would, also
    when the ranks hold different token counts (CoNLL, SQuAD). None in a single process. One all-reduce of a
    scalar on the device (no host sync)."""
    if not shard.enabled:
        return None
    n = torch.tensor([float(count)], dtype=torch.float64, device=device)
    total = n.clone()
    dist.all_reduce(total, group=_stats_group())
    return (shard.world * n / total).float().reshape(())


def teardown() -> None:
    global _STATS_GROUP
    _STATS_GROUP = None
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def all_reduce_sum(tensors: dict[str, torch.Tensor], shard: Shard) -> dict[str, torch.Tensor]:
    """Sum each tensor over the ranks (one collective per dtype: they are flattened together)."""
    if not shard.enabled:
        return tensors
    out: dict[str, torch.Tensor] = {}
    by_dtype: dict[torch.dtype, list[str]] = {}
    for k, t in tensors.items():
        by_dtype.setdefault(t.dtype, []).append(k)
    for dtype, keys in by_dtype.items():
        flat = torch.cat([tensors[k].reshape(-1) for k in keys])
        dist.all_reduce(flat)
        i = 0
        for k in keys:
            n = tensors[k].numel()
            out[k] = flat[i : i + n].reshape(tensors[k].shape)
            i += n
    return out


def broadcast(obj, shard: Shard):  # noqa: ANN001, ANN201 - any picklable value
    """Rank 0's `obj` on every rank."""
    if not shard.enabled:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(obj, shard: Shard) -> list:  # noqa: ANN001 - any picklable value
    """[obj of rank 0, obj of rank 1, ...] on every rank."""
    if not shard.enabled:
        return [obj]
    out: list = [None] * shard.world
    dist.all_gather_object(out, obj)
    return out


def any_rank(flag: bool, shard: Shard) -> bool:
    """True on every rank when `flag` is True on any (a stop signal one rank received, say)."""
    if not shard.enabled:
        return flag
    t = torch.tensor([1 if flag else 0], device="cuda" if dist.get_backend() == "nccl" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item())


def barrier(shard: Shard) -> None:
    if shard.enabled:
        dist.barrier()




class NotRankZero:
    """Stands in for rank 0's `Metrics` and `RunState` on the other ranks: they write no run.json or
    metrics.parquet (rank 0 logs the all-reduced values)."""

    rows: list = []

    def add(self, *args, **kwargs) -> None:  # noqa: ANN002, ANN003 - Metrics.add's signature
        pass

    add_many = save = add

    def flush(self) -> None:
        pass


__all__ = ["Shard", "SINGLE", "TIMEOUT_S", "NotRankZero", "launched", "setup", "teardown", "all_reduce_sum", "broadcast",
           "gather", "any_rank", "barrier", "attach", "sum_with_grad", "loss_scale"]  # fmt: skip
