"""The one-call GPU check (docs/gpu.md): MoE layer, WikiText-2 LM step, 8 epochs through the trainer.

    python benchmarks/gpu_check.py OUTDIR [--device cuda|cpu] [--tiny] [--data DIR] [--parts 1,2,3] [--budget-s N]

Every table is written to OUTDIR as soon as it is measured (`<name>.md`, `<name>.json`, `<name>.csv`,
and appended to `OUTDIR/tables.md`) and printed, so a timeout still leaves the tables measured so far.

1. `moe_layer`: one MoE layer (mode `baseline`: noisy top-k, importance + load losses), forward and
   backward, the grouped dispatch (F.grouped_mm on CUDA, bf16 autocast) against the per-expert loop
   reference, at e = 8/32/64 and k = 1/2, with the bf16 matmul ceiling on the same shapes measured in
   the same alternation (benchmarks/bench_moe_layer.py's `time_both`: synchronised timers, medians),
   and `matmul_peak`: one large bf16 matmul timed with CUDA events (the device's dense ceiling).
2. `lm_step`: the WikiText-2 LM at the 2025 LSTM-MoE study's size (embed 256, 2-layer LSTM 256, 8
   experts of hidden 256, the full 33,278-word vocabulary, batch 64 x 35), the step `train._Loop`
   runs (autocast, AdamW fused, clip, scheduler, StatsWindow), per mode: tokens/s, seconds per epoch
   ESTIMATED as steps per epoch x the median step, peak GPU memory, and the step with `Recorder.add`
   against without, interleaved step by step (medians).
3. `train_<mode>`: `baseline` and `hybrid` trained by `moe_lens.train.train` (the code path of
   `moe-lens train`), recorded, 8 epochs; per epoch the training seconds, validation and test
   perplexity. The test split is evaluated after each validation by wrapping `train.evaluate`
   (test not recorded; its seconds are not in the epoch's training seconds).

POS tags are off everywhere here (`pos_tags=False`): the GPU machine has no spaCy, and the POS cache's
key names the installed tagger, so a carried cache would not be found. Routing is recorded as usual;
only the `pos_tag` column is NULL.

`--budget-s`: the whole script's wall-time budget. Part 3 fits its epochs into what is left (same
number for both modes, at most 8, estimated from part 2's epoch time: 1.3x it + 5 s of evaluation per
epoch, 30 s per run) and a timer stops a run cleanly at a step
boundary (SIGTERM, the trainer's own stop: checkpoint, run.json `interrupted`) at the deadline; the
tables then hold the epochs that finished.
"""
from __future__ import annotations

import argparse
import csv
import json
import os
import shutil
import signal
import statistics
import sys
import threading
import time
import traceback
from dataclasses import replace
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without `pip install -e .`
sys.path.insert(0, os.path.join(ROOT, "benchmarks"))

LM_MODES = ("baseline", "switch", "hybrid", "noisy_topk", "dense")
TRAIN_MODES = ("baseline", "hybrid")
T0 = time.monotonic()


class Tables:
    """Writes each table into OUTDIR as soon as it is complete, and prints it."""

    def __init__(self, out: Path) -> None:
        self.out, self.texts = out, {}
        out.mkdir(parents=True, exist_ok=True)

    def write(self, name: str, title: str, rows: list[dict], notes: str = "") -> None:
        cols = list(dict.fromkeys(k for r in rows for k in r))
        md = [f"### {title}", ""] + ([notes, ""] if notes else [])
        md += ["| " + " | ".join(cols) + " |", "|" + "---|" * len(cols)]
        md += ["| " + " | ".join(_fmt(r.get(c, "")) for c in cols) + " |" for r in rows]
        text = "\n".join(md) + "\n"
        (self.out / f"{name}.md").write_text(text)
        (self.out / f"{name}.json").write_text(json.dumps({"title": title, "notes": notes, "rows": rows}, indent=1))
        with open(self.out / f"{name}.csv", "w", newline="") as f:
            w = csv.DictWriter(f, fieldnames=cols)
            w.writeheader()
            w.writerows(rows)
        self.texts[name] = f"<!-- {name}, written at {time.monotonic() - T0:.0f} s -->\n{text}\n"
        (self.out / "tables.md").write_text("".join(self.texts.values()))
        print("\n" + text, flush=True)


