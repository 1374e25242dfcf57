"""`moe-lens analyze NAME RUN... [--OPTION VALUE ...] [--bootstrap N --unit document|sentence]`: any registered
analysis (moe_lens/analysis/registry.py) printed as a table.

The options are read from the analysis functions' signatures: every keyword-only parameter `x` of some analysis is
`--x` (underscores as dashes), converted by its annotation (int, float, bool, str; `none` for None); an option the
named analysis does not take is refused in one line. RUN... go to the function's leading positional parameters:
all of them to `runs`, or one each to `run` / `run_a, run_b` (agreement). `--bootstrap N` adds 95% intervals
(`analysis.bootstrap`, N replicates) to the analyses that have a resampler.
"""
from __future__ import annotations

import argparse
import inspect
from typing import Any

import pandas as pd

from moe_lens.analysis.bootstrap import RESAMPLERS, bootstrap
from moe_lens.analysis.registry import ANALYSES, analysis
from moe_lens.errors import MoeLensError
from moe_lens.store import connect, default_runs_dir


def _keyword_params() -> dict[str, inspect.Parameter]:
    """Every keyword-only parameter of a registered analysis, by name (first one seen)."""
    out: dict[str, inspect.Parameter] = {}
    for a in ANALYSES:
        for p in inspect.signature(a.fn).parameters.values():
            if p.kind is inspect.Parameter.KEYWORD_ONLY:
                out.setdefault(p.name, p)
    return out


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("analyze", help="print one analysis of moe_lens.analysis as a table",
                              description="Analyses: " + "; ".join(f"{a.name}: {a.about}" for a in ANALYSES))
    p.add_argument("name", choices=[a.name for a in ANALYSES], metavar="NAME", help="a registered analysis")
    p.add_argument("runs", nargs="*", metavar="RUN", help="run names (default: every run, where the analysis allows)")
    p.add_argument("--runs-dir", default=None, help="runs directory (default: runs/ when it holds runs, else sample_runs/)")
    p.add_argument("--format", choices=("table", "csv", "json"), default="table")
    p.add_argument("--bootstrap", type=int, default=0, metavar="N",
                   help=f"add 95%% intervals from N bootstrap replicates ({', '.join(RESAMPLERS)})")
    p.add_argument("--unit", choices=("document", "sentence"), default="document", help="bootstrap resampling unit")
    p.add_argument("--bootstrap-seed", dest="boot_seed", type=int, default=0, help="bootstrap seed")
    for name, param in _keyword_params().items():
        p.add_argument(f"--{name.replace('_', '-')}", dest=f"opt_{name}", default=argparse.SUPPRESS, metavar="VALUE",
                       help=f"{name} (default {param.default!r})")
    p.set_defaults(func=_analyze_command)


def _convert(value: str, param: inspect.Parameter, name: str) -> Any:
    ann = str(param.annotation)
    if value.lower() == "none" and ("None" in ann or param.default is None):
        return None
    try:
        if ann.startswith("bool"):
            if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError
            return value.lower() in ("true", "1", "yes")
        if ann.startswith("int"):
            return int(value)
        if ann.startswith("float"):
            return float(value)
    except ValueError:
        raise MoeLensError(f"--{name.replace('_', '-')}={value!r}: expected {ann}") from None
    return value


def _analyze_command(args: argparse.Namespace) -> int:
    a = analysis(args.name)
    params = inspect.signature(a.fn).parameters
    options = {}
    for key, value in vars(args).items():
        if not key.startswith("opt_"):
            continue
        name = key[4:]
        if name not in params or params[name].kind is not inspect.Parameter.KEYWORD_ONLY:
            raise MoeLensError(f"{a.name} takes no --{name.replace('_', '-')}; its options: "
                               + ", ".join(f"--{n.replace('_', '-')}" for n, q in params.items()
                                           if q.kind is inspect.Parameter.KEYWORD_ONLY))
        options[name] = _convert(value, params[name], name)
    con = connect(args.runs_dir or default_runs_dir())
    positional = [n for n, q in params.items() if q.kind is inspect.Parameter.POSITIONAL_OR_KEYWORD][1:]  # after con
    if positional and positional[0] == "runs":
        call_args: list[Any] = [args.runs or None]
    else:
        if len(args.runs) != len(positional):
            raise MoeLensError(f"{a.name} takes {len(positional)} run(s): {' '.join(p.upper() for p in positional)}")
        call_args = list(args.runs)
    if args.bootstrap:
        if a.name not in RESAMPLERS:
            raise MoeLensError(f"--bootstrap: {a.name} has no resampler; bootstrappable: {', '.join(RESAMPLERS)}")
        fn_options = {"by": options.pop("by")} if "by" in options else None
        df = bootstrap(a.fn, con, *call_args, by=args.unit, n=args.bootstrap, seed=args.boot_seed,
                       fn_options=fn_options, **options)
    else:
        df = a.fn(con, *call_args, **options)
    _print(df, args.format)
    return 0


def _print(df: pd.DataFrame, fmt: str) -> None:
    if fmt == "csv":
        print(df.to_csv(index=False), end="")
    elif fmt == "json":
        print(df.to_json(orient="records"))
    else:
        with pd.option_context("display.max_rows", 500, "display.max_columns", 100, "display.width", 200):
            print(df.to_string(index=False))
