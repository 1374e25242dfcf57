"""The gating study of the SAiDL 2024 MoE report (shared/references/003) on CoNLL-2003 or SQuAD (issue 8).

    MOE_LENS_DATA=../shared/data python trainers/saidl.py --dataset conll2003 --setup both \\
        --runs-dir runs-saidl --jobs 2

Six variants (the report's table): dense (the LSTM baseline, one expert), naive_topk, topk_mask,
noisy_topk, importance (top-k mask + w_importance 0.1), load (noisy top-k + w_load 0.1), each
recorded, in two setups:

- `report`: the report as written: frozen GloVe 6B 50d, BiLSTM(128) -> 8 experts (hidden 128), k = 2
  -> BiLSTM(128), batch 32, Adam lr 1e-3 (AdamW with weight_decay 0 is Adam), no dropout, CoNLL 10
  epochs at max_len 128, SQuAD 5 epochs at 256. Differences we cannot remove without changing
  moe_lens/train.py or the data layer: the lr decays linearly from 1e-3 to 1e-4 (warmup_steps 0;
  `_lr_lambda` has no constant schedule); gradients are clipped at norm 1e6, i.e. never; the
  vocabulary is the training words (the report's covered all splits, pruned to GloVe), so valid words
  unseen in training are `<unk>`; the report's experts end with dropout 0.5, ours have none.
- `moelens`: our setup for the task: GloVe-initialised trainable embeddings, casing features
  (`case_features`), dropout 0.5, AdamW lr 2e-3 with 100 warmup steps, clip 1; same experts and k;
  10 epochs on CoNLL (target: entity F1 >= 88 on valid for every MoE variant), 5 on SQuAD. Tuning
  (CoNLL, `load`, one thread): valid F1 78.5, 83.7, 86.5, 87.3, 88.6, 88.8, 89.2, 90.2, 89.9, 90.3 by
  epoch, 15 min; capping the vocabulary at 20k words so `<unk>` is trained ended at 89.7 (not kept).

`--jobs N` trains N runs at once as subprocesses, each with OMP_NUM_THREADS = cores // N. A run whose
run.json says finished is skipped, so a rerun only prints the tables; an unfinished one is resumed.
The tables (also written to <runs-dir>/saidl-<dataset>.md) put our final valid metrics next to the
report's, with parameters, wall time, and expert collapse from the recorded valid routing.
No training loop here: it calls moe_lens.train.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

import pandas as pd

import moe_lens
from moe_lens import analysis
from moe_lens.config import RunConfig
from moe_lens.data import resolve_data_dir
from moe_lens.errors import MoeLensError
from moe_lens.train import train

VARIANTS = ("dense", "naive_topk", "topk_mask", "noisy_topk", "importance", "load")
SETUPS = ("report", "moelens")
GLOVE = "glove/glove.6B.50d.subset.txt"
# the report's validation accuracy % and loss (CoNLL: token accuracy counting O and padding; SQuAD:
# start and end both exact)
REPORTED = {
    "conll2003": {"dense": (97.08, 0.1179), "naive_topk": (97.08, 0.1142), "topk_mask": (97.26, 0.1173),
                  "noisy_topk": (97.31, 0.1087), "importance": (97.40, 0.1095), "load": (97.30, 0.1133)},
    "squad": {"dense": (11.45, 8.770), "naive_topk": (11.62, 8.710), "topk_mask": (11.47, 8.766),
              "noisy_topk": (11.40, 8.717), "importance": (11.46, 8.794), "load": (11.76, 8.710)},
}  # fmt: skip
MODEL = dict(d_embed=50, d_model=128, expert_hidden=128, batch_size=32, record=True, record_every=50,
             hidden_sample=2000, seed=0)  # fmt: skip
SETUP_FIELDS = {
    "report": dict(freeze_embeddings=True, lr=1e-3, weight_decay=0.0, warmup_steps=0, clip=1e6, dropout=0.0),
    "moelens": dict(freeze_embeddings=False, lr=2e-3, weight_decay=0.01, warmup_steps=100, clip=1.0, dropout=0.5),
}
EPOCHS = {"conll2003": 10, "squad": 5}
MAX_LEN = {"conll2003": 128, "squad": 256}


def make_config(dataset: str, setup: str, variant: str, *, runs_dir: str, data_dir: str | None, embeddings: str,
                **overrides) -> RunConfig:
    """One run of the sweep; `overrides` (epochs, max_steps, ...) for smoke runs."""
    moe = {} if variant == "dense" else dict(num_experts=8, top_k=2)  # dense keeps its single expert
    fields = dict(dataset=dataset, data_dir=data_dir, embeddings=embeddings, max_len=MAX_LEN[dataset],
                  epochs=EPOCHS[dataset], case_features=setup == "moelens" and dataset == "conll2003",
                  runs_dir=runs_dir, run_name=f"{dataset}-{setup}-{variant}")  # fmt: skip
    return RunConfig.for_mode(variant, **{**MODEL, **SETUP_FIELDS[setup], **moe, **fields, **overrides})


def run_status(cfg: RunConfig) -> str | None:
    """run.json's status, or None when the run was never started."""
    path = Path(cfg.runs_dir) / str(cfg.run_name) / "run.json"
    try:
        return json.loads(path.read_text()).get("status")
    except (OSError, ValueError):
        return None