def _fmt(v) -> str:
    if isinstance(v, float):
        return f"{v:,.3g}" if abs(v) < 100 else f"{v:,.0f}"
    return str(v)


def guarded(args, label: str, fn, *a, **kw):
    """fn(*a, **kw), or, when it raises, the error's one-line text after its traceback is printed and
    appended to OUTDIR/errors.md: one failing piece must not lose the rest of the one device call."""
    try:
        return fn(*a, **kw)
    except Exception as err:  # noqa: BLE001 - reported in errors.md and the table, the check goes on
        tb = traceback.format_exc()
        print(tb, file=sys.stderr, flush=True)
        with open(Path(args.out) / "errors.md", "a") as f:
            f.write(f"## {label}\n\n```\n{tb}```\n\n")
        return f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}"[:200]


def log(msg: str) -> None:
    print(f"[{time.monotonic() - T0:6.1f} s] {msg}", flush=True)


def _sync(device) -> None:
    import torch

    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()


# ----------------------------------------------------------------------------------------------- part 1
def part_moe_layer(args, tables: Tables) -> None:
    import bench_moe_layer as bml
    import torch

    dev = args.device
    if args.tiny:
        n, sizes, es, reps = 256, {"tiny": (32, 16)}, (4, 8), 2
    else:
        n, sizes, es, reps = 8192, {"small": bml.SIZES["small"], "large": bml.SIZES["large"]}, (8, 32, 64), 15
    rows = []
    for size, (d, h) in sizes.items():
        for e in es:
            for k in (1, 2):
                sec = guarded(args, f"moe_layer {size} e={e} k={k}", bml.time_both, dev, n, d, h, e, k, reps, mode="baseline")
                if not isinstance(sec, dict):
                    rows.append({"size": size, "d": d, "h": h, "e": e, "k": k, "n": n, "error": sec})
                    continue
                ratios = sec["ratios"]
                fl = bml.flops_per_token(d, h, e, k, sec["router_mats"]) * n
                rows.append({"size": size, "d": d, "h": h, "e": e, "k": k, "n": n,
                             "loop ms": 1e3 * sec["reference"], "grouped ms": 1e3 * sec["grouped"],
                             "grouped/loop speed-up": statistics.median(ratios),
                             "speed-up min": min(ratios), "speed-up max": max(ratios),
                             "router share of grouped": sec["router"] / sec["grouped"],
                             "grouped TFLOP/s": fl / sec["grouped"] / 1e12,
                             "ceiling TFLOP/s (same shapes)": 12 * n * d * h / sec["ceiling"] / 1e12,
                             "same outputs": bool(sec["same"])})  # fmt: skip
                log(f"moe layer {size} e={e} k={k}: {rows[-1]['grouped/loop speed-up']:.2f}x")
                tables.write("moe_layer", "MoE layer: grouped vs per-expert loop, forward + backward, bf16 autocast on CUDA",
                             rows, notes=f"device {_device_name(dev)}; medians of {reps} alternating steps; mode baseline; "
                             "ceiling: the six matmuls of a dense d->h->d MLP over all n tokens, bf16 on CUDA, "
                             "fp32 on the CPU")  # fmt: skip
    m = 512 if args.tiny else 8192
    tables.write("matmul_peak", "Dense bf16 matmul ceiling of this device",
                 [{"m=n=k": m, "dtype": "bf16" if torch.device(dev).type == "cuda" else "fp32",
                   "TFLOP/s": matmul_peak(dev, m, 3 if args.tiny else 20)}],
                 notes="median of timed (CUDA events on CUDA) square matmuls after warm-up")


def matmul_peak(device: str, m: int, reps: int) -> float:
    import torch

    cuda = torch.device(device).type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    a, b = torch.randn(m, m, device=device, dtype=dtype), torch.randn(m, m, device=device, dtype=dtype)
    out = torch.empty(m, m, device=device, dtype=dtype)
    times = []
    for i in range(reps + 2):
        if cuda:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            torch.mm(a, b, out=out)
            end.record()
            end.synchronize()
            sec = start.elapsed_time(end) / 1e3
        else:
            t0 = time.perf_counter()
            torch.mm(a, b, out=out)
            sec = time.perf_counter() - t0
        if i >= 2:
            times.append(sec)
    return 2 * m**3 / statistics.median(times) / 1e12


