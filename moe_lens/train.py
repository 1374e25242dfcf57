"""The one training loop, for all three tasks, with routing recorded off the critical path.

AdamW (Loshchilov & Hutter 2019), gradient-norm clipping, linear warmup then linear decay to 10%,
evaluation on the validation split each epoch, bf16 autocast + TF32 on CUDA. A checkpoint after
each epoch's evaluation and one within the epoch every `checkpoint_every` steps (default: every
`CHECKPOINT_SECONDS` of wall time), and always when SIGINT or SIGTERM stops the run at a step
boundary; `resume` continues exactly where the checkpoint was taken (moe_lens/resume.py). The step
has no host sync: losses and per-expert loads are summed on the device and read every `LOG_EVERY`
steps, which is also where the NaN/inf guard looks. The full validation split is recorded every
epoch; a training batch every `record_every` steps.
"""
from __future__ import annotations

import functools
import itertools
import random
import signal
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm.auto import tqdm

from moe_lens import data as mdata
from moe_lens.atomic import write_json_atomic
from moe_lens.clock import now
from moe_lens.config import RunConfig
from moe_lens.distributed import (SINGLE, NotRankZero, Shard, all_reduce_sum, any_rank, attach, barrier, broadcast,
                                  gather, loss_scale, teardown)  # fmt: skip
from moe_lens.distributed import setup as dist_setup
from moe_lens.errors import MoeLensError
from moe_lens.health import read_json
from moe_lens.models import build_model, count_parameters
from moe_lens import resume as rs
from moe_lens.moe.step_hooks import step_hooks
from moe_lens.record import Recorder
from moe_lens.rundir import (Metrics, RunState, checkpoint_path, create_run_dir, environment, latest_checkpoint,
                             plan_run_dir, save_checkpoint)  # fmt: skip
from moe_lens.stats_window import StatsWindow
from moe_lens.tasks import get_task

LOG_EVERY = 50
CHECKPOINT_SECONDS = 600.0  # the default mid-epoch checkpoint interval (checkpoint_every=None)
clock = time.monotonic  # wall time for the checkpoint interval (a test replaces it)


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise MoeLensError(f"--device {name}: CUDA is not available on this machine; use --device cpu or auto")
    return torch.device(name)


def seed_everything(seed: int) -> None:
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def load_data(cfg: RunConfig) -> dict:
    """The train and valid splits of cfg.dataset, sharing the training vocabulary.

    Cached per process, so a sweep of variants (trainers/, tests) reads and annotates once."""
    return _load_data(cfg.dataset, cfg.data_dir, cfg.vocab_size, cfg.pos_tags)


@functools.lru_cache(maxsize=3)
def _load_data(dataset: str, data_dir: str | None, vocab_size: int | None, pos_tags: bool) -> dict:
    train = mdata.load_split(dataset, "train", data_dir, vocab_size=vocab_size, pos=pos_tags, progress=True)
    valid = mdata.load_split(dataset, "valid", data_dir, vocab=train.vocab, pos=pos_tags, progress=True)
    return {"train": train, "valid": valid}


def hidden_sample(n: int, size: int, seed: int, within: int | None = None) -> torch.Tensor:
    """(n,) bool: a fixed random sample of `size` token positions of a split (of its first `within`)."""
    keep = torch.zeros(n, dtype=torch.bool)
    m = n if within is None else min(n, within)
    if size > 0 and m > 0:
        keep[torch.randperm(m, generator=torch.Generator().manual_seed(seed))[:size]] = True
    return keep


