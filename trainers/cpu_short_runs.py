"""Short real CPU runs on the three datasets, the figures of issue 4's closing note.

    MOE_LENS_DATA=../shared/data python trainers/cpu_short_runs.py [--runs-dir runs-short] [--only wikitext2]

WikiText-2 (10k capped vocabulary) for 3 epochs with noisy top-2 + both Shazeer losses, CoNLL-2003
with GloVe-initialised embeddings and the load loss for 3 epochs, SQuAD (article split of dev)
with hybrid switch + LoRA for 2 epochs. Every run records its routing. Prints the validation
curve of each run from metrics.parquet. No training loop here: it calls moe_lens.train.
"""
from __future__ import annotations

import argparse
import os
from pathlib import Path

import pandas as pd

from moe_lens.config import RunConfig
from moe_lens.train import train

GLOVE = "glove/glove.6B.50d.subset.txt"
SMALL = dict(d_model=128, expert_hidden=128, num_experts=8, record=True, seed=0)


def configs(data_dir: str) -> dict[str, RunConfig]:
    glove = str(Path(data_dir) / GLOVE)
    return {
        "wikitext2": RunConfig.for_mode("baseline", dataset="wikitext2", vocab_size=10_000, d_embed=128, batch_size=64,
                                        epochs=3, lr=2e-3, clip=0.25, weight_decay=0.0, dropout=0.1, **SMALL),  # fmt: skip
        "conll2003": RunConfig.for_mode("load", dataset="conll2003", embeddings=glove, d_embed=50, epochs=3,
                                        lr=2e-3, dropout=0.3, **SMALL),  # fmt: skip
        "squad": RunConfig.for_mode("hybrid", dataset="squad", embeddings=glove, d_embed=50, epochs=2, lr=2e-3,
                                    dropout=0.2, **SMALL),  # fmt: skip
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--runs-dir", default="runs-short")
    p.add_argument("--data-dir", default=os.environ.get("MOE_LENS_DATA"))
    p.add_argument("--only", nargs="*", default=None)
    args = p.parse_args()
    for name, cfg in configs(args.data_dir).items():
        if args.only and name not in args.only:
            continue
        cfg = RunConfig.from_dict({**cfg.to_dict(), "runs_dir": args.runs_dir, "run_name": f"{name}-{cfg.mode}",
                                   "data_dir": args.data_dir})  # fmt: skip
        run_dir = train(cfg)
        m = pd.read_parquet(run_dir / "metrics.parquet")
        valid = m[m["split"] == "valid"].pivot_table(index=["epoch", "step"], columns="name", values="value")
        print(f"\n{run_dir.name}: validation by epoch\n{valid.round(3).to_string()}\n")


if __name__ == "__main__":
    main()