def train_one(cfg: RunConfig, progress: bool = False) -> None:
    """Train, or resume an unfinished run that left its config.json."""
    resume = (Path(cfg.runs_dir) / str(cfg.run_name) / "config.json").is_file()
    train(cfg, resume=resume, progress=progress)


def run_all(cfgs: list[RunConfig], jobs: int) -> list[str]:
    """Train every unfinished run, `jobs` at a time; returns the names of runs that failed."""
    todo = [c for c in cfgs if run_status(c) != "finished"]
    for c in cfgs:
        if c not in todo:
            print(f"{c.run_name}: finished, skipped")
    if jobs <= 1:
        failed = []
        for c in todo:
            print(f"{c.run_name}: training", flush=True)
            try:
                train_one(c)
            except Exception as e:  # noqa: BLE001 - one failed run must not stop the sweep
                print(f"{c.run_name}: failed: {e}", flush=True)
                failed.append(str(c.run_name))
        return failed
    return _run_parallel(todo, jobs)


def _run_parallel(todo: list[RunConfig], jobs: int) -> list[str]:
    threads = max(1, (os.cpu_count() or 1) // jobs)
    if os.environ.get("OMP_NUM_THREADS", "").isdigit():
        threads = max(1, min(threads, int(os.environ["OMP_NUM_THREADS"])))
    root = str(Path(moe_lens.__file__).resolve().parents[1])  # children import the same moe_lens
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads),
           "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)}  # fmt: skip
    pending, running, failed = list(todo), [], []
    while pending or running:
        while pending and len(running) < jobs:
            c = pending.pop(0)
            log = Path(c.runs_dir) / "logs" / f"{c.run_name}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            with open(log, "a") as out:
                cmd = [sys.executable, __file__, "--run-config", json.dumps(c.to_dict())]
                running.append((c, subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env)))
            print(f"{c.run_name}: training ({threads} threads), log {log}", flush=True)
        time.sleep(2)
        for c, proc in list(running):
            if proc.poll() is not None:
                running.remove((c, proc))
                print(f"{c.run_name}: {'done' if proc.returncode == 0 else f'failed (exit {proc.returncode})'}",
                      flush=True)  # fmt: skip
                if proc.returncode != 0:
                    failed.append(str(c.run_name))
    return failed


# ---- the tables: one row per run, from run.json, config.json and the recorded valid routing


def tables(runs_dir: str, dataset: str, by_setup: dict[str, list[RunConfig]]) -> str:
    """Markdown: per setup, the results table and the per-epoch effective experts."""
    try:
        con = moe_lens.connect(runs_dir)
    except MoeLensError:
        con = None  # nothing recorded yet: the tables say "not run"
    out = [f"# SAiDL 2024 gating study on {dataset}: ours vs the report (valid split)\n"]
    for setup, cfgs in by_setup.items():
        rows = [_row(con, c) for c in cfgs]
        out.append(f"## setup `{setup}`\n")
        if dataset == "squad":
            sources = sorted({r["squad_source"] for r in rows if r["squad_source"]})
            out.append(f"SQuAD source: {', '.join(sources) or 'unknown'} (official = train file + dev; dev-split = "
                       "the dev file split by article into train/valid).\n")  # fmt: skip
        out.append(_markdown(pd.DataFrame([_main_cells(r, dataset) for r in rows])))
        curves = pd.DataFrame([{"variant": r["variant"], **{f"epoch {e}": f"{x:.2f}" for e, x in r["eff_by_epoch"]}}
                               for r in rows]).fillna("")  # fmt: skip
        out.append("Effective experts exp(H) of top-1 valid routing, per epoch (collapse onto two experts: ~2 or "
                   "below):\n")  # fmt: skip
        out.append(_markdown(curves))
    return "\n".join(out)


def _row(con, cfg: RunConfig) -> dict:
    """What the tables need of one run; empty values for a run not (yet) there."""
    run_dir = Path(cfg.runs_dir) / str(cfg.run_name)
    state, conf = _read_json(run_dir / "run.json"), _read_json(run_dir / "config.json")
    row = {"variant": cfg.mode, "status": state.get("status", "not run"), "valid": state.get("valid") or {},
           "params": conf.get("num_params"), "trainable": conf.get("num_trainable"),
           "squad_source": (conf.get("data") or {}).get("squad_source"), "wall": _wall_s(state),
           "eff_by_epoch": []}  # fmt: skip
    if con is not None and state:
        try:
            col = analysis.collapse(con, runs=[str(cfg.run_name)], split="valid", by="epoch")
        except MoeLensError:
            col = None  # no valid routing recorded yet
        if col is not None:
            col = col.sort_values("epoch")
            row["eff_by_epoch"] = list(zip(col["epoch"].astype(int), col["effective_experts"]))
            row["eff"], row["dead"] = col["effective_experts"].iloc[-1], int(col["dead_experts"].iloc[-1])
    return row


