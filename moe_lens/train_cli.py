"""`moe-lens train`, `moe-lens record` and `moe-lens runs`.

The train flags are generated from `dataclasses.fields(RunConfig)`, so every default is written
once, in the dataclass, and each flag's help is the field's comment there (config_help.py). Flags the user does not give are not set, so `--mode` presets apply
underneath explicit flags: `RunConfig(**{**MODES[mode], **given})`.
"""
from __future__ import annotations

import argparse
import os
import sys
import types
import typing
from dataclasses import MISSING, fields
from pathlib import Path

from moe_lens import health
from moe_lens.config import CHOICES, DATASETS, GLOVE_50D, QUICK, RunConfig
from moe_lens.config_help import field_help, groups, help_text
from moe_lens.data.paths import resolve_data_dir
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
    """One flag per RunConfig field, in the dataclass's groups, help from its comments (config_help.py)."""
    sections = {g: p.add_argument_group(f"{g} (RunConfig)") for g in groups()}
    for f in fields(RunConfig):
        tp, is_bool = _flag_type(f.type)
        flag = "--" + f.name.replace("_", "-")
        default = None if f.default is MISSING else f.default
        kw: dict = {"dest": f.name, "default": argparse.SUPPRESS, "help": help_text(f.name, default)}
        g = sections[field_help()[f.name].group] if f.name in field_help() else p
        if is_bool:
            g.add_argument(flag, action=argparse.BooleanOptionalAction, **kw)
        elif f.name in ("mode", "dataset"):  # other enumerated fields: RunConfig's check names the allowed values
            g.add_argument(flag, choices=list(CHOICES[f.name]), metavar=f.name.upper(), **kw)
        else:
            g.add_argument(flag, type=tp, **kw)


def given_flags(args: argparse.Namespace) -> dict:
    """The RunConfig fields typed on the command line (flags not given are absent: SUPPRESS)."""
    names = {f.name for f in fields(RunConfig)}
    return {k: v for k, v in vars(args).items() if k in names}


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """Explicit flags over `--quick`'s recipe (config.QUICK) over the `--mode` preset."""
    given = given_flags(args)
    if getattr(args, "quick", False):
        given = {**_quick(given), **given}
    return RunConfig.for_mode(given.pop("mode", "noisy_topk"), **given)


def _quick(given: dict) -> dict:
    """config.QUICK for the chosen dataset, GloVe resolved under the data directory (checked when used)."""
    dataset = given.get("dataset", RunConfig.dataset)
    if dataset not in QUICK:
        raise MoeLensError(f"--quick has no recipe for dataset {dataset!r}; allowed: {', '.join(QUICK)}")
    q = dict(QUICK[dataset])
    if q.get("embeddings") == "glove" and "embeddings" not in given:
        path = resolve_data_dir(given.get("data_dir")) / GLOVE_50D
        if not path.is_file():
            raise MoeLensError(f"--quick on {dataset} initialises the embedding from GloVe 50d, not found at {path}; "
                               "put glove.6B.50d.txt (or the subset) there, or give --embeddings FILE, or "
                               "--embeddings none --d-embed 128 to start from random vectors")
        q["embeddings"] = str(path)
    elif q.get("embeddings") == "glove":
        q.pop("embeddings")
    return q


def add_commands(sub: argparse._SubParsersAction) -> None:
    p = sub.add_parser("train", help="train a model and optionally record its routing",
                       description="Train one run. Every RunConfig field is a flag; --mode sets a preset.")
    p.add_argument("--quick", action="store_true",
                   help="the sample runs' short recipe for --dataset (config.QUICK: d_model 128, a few 150-step "
                        "epochs, recorded, 5,000 hidden states); explicit flags still override it")
    add_config_flags(p)
    p.add_argument("--resume", action="store_true",
                   help="continue the run --run-name from its last checkpoint, with its config.json; only "
                        "epochs, max-steps, device, directories, checkpoint-every and recording flags may change")  # fmt: skip
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.add_argument("--nproc", type=int, default=1, metavar="N",
                   help="data-parallel processes on this machine: launches `torchrun --standalone --nproc-per-node N "
                        "-m moe_lens train ...` with the other flags (DDP; docs/distributed.md)")  # fmt: skip
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
    from moe_lens import distributed, resume
    from moe_lens.rundir import plan_run_dir
    from moe_lens.train import train

    if args.nproc < 1:
        raise MoeLensError(f"--nproc {args.nproc}: needs at least 1 process")
    if args.nproc > 1 and not distributed.launched():
        return _launch(args)
    if args.resume:
        given = given_flags(args)
        if not given.get("run_name"):
            raise MoeLensError("--resume needs --run-name (and the --runs-dir the run is in)")
        run_dir = plan_run_dir(given.get("runs_dir", "runs"), given["run_name"], "", "", resume=True)
        cfg = resume.resume_config(run_dir, given)
    else:
        cfg = config_from_args(args)
        fetch_default_data(cfg.dataset, cfg.data_dir, progress=not args.no_progress)
    try:
        run_dir = train(cfg, resume=args.resume, progress=not args.no_progress)
    except resume.RunInterrupted as e:
        if os.environ.get("RANK", "0") != "0":  # torchrun: rank 0 says it once
            return e.exit_code
        print(f"moe-lens train: stopped by {e.signame} at step {e.step}, checkpoint saved; resume with: "
              f"{e.resume_command()}", file=sys.stderr)  # fmt: skip
        return e.exit_code
    if os.environ.get("RANK", "0") == "0":
        print(run_dir)
    return 0


def _launch(args: argparse.Namespace) -> int:
    """`moe-lens train --nproc N ...` -> `torchrun --standalone --nproc-per-node N -m moe_lens train ...` (the
    same flags, --nproc left out) in a child process; its exit code is returned."""
    import subprocess

    argv = list(getattr(args, "argv", None) or sys.argv[1:])
    if not args.resume:  # the data is fetched once here, not by N ranks at the same time
        fetch_default_data(config_from_args(args).dataset, given_flags(args).get("data_dir"),
                           progress=not args.no_progress)  # fmt: skip
    rest, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--nproc":
            skip = True
        elif not a.startswith("--nproc="):
            rest.append(a)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={args.nproc}",
           "-m", "moe_lens", *rest]  # fmt: skip
    return subprocess.run(cmd, check=False).returncode


def fetch_default_data(dataset: str, data_dir: str | None, *, progress: bool = True) -> None:
    """With no data directory given (no --data-dir, no $MOE_LENS_DATA), download a missing WikiText-2 / SQuAD
    into the default one (~/.cache/moe-lens/data) after a one-line notice. A given directory is never written."""
    from moe_lens.data import download as dl

    if data_dir or os.environ.get("MOE_LENS_DATA") or dataset not in dl.REMOTE:
        return
    d = resolve_data_dir(None)
    missing = [rf for rf in dl.REMOTE[dataset] if not (d / rf.local).is_file()]
    needed = missing if dataset != "squad" else [rf for rf in missing if rf.local.endswith("dev-v1.1.json")]
    if not needed:
        return  # SQuAD's train file is optional: dev alone is split by article
    print(f"no data directory given (--data-dir, $MOE_LENS_DATA): downloading {dataset} into {d} (once)", flush=True)
    dl.download(dataset, d, progress=progress, log=lambda _: None)


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
