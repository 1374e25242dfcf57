"""Data-layer timings: cold load + annotate vs cached load, per dataset and split; POS agreement.

Each measurement runs in a fresh Python process (so spaCy's import and model load count where
they happen). "cold" uses an empty POS cache directory, so it tags; "cached" reuses that cache,
median of --runs processes. The times are of the `load_split` call itself (the import of
moe_lens.data is reported apart). Then spaCy's agreement with CoNLL-2003 gold POS on the test
split, gold tokenisation (moe_lens.data.pos.conll_pos_agreement).

    MOE_LENS_DATA=../shared/data python benchmarks/bench_data.py [--runs 3] [--datasets squad conll2003]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time



def one(dataset: str, split: str, data_dir: str | None) -> None:
    """Child process: time one load_split and print a JSON line."""
    t0 = time.perf_counter()
    from moe_lens.data import load_split

    t1 = time.perf_counter()
    s = load_split(dataset, split, data_dir, progress=False)
    t2 = time.perf_counter()
    print(json.dumps({"import_s": t1 - t0, "load_s": t2 - t1, "tokens": len(s),
                      "pos": s.meta.get("pos_source")}))


def measure(dataset: str, split: str, data_dir: str, cache: str) -> dict:
    env = {**os.environ, "MOE_LENS_CACHE": cache}
    out = subprocess.run([sys.executable, __file__, "--one", dataset, split, "--data-dir", data_dir],
                         env=env, capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None)
    ap.add_argument("--runs", type=int, default=3)
    ap.add_argument("--datasets", nargs="+", default=["wikitext2", "conll2003", "squad"])
    ap.add_argument("--no-agreement", action="store_true")
    ap.add_argument("--one", nargs=2, metavar=("DATASET", "SPLIT"), help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.one:  # before importing moe_lens.data here, so the child times that import
        return one(*args.one, args.data_dir)
    from moe_lens.data import available_splits, resolve_data_dir
    from moe_lens.data.pos import conll_pos_agreement

    data_dir = str(resolve_data_dir(args.data_dir))
    print(f"data: {data_dir}; python {sys.version.split()[0]}; {os.cpu_count()} CPUs\n")
    print("| dataset | split | tokens | cold load + annotate (s) | cached load (s, median of %d) | import (s) |"
          % args.runs)
    print("|---|---|---:|---:|---:|---:|")
    for ds in args.datasets:
        with tempfile.TemporaryDirectory() as cache:
            for split in available_splits(ds, data_dir):
                cold = measure(ds, split, data_dir, cache)
                warm = [measure(ds, split, data_dir, cache) for _ in range(args.runs)]
                med = statistics.median(w["load_s"] for w in warm)
                imp = statistics.median(w["import_s"] for w in warm)
                print(f"| {ds} | {split} | {cold['tokens']:,} | {cold['load_s']:.2f} | {med:.2f} | {imp:.2f} |",
                      flush=True)
    if not args.no_agreement and "conll2003" in args.datasets:
        r = conll_pos_agreement(data_dir, "test")
        print(f"\nspaCy ({r.get('model')}) vs CoNLL-2003 gold POS, test split, {r['tokens']:,} tokens: "
              f"raw {r['raw']:.4f}, after mapping conventions {r['mapped']:.4f}")
        print("most frequent remaining (gold, predicted) mismatches:", r["confusions"][:6])


if __name__ == "__main__":
    main()
