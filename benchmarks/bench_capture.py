"""Capture overhead: a tiny random Hugging Face MoE model's forward with `moe-lens capture`'s router hooks and the
Recorder against the plain forward, in one run.

The two are interleaved rep by rep (plain, capture, plain, capture, ...) so drift in machine speed hits both
alike; the figure is the ratio of medians, with the interquartile range of each, in wall time and in process CPU
time (all threads, the recorder's included: on a machine shared with other jobs the CPU time is the steadier
measure of what capture costs). "capture" is what the capture
loop puts on the critical path per batch (moe_lens/capture/run.py capture_batches): the forward with the hooks on,
reading each layer's routing, the entropy, and Recorder.add (host copies started, rows queued); the Parquet
writing runs on the recorder's thread and is timed apart (the final flush).

    python benchmarks/bench_capture.py [--family olmoe] [--hidden 256] [--layers 4] [--batch 4] [--seq 128] [--reps 100]
                                       [--threads 1]
"""
from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch
import transformers

from moe_lens.capture.adapters import ADAPTERS
from moe_lens.capture.run import capture_batches
from moe_lens.capture.words import SubwordStream
from moe_lens.record import Recorder

CONFIGS = {  # the families' own config classes; d = --hidden, 8 experts, top-2
    "olmoe": lambda d, n: dict(hidden_size=d, intermediate_size=d, num_experts=8, num_experts_per_tok=2,
                               num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
    "mixtral": lambda d, n: dict(hidden_size=d, intermediate_size=d, num_local_experts=8, num_experts_per_tok=2,
                                 num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
    "qwen2_moe": lambda d, n: dict(hidden_size=d, intermediate_size=d, moe_intermediate_size=d,
                                   shared_expert_intermediate_size=d, num_experts=8, num_experts_per_tok=2,
                                   num_hidden_layers=n, num_attention_heads=4, num_key_value_heads=4, vocab_size=1000),
}


def quartiles(xs: list[float]) -> tuple[float, float, float]:
    q = np.percentile(xs, [25, 50, 75])
    return float(q[0]), float(q[1]), float(q[2])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--family", default="olmoe", choices=sorted(CONFIGS))
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--layers", type=int, default=4)
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--seq", type=int, default=128)
    p.add_argument("--reps", type=int, default=100)
    p.add_argument("--threads", type=int, default=1, help="torch threads (0: torch's default)")
    args = p.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    cfg = transformers.AutoConfig.for_model(args.family, **CONFIGS[args.family](args.hidden, args.layers))
    model = transformers.AutoModel.from_config(cfg).eval()
    adapter = ADAPTERS[args.family]
    n = args.batch * args.seq
    rng = np.random.default_rng(0)
    stream = SubwordStream(rng.integers(0, 1000, n), np.arange(n), np.zeros(n, dtype=np.int16))
    pos = [np.arange(n).reshape(args.batch, args.seq)]
    ids = torch.from_numpy(stream.ids).reshape(args.batch, args.seq)
    dev = torch.device("cpu")
    plain, capt, plain_cpu, capt_cpu = [], [], [], []
    with tempfile.TemporaryDirectory() as tmp:
        rec = Recorder(tmp, flush_rows=10**9)
        for rep in range(args.reps + 3):  # 3 warm-up reps of each, not counted
            with torch.inference_mode():
                t, c = time.perf_counter(), time.process_time()
                model(input_ids=ids)
                a, a_cpu = time.perf_counter() - t, time.process_time() - c
            t, c = time.perf_counter(), time.process_time()
            capture_batches(model, adapter, stream, pos, None, rec, "wikitext2", "valid", dev)
            b, b_cpu = time.perf_counter() - t, time.process_time() - c
            if rep >= 3:
                plain.append(a)
                capt.append(b)
                plain_cpu.append(a_cpu)
                capt_cpu.append(b_cpu)
        t = time.perf_counter()
        rec.close()
        flush = time.perf_counter() - t
    p25, p50, p75 = quartiles(plain)
    c25, c50, c75 = quartiles(capt)
    ratios = [c / p for c, p in zip(capt, plain)]
    r25, r50, r75 = quartiles(ratios)
    print(f"{args.family} d={args.hidden} layers={args.layers} batch={args.batch}x{args.seq} ({n} tokens/forward), "
          f"{args.reps} interleaved reps, torch threads {torch.get_num_threads()}")
    print(f"plain forward    median {p50 * 1e3:8.2f} ms  (IQR {p25 * 1e3:.2f}-{p75 * 1e3:.2f})")
    print(f"with capture     median {c50 * 1e3:8.2f} ms  (IQR {c25 * 1e3:.2f}-{c75 * 1e3:.2f})")
    print(f"ratio of medians {c50 / p50:.3f}  (overhead {100 * (c50 / p50 - 1):+.1f}%); per-rep ratio median {r50:.3f} "
          f"IQR {r25:.3f}-{r75:.3f}")
    q25, q50, q75 = quartiles(plain_cpu)
    d25, d50, d75 = quartiles(capt_cpu)
    print(f"CPU time: plain median {q50 * 1e3:.2f} ms (IQR {q25 * 1e3:.2f}-{q75 * 1e3:.2f}), capture median "
          f"{d50 * 1e3:.2f} ms (IQR {d25 * 1e3:.2f}-{d75 * 1e3:.2f}); ratio of medians {d50 / q50:.3f}")
    print(f"recorder thread: final flush of {args.reps + 3} batches' rows {flush * 1e3:.0f} ms (off the critical path)")
    print(f"capture tokens/s {n / c50:,.0f}  plain tokens/s {n / p50:,.0f}")


if __name__ == "__main__":
    main()
