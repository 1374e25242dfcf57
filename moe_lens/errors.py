"""User-facing errors.

`MoeLensError` is what bad user input raises: a file, an argument, a mode. The CLI prints its
message on one line without a traceback. `InputError` adds the file and line it came from, so
the message always reads ``path:line: what is wrong``. Internal invariants use ``assert``.
"""
from __future__ import annotations

from pathlib import Path


class MoeLensError(Exception):
    """An error in what the user gave us; its message is shown as one line."""


class InputError(MoeLensError, ValueError):
    """Bad content in an input file, located by file and (1-based) line."""

    def __init__(self, path: str | Path, line: int | None, message: str) -> None:
        self.path = str(path)
        self.line = line
        self.message = message
        where = f"{self.path}:{line}" if line is not None else self.path
        super().__init__(f"{where}: {message}")
