"""The one training loop, for all three tasks, with routing recorded off the critical path.

AdamW (Loshchilov & Hutter 2019), gradient-norm clipping, linear warmup then linear decay to 10%,
evaluation on the validation split each epoch, bf16 autocast + TF32 on CUDA, a checkpoint per
epoch and `resume`. The step has no host sync: losses and per-expert loads are summed on the
device and read every `LOG_EVERY` steps, which is also where the NaN/inf guard looks. The full
validation split is recorded every epoch; a training batch every `record_every` steps.
"""
from __future__ import annotations

import functools
import math
import random
import time
from pathlib import Path

import numpy as np
import torch
from tqdm.auto import tqdm

from moe_lens import data as mdata
from moe_lens.config import RunConfig
from moe_lens.errors import MoeLensError
from moe_lens.models import build_model, count_parameters
from moe_lens.record import Recorder, clear_traces_after, write_json_atomic
from moe_lens.rundir import (Metrics, RunState, checkpoint_path, create_run_dir, environment, latest_checkpoint,
                             plan_run_dir, save_checkpoint)  # fmt: skip
from moe_lens.tasks import get_task

LOG_EVERY = 50


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


def _lr_lambda(cfg: RunConfig, total: int):
    def f(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / cfg.warmup_steps
        return max(0.1, 1.0 - 0.9 * (step - cfg.warmup_steps) / max(1, total - cfg.warmup_steps))

    return f


def _to(batch: dict, device: torch.device) -> dict:
    return {k: v.to(device, non_blocking=True) if torch.is_tensor(v) and k not in ("lengths", "c_len", "q_len") else v
            for k, v in batch.items()}  # fmt: skip  (pack_padded_sequence wants lengths on the CPU)


def evaluate(task, model, split, device, *, epoch: int, step: int, recorder: Recorder | None, keep,
             max_batches: int | None = None) -> dict:
    """Metrics over the whole split (or its first `max_batches`); records every batch's routing."""
    model.eval()
    acc: dict = {}
    state = task.init_state()
    with torch.no_grad(), _autocast(device):
        for i, batch in enumerate(task.batches(split, train=False, seed=0)):
            if max_batches is not None and i >= max_batches:
                break
            batch = _to(batch, device)
            fwd = task.forward(model, batch, state)
            state = fwd.state
            task.eval_update(acc, batch, fwd)
            if recorder is not None:
                recorder.add(fwd.traces, dataset=split.dataset, split=split.split, epoch=epoch, step=step,
                             hidden_keep=keep)  # fmt: skip
    model.train()
    return task.eval_metrics(acc, split)


def _autocast(device: torch.device):
    return torch.autocast("cuda", dtype=torch.bfloat16) if device.type == "cuda" else torch.autocast("cpu", enabled=False)


def train(cfg: RunConfig, *, resume: bool = False, progress: bool = True) -> Path:
    """Train (and record) one run; returns its directory."""
    device = resolve_device(cfg.device)
    run_dir = plan_run_dir(cfg.runs_dir, cfg.run_name, cfg.dataset, cfg.mode, resume=resume)
    seed_everything(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    splits = load_data(cfg)  # a missing dataset fails here, before anything is written
    create_run_dir(run_dir, cfg.runs_dir)
    train_split, valid_split = splits["train"], splits["valid"]
    emb_init = None
    if cfg.embeddings:
        emb_init, coverage = mdata.load_glove(cfg.embeddings, train_split.vocab, dim=cfg.d_embed)
    task = get_task(cfg.dataset, cfg)
    model = build_model(cfg, len(train_split.vocab), num_tags=len(train_split.label_names or []),
                        embedding_init=emb_init).to(device)  # fmt: skip
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    steps_per_epoch = sum(1 for _ in task.batches(train_split, train=True, seed=cfg.seed))
    steps_per_epoch = min(steps_per_epoch, cfg.epoch_steps or steps_per_epoch)
    total = min(cfg.max_steps or 10**12, steps_per_epoch * cfg.epochs)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, _lr_lambda(cfg, total))
    step, start_epoch = 0, 0
    ckpt = latest_checkpoint(run_dir) if resume else None
    if ckpt is not None:
        payload = torch.load(ckpt, map_location=device, weights_only=False)
        model.load_state_dict(payload["model"])
        opt.load_state_dict(payload["optimizer"])
        sched.load_state_dict(payload["scheduler"])
        step, start_epoch = payload["step"], payload["epoch"] + 1
    clear_traces_after(run_dir, start_epoch - 1)  # a resumed epoch is recorded again: no duplicates
    if not resume:
        meta = {k: v for k, v in train_split.meta.items() if isinstance(v, (str, int, float, bool)) or v is None}
        write_json_atomic({**cfg.to_dict(), "run": run_dir.name, **environment(device), **count_parameters(model),
                           "steps_per_epoch": steps_per_epoch, "data": meta,
                           "embedding_coverage": coverage if cfg.embeddings else None}, run_dir / "config.json")  # fmt: skip
    state = RunState.start(run_dir, resume=resume)
    metrics = Metrics(run_dir, keep_until_step=step if resume else None, tensorboard=cfg.tensorboard)
    recorder = Recorder(run_dir, record_probs=cfg.record_probs, flush_rows=cfg.record_flush_rows,
                        hidden_bf16=cfg.hidden_bf16) if cfg.record else None  # fmt: skip
    if recorder is not None:
        recorder.write_tokens(train_split.tokens, cfg.dataset, "train", lazy=cfg.record_tokens is not None)
        recorder.write_tokens(valid_split.tokens, cfg.dataset, "valid", limit=cfg.record_tokens)
    keep_valid = hidden_sample(len(valid_split), cfg.hidden_sample, cfg.seed, within=cfg.record_tokens)
    loop = _Loop(cfg, task, model, opt, sched, params, device, recorder, metrics, state, progress)
    try:
        for epoch in range(start_epoch, cfg.epochs):
            step = loop.run_epoch(train_split, epoch, step, steps_per_epoch)
            vm = evaluate(task, model, valid_split, device, epoch=epoch, step=step, recorder=recorder, keep=keep_valid,
                          max_batches=cfg.max_eval_batches)  # fmt: skip
            metrics.add_many(step, epoch, "valid", vm)
            if recorder is not None:
                recorder.flush()
            metrics.flush()
            save_checkpoint(checkpoint_path(run_dir, epoch), {
                "model": model.state_dict(), "optimizer": opt.state_dict(), "scheduler": sched.state_dict(),
                "config": cfg.to_dict(), "vocab": train_split.vocab.to_dict(), "step": step, "epoch": epoch})  # fmt: skip
            state.save(step=step, epoch=epoch, valid=vm)
            if progress:
                tqdm.write(f"epoch {epoch}: " + ", ".join(f"valid {k} {v:.4g}" for k, v in vm.items()))
            if cfg.max_steps and step >= cfg.max_steps:
                break
    except KeyboardInterrupt:
        _finish(recorder, metrics, state, "interrupted", step)
        raise
    except BaseException as e:
        _finish(recorder, metrics, state, "failed", step, error=str(e).splitlines()[0] if str(e) else type(e).__name__)
        raise
    _finish(recorder, metrics, state, "finished", step)
    return run_dir


def _finish(recorder, metrics: Metrics, state: RunState, status: str, step: int, error: str | None = None) -> None:
    """Everything already recorded reaches the disk whatever ended the run."""
    try:
        if recorder is not None:
            recorder.close()
    finally:
        metrics.flush()
        state.save(status=status, finished_at=time.strftime("%Y-%m-%dT%H:%M:%S"), error=error)


class _Loop:
    """The training epoch: the step, device-side accumulators, the log/guard every LOG_EVERY steps."""

    def __init__(self, cfg, task, model, opt, sched, params, device, recorder, metrics, state, progress) -> None:
        self.cfg, self.task, self.model, self.opt, self.sched, self.params = cfg, task, model, opt, sched, params
        self.device, self.recorder, self.metrics, self.state, self.progress = device, recorder, metrics, state, progress

    def run_epoch(self, split, epoch: int, step: int, steps_per_epoch: int) -> int:
        cfg, model = self.cfg, self.model
        model.train()
        fstate = self.task.init_state()
        window = _Window(cfg.num_experts if cfg.router != "dense" else 1, self.device)
        bar = tqdm(total=steps_per_epoch, desc=f"epoch {epoch}", disable=not self.progress, unit="step")
        t0, ntok = time.perf_counter(), 0
        for i, batch in enumerate(self.task.batches(split, train=True, seed=cfg.seed * 1000 + epoch, epoch=epoch)):
            batch = _to(batch, self.device)
            with _autocast(self.device):
                fwd = self.task.forward(model, batch, fstate)
            fstate = fwd.state
            label = step  # the forward's step: the number of updates its weights had
            loss = fwd.loss + fwd.aux
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(self.params, cfg.clip)
            self.opt.step()
            self.sched.step()
            step += 1
            window.update(fwd)
            if self.recorder is not None and label % cfg.record_every == 0:
                self.recorder.add(fwd.traces, dataset=split.dataset, split="train", epoch=epoch, step=label)
            ntok += batch["ntokens"]
            bar.update(1)
            last = cfg.max_steps is not None and step >= cfg.max_steps
            if step % LOG_EVERY == 0 or last or i == steps_per_epoch - 1:
                tok_s = ntok / (time.perf_counter() - t0)
                window.log(self.metrics, step, epoch, tok_s, self.opt.param_groups[0]["lr"], bar)
                self.state.save(step=step)
            if last or i == steps_per_epoch - 1:  # an --epoch-steps epoch ends early
                break
        bar.close()
        return step


class _Window:
    """Sums over the steps since the last log, kept on the device (no host sync in the step)."""

    def __init__(self, e: int, device: torch.device) -> None:
        self.e, self.device = e, device
        self.reset()

    def reset(self) -> None:
        z = lambda *s: torch.zeros(*s, device=self.device)  # noqa: E731
        self.loss, self.aux, self.load, self.importance, self.dropped, self.n = z(()), z(()), z(self.e), z(self.e), z(()), 0
        self.parts: dict[str, torch.Tensor] = {}

    def update(self, fwd) -> None:
        self.loss += fwd.loss.detach()
        self.aux += fwd.aux.detach()
        for tr in fwd.traces:
            r = tr.routing
            self.load += r.load.detach()
            self.importance += r.importance.detach()
            self.dropped += r.num_dropped
            for k, v in r.aux.items():
                self.parts[k] = self.parts.get(k, 0) + v.detach()
        self.n += 1

    def log(self, metrics, step: int, epoch: int, tok_s: float, lr: float, bar) -> None:
        loss = float(self.loss) / self.n  # the one host sync, every LOG_EVERY steps
        if not math.isfinite(loss):
            raise MoeLensError(f"non-finite training loss ({loss}) at step {step}; stopped. Traces, metrics and "
                               f"checkpoints so far are kept. Try a lower --lr or --clip.")  # fmt: skip
        vals = {"loss": loss, "aux_loss": float(self.aux) / self.n, "tokens_per_s": tok_s, "lr": lr,
                "dropped": float(self.dropped)} | {f"aux_{k}": float(v) / self.n for k, v in self.parts.items()}  # fmt: skip
        metrics.add_many(step, epoch, "train", vals)
        for name, arr in (("load", self.load), ("importance", self.importance)):
            for i, v in enumerate((arr / arr.sum().clamp_min(1e-12)).tolist()):
                metrics.add(step, epoch, "train", name, v, layer=0, expert=i)
        bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        self.reset()


__all__ = ["train", "evaluate", "load_data", "resolve_device"]