def _device_name(device: str) -> str:
    import torch

    if torch.device(device).type == "cuda":
        return torch.cuda.get_device_name(torch.device(device))
    return "cpu"


# ----------------------------------------------------------------------------------------------- part 2
def lm_config(mode: str, args):
    import bench_train_step as bts

    cfg = replace(bts.config(mode), device=args.device, data_dir=args.data, pos_tags=False)
    if args.tiny:
        from moe_lens.config import RunConfig

        cfg = RunConfig.for_mode(mode, dataset="wikitext2", d_embed=16, d_model=16, num_layers=2, expert_hidden=16,
                                 num_experts=4, batch_size=4, bptt=8, vocab_size=500, pos_tags=False, record=True,
                                 device=args.device, data_dir=args.data)  # fmt: skip
    return cfg


def part_lm_step(args, tables: Tables) -> dict:
    """Per mode: tokens/s, estimated s/epoch, peak memory, recorder on vs off. Returns {mode: s/epoch}."""
    import torch

    device = torch.device(args.device)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    pairs, warm = (3, 2) if args.tiny else (40, 10)
    rows, epoch_s = [], {}
    for mode in LM_MODES:
        row = guarded(args, f"lm_step {mode}", lm_step_mode, mode, args, device, pairs, warm)
        rows.append(row if isinstance(row, dict) else {"mode": mode, "error": row})
        if isinstance(row, dict):
            epoch_s[mode] = row["s/epoch (ESTIMATED: steps x median step)"]
            log(f"lm step {mode}: {row['step ms (no recorder)']:.1f} ms")
        tables.write("lm_step", "WikiText-2 LM training step at the 2025 LSTM-MoE study's size", rows,
                     notes=f"device {_device_name(args.device)}; {pairs} pairs of steps (recorder on/off interleaved) "
                     f"after {warm} warm-up steps, medians; tokens/s and s/epoch at the trainer's record cadence; "
                     "s/epoch excludes validation; pos_tags off")  # fmt: skip
        if device.type == "cuda":
            torch.cuda.empty_cache()  # the mode's model and optimizer are gone with lm_step_mode's frame
    return epoch_s


def lm_step_mode(mode: str, args, device, pairs: int, warm: int) -> dict:
    """One mode's row of `lm_step`."""
    import torch

    from moe_lens.models import build_model
    from moe_lens.record import Recorder
    from moe_lens.stats_window import StatsWindow
    from moe_lens.tasks import get_task
    from moe_lens.train import (
        _autocast,
        _to,
        load_data,
        make_optimizer,
        seed_everything,
    )

    cfg = lm_config(mode, args)
    data = load_data(cfg)
    split = data["train"]
    task = get_task(cfg.dataset, cfg)
    steps_per_epoch = sum(1 for _ in task.batches(split, train=True, seed=0))
    seed_everything(0)
    model = build_model(cfg, len(split.vocab)).to(device).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, device)
    window = StatsWindow(device)
    run_dir = Path(args.out) / "lm_step_runs" / mode
    run_dir.mkdir(parents=True, exist_ok=True)
    recorder = Recorder(run_dir)
    batches = task.batches(split, train=True, seed=0)
    state = task.init_state()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    times: dict[bool, list[float]] = {True: [], False: []}
    for i in range(warm + 2 * pairs):
        try:
            batch = next(batches)
        except StopIteration:
            batches, state = task.batches(split, train=True, seed=0), task.init_state()
            batch = next(batches)
        rec = i % 2 == 0  # interleaved: recorder on, off, on, off, ...
        _sync(device)
        t0 = time.perf_counter()
        batch = _to(batch, device)
        with _autocast(device):
            fwd = task.forward(model, batch, state)
        state = fwd.state
        loss = fwd.loss + fwd.aux
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        window.update(fwd)
        if rec:
            recorder.add(fwd.traces, dataset="wikitext2", split="train", epoch=0, step=i)
        _sync(device)
        if i >= warm:
            times[rec].append(time.perf_counter() - t0)
    recorder.close()
    off, on = statistics.median(times[False]), statistics.median(times[True])
    tokens = cfg.batch_size * cfg.bptt
    at_cadence = off + (on - off) / cfg.record_every
    return {"mode": mode, "tokens/step": tokens, "step ms (no recorder)": 1e3 * off,
                 "step ms (recorder every step)": 1e3 * on, "recorder overhead per recorded step": on / off - 1,
                 f"recorder overhead at record_every={cfg.record_every}": at_cadence / off - 1,
                 "tokens/s": tokens / at_cadence, "steps/epoch": steps_per_epoch,
                 "s/epoch (ESTIMATED: steps x median step)": steps_per_epoch * at_cadence,
                 "peak GPU MiB": torch.cuda.max_memory_allocated(device) / 2**20 if device.type == "cuda" else "n/a"}  # fmt: skip


