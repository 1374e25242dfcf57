"""Is a runs directory healthy: the one reader of run.json/config.json, the one run-status rule, the cheap
check of every Parquet part's footer, the one default runs directory, and `moe-lens check`.

Everything that reads a run's metadata (the SQL `runs` view, `moe-lens runs`, `report`, the app, resume)
reads it through `read_json`, so an invalid file is named the same way everywhere, in one line:

    runs/x/config.json:3: Expecting property name enclosed in double quotes (column 5)

A damaged file never hides the rest of the directory: `scan` lists the readable part files of each table
(what `store.connect` puts in its views) and the damaged ones apart, with the reason, per run.
`moe-lens check [RUNS_DIR] [--fix]` lists them and moves them to `<run>/quarantine/`.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import sys
from pathlib import Path
from typing import Any, NamedTuple

import pyarrow.parquet as pq

from moe_lens.errors import MoeLensError

# The layout of a run directory (docs/traces.md): the part files of each table, relative to the runs dir.
GLOBS = ({t: f"*/{t}/**/part-*.parquet" for t in ("tokens", "routing", "probs", "hidden")} | {"metrics": "*/metrics.parquet"}
         | {"ablation": "*/ablation/**/part-*.parquet"})  # `moe-lens ablate` (moe_lens/ablate.py)
RUN_MARKS = ("config.json", "run.json", "routing", "tokens", "metrics.parquet")
QUARANTINE = "quarantine"


class DamagedFile(MoeLensError):
    """An unreadable run file; `detail` is what follows the file's name (`:3: Expecting ... (column 5)`)."""

    def __init__(self, path: Path, detail: str) -> None:
        self.path, self.detail = Path(path), detail
        super().__init__(f"{path}{detail}")


def read_json(path: str | Path) -> dict[str, Any]:
    """A JSON object from `path`; FileNotFoundError when missing, DamagedFile (file and line) when invalid."""
    path = Path(path)
    text = path.read_text()
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise DamagedFile(path, f":{e.lineno}: {e.msg} (column {e.colno})") from None
    except UnicodeDecodeError as e:
        raise DamagedFile(path, f": not UTF-8 text ({e.reason})") from None
    if not isinstance(obj, dict):
        raise DamagedFile(path, f":1: expected a JSON object, found {type(obj).__name__}")
    return obj


class RunMeta(NamedTuple):
    """A run's run.json and config.json ({} when missing or damaged) and their problems (one line each)."""

    state: dict[str, Any]
    config: dict[str, Any]
    problems: list[str]


def read_run(run_dir: Path) -> RunMeta:
    """run.json and config.json of one run; a damaged file is a problem line, never an exception."""
    out, problems = [], []
    for name in ("run.json", "config.json"):
        try:
            out.append(read_json(run_dir / name))
        except FileNotFoundError:
            out.append({})  # not written yet: a run that never started, or a copied trace directory
        except (DamagedFile, OSError) as e:
            out.append({})
            problems.append(f"{name}{e.detail}" if isinstance(e, DamagedFile) else f"{name}: {e.strerror}")
    return RunMeta(out[0], out[1], problems)


def run_status(state: dict[str, Any], config: dict[str, Any] | None = None) -> str:
    """run.json's status, except that a `running` run whose process is gone from this host is `killed`.

    The host is run.json's `host`, else config.json's (written by the same start); a run on another host
    keeps `running`: its process cannot be seen from here. No run.json (or a damaged one) is `unknown`.
    """
    status = state.get("status") or "unknown"
    if status != "running" or not isinstance(state.get("pid"), int):
        return status
    host = state.get("host") or (config or {}).get("host")
    if host and host != socket.gethostname():
        return status
    return status if _alive(state["pid"]) else "killed"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except (PermissionError, OverflowError):
        return True  # another user's process (or a pid we cannot ask about): assume it lives
    return True


def run_dirs(root: Path) -> list[Path]:
    """Subdirectories of `root` that look like runs (a JSON file or a table directory)."""
    return sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith(".")
                  and any((p / m).exists() for m in RUN_MARKS))


def default_runs_dir() -> str:
    """The one default for `moe-lens app`, `streamlit run app/main.py` and every command (`why_runs_dir`)."""
    return why_runs_dir()[0]


