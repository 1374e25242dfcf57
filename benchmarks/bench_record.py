"""Recording overhead: the WikiText-2 LM training step with the Recorder against without, in one run.

Modes are interleaved in blocks of steps (off, every step, every 100 steps, off, ...) so drift in
machine speed hits all alike; the figure is the median step time of each mode. Also: evaluation
with and without recording the split, trace bytes per recorded token (routing part files), and the
tokens/s of the run.

    python benchmarks/bench_record.py [--steps-per-block 20] [--blocks 6] [--vocab-size 10000]
"""
from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import torch

from moe_lens.config import RunConfig
from moe_lens.models import build_model
from moe_lens.record import Recorder
from moe_lens.tasks import get_task
from moe_lens.train import evaluate, hidden_sample, load_data


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps-per-block", type=int, default=20)
    p.add_argument("--blocks", type=int, default=6)
    p.add_argument("--vocab-size", type=int, default=10000)
    p.add_argument("--eval-batches", type=int, default=150)
    p.add_argument("--data-dir", default=None)
    args = p.parse_args()
    cfg = RunConfig.for_mode("noisy_topk", dataset="wikitext2", data_dir=args.data_dir, vocab_size=args.vocab_size,
                             d_embed=128, d_model=128, expert_hidden=128, pos_tags=False)  # fmt: skip
    data = load_data(cfg)
    task = get_task("wikitext2", cfg)
    torch.manual_seed(0)
    model = build_model(cfg, len(data["train"].vocab))
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    batches = task.batches(data["train"], train=True, seed=0)
    tmp = Path(tempfile.mkdtemp(prefix="bench-record-"))
    recorder = Recorder(tmp, flush_rows=cfg.record_flush_rows)
    times: dict[str, list[float]] = {"off": [], "every 1": [], "every 100": []}
    every = {"off": 0, "every 1": 1, "every 100": 100}
    state, step, recorded_tokens, tokens = None, 0, 0, 0
    t_run = time.perf_counter()
    for _ in range(args.blocks):
        for mode in times:
            for _ in range(args.steps_per_block):
                batch = next(batches)
                t0 = time.perf_counter()
                fwd = task.forward(model, batch, state)
                state = fwd.state
                opt.zero_grad(set_to_none=True)
                (fwd.loss + fwd.aux).backward()
                opt.step()
                step += 1
                if every[mode] and step % every[mode] == 0:
                    recorder.add(fwd.traces, dataset="wikitext2", split="train", epoch=0, step=step)
                    recorded_tokens += batch["ntokens"]
                times[mode].append(time.perf_counter() - t0)
                tokens += batch["ntokens"]
    run_s = time.perf_counter() - t_run
    recorder.flush()
    trace_bytes = sum(f.stat().st_size for f in (tmp / "routing").rglob("*.parquet"))
    keep = hidden_sample(len(data["valid"]), cfg.hidden_sample, 0)
    eval_s = {}
    for label, rec in (("off", None), ("on", recorder), ("off ", None), ("on ", recorder)):
        t0 = time.perf_counter()
        evaluate(task, model, data["valid"], torch.device("cpu"), epoch=1, step=step, recorder=rec, keep=keep,
                 max_batches=args.eval_batches)  # fmt: skip
        if rec is not None:
            rec.flush()  # the write must finish for the comparison to be honest
        eval_s.setdefault(label.strip(), []).append(time.perf_counter() - t0)
    recorder.close()
    base = statistics.median(times["off"])
    print(f"WikiText-2 LM, d=128, e=8, k=2, batch {cfg.batch_size} x bptt {cfg.bptt}, vocab {len(data['train'].vocab)}, "
          f"threads {torch.get_num_threads()}; {args.blocks} interleaved blocks of {args.steps_per_block} steps")  # fmt: skip
    print("| recording | median step ms | overhead |")
    print("|---|---|---|")
    for mode, ts in times.items():
        med = statistics.median(ts)
        print(f"| {mode} | {1000 * med:.1f} | {100 * (med / base - 1):+.1f}% |")
    ev_off, ev_on = min(eval_s["off"]), min(eval_s["on"])
    print(f"\nevaluation of {args.eval_batches} batches: {ev_off:.2f} s without, {ev_on:.2f} s recording "
          f"({100 * (ev_on / ev_off - 1):+.1f}%, flush included)")  # fmt: skip
    print(f"trace bytes per recorded token (routing, zstd, k=2): {trace_bytes / max(recorded_tokens, 1):.2f}")
    print(f"training throughput of this run: {tokens / run_s:,.0f} tokens/s")


if __name__ == "__main__":
    main()
