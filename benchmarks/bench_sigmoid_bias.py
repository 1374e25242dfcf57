"""Load balance without an aux loss: `sigmoid_bias` (Wang et al. 2024) against `topk_mask`, in one run.

Each mode trains the WikiText-2 LM through the ordinary training loop (`moe_lens.train.train`, so the
bias moves through the loop's after-step hook) for 300 steps with e = 8, k = 2, d = 64, the same
seed, data order and a capped vocabulary, and no aux loss (neither mode has one). The loop logs each
expert's share of the assignments (all k of each token) of every 50-step window (metrics.parquet,
`load`); since every window holds the same number of assignments, max/mean load = e * the largest
share. Every window is reported, the first included. Each seed runs both modes; the table gives
each run and the per-window median over the seeds. The issue's target: `sigmoid_bias` <= 1.3,
`topk_mask` >= 3 (it collapses onto few experts).

    python benchmarks/bench_sigmoid_bias.py --data-dir ../shared/data [--steps 300] [--rates 1e-2] [--seeds 0 1 2]
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without `pip install -e .`

SETUP = dict(dataset="wikitext2", num_experts=8, top_k=2, d_embed=64, d_model=64, expert_hidden=64, pos_tags=False,
             max_eval_batches=1, record=False, seed=0)  # fmt: skip


def window_imbalance(run_dir: str, e: int) -> tuple[list[int], list[float], list[float]]:
    """(window end steps, max/mean load per window, mean train loss per window) from metrics.parquet."""
    import pandas as pd

    m = pd.read_parquet(os.path.join(run_dir, "metrics.parquet"))
    train = m[m["split"] == "train"]
    load = train[train["name"] == "load"].groupby("step")["value"].max() * e  # the shares sum to 1
    loss = train[train["name"] == "loss"].set_index("step")["value"]
    return load.index.tolist(), load.tolist(), loss.reindex(load.index).tolist()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data-dir", default=None, help="datasets directory (default: $MOE_LENS_DATA)")
    ap.add_argument("--steps", type=int, default=300)
    ap.add_argument("--vocab-size", type=int, default=2000, help="most frequent words kept (a small head: fast steps)")
    ap.add_argument("--rates", type=float, nargs="+", default=[1e-2], help="bias_update_rate values u to run")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds; each runs every mode")
    args = ap.parse_args()

    import statistics

    import torch

    from moe_lens.config import RunConfig
    from moe_lens.train import train

    torch.set_num_threads(min(2, torch.get_num_threads()))
    runs = [("topk_mask", {})] + [("sigmoid_bias", {"bias_update_rate": u}) for u in args.rates]
    rows: dict[str, list[tuple[int, list[float], float, float]]] = {}  # label -> (seed, imbalance, loss, s)
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            for i, (mode, extra) in enumerate(runs):
                cfg = RunConfig.for_mode(mode, **{**SETUP, "seed": seed}, **extra, data_dir=args.data_dir,
                                         vocab_size=args.vocab_size, max_steps=args.steps, runs_dir=tmp,
                                         run_name=f"seed{seed}-run{i}")  # fmt: skip
                t0 = time.perf_counter()
                run_dir = train(cfg, progress=False)
                steps, imb, loss = window_imbalance(str(run_dir), cfg.num_experts)
                label = mode + (f" u={extra['bias_update_rate']:g}" if extra else "")
                rows.setdefault(label, []).append((seed, imb, loss[-1], time.perf_counter() - t0))
    print(f"WikiText-2 LM, {args.steps} steps, e=8, k=2, d=64, vocab {args.vocab_size}, no aux loss; "
          f"max/mean load per window ending at step:")  # fmt: skip
    print(f"{'mode':<22}{'seed':>7}" + "".join(f"{s:>7}" for s in steps) + f"{'max':>7}   last-window loss   seconds")
    for label, runs_of in rows.items():
        for seed, imb, loss, secs in runs_of:
            print(f"{label:<22}{seed:>7}" + "".join(f"{v:>7.2f}" for v in imb) + f"{max(imb):>7.2f}"
                  f"   {loss:>16.3f}   {secs:>7.0f}")  # fmt: skip
        med = [statistics.median(r[1][w] for r in runs_of) for w in range(len(steps))]
        print(f"{label:<22}{'median':>7}" + "".join(f"{v:>7.2f}" for v in med) + f"{max(med):>7.2f}")


if __name__ == "__main__":
    main()
