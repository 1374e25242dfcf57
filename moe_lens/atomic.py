"""Atomic file writes: write to a temporary name, then rename, so a reader (or a run killed mid-write) sees the
old file or the new one, never a part. Used for Parquet parts and metrics.parquet (record.py, rundir.py,
resume.py), run.json and config.json (rundir.py, train.py) and checkpoints (rundir.py).

A full disk raises `DiskFull` naming the file (one line for the CLI); the temporary file is removed.
"""
from __future__ import annotations

import errno
import json
import os
import uuid
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from moe_lens.errors import MoeLensError


class DiskFull(MoeLensError):
    """A write failed for lack of space; what was written before stays readable."""

    def __init__(self, path: Path, err: OSError) -> None:
        self.path = path
        super().__init__(f"disk full writing {path} ({err.strerror or err})")


def is_disk_full(err: BaseException) -> bool:
    # pyarrow's OSError carries the errno in its message only
    return isinstance(err, OSError) and (err.errno == errno.ENOSPC or "No space left on device" in str(err))


def write_atomic(path: Path, write, tmp: Path | None = None) -> None:
    """`write(tmp)` then rename tmp to `path`: readers see the old file or the new one, never a part.
    A failed write removes its temporary file; a full disk raises `DiskFull` naming `path`."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = tmp or path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException as e:
        tmp.unlink(missing_ok=True)
        if is_disk_full(e):
            raise DiskFull(path, e) from e
        raise


def write_table_atomic(table: pa.Table, path: Path) -> None:
    write_atomic(path, lambda tmp: pq.write_table(table, tmp, compression="zstd"))


def write_json_atomic(obj: dict[str, Any], path: Path) -> None:
    text = json.dumps(obj, indent=2, default=str)
    write_atomic(path, lambda tmp: tmp.write_text(text), tmp=path.with_name(f".{path.name}.tmp"))
