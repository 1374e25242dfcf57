"""The `moe-lens` command line.

Subcommands are contributed by the modules that own them: each exposes
``add_commands(subparsers) -> None``, adding parsers whose ``func(args) -> int`` runs the command.
User errors (`MoeLensError`, `ValueError` from validation, missing files, a full disk or another
OSError) print as one line on stderr, exit code 2, no traceback.
"""
from __future__ import annotations

import argparse
import errno
import importlib
import sys

from moe_lens.errors import MoeLensError

# Modules that add subcommands, in the order `moe-lens --help` lists them.
COMMAND_MODULES = (
    "moe_lens.train_cli",  # train, record, runs
    "moe_lens.capture.cli",  # capture (a Hugging Face MoE model's routing)
    "moe_lens.data.commands",  # data download / info
    "moe_lens.store",  # sql
    "moe_lens.summarize_cli",  # summarize
    "moe_lens.report",  # report
    "moe_lens.analyze_cli",  # analyze
    "moe_lens.figures",  # figure
    "moe_lens.app_cli",  # app
    "moe_lens.health",  # check
    "moe_lens.ablate",  # ablate
)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="moe-lens", description="Expert-routing analysis for mixture-of-experts LSTMs."
    )
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMAND_MODULES:
        try:
            module = importlib.import_module(name)
        except ModuleNotFoundError as e:
            if e.name != name:  # a real missing dependency inside the module: surface it
                raise
            continue
        module.add_commands(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.argv = list(sys.argv[1:] if argv is None else argv)  # `train --nproc N` relaunches these under torchrun
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    try:
        return int(args.func(args) or 0)
    except (MoeLensError, ValueError) as e:
        print(f"moe-lens {args.command}: error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # missing files, permissions, a full disk: the file and the reason, one line
        what = "disk full writing" if e.errno == errno.ENOSPC else "cannot access"
        where = f"{what} {e.filename} " if e.filename else ""
        print(f"moe-lens {args.command}: error: {where}({e.strerror or e})", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"moe-lens {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
