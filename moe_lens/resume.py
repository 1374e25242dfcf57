"""Stopping a run and continuing it exactly where it stopped.

- `resume_config`: `--resume` starts from the run's own config.json; flags typed on the command
  line may change only `RESUME_SAFE` fields, any other difference is refused in one line.
- `StopSignals`: SIGINT and SIGTERM set a flag that the training loop reads at the next step
  boundary (or between evaluation batches); it then checkpoints and raises `RunInterrupted`.
- `rng_state` / `set_rng_state`: python, numpy, torch CPU and every CUDA generator (the noisy
  router draws its noise from torch's global generator, so it is among them).
- `ResumePoint`: where a checkpoint says the run continues (epoch, batch, step) and what it restores.
- `rewind`: traces written after the checkpoint are removed, so the resumed steps are recorded once.
- `remove_tmp_files`: temporary files a killed writer left behind.
"""
from __future__ import annotations

import json
import random
import shlex
import signal
import threading
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from moe_lens.atomic import write_table_atomic
from moe_lens.config import MODES, RunConfig
from moe_lens.errors import MoeLensError
from moe_lens.record import TRACE_TABLES

# Fields a resumed run may change: how long it runs, where, and what it records. Anything else would
# make the rest of the run a different experiment from the one config.json describes.
RESUME_SAFE = ("epochs", "max_steps", "device", "data_dir", "runs_dir", "run_name", "checkpoint_every",
               "record", "record_every", "record_probs", "hidden_sample", "hidden_bf16", "record_flush_rows",
               "record_tokens", "max_eval_batches", "tensorboard")  # fmt: skip


def saved_config(run_dir: Path) -> RunConfig:
    """The RunConfig a run was started with (its config.json)."""
    path = run_dir / "config.json"
    try:
        saved = json.loads(path.read_text())
        saved.pop("device", None)  # config.json's "device" names the machine's device ("cpu (x86_64)"); the
        return RunConfig.from_dict(saved)  # resumed run uses --device, else auto
    except json.JSONDecodeError as e:
        raise MoeLensError(f"{path}:{e.lineno}: {e.msg} (column {e.colno})") from e


def requested_changes(saved: RunConfig, given: dict[str, Any]) -> dict[str, tuple[Any, Any]]:
    """{field: (saved, requested)} for each field the explicit flags `given` would change.

    A `--mode` given on the command line also brings the fields its preset (or the old mode's preset)
    sets: switching from `load` to `noisy_topk` takes w_load back to its default."""
    requested = dict(given)
    if "mode" in given:
        defaults = RunConfig()
        new, old = MODES[given["mode"]], MODES.get(saved.mode, {})
        for name in {*new, *old} - set(given):
            requested[name] = new.get(name, getattr(defaults, name))
    return {k: (getattr(saved, k), v) for k, v in requested.items() if getattr(saved, k) != v}


def check_unsafe(changes: dict[str, tuple[Any, Any]], path: Path) -> None:
    unsafe = {k: v for k, v in changes.items() if k not in RESUME_SAFE}
    if unsafe:
        listed = ", ".join(f"{k} ({a!r} -> {b!r})" for k, (a, b) in unsafe.items())
        raise MoeLensError(f"--resume: {listed} differ from its config.json ({path}); only "
                           f"{', '.join(RESUME_SAFE)} may change")  # fmt: skip


def resume_config(run_dir: Path, given: dict[str, Any]) -> RunConfig:
    """config.json of `run_dir` with the explicitly given safe flags applied; unsafe ones refused."""
    saved = saved_config(run_dir)
    changes = requested_changes(saved, given)
    check_unsafe(changes, run_dir / "config.json")
    return RunConfig.from_dict({**saved.to_dict(), **{k: b for k, (_, b) in changes.items()}})


def check_matches_saved(run_dir: Path, cfg: RunConfig) -> None:
    """A library caller's `train(cfg, resume=True)`: cfg may differ from config.json only in safe fields."""
    saved = saved_config(run_dir)
    changes = {k: (getattr(saved, k), v) for k, v in cfg.to_dict().items() if getattr(saved, k) != v}
    check_unsafe(changes, run_dir / "config.json")


# ---- signals ----------------------------------------------------------------------------------
class RunInterrupted(Exception):
    """The run stopped on a signal after its checkpoint was written."""

    def __init__(self, signum: int, step: int, run_dir: Path, world: int = 1) -> None:
        self.signum, self.step, self.run_dir, self.world = signum, step, run_dir, world
        self.signame = signal.Signals(signum).name
        super().__init__(f"stopped by {self.signame} at step {step}")

    @property
    def exit_code(self) -> int:
        return 128 + self.signum  # the shell's convention: 130 for SIGINT, 143 for SIGTERM

    def resume_command(self) -> str:
        return resume_command(self.run_dir, self.world)


def resume_command(run_dir: Path, world: int = 1) -> str:
    """The command that resumes `run_dir`; a torchrun run of `world` processes (one node) is resumed by as many."""
    nproc = f"--nproc {world} " if world > 1 else ""
    return (f"moe-lens train {nproc}--resume --run-name {shlex.quote(run_dir.name)} "
            f"--runs-dir {shlex.quote(str(run_dir.parent))}")  # fmt: skip


