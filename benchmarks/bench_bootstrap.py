"""Time analysis.bootstrap (n=200, documents resampled) on the committed sample runs, all runs and one run.

    PYTHONPATH=. python benchmarks/bench_bootstrap.py [--runs-dir sample_runs] [--repeat 3]

Target (issue 23): <= 10 s. Prints the median wall time of `--repeat` calls after one warm-up, DuckDB threads=2.
"""
from __future__ import annotations

import argparse
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
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-dir", default="sample_runs")
    ap.add_argument("--run", default="conll2003-hybrid", help="the one-run case")
    ap.add_argument("--repeat", type=int, default=3)
    args = ap.parse_args()
    con = connect(args.runs_dir, threads=2)
    print("| bootstrap n=200 of | runs | median s | rows |\n|---|---|---|---|")
    for name, fn in CASES.items():
        for runs, label in ((None, "all"), (args.run, args.run)):
            fn(con, runs)
            times, n = [], 0
            for _ in range(args.repeat):
                t = time.perf_counter()
                n = len(fn(con, runs))
                times.append(time.perf_counter() - t)
            print(f"| {name} | {label} | {statistics.median(times):.2f} | {n} |", flush=True)


if __name__ == "__main__":
    main()