def _main_cells(r: dict, dataset: str) -> dict[str, str]:
    v, (rep_acc, rep_loss) = r["valid"], REPORTED[dataset][r["variant"]]
    cells = {"variant": r["variant"], "status": r["status"]}
    if dataset == "conll2003":
        cells |= {"token acc": _f(v.get("accuracy")), "report acc": f"{rep_acc:.2f}",
                  "loss": _f(v.get("loss"), 4), "report loss": f"{rep_loss:.4f}",
                  "entity F1 (P/R)": f"{_f(v.get('f1'))} ({_f(v.get('precision'), 1)}/{_f(v.get('recall'), 1)})"}
    else:
        cells |= {"exact span": _f(v.get("exact_span")), "report acc": f"{rep_acc:.2f}",
                  "loss": _f(v.get("loss"), 3), "report loss": f"{rep_loss:.3f}", "EM": _f(v.get("em")),
                  "F1": _f(v.get("f1"))}  # fmt: skip
    params = f"{r['params'] / 1e6:.2f}M ({r['trainable'] / 1e6:.2f}M)" if r["params"] else "-"
    wall = f"{r['wall'] / 60:.1f} min" if r["wall"] is not None else "-"
    eff = f"{r['eff']:.2f}" if "eff" in r else "-"
    return cells | {"params (trainable)": params, "wall": wall, "eff. experts": eff,
                    "dead experts": str(r.get("dead", "-"))}  # fmt: skip


def _f(x: float | None, digits: int = 2) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _wall_s(state: dict) -> float | None:
    """finished_at - started_at in seconds (both UTC with offset, moe_lens.clock; older runs: naive local)."""
    if not state.get("started_at") or not state.get("finished_at"):
        return None
    a, b = (datetime.fromisoformat(state[k]) for k in ("started_at", "finished_at"))
    a, b = (t if t.tzinfo else t.astimezone() for t in (a, b))  # a naive time is this machine's local time
    return (b - a).total_seconds()


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _markdown(df: pd.DataFrame) -> str:
    cols = [str(c) for c in df.columns]
    lines = ["| " + " | ".join(cols) + " |", "|" + "|".join("---" for _ in cols) + "|"]
    lines += ["| " + " | ".join(str(x) for x in row) + " |" for row in df.itertuples(index=False)]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--dataset", choices=sorted(EPOCHS), default="conll2003")
    p.add_argument("--setup", choices=[*SETUPS, "both"], default="both")
    p.add_argument("--runs-dir", default="runs-saidl")
    p.add_argument("--data-dir", default=os.environ.get("MOE_LENS_DATA"))
    p.add_argument("--embeddings", default=None, help=f"GloVe 50d text file (default <data>/{GLOVE})")
    p.add_argument("--variants", nargs="+", choices=VARIANTS, default=list(VARIANTS))
    p.add_argument("--jobs", type=int, default=1, help="runs trained at once, as subprocesses")
    p.add_argument("--epochs", type=int, default=None, help="override the epochs (smoke runs)")
    p.add_argument("--max-steps", type=int, default=None, help="smoke runs only")
    p.add_argument("--max-eval-batches", type=int, default=None, help="smoke runs only")
    p.add_argument("--run-config", default=None, help=argparse.SUPPRESS)  # a --jobs child: one run's JSON
    args = p.parse_args(argv)
    if args.run_config:
        train_one(RunConfig.from_dict(json.loads(args.run_config)), progress=False)
        return 0
    embeddings = args.embeddings or str(resolve_data_dir(args.data_dir) / GLOVE)
    smoke = {k: v for k, v in dict(epochs=args.epochs, max_steps=args.max_steps,
                                   max_eval_batches=args.max_eval_batches).items() if v is not None}  # fmt: skip
    setups = SETUPS if args.setup == "both" else (args.setup,)
    by_setup = {s: [make_config(args.dataset, s, v, runs_dir=args.runs_dir, data_dir=args.data_dir,
                                embeddings=embeddings, **smoke) for v in args.variants] for s in setups}  # fmt: skip
    failed = run_all([c for cfgs in by_setup.values() for c in cfgs], args.jobs)
    text = tables(args.runs_dir, args.dataset, by_setup)
    print(text)
    out = Path(args.runs_dir) / f"saidl-{args.dataset}.md"
    out.write_text(text)
    print(f"written to {out}")
    if failed:
        print(f"failed runs: {', '.join(failed)} (logs under {Path(args.runs_dir) / 'logs'})")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
