"""The run directory: config.json, run.json, metrics.parquet and checkpoints (docs/traces.md).

`config.json` is written before step 0 (minGPT's `setup_logging`), so a crashed run still
describes itself. `run.json` says how far the run got; it is rewritten atomically. A checkpoint
holds {"model", "optimizer", "scheduler", "config", "vocab", "step", "epoch"}; never the pickled model.
Checkpoints are `checkpoints/epoch-E.pt` after epoch E's evaluation and `epoch-E-step-S.pt` within
an epoch (only the latest of those is kept); the latter also hold what an exact resume needs
(moe_lens/resume.py): the batch position, the random generators, the LM's carried state, the
train-time statistics window and the number of metrics rows.
"""
from __future__ import annotations

import os
import platform
import socket
import subprocess
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from moe_lens.atomic import write_atomic, write_json_atomic, write_table_atomic
from moe_lens.clock import now, stamp
from moe_lens.errors import MoeLensError
from moe_lens.health import read_json

METRIC_SCHEMA = pa.schema([("step", pa.int64()), ("epoch", pa.int32()), ("split", pa.string()), ("name", pa.string()),
                           ("layer", pa.int16()), ("expert", pa.int16()), ("value", pa.float64())])  # fmt: skip


def plan_run_dir(runs_dir: str, run_name: str | None, dataset: str, mode: str, *, resume: bool) -> Path:
    """The run directory's path, checked before any work: a resumed run must exist, a new one must not."""
    name = run_name or f"{dataset}-{mode}-{stamp()}"
    path = Path(runs_dir).expanduser() / name
    if resume and not (path / "config.json").is_file():
        raise MoeLensError(f"--resume: no run at {path} (give the same --runs-dir and --run-name)")
    if not resume and path.is_dir() and any(path.iterdir()):
        raise MoeLensError(f"run directory {path} already exists; choose another --run-name or pass --resume")
    return path


def create_run_dir(path: Path, runs_dir: str) -> None:
    """Create the planned directory; a clear error if it cannot be written."""
    try:
        path.mkdir(parents=True, exist_ok=True)
        probe = path / ".write-test"
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise MoeLensError(f"runs directory {runs_dir} is not writable ({e.strerror}); pass --runs-dir DIR") from e


def environment(device: torch.device) -> dict[str, Any]:
    versions = {}
    for pkg in ("moe-lens", "torch", "numpy", "pyarrow", "duckdb", "spacy"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            pass
    try:
        here = Path(__file__).resolve().parent
        commit = subprocess.run(["git", "rev-parse", "HEAD"], cwd=here, capture_output=True, text=True, timeout=5)
        git_commit = commit.stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        git_commit = None
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"versions": versions, "device": f"{device} ({name})", "git_commit": git_commit,
            "python": platform.python_version(), "host": socket.gethostname()}  # fmt: skip


@dataclass
class RunState:
    """run.json, kept in memory and rewritten atomically at each `save()`."""

    path: Path
    data: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def start(cls, run_dir: Path, *, resume: bool) -> "RunState":
        state = cls(run_dir / "run.json")
        if resume and state.path.is_file():
            state.data = read_json(state.path)
        state.data.update(status="running", pid=os.getpid(), host=socket.gethostname(), updated_at=now(), error=None,
                          finished_at=None, stopped_by=None)  # fmt: skip
        state.data.setdefault("started_at", now())
        state.data.setdefault("step", 0)
        state.data.setdefault("epoch", -1)
        state.save()
        return state

    def save(self, **fields: Any) -> None:
        self.data.update(fields, updated_at=now())
        write_json_atomic(self.data, self.path)


class Metrics:
    """Long-format scalars; metrics.parquet is rewritten atomically at each `flush()`."""

    def __init__(self, run_dir: Path, *, keep_until_step: int | None = None, keep_rows: int | None = None,
                 tensorboard: bool = False) -> None:
        """Resume: `keep_rows` keeps the first rows the checkpoint counted (exact), `keep_until_step`
        the rows up to a step (checkpoints written before the row count was saved)."""
        self.path = run_dir / "metrics.parquet"
        self.rows: list[dict[str, Any]] = []
        self.writer = _tensorboard_writer(run_dir) if tensorboard else None
        if (keep_until_step is not None or keep_rows is not None) and self.path.is_file():
            old = pq.read_table(self.path).to_pylist()  # Arrow keeps NULL layer/expert as None (pandas: NaN)
            if keep_rows is not None:
                self.rows = old[:keep_rows]
            else:
                self.rows = [r for r in old if r["step"] <= keep_until_step]

    def add(self, step: int, epoch: int, split: str, name: str, value: float, *, layer: int | None = None,
            expert: int | None = None) -> None:
        self.rows.append(dict(step=step, epoch=epoch, split=split, name=name, layer=layer, expert=expert,
                              value=float(value)))  # fmt: skip
        if self.writer is not None:
            tag = f"{split}/{name}" + (f"/layer{layer}" if layer is not None else "") + \
                (f"/expert{expert}" if expert is not None else "")
            self.writer.add_scalar(tag, float(value), step)

    def add_many(self, step: int, epoch: int, split: str, values: dict[str, float]) -> None:
        for name, v in values.items():
            self.add(step, epoch, split, name, v)

    def flush(self) -> None:
        table = pa.Table.from_pylist(self.rows, schema=METRIC_SCHEMA)
        write_table_atomic(table, self.path)
        if self.writer is not None:
            self.writer.flush()


def _tensorboard_writer(run_dir: Path):  # noqa: ANN202 - SummaryWriter, imported only when asked for
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise MoeLensError("--tensorboard needs the tensorboard package: pip install tensorboard") from e
    return SummaryWriter(log_dir=str(run_dir / "tensorboard"))


def checkpoint_path(run_dir: Path, epoch: int, step: int | None = None) -> Path:
    """`epoch-E.pt` after epoch E's evaluation; `epoch-E-step-S.pt` after step S within epoch E."""
    name = f"epoch-{epoch}.pt" if step is None else f"epoch-{epoch}-step-{step}.pt"
    return run_dir / "checkpoints" / name


def _order(path: Path) -> tuple[int, float]:
    parts = path.stem.split("-")  # epoch-E or epoch-E-step-S
    return int(parts[1]), float(parts[3]) if len(parts) == 4 else float("inf")  # an epoch's end is its last


def _checkpoints(run_dir: Path) -> list[Path]:
    found = [p for p in (run_dir / "checkpoints").glob("epoch-*.pt")
             if all(x.isdigit() for x in p.stem.split("-")[1::2]) and len(p.stem.split("-")) in (2, 4)]  # fmt: skip
    return sorted(found, key=_order)


def latest_checkpoint(run_dir: Path, *, epoch_end: bool = False) -> Path | None:
    """The checkpoint furthest into the run (`epoch_end`: the latest written after an evaluation)."""
    found = [p for p in _checkpoints(run_dir) if not epoch_end or len(p.stem.split("-")) == 2]
    return found[-1] if found else None


def save_checkpoint(path: Path, payload: dict[str, Any]) -> None:
    """Write atomically, then delete every other mid-epoch checkpoint (only the latest one is kept)."""
    write_atomic(path, lambda tmp: torch.save(payload, tmp), tmp=path.with_name(f".{path.name}.tmp"))
    for old in _checkpoints(path.parent.parent):
        if old != path and len(old.stem.split("-")) == 4:
            old.unlink()
