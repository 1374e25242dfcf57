"""`sample_runs/conll2003-load-ablate`: the one sample run with a checkpoint, so `moe-lens ablate` has a model.

    MOE_LENS_DATA=../shared/data python trainers/ablation_sample.py [--out sample_runs]

The CoNLL-2003 `load` recipe of trainers/sample_runs.py (noisy top-2 of 8 MLP experts, w_load 0.1, GloVe 50d,
3 epochs of 150 steps, seed 0, the valid traces of the first 8,000 tokens), made smaller so the checkpoint fits
the repository: d_model 64, expert hidden 64, a 10k vocabulary, 100 hidden states. The last epoch's
checkpoint is kept with the model, config, vocabulary, step and epoch only (no optimizer state: it can be
ablated and replayed, not resumed). Then every expert is ablated on the whole validation split
(`moe_lens.ablate.ablate_run`; rows for the 8,000 recorded tokens), and the wall time per expert printed.
No training loop here: it calls moe_lens.train.train and moe_lens.ablate.ablate_run.
"""
from __future__ import annotations

import argparse
import os
import time
from pathlib import Path

import torch

from moe_lens.ablate import ablate_run
from moe_lens.config import RunConfig
from moe_lens.rundir import latest_checkpoint
from moe_lens.train import train

RUN = "conll2003-load-ablate"
RECIPE = dict(dataset="conll2003", embeddings="glove/glove.6B.50d.subset.txt", d_embed=50, d_model=64,
              expert_hidden=64, num_experts=8, vocab_size=10_000, lr=2e-3, dropout=0.3, epochs=3, epoch_steps=150,
              warmup_steps=50, seed=0, record=True, record_every=30, record_tokens=8000, hidden_sample=100, hidden_bf16=True,
              device="cpu")  # fmt: skip
KEEP = ("model", "config", "vocab", "step", "epoch")  # what ablate and record read from a checkpoint


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--out", default="sample_runs")
    args = ap.parse_args()
    data = os.environ.get("MOE_LENS_DATA", "../shared/data")
    cfg = RunConfig.for_mode("load", data_dir=data, runs_dir=args.out, run_name=RUN,
                             **{**RECIPE, "embeddings": str(Path(data) / RECIPE["embeddings"])})  # fmt: skip
    t0 = time.perf_counter()
    run_dir = train(cfg, progress=False)
    print(f"trained {run_dir} in {time.perf_counter() - t0:.0f} s")
    last = latest_checkpoint(run_dir, epoch_end=True)
    payload = torch.load(last, weights_only=False)
    torch.save({k: payload[k] for k in KEEP}, last)
    for p in (run_dir / "checkpoints").glob("*.pt"):
        if p != last:
            p.unlink()
    t0 = time.perf_counter()
    paths = ablate_run(run_dir, data_dir=data)
    print(f"ablated {len(paths)} experts in {time.perf_counter() - t0:.0f} s "
          f"({(time.perf_counter() - t0) / len(paths):.1f} s per expert, unablated forward included)")


if __name__ == "__main__":
    main()
