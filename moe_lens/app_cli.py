"""`moe-lens app`: start the Streamlit app (app/main.py) on 127.0.0.1 over a runs directory.

Runs `python -m streamlit run app/main.py --server.address 127.0.0.1 ... -- --runs-dir D`; the flags are
passed explicitly because Streamlit reads app/.streamlit/config.toml only when started from app/. Without
`--runs-dir`, D is `health.default_runs_dir()`, the rule `streamlit run app/main.py` applies itself.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

from moe_lens.app_pages import PAGES
from moe_lens.errors import MoeLensError

APP = Path(__file__).resolve().parents[1] / "app" / "main.py"


def streamlit_command(runs_dir: str, *, port: int = 8501, address: str = "127.0.0.1",
                      headless: bool = False) -> list[str]:
    """The `streamlit run` command line that `moe-lens app` executes."""
    return [sys.executable, "-m", "streamlit", "run", str(APP), "--server.address", address,
            "--server.port", str(port), "--server.headless", str(headless).lower(),
            "--browser.gatherUsageStats", "false", "--", "--runs-dir", str(Path(runs_dir).expanduser().resolve())]


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("app", help="open the Streamlit app over a runs directory (127.0.0.1)",
                              description=f"Pages: {', '.join(p.title for p in PAGES)}.")
    p.add_argument("--runs-dir", default=None,
                   help="runs directory (default: $MOE_LENS_RUNS_DIR, else runs/ when it holds runs, else sample_runs/)")
    p.add_argument("--port", type=int, default=8501)
    p.add_argument("--address", default="127.0.0.1", help="bind address (default 127.0.0.1: local only)")
    p.add_argument("--headless", action="store_true", help="do not open a browser")
    p.set_defaults(func=_app_command)


def _app_command(args: argparse.Namespace) -> int:
    from moe_lens.health import why_runs_dir

    if not APP.exists():
        raise MoeLensError(f"app not found at {APP} (moe-lens app needs a source checkout)")
    try:
        import streamlit  # noqa: F401
    except ModuleNotFoundError:
        raise MoeLensError('streamlit is not installed: pip install -e ".[app]"') from None
    runs_dir, why = (args.runs_dir, "--runs-dir") if args.runs_dir else why_runs_dir()
    print(f"moe-lens app: opening {Path(runs_dir).expanduser().resolve()} ({why})", file=sys.stderr)
    cmd = streamlit_command(runs_dir, port=args.port, address=args.address, headless=args.headless)
    return subprocess.call(cmd)