# ----------------------------------------------------------------------------------------------- part 3
def part_train(args, tables: Tables, epoch_s: dict) -> None:
    epochs = 1 if args.tiny else 8
    left = args.budget_s - (time.monotonic() - T0) if args.budget_s else None
    if left is not None and epoch_s:  # same epochs for both modes: an epoch of each ~1.3x part 2's training
        # estimate + 5 s for its recorded validation and test, and 30 s once per run (start, token tables)
        per = sum(1.3 * epoch_s.get(m, max(epoch_s.values())) + 5.0 for m in TRAIN_MODES)
        fit = int((left - 30.0 * len(TRAIN_MODES)) // per)
        if fit < epochs:
            log(f"budget: {left:.0f} s left, about {per:.0f} s per epoch of both modes: {max(fit, 1)} epochs")
            epochs = max(fit, 1)
    for mode in TRAIN_MODES:
        if guarded(args, f"train {mode}", train_one, args, tables, mode, epochs) is False:
            return  # stopped by the budget


def train_one(args, tables: Tables, mode: str, epochs: int) -> bool:
    """One run through `moe_lens.train.train`, its table written after each epoch; False if the budget stopped it."""
    import torch

    import moe_lens.train as tr
    from moe_lens import data as mdata
    from moe_lens import resume as rs

    runs = Path(args.runs or Path(args.out) / "runs")
    cfg = replace(lm_config(mode, args), epochs=epochs, record=True, runs_dir=str(runs), run_name=f"gpu-{mode}",
                  checkpoint_every=10**9)  # fmt: skip  (epoch-end checkpoints only)
    if args.tiny:
        cfg = replace(cfg, epoch_steps=3, max_eval_batches=2)
    test = mdata.load_split("wikitext2", "test", cfg.data_dir, vocab=tr.load_data(cfg)["train"].vocab,
                            pos=False, progress=False)  # fmt: skip
    rows: list[dict] = []
    real_evaluate = tr.evaluate
    last = [time.perf_counter()]

    def evaluate(task, model, split, device, **kw):
        t_valid = time.perf_counter()
        vm = real_evaluate(task, model, split, device, **kw)
        _sync(device)
        t_test = time.perf_counter()
        tm = real_evaluate(task, model, test, device, epoch=kw["epoch"], step=kw["step"], recorder=None, keep=None,
                           max_batches=kw.get("max_batches"))  # fmt: skip
        _sync(device)
        rows.append({"mode": mode, "epoch": kw["epoch"] + 1, "step": kw["step"], "train s": t_valid - last[0],
                     "valid s (recorded)": t_test - t_valid, "test s": time.perf_counter() - t_test,
                     "valid ppl": vm["ppl"], "test ppl": tm["ppl"]})  # fmt: skip
        tables.write(f"train_{mode}", f"WikiText-2 LM, mode {mode}, trained by moe_lens.train (recorded)", rows,
                     notes=f"device {_device_name(args.device)}; {epochs} epochs planned; train s = wall time from "
                     "the end of the last evaluation (for epoch 1: from the call of train(), so it includes loading "
                     "the data, building the model, writing the token tables and the warm-up) to this validation; "
                     "test evaluated after each validation, not recorded")  # fmt: skip
        last[0] = time.perf_counter()
        return vm

    tr.evaluate = evaluate
    timer = None
    if args.budget_s and args.budget_s - (time.monotonic() - T0) < 30:
        log(f"train {mode}: skipped, under 30 s of the budget left")
        tr.evaluate = real_evaluate
        return False
    if args.budget_s:
        timer = threading.Timer(max(args.budget_s - (time.monotonic() - T0), 0.0), os.kill,
                                (os.getpid(), signal.SIGTERM))  # fmt: skip
        timer.daemon = True
        timer.start()
    try:
        log(f"train {mode}: {epochs} epochs")
        last[0] = time.perf_counter()
        tr.train(cfg, progress=False)
        return True
    except rs.RunInterrupted as stopped:
        log(f"train {mode}: stopped by the budget at step {stopped.step}, after {len(rows)} epochs")
        rows.append({"mode": mode, "epoch": f"stopped by the budget at step {stopped.step}"})
        tables.write(f"train_{mode}", f"WikiText-2 LM, mode {mode}, trained by moe_lens.train (recorded)", rows,
                     notes=f"device {_device_name(args.device)}; {epochs} epochs planned; stopped by --budget-s "
                     f"{args.budget_s:g} at step {stopped.step}")  # fmt: skip
        return False
    finally:
        tr.evaluate = real_evaluate
        if timer is not None:
            timer.cancel()
        keep = Path(args.out) / "runs-meta" / cfg.run_name  # the run's small files, beside the tables
        keep.mkdir(parents=True, exist_ok=True)
        for name in ("config.json", "run.json", "metrics.parquet"):
            if (runs / cfg.run_name / name).is_file():
                shutil.copy2(runs / cfg.run_name / name, keep / name)
        if torch.device(args.device).type == "cuda":
            torch.cuda.empty_cache()


def tiny_data(data: str | None, dest: Path, lines: int = 400) -> Path:
    """The first `lines` lines of each WikiText-2 split file, for the --tiny smoke run."""
    from moe_lens.data.paths import resolve_data_dir
    from moe_lens.data.wikitext import SPLIT_FILES

    src = resolve_data_dir(data) / "wikitext-2"
    (dest / "wikitext-2").mkdir(parents=True, exist_ok=True)
    for name in SPLIT_FILES.values():
        with open(src / name, encoding="utf-8") as f:
            head = [next(f, "") for _ in range(lines)]
        (dest / "wikitext-2" / name).write_text("".join(head), encoding="utf-8")
    return dest


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("out", help="folder for the tables (created)")
    p.add_argument("--device", default="cuda", help="cuda (default) or cpu")
    p.add_argument("--tiny", action="store_true", help="tiny sizes, a few steps: the CPU smoke run (tests)")
    p.add_argument("--data", default=None, help="dataset folder (default: $MOE_LENS_DATA)")
    p.add_argument("--parts", default="1,2,3", help="which parts to run, e.g. 1,2 or 3")
    p.add_argument("--budget-s", type=float, default=None, help="wall-time budget of the whole script, seconds")
    p.add_argument("--runs", default=None, help="runs directory of part 3 (default OUTDIR/runs; checkpoints are "
                   "about 230 MB each at full size, so the device command puts them under /tmp)")
    args = p.parse_args(argv)
    parts = {int(x) for x in args.parts.split(",") if x.strip()}
    import torch

    # SIGTERM from the budget timer outside a training run (the trainer installs its own handler while it runs):
    # note it and go on; the next run checks the budget before it starts
    signal.signal(signal.SIGTERM, lambda signum, frame: log("budget reached (SIGTERM outside a training run)"))
    out = Path(args.out)
    tables = Tables(out)
    env = {"device": _device_name(args.device), "torch": torch.__version__, "python": sys.version.split()[0],
           "cuda": torch.version.cuda, "date_utc": time.strftime("%Y-%m-%d %H:%M:%S", time.gmtime()),
           "args": vars(args)}  # fmt: skip
    (out / "env.json").write_text(json.dumps(env, indent=1))
    log(f"env: {env}")
    if args.tiny and (2 in parts or 3 in parts):
        args.data = str(tiny_data(args.data, out / "tiny-data"))
    epoch_s: dict = {}
    if 1 in parts:
        guarded(args, "part 1", part_moe_layer, args, tables)
    if 2 in parts:
        got = guarded(args, "part 2", part_lm_step, args, tables)
        epoch_s = got if isinstance(got, dict) else {}
    if 3 in parts:
        guarded(args, "part 3", part_train, args, tables, epoch_s)
    errors = Path(args.out) / "errors.md"
    if errors.is_file():
        log(f"errors: see {errors}")
        sys.exit(1)
    log("done")


if __name__ == "__main__":
    main()