def make_optimizer(params: list[torch.nn.Parameter], cfg: RunConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW with the fused kernel (CPU and CUDA), the same update rule: for the WikiText-2 LM at the
    2025 study's size (19M parameters) clip + step took 26 ms per step against 112 ms (6.7% of the
    step) for the default foreach AdamW on 2 CPU threads (benchmarks/bench_train_step.py [--foreach],
    docs/moe.md)."""
    return torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay, fused=device.type in ("cpu", "cuda"))


def _lr_lambda(cfg: RunConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.1, 1.0 - 0.9 * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))

    return f


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in ("lengths", "c_len", "q_len") else v
            for k, v in batch.items()}  # fmt: skip  (pack_padded_sequence wants lengths on the CPU)


class EvalStopped(Exception):
    """A stop signal arrived between evaluation batches."""


def evaluate(task, model, split, device, *, epoch: int, step: int, recorder: Recorder | None, keep,
             max_batches: int | None = None, score: bool = True, stop: rs.StopSignals | None = None,
             shard: Shard = SINGLE) -> dict:
    """Metrics over the whole split (or its first `max_batches`); records every batch's routing.

    `score=False`: routing only, no task metric (a model replayed over text without its labels).
    `stop`: raise `EvalStopped` between batches once a stop signal arrived.
    `shard`: under torchrun each rank evaluates its share of each batch (the task's), and the task's
    totals are summed over the ranks, so every rank returns the single-process metrics of the split."""
    model.eval()
    acc: dict = {}
    state = task.init_state()
    with torch.no_grad(), _autocast(device):
        for i, batch in enumerate(task.batches(split, train=False, seed=0)):
            if max_batches is not None and i >= max_batches:
                break
            if stop is not None and stop.signum is not None:
                model.train()
                raise EvalStopped
            batch = _to(batch, device)
            fwd = task.forward(model, batch, state)
            state = fwd.state
            if score:
                task.eval_update(acc, batch, fwd)
            if recorder is not None:
                recorder.add(fwd.traces, dataset=split.dataset, split=split.split, epoch=epoch, step=step,
                             hidden_keep=keep)  # fmt: skip
    model.train()
    if not score:
        return {}
    return task.eval_metrics(all_reduce_sum(task.eval_totals(acc, split, device), shard), split)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train (and record) one run; returns its directory.

    SIGINT or SIGTERM stops the run at the next step boundary (or between evaluation batches):
    everything is flushed, a checkpoint written, run.json marked `interrupted`, and
    `resume.RunInterrupted` raised (the CLI prints the command that resumes it).

    Under torchrun (moe_lens/distributed.py, docs/distributed.md) every rank runs this: DDP, each rank
    its share of each batch and its own `ddp_rank=R/` trace partitions; rank 0 alone writes config.json,
    run.json, metrics.parquet and the checkpoints. A stop signal is then acted on at the next log step."""
    shard, ddp_device = dist_setup(cfg.device)
    try:
        return _train(cfg, resume, progress, shard, ddp_device or resolve_device(cfg.device))
    finally:
        teardown()


def _plan(cfg: RunConfig, resume: bool, shard: Shard) -> Path:
    """The run directory, planned by rank 0 (a default name has a time stamp) and the same on every rank."""
    planned: tuple[str | None, str | None] = (None, None)
    if shard.rank == 0:
        try:
            planned = (str(plan_run_dir(cfg.runs_dir, cfg.run_name, cfg.dataset, cfg.mode, resume=resume)), None)
        except MoeLensError as e:
            planned = (None, str(e))
    path, error = broadcast(planned, shard)
    if error is not None:
        raise MoeLensError(error)
    return Path(path)


def _check_world(run_dir: Path, shard: Shard) -> None:
    saved = read_json(run_dir / "config.json").get("world_size", 1)
    if saved != shard.world:
        raise MoeLensError(f"--resume: {run_dir} was trained by {saved} process(es), this launch has {shard.world}; "
                           f"resume with the same --nproc-per-node x --nnodes ({saved})")  # fmt: skip


def _train(cfg: RunConfig, resume: bool, progress: bool, shard: Shard, device: torch.device) -> Path:
    run_dir = _plan(cfg, resume, shard)
    if resume:
        rs.check_matches_saved(run_dir, cfg)
        _check_world(run_dir, shard)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    splits = load_data(cfg)  # a missing dataset fails here, before anything is written
    train_split, valid_split = splits["train"], splits["valid"]
    emb_init, coverage = None, None
    if cfg.embeddings:
        emb_init, coverage = mdata.load_glove(cfg.embeddings, train_split.vocab, dim=cfg.d_embed)
    task = get_task(cfg.dataset, cfg, shard)
    model = build_model(cfg, len(train_split.vocab), num_tags=len(train_split.label_names or []),
                        embedding_init=emb_init).to(device)  # fmt: skip
    step_model = model  # what the training step calls: DDP averages the gradients over the ranks
    if shard.enabled:  # find_unused: an expert no token of this rank's batch chose has no gradient here
        step_model = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                         find_unused_parameters=True)  # fmt: skip
        attach(model, shard)  # aux losses from the global batch's sums (one differentiable all-reduce per layer)
        seed_everything(cfg.seed + shard.rank)  # the weights are rank 0's (DDP broadcast them); noise differs
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, device)
    sampler = task.sampler(train_split, train=True, seed=cfg.seed * 1000)  # epoch e shuffled by seed*1000 + e
    steps_per_epoch = len(sampler)
    steps_per_epoch = min(steps_per_epoch, cfg.epoch_steps or steps_per_epoch)
    total = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    lead = shard.rank == 0  # rank 0 owns config.json, run.json, metrics.parquet and the checkpoints
    if lead:
        create_run_dir(run_dir, cfg.runs_dir)  # only now: a start that fails above leaves no directory
    payload = None
    if resume:
        if lead:
            rs.remove_tmp_files(run_dir)  # left by a killed writer
        ckpt = latest_checkpoint(run_dir)
        payload = torch.load(ckpt, map_location=device, weights_only=False) if ckpt is not None else None
        if payload is not None and "ranks" in payload:  # this rank's generators, LM state and window
            payload = {**payload, **payload["ranks"][shard.rank]}
    start = rs.ResumePoint(payload)
    if payload is not None:
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        sched.load_state_dict(payload["scheduler"])
    if lead:
        rs.rewind(run_dir, step=start.train_through, epoch=start.epoch, epoch_complete=start.batch is None)
    barrier(shard)  # no rank records before rank 0 has rewound the traces
    if lead and not resume:
        meta = {k: v for k, v in train_split.meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
        write_json_atomic({**cfg.to_dict(), "run": run_dir.name, **environment(device), **count_parameters(model),
                           "steps_per_epoch": steps_per_epoch, "data": meta,
                           **({"world_size": shard.world} if shard.enabled else {}),  # absent: 1 process
                           "embedding_coverage": coverage}, run_dir / "config.json")  # fmt: skip
    state = RunState.start(run_dir, resume=resume) if lead else NotRankZero()
    metrics = Metrics(run_dir, keep_until_step=start.step if resume else None, tensorboard=cfg.tensorboard,
                      keep_rows=payload.get("metrics_rows") if payload is not None else None) if lead else NotRankZero()
    recorder = Recorder(run_dir, record_probs=cfg.record_probs, flush_rows=cfg.record_flush_rows,
                        hidden_bf16=cfg.hidden_bf16, ddp_rank=shard.rank if shard.enabled else None) \
        if cfg.record else None  # fmt: skip
    loop = _Loop(cfg, task, model, opt, sched, params, device, recorder, metrics, state, run_dir, train_split.vocab)
    loop.step, loop.shard, loop.step_model, loop.sampler = start.step, shard, step_model, sampler
    bar = tqdm(total=total, initial=start.step, desc=run_dir.name, disable=not progress or not lead, unit="step",
               smoothing=0)  # fmt: skip
    try:
        with rs.StopSignals() as stop:
            loop.stop, loop.bar = stop, bar
            if recorder is not None:  # under torchrun each rank writes its contiguous block of each token table
                recorder.write_tokens(_own(train_split.tokens, shard), cfg.dataset, "train",
                                      lazy=cfg.record_tokens is not None and not shard.enabled)  # fmt: skip
                recorder.write_tokens(_own(valid_split.tokens, shard), cfg.dataset, "valid", limit=cfg.record_tokens)
            keep_valid = hidden_sample(len(valid_split), cfg.hidden_sample, cfg.seed, within=cfg.record_tokens)
            start.restore(loop)  # last: nothing after it may draw from a random generator before the first step
            for epoch in range(start.epoch, cfg.epochs):
                resumed = epoch == start.epoch and start.batch is not None
                if not (resumed and start.trained):
                    loop.run_epoch(train_split, epoch, steps_per_epoch, skip=start.batch if resumed else None)
                try:
                    vm = evaluate(task, model, valid_split, device, epoch=epoch, step=loop.step, recorder=recorder,
                                  keep=keep_valid, max_batches=cfg.max_eval_batches,
                                  stop=None if shard.enabled else stop, shard=shard)  # fmt: skip
                except EvalStopped:
                    loop.interrupt(epoch, batch=steps_per_epoch, trained=True)
                metrics.add_many(loop.step, epoch, "valid", vm)
                loop.checkpoint(epoch, batch=None)
                state.save(step=loop.step, epoch=epoch, valid=vm)
                if shard.enabled:  # a signal during the evaluation: every rank stops before the next step
                    loop._stop_agreed = any_rank(stop.signum is not None, shard)
                if progress and lead:
                    tqdm.write(f"epoch {epoch}: " + ", ".join(f"valid {k} {v:.4g}" for k, v in vm.items()))
                if cfg.max_steps and loop.step >= cfg.max_steps:
                    break
    except rs.RunInterrupted as e:
        _finish(recorder, metrics, state, "interrupted", stopped_by=e.signame)
        raise
    except KeyboardInterrupt:
        _finish(recorder, metrics, state, "interrupted", stopped_by="SIGINT")
        raise
    except BaseException as e:
        _finish(recorder, metrics, state, "failed", error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    finally:
        bar.close()
    _finish(recorder, metrics, state, "finished")
    return run_dir


def _own(tokens, shard: Shard):  # noqa: ANN001, ANN202 - a split's token DataFrame
    """This rank's contiguous block of a split's token table (all of it in a single process): each token is
    written by one rank, so the `tokens` view holds it once."""
    return tokens.iloc[shard.rows(len(tokens))] if shard.enabled else tokens


def _finish(recorder, metrics: Metrics, state: RunState, status: str, error: str | None = None, **extra: Any) -> None:
    """Everything already recorded reaches the disk whatever ended the run. When the run is already
    failing or stopping, a second error here (a full disk, say) does not hide the first."""
    errors: list[BaseException] = []
    for flush in ([recorder.close] if recorder is not None else []) + [metrics.flush]:
        try:
            flush()
        except Exception as e:  # noqa: BLE001 - reported below, once
            errors.append(e)
    closing_error = errors[0] if errors and status == "finished" else None
    if closing_error is not None:
        status, error = "failed", str(closing_error).splitlines()[0]
    try:
        state.save(status=status, finished_at=now(), error=error, **extra)
    except OSError:
        if status == "finished":
            raise
    if closing_error is not None:
        raise closing_error


class _Loop:
    """The training epoch: the step, device-side accumulators, the log/guard every LOG_EVERY steps,
    checkpoints within the epoch and the stop at a step boundary."""

    def __init__(self, cfg, task, model, opt, sched, params, device, recorder, metrics, state, run_dir, vocab) -> None:
        self.cfg, self.task, self.model, self.opt, self.sched, self.params = cfg, task, model, opt, sched, params
        self.device, self.recorder, self.metrics, self.state = device, recorder, metrics, state
        self.run_dir, self.vocab = run_dir, vocab
        self.window = StatsWindow(device)
        self.step, self.fstate, self.last_checkpoint, self.train_through = 0, None, clock(), -1
        self.stop: rs.StopSignals | None = None
        self.bar = None
        self._rate_started = False
        self.after_step = step_hooks(model)  # e.g. the sigmoid_bias router's bias update
        self.shard: Shard = SINGLE
        self.step_model = model  # the DDP wrapper under torchrun
        self.sampler = None  # the task's training sampler (`set_epoch` every epoch)
        self._stop_agreed = False  # torchrun: every rank saw a stop signal on some rank (at a log step)

    def run_epoch(self, split, epoch: int, steps_per_epoch: int, *, skip: int | None = None) -> None:
        """Run the epoch's batches; `skip`: resume after its first `skip` batches (not run again)."""
        cfg, model = self.cfg, self.model
        model.train()
        if skip is None:
            self.fstate = self.task.init_state()
        t0, ntok = time.perf_counter(), 0
        self.sampler.set_epoch(epoch, start=skip or 0)  # the same order on every rank, and after a resume
        batches = enumerate(self.task.batches(split, train=True, sampler=self.sampler), start=skip or 0)
        for i, batch in itertools.islice(batches, max(steps_per_epoch - (skip or 0), 0)):
            if cfg.max_steps is not None and self.step >= cfg.max_steps:
                break
            if self._stopping():
                self.interrupt(epoch, batch=i)
            batch = _to(batch, self.device)
            with _autocast(self.device):
                fwd = self.task.forward(self.step_model, batch, self.fstate)
            self.fstate = fwd.state
            label = self.step  # the forward's step: the number of updates its weights had
            scale = loss_scale(self.task.loss_count(batch), self.shard, self.device)  # None in one process
            loss = (fwd.loss if scale is None else fwd.loss * scale) + fwd.aux
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
            self.opt.step()
            for hook in self.after_step:
                hook()
            self.sched.step()
            self.step += 1
            step = self.step
            self.window.update(fwd, scale)
            if self.recorder is not None and label % cfg.record_every == 0:
                self.recorder.add(fwd.traces, dataset=split.dataset, split="train", epoch=epoch, step=label)
            ntok += batch["ntokens"]
            self._advance_bar()
            last = cfg.max_steps is not None and step >= cfg.max_steps
            logged = step % LOG_EVERY == 0 or last or i == steps_per_epoch - 1
            if logged:
                tok_s = ntok / (time.perf_counter() - t0)
                self.window.log(self.metrics, step, epoch, tok_s, self.opt.param_groups[0]["lr"], self.bar,
                                shard=self.shard)  # fmt: skip
                self.state.save(step=step)
                if self.shard.enabled:  # the ranks agree on a stop here, never within the step
                    self._stop_agreed = any_rank(self.stop is not None and self.stop.signum is not None, self.shard)
            if self._checkpoint_due(logged):
                self.checkpoint(epoch, batch=i + 1)
            if last:
                break

    def _advance_bar(self) -> None:
        self.bar.update(1)
        if not self._rate_started and not self.bar.disable:
            # the rate (and the ETA over the whole run) counts from the end of this process's first step,
            # which also paid for warm-up (kernel builds, allocator); set once, never again
            self.bar.start_t, self.bar.initial, self._rate_started = self.bar._time(), self.bar.n, True

    def _stopping(self) -> bool:
        if self.shard.enabled:
            return self._stop_agreed
        return self.stop is not None and self.stop.signum is not None

    def _checkpoint_due(self, logged: bool) -> bool:
        every = self.cfg.checkpoint_every
        if every is not None:
            return self.step % every == 0
        if self.shard.enabled:  # rank 0's clock decides, read at log steps only (no sync within the step)
            return logged and broadcast(clock() - self.last_checkpoint >= CHECKPOINT_SECONDS, self.shard)
        return clock() - self.last_checkpoint >= CHECKPOINT_SECONDS

    def checkpoint(self, epoch: int, *, batch: int | None, trained: bool = False) -> None:
        """Write a checkpoint after `batch` batches of `epoch` (None: after its evaluation), with what an
        exact resume needs; traces and metrics are flushed first, so the checkpoint counts them."""
        if self.recorder is not None:
            self.recorder.flush()
            self.train_through = self.recorder.last_step.get((self.cfg.dataset, "train"), self.train_through)
        self.metrics.flush()
        mine = {"rng": rs.rng_state(), "lm_state": _cpu(self.fstate), "window": self.window.state_dict(),
                "train_through": self.train_through}
        ranks = gather(mine, self.shard)  # every rank has flushed its traces once this returns
        self.last_checkpoint = clock()
        if self.shard.rank != 0:
            return
        payload = {"model": self.model.state_dict(), "optimizer": self.opt.state_dict(),
                   "scheduler": self.sched.state_dict(), "config": self.cfg.to_dict(), "vocab": self.vocab.to_dict(),
                   "step": self.step, "epoch": epoch, "batch": batch, "trained": trained, **mine,
                   "metrics_rows": len(self.metrics.rows), "world_size": self.shard.world}  # fmt: skip
        if self.shard.enabled:
            payload["ranks"] = ranks  # each rank's generators, LM state and window, restored by that rank
        save_checkpoint(checkpoint_path(self.run_dir, epoch, None if batch is None else self.step), payload)

    def interrupt(self, epoch: int, *, batch: int, trained: bool = False) -> None:
        self.checkpoint(epoch, batch=batch, trained=trained)
        signum = self.stop.signum if self.stop is not None and self.stop.signum is not None else signal.SIGTERM
        raise rs.RunInterrupted(signum, self.step, self.run_dir, self.shard.world)  # torchrun: maybe another rank's signal


def _cpu(state: Any) -> Any:
    """The LM's carried state (nested tuples of tensors, or None) on the CPU, for gathering and checkpoints."""
    if isinstance(state, tuple):
        return tuple(_cpu(s) for s in state)
    return state.cpu() if torch.is_tensor(state) else state


__all__ = ["train", "evaluate", "load_data", "resolve_device"]
