"""Time analysis.bootstrap (n=200, documents resampled) on the committed sample runs, all runs and one run.

    PYTHONPATH=. python benchmarks/bench_bootstrap.py [--runs-dir sample_runs] [--repeat 3]

Target (issue 23): <= 10 s. Prints the median wall time and the median CPU time of this process (user + system,
all threads: less sensitive than wall time to other processes on a shared machine) of `--repeat` calls after one
warm-up, DuckDB threads=2, and the load average before and after. `pos_probe` is the probe's logistic-regression
fit plus its own n=200 interval (the interval itself is one matrix product; the fit is nearly all of the time).
"""
from __future__ import annotations

import argparse
import os
import statistics
import time

from moe_lens import analysis as A
from moe_lens.store import connect

CASES = {
    "collapse (valid, per epoch)": lambda con, r: A.bootstrap(A.collapse, con, r, split="valid", fn_options={"by": "epoch"}),
    "collapse (train, per step)": lambda con, r: A.bootstrap(A.collapse, con, r),
    "specialization pos_tag summary": lambda con, r: A.bootstrap(A.specialization, con, r, summary=True),
    "consecutive": lambda con, r: A.bootstrap(A.consecutive, con, r),
    "saturation": lambda con, r: A.bootstrap(A.saturation, con, r),
    "vocabulary": lambda con, r: A.bootstrap(A.vocabulary, con, r),
    "ablation": lambda con, r: A.bootstrap(A.ablation, con, r),
    "pos_probe (fit + n=200)": lambda con, r: A.pos_probe(con, r),
}
ONE_RUN = {"ablation": "conll2003-load-ablate"}  # the one sample run with an ablation table


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="sample_runs")
    ap.add_argument("--run", default="conll2003-hybrid", help="the one-run case")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--only", default=None, help="comma-separated parts of case names (default: all)")
    args = ap.parse_args()
    con = connect(args.runs_dir, threads=2)
    print(f"load average {os.getloadavg()[0]:.2f}; --repeat {args.repeat}")
    print("| bootstrap n=200 of | runs | median s | median cpu s | rows |\n|---|---|---|---|---|")
    for name, fn in CASES.items():
        if args.only and not any(part in name for part in args.only.split(",")):
            continue
        one = ONE_RUN.get(name, args.run)
        for runs, label in ((None, "all"), (one, one)):
            fn(con, runs)
            times, cpu, n = [], [], 0
            for _ in range(args.repeat):
                t, c = time.perf_counter(), time.process_time()
                n = len(fn(con, runs))
                times.append(time.perf_counter() - t)
                cpu.append(time.process_time() - c)
            print(f"| {name} | {label} | {statistics.median(times):.2f} | {statistics.median(cpu):.2f} | {n} |",
                  flush=True)
    print(f"load average {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
