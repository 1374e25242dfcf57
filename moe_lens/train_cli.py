"""`moe-lens train`, `moe-lens record` and `moe-lens runs`.

The train flags are generated from `dataclasses.fields(RunConfig)`, so every default is written
once, in the dataclass. Flags the user does not give are not set, so `--mode` presets apply
underneath explicit flags: `RunConfig(**{**MODES[mode], **given})`.
"""
from __future__ import annotations

import argparse
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from moe_lens import health
from moe_lens.config import DATASETS, MODES, RunConfig
from moe_lens.errors import MoeLensError


def _flag_type(tp: object):
    """(argparse type, is_bool) for a dataclass field annotation such as 'int | None' ('none' -> None)."""
    tp = eval(tp, vars(typing)) if isinstance(tp, str) else tp  # noqa: S307 - annotations of our own dataclass
    optional = isinstance(tp, types.UnionType)
    base = [a for a in typing.get_args(tp) if a is not type(None)][0] if optional else tp
    if base is bool:
        return None, True
    if not optional:
        return base, False

    def parse(v: str):
        return None if v.lower() == "none" else base(v)

    parse.__name__ = base.__name__  # argparse names the type in its error message
    return parse, False


def _parse_bool(v: str) -> bool:
    if v.lower() in ("1", "true", "yes", "on"):
        return True
    if v.lower() in ("0", "false", "no", "off"):
        return False
    raise argparse.ArgumentTypeError(f"expected true/false, got {v!r}")


def add_config_flags(p: argparse.ArgumentParser) -> None:
    for f in fields(RunConfig):
        tp, is_bool = _flag_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS}
        if is_bool:
            p.add_argument(flag, action=argparse.BooleanOptionalAction, help=f"(default: {default})", **kw)
        elif f.name == "mode":
            p.add_argument(flag, choices=list(MODES), help="gating variant preset (default: noisy_topk)", **kw)
        elif f.name == "dataset":
            p.add_argument(flag, choices=list(DATASETS), help="(default: wikitext2)", **kw)
        else:
            p.add_argument(flag, type=tp, help=f"(default: {default})", **kw)


def given_flags(args: argparse.Namespace) -> dict:
    """The RunConfig fields typed on the command line (flags not given are absent: SUPPRESS)."""
    names = {f.name for f in fields(RunConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    given = given_flags(args)
    return RunConfig.for_mode(given.pop("mode", "noisy_topk"), **given)


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model and optionally record its routing",
                       description="Train one run. Every RunConfig field is a flag; --mode sets a preset.")
    add_config_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run --run-name from its last checkpoint, with its config.json; only "
                        "epochs, max-steps, device, directories, checkpoint-every and recording flags may change")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=_train)

    r = sub.add_parser("record", help="replay a trained run over a dataset split and record its routing")
    r.add_argument("run", help="run directory (or name under --runs-dir)")
    r.add_argument("--dataset", required=True, choices=list(DATASETS))
    r.add_argument("--split", default="valid")
    r.add_argument("--runs-dir", default="runs")
    r.add_argument("--data-dir", default=None)
    r.add_argument("--record-probs", action="store_true")
    r.set_defaults(func=_record)

    ls = sub.add_parser("runs", help="list runs with status and final metrics")
    ls.add_argument("--runs-dir", default=None,
                    help="runs directory (default: $MOE_LENS_RUNS_DIR, else runs/ when it holds runs, else sample_runs/)")
    ls.set_defaults(func=_runs)


def _train(args: argparse.Namespace) -> int:
    from moe_lens import resume
    from moe_lens.rundir import plan_run_dir
    from moe_lens.train import train

    if args.resume:
        given = given_flags(args)
        if not given.get("run_name"):
            raise MoeLensError("--resume needs --run-name (and the --runs-dir the run is in)")
        run_dir = plan_run_dir(given.get("runs_dir", "runs"), given["run_name"], "", "", resume=True)
        cfg = resume.resume_config(run_dir, given)
    else:
        cfg = config_from_args(args)
    try:
        run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    except resume.RunInterrupted as e:
        print(f"moe-lens train: stopped by {e.signame} at step {e.step}, checkpoint saved; resume with: "
              f"{e.resume_command()}", file=sys.stderr)  # fmt: skip
        return e.exit_code
    print(run_dir)
    return 0


def _record(args: argparse.Namespace) -> int:
    from moe_lens.probe import record_run

    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.runs_dir) / args.run
    record_run(run_dir, args.dataset, args.split, data_dir=args.data_dir, record_probs=args.record_probs)
    print(run_dir)
    return 0


def run_summaries(runs_dir: Path) -> list[dict]:
    """One dict per run directory: name, dataset, mode, status (`health.run_status`), step, final validation
    metrics, and `problems` (the run's damaged run.json/config.json, file and line)."""
    out = []
    for d in health.run_dirs(Path(runs_dir)):
        run, cfg, problems = health.read_run(d)
        out.append({"run": d.name, "dataset": cfg.get("dataset"), "mode": cfg.get("mode"),
                    "status": health.run_status(run, cfg), "step": run.get("step"), "epoch": run.get("epoch"),
                    **(run.get("valid") or {}), "problems": problems})  # fmt: skip
    return out


def _runs(args: argparse.Namespace) -> int:
    runs_dir = args.runs_dir or health.default_runs_dir()
    if not Path(runs_dir).is_dir():
        raise MoeLensError(f"runs directory {runs_dir} does not exist")
    rows = run_summaries(Path(runs_dir))
    if not rows:
        print(f"no runs in {runs_dir}")
        return 0
    for r in rows:
        for p in r["problems"]:
            print(f"moe-lens runs: damaged: {Path(runs_dir) / r['run'] / p}", file=sys.stderr)
    keys = ["run", "dataset", "mode", "status", "step"]
    metric_keys = [k for k in ("ppl", "accuracy", "f1", "em", "exact_span", "loss") if any(k in r for r in rows)]
    header = keys + metric_keys
    table = [[_fmt(r.get(k)) for k in header] for r in rows]
    widths = [max(len(h), *(len(row[i]) for row in table)) for i, h in enumerate(header)]
    print("  ".join(h.ljust(w) for h, w in zip(header, widths)))
    for row in table:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths)))
    return 0


def _fmt(v: object) -> str:
    if v is None:
        return "-"
    return f"{v:.4g}" if isinstance(v, float) else str(v)