def why_runs_dir() -> tuple[str, str]:
    """(directory, why): $MOE_LENS_RUNS_DIR, else `runs/` when it holds runs, else `sample_runs/` (here, else
    the checkout's)."""
    if os.environ.get("MOE_LENS_RUNS_DIR"):
        return os.environ["MOE_LENS_RUNS_DIR"], "$MOE_LENS_RUNS_DIR"
    if Path("runs").is_dir() and run_dirs(Path("runs")):
        return "runs", "runs/ holds runs"
    bundled = Path(__file__).resolve().parents[1] / "sample_runs"
    samples = "sample_runs" if Path("sample_runs").is_dir() or not bundled.is_dir() else str(bundled)
    return samples, "runs/ holds no runs: the bundled samples"


_FOOTERS: dict[tuple[str, int, int], str | None] = {}  # (path, size, mtime_ns) -> problem or None


def parquet_problem(path: Path) -> str | None:
    """None when the file's footer reads (`pq.read_metadata`), else the reason; cached per (path, size, mtime)."""
    try:
        st = path.stat()
    except OSError as e:
        return e.strerror or "cannot stat"
    key = (str(path), st.st_size, st.st_mtime_ns)
    if key not in _FOOTERS:
        if st.st_size == 0:
            _FOOTERS[key] = "empty file (0 bytes)"
        else:
            try:
                pq.read_metadata(path)
                _FOOTERS[key] = None
            except Exception as e:  # noqa: BLE001 - Arrow raises several types for a bad file
                _FOOTERS[key] = f"unreadable Parquet ({str(e).splitlines()[0]})"
    return _FOOTERS[key]


class Damage(NamedTuple):
    run: str  # the run directory's name
    path: Path  # the damaged file
    problem: str  # one line, starting with the file's path inside the run
    table: str | None  # the view it would feed (a GLOBS key), None for run.json/config.json


class Scan(NamedTuple):
    """A runs directory: its runs, the readable part files of each table, and every damaged file."""

    runs: list[Path]
    files: dict[str, list[Path]]
    damaged: list[Damage]

    def problems(self, run: str) -> list[str]:
        return [d.problem for d in self.damaged if d.run == run]


def scan(root: Path) -> Scan:
    """Check every run's JSON files and every part file's footer under `root` (quarantine/ is skipped)."""
    runs = run_dirs(root)
    damaged = [Damage(d.name, d / p.split(":", 1)[0], p, None) for d in runs for p in read_run(d).problems]
    files: dict[str, list[Path]] = {}
    for table, pattern in GLOBS.items():
        files[table] = []
        for f in sorted(root.glob(pattern)):
            run = f.relative_to(root).parts[0]
            problem = parquet_problem(f)
            if problem is None:
                files[table].append(f)
            else:
                damaged.append(Damage(run, f, f"{f.relative_to(root / run).as_posix()}: {problem}", table))
    return Scan(runs, files, damaged)


def quarantine(root: Path, damage: Damage) -> Path:
    """Move a damaged file to `<run>/quarantine/<its path in the run>`; returns the new path."""
    rel = damage.path.relative_to(root / damage.run)
    target = root / damage.run / QUARANTINE / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    os.replace(damage.path, target)
    return target


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("check", help="list damaged files and runs (exit 1 while any); --fix quarantines them",
                              description="Checks every run's run.json/config.json and every Parquet part's footer.")
    p.add_argument("runs_dir", nargs="?", default=None, metavar="RUNS_DIR",
                   help="runs directory (default: $MOE_LENS_RUNS_DIR, else runs/ when it holds runs, else sample_runs/)")
    p.add_argument("--fix", action="store_true", help=f"move each damaged file to <run>/{QUARANTINE}/")
    p.set_defaults(func=_check_command)


def _check_command(args: argparse.Namespace) -> int:
    root = Path(args.runs_dir or default_runs_dir()).expanduser()
    if not root.is_dir():
        raise MoeLensError(f"runs directory {root} does not exist")
    found = scan(root.resolve())
    for d in found.damaged:
        print(f"damaged: {d.run}/{d.problem}")
        if args.fix:
            print(f"  moved to {quarantine(root.resolve(), d).relative_to(root.resolve())}")
    runs = sorted({d.run for d in found.damaged})
    print(f"{len(found.runs)} runs, {sum(map(len, found.files.values()))} readable part files, "
          f"{len(found.damaged)} damaged files in {len(runs)} runs" + (f": {', '.join(runs)}" if runs else ""),
          file=sys.stderr if found.damaged else sys.stdout)
    if args.fix and found.damaged:
        return 1 if scan(root.resolve()).damaged else 0
    return 1 if found.damaged else 0