class StopSignals:
    """While entered (main thread only), SIGINT and SIGTERM set `signum` instead of stopping the
    process; a second signal stops at once (KeyboardInterrupt)."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM)

    def __init__(self) -> None:
        self.signum: int | None = None
        self._old: dict[int, Any] = {}

    def __enter__(self) -> "StopSignals":
        if threading.current_thread() is threading.main_thread():
            for s in self.SIGNALS:
                self._old[s] = signal.signal(s, self._handle)
        return self

    def _handle(self, signum: int, frame: Any) -> None:
        if self.signum is not None:
            raise KeyboardInterrupt
        self.signum = signum

    def __exit__(self, *exc: Any) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old.clear()


# ---- random generators --------------------------------------------------------------------------
def rng_state() -> dict[str, Any]:
    return {"python": random.getstate(), "numpy": np.random.get_state(), "torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else []}  # fmt: skip


def set_rng_state(state: dict[str, Any]) -> None:
    random.setstate(state["python"])
    np.random.set_state(state["numpy"])
    torch.set_rng_state(state["torch"].cpu())
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all([s.cpu() for s in state["cuda"]])


# ---- where a resumed run starts ------------------------------------------------------------------
class ResumePoint:
    """Where a (resumed) run starts: from nothing, after an epoch (`batch` None), or within one."""

    def __init__(self, payload: dict | None) -> None:
        self.payload = payload or {}
        self.step = self.payload.get("step", 0)
        within = payload is not None and self.payload.get("batch") is not None
        self.epoch = self.payload["epoch"] + (0 if within else 1) if payload is not None else 0
        self.batch = self.payload["batch"] if within else None  # batches of `epoch` already done
        self.trained = bool(self.payload.get("trained"))  # `epoch`'s training done, its evaluation not
        # the step label of the last training batch recorded before the checkpoint (labels are the recorder's)
        self.train_through = self.payload.get("train_through", self.step if payload is not None else -1)

    def restore(self, loop: Any) -> None:
        """Put the carried LM state, the statistics window and every random generator of the training
        loop (moe_lens.train._Loop) back as checkpointed."""
        if "window" in self.payload and self.payload["window"] is not None:
            loop.window.load_state_dict(self.payload["window"])
        loop.fstate = self.payload.get("lm_state")
        loop.train_through = self.train_through
        if "rng" in self.payload:
            set_rng_state(self.payload["rng"])


# ---- files ---------------------------------------------------------------------------------------
def remove_tmp_files(run_dir: Path) -> list[Path]:
    """Delete the temporary files (`.name.tmp`, `.name.<id>.tmp`) a killed writer left; returns them."""
    found = [p for p in run_dir.rglob("*.tmp") if p.is_file()]
    for p in found:
        p.unlink()
    return found


def rewind(run_dir: Path, *, step: int, epoch: int, epoch_complete: bool) -> None:
    """Remove trace rows recorded after a checkpoint in `epoch`.

    Training rows are kept up to the step label `step` (the label of the last training batch recorded
    before the checkpoint). Evaluation partitions are kept for epochs before `epoch`, and for `epoch`
    itself only when the checkpoint was taken after its evaluation (`epoch_complete`)."""
    for table in TRACE_TABLES:
        for part in sorted((run_dir / table).glob("dataset=*/split=*/epoch=*")):
            e = int(part.name.split("=", 1)[1])
            if part.parent.name == "split=train":
                for f in sorted(part.rglob("*.parquet")):  # rglob: the ddp_rank=R/ partitions of a torchrun run
                    _keep_steps_up_to(f, step)
            elif e > epoch or (e == epoch and not epoch_complete):
                for f in part.rglob("*.parquet"):
                    f.unlink()
            for d in sorted((p for p in part.rglob("*") if p.is_dir()), reverse=True) + [part]:
                if d.is_dir() and not any(d.iterdir()):
                    d.rmdir()


def _keep_steps_up_to(path: Path, step: int) -> None:
    """Drop the rows of one part file with step > `step` (the file's statistics decide most cases)."""
    meta = pq.read_metadata(path)
    col = meta.schema.to_arrow_schema().get_field_index("step")
    stats = [meta.row_group(i).column(col).statistics for i in range(meta.num_row_groups)]
    if stats and all(s is not None and s.has_min_max for s in stats):
        lo, hi = min(s.min for s in stats), max(s.max for s in stats)
        if hi <= step:
            return
        if lo > step:
            path.unlink()
            return
    table = pq.ParquetFile(path).read()  # the file alone: no hive partition columns added
    kept = table.filter(pc.less_equal(table["step"], step))
    if kept.num_rows == table.num_rows:
        return
    if kept.num_rows == 0:
        path.unlink()
    else:
        write_table_atomic(kept, path)


__all__ = ["RESUME_SAFE", "ResumePoint", "resume_config", "check_matches_saved", "RunInterrupted", "StopSignals", "rng_state",
           "set_rng_state", "remove_tmp_files", "rewind", "resume_command"]  # fmt: skip
