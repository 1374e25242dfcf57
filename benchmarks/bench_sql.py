"""Time each canonical analysis on a synthetic trace of 20 million routing rows in the real layout.

    python benchmarks/bench_sql.py [--dir /tmp/moe-lens-bench] [--repeat 3]

The trace: splits train + valid, 500k tokens each, 10 epochs, top-2, 1 layer = 2 x 10 x 500k x 2 = 20M
rows (written once and reused). Each analysis runs once to warm up, then `--repeat` times; the table gives
the median wall time and the process's peak RSS (ru_maxrss) after it, with DuckDB at threads=2,
memory_limit=2GB, preserve_insertion_order=false. Targets: <= 1 s and <= 2 GB each.
"""
from __future__ import annotations

import argparse
import resource
import statistics
import sys
import time
from pathlib import Path

from moe_lens import analysis as A
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_ablation, write_synthetic_run

SHAPE = dict(num_tokens=500_000, num_experts=8, top_k=2, epochs=10, steps_per_epoch=100, layers=1,
             specialization=1.0, drop_rate=0.01, capacity_factor=1.25, mode="noisy_topk")


def cases(run: str) -> dict[str, object]:
    """name -> zero-argument call (the app's default calls, plus the heavier full-series variants)."""
    return {
        "load_balance (valid, per epoch)": lambda con: A.load_balance(con, run),
        "load_balance (train, per step)": lambda con: A.load_balance(con, run, split="train", by="step"),
        "load_balance per_expert": lambda con: A.load_balance(con, run, per_expert=True),
        "collapse (train, per step)": lambda con: A.collapse(con, run),
        "router_confidence": lambda con: A.router_confidence(con, run),
        "specialization pos_tag": lambda con: A.specialization(con, run),
        "specialization top tokens": lambda con: A.specialization(con, run, attribute="token", top=10,
                                                                  order_by="lift", min_count=20),
        "stability (last epoch)": lambda con: A.stability(con, run, epoch=SHAPE["epochs"] - 1),
        "stability (all 10 epochs)": lambda con: A.stability(con, run),
        "agreement (two runs)": lambda con: A.agreement(con, run, run + "-b"),
        "capacity": lambda con: A.capacity(con, run),
        "compare (all of the above, last epoch)": lambda con: A.compare(con, run),
        "coactivation (last epoch)": lambda con: A.coactivation(con, run),
        "consecutive (last epoch)": lambda con: A.consecutive(con, run),
        "saturation (10 epochs vs the last)": lambda con: A.saturation(con, run),
        "vocabulary (last epoch)": lambda con: A.vocabulary(con, run),
        "fluctuation (10 epochs)": lambda con: A.fluctuation(con, run),
        "consecutive + bootstrap n=200": lambda con: A.bootstrap(A.consecutive, con, run, n=200),
        "pos_probe (20k tokens, logistic regression)": lambda con: A.pos_probe(con, run),
        "ablation (valid, 8 experts x 500k tokens)": lambda con: A.ablation(con, run),
        "bootstrap(ablation), n=200": lambda con: A.bootstrap(A.ablation, con, run),
        "ablation_by pos_tag": lambda con: A.ablation_by(con, run),
        "ablation_importance (Spearman, n=200)": lambda con: A.ablation_importance(con, run),
    }


def ensure_trace(root: Path) -> None:
    if not (root / "bench" / "run.json").exists():
        t = time.perf_counter()
        write_synthetic_run(root, "bench", seed=0, **SHAPE)
        print(f"wrote 20M routing rows in {time.perf_counter() - t:.1f} s", file=sys.stderr)
    if not (root / "bench" / "ablation").exists():  # what `moe-lens ablate` writes (the valid split's last epoch)
        write_synthetic_ablation(root / "bench")
    if not (root / "bench-b" / "run.json").exists():  # a second run for agreement (valid split only)
        write_synthetic_run(root, "bench-b", seed=1, splits=("valid",), **SHAPE)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dir", default="/tmp/moe-lens-bench")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", nargs="*", default=None, help="run only the cases whose name starts with one of these")
    args = ap.parse_args()
    root = Path(args.dir)
    ensure_trace(root)
    con = connect(root, threads=2, memory_limit="2GB")
    rows = con.execute("SELECT count(*) FROM routing WHERE run = 'bench'").fetchone()[0]
    print(f"routing rows in run 'bench': {rows:,}; DuckDB {con.execute('SELECT version()').fetchone()[0]}\n")
    print(f"| analysis | median s (n={args.repeat}) | peak RSS MB | result rows | <= 1 s |")
    print("|---|---|---|---|---|")
    for name, fn in cases("bench").items():
        if args.only and not any(name.startswith(o) for o in args.only):
            continue
        fn(con)  # warm-up
        times, n = [], 0
        for _ in range(args.repeat):
            t = time.perf_counter()
            n = len(fn(con))
            times.append(time.perf_counter() - t)
        rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB -> MiB (Linux)
        med = statistics.median(times)
        print(f"| {name} | {med:.3f} | {rss:.0f} | {n} | {'yes' if med <= 1 else 'no'} |", flush=True)


if __name__ == "__main__":
    main()
