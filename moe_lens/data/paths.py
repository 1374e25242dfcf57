"""Where data and caches live, and strict file reading.

Data directory resolution: an explicit argument, else ``$MOE_LENS_DATA``, else
``~/.cache/moe-lens/data``. Derived files go to the cache directory, ``$MOE_LENS_CACHE`` when set,
else ``~/.cache/moe-lens``: POS tags in ``pos/``, hidden-state projections in ``projections/``. A data
directory (often shared, or read-only) and a runs directory are never written with caches; caches that
earlier versions wrote beside the data (``<data_dir>/.moe-lens-cache``, ``~/.cache/moe-lens/cache``)
are still read (`legacy_cache_dirs`). A directory counts as writable only when the process may write it
*and* its owner-write bit is set, so a folder deliberately made read-only (``chmod a-w``) is left
alone even by root.

`read_text` is the one way dataset files are read: UTF-8 strict, and an empty file or a
non-UTF-8 byte raises `InputError` naming the file and line.
"""
from __future__ import annotations

import hashlib
import os
import stat
from pathlib import Path

from moe_lens.errors import InputError

DEFAULT_DATA_DIR = Path("~/.cache/moe-lens/data")
DEFAULT_CACHE_DIR = Path("~/.cache/moe-lens")


def resolve_data_dir(data_dir: str | Path | None = None) -> Path:
    """`data_dir` if given, else $MOE_LENS_DATA, else ~/.cache/moe-lens/data (not created here)."""
    if data_dir is None or str(data_dir) == "":
        data_dir = os.environ.get("MOE_LENS_DATA") or DEFAULT_DATA_DIR
    return Path(data_dir).expanduser()


def is_writable_dir(path: Path) -> bool:
    """True when `path` is a directory we may write and that is not marked read-only."""
    try:
        mode = path.stat().st_mode
    except OSError:
        return False
    return stat.S_ISDIR(mode) and bool(mode & stat.S_IWUSR) and os.access(path, os.W_OK | os.X_OK)


def resolve_cache_dir(kind: str = "") -> Path:
    """$MOE_LENS_CACHE, else ~/.cache/moe-lens, joined with `kind` ('pos', 'projections'); created by the writer."""
    root = Path(os.environ.get("MOE_LENS_CACHE") or DEFAULT_CACHE_DIR).expanduser()
    return root / kind if kind else root


def legacy_cache_dirs(data_dir: str | Path | None = None) -> list[Path]:
    """Where earlier versions wrote POS caches: read from (never written) so nothing is tagged twice."""
    return [resolve_data_dir(data_dir) / ".moe-lens-cache", Path("~/.cache/moe-lens/cache").expanduser()]


def read_text(path: str | Path) -> tuple[str, str]:
    """(text, sha256 hex) of a UTF-8 file; `InputError` for an empty or non-UTF-8 file."""
    path = Path(path)
    data = path.read_bytes()
    if not data.strip():
        raise InputError(path, 1, "empty file")
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        col = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise InputError(path, line, f"not UTF-8: byte 0x{data[e.start]:02x} at column {col}") from None
    return text, hashlib.sha256(data).hexdigest()
