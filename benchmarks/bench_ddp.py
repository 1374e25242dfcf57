"""Data-parallel scaling on this CPU: training tokens/s of 1 process against 2 (torchrun, gloo), one thread each.

Both run the same `moe-lens train` (WikiText-2 LM, the same global batch: each of the 2 ranks takes half of
every batch's rows, so this is strong scaling), interleaved in `--reps` rounds (1, 2, 1, 2, ...) so drift in
machine speed hits both alike. The figure of a run is the training tokens/s its loop logs at its last step
(metrics.parquet `tokens_per_s`, summed over the ranks; timed from the start of the epoch's first step, so
process start-up, data loading and evaluation are not in it). Prints the medians and the scaling efficiency
tokens/s(2) / (2 x tokens/s(1)).

    python benchmarks/bench_ddp.py [--reps 3] [--steps 100] [--data-dir DIR]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import pyarrow.parquet as pq

ROOT = Path(__file__).resolve().parents[1]


def run_once(nproc: int, steps: int, runs: Path, name: str, data_dir: str | None, extra: list[str]) -> float:
    """One `moe-lens train` (nproc 1: plain; 2: under torchrun); its logged training tokens/s at the last step."""
    flags = ["train", "--dataset", "wikitext2", "--mode", "noisy_topk", "--d-embed", "128", "--d-model", "128",
             "--expert-hidden", "128", "--batch-size", "32", "--bptt", "35", "--vocab-size", "10000",
             "--epochs", "1", "--max-steps", str(steps), "--max-eval-batches", "1", "--no-record", "--no-pos-tags",
             "--no-progress", "--runs-dir", str(runs), "--run-name", name, *extra]  # fmt: skip
    if data_dir:
        flags += ["--data-dir", data_dir]
    launcher = ["-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={nproc}"] if nproc > 1 else []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    done = subprocess.run([sys.executable, *launcher, "-m", "moe_lens", *flags], cwd=ROOT, env=env,
                          capture_output=True, text=True)  # fmt: skip
    if done.returncode != 0:
        raise SystemExit(f"nproc {nproc} failed:\n{done.stderr[-3000:]}")
    m = pq.read_table(runs / name / "metrics.parquet").to_pandas()
    tps = m[(m["split"] == "train") & (m["name"] == "tokens_per_s")].sort_values("step")
    return float(tps["value"].iloc[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--reps", type=int, default=3)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--data-dir", default=None)
    p.add_argument("extra", nargs="*", help="more `moe-lens train` flags for both (after --)")
    args = p.parse_args()
    runs = Path(tempfile.mkdtemp(prefix="bench-ddp-"))
    tps: dict[int, list[float]] = {1: [], 2: []}
    for r in range(args.reps):
        for nproc in (1, 2):
            tps[nproc].append(run_once(nproc, args.steps, runs, f"r{r}-p{nproc}", args.data_dir, args.extra))
            print(f"rep {r} nproc {nproc}: {tps[nproc][-1]:,.0f} tokens/s", flush=True)
    med = {n: statistics.median(v) for n, v in tps.items()}
    print(f"median tokens/s: 1 process {med[1]:,.0f}, 2 processes {med[2]:,.0f}; speed-up {med[2] / med[1]:.2f}x, "
          f"scaling efficiency {med[2] / (2 * med[1]):.0%} (cpu count {os.cpu_count()}, OMP_NUM_THREADS=1 each)")


if __name__ == "__main__":
    main()
