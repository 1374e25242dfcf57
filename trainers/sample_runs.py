"""The committed `sample_runs/`: small real recorded runs of nine gating variants on the three datasets.

    MOE_LENS_DATA=../shared/data python trainers/sample_runs.py [--out sample_runs] [--jobs 2]
        [--only conll2003 ...] [--modes load switch ...] [--seeds 0 ...] [--epochs N] [--epoch-steps N]
        [--no-extra | --extra-only]

Nine modes (dense, dense_flops, naive_topk, topk_mask, noisy_topk, importance, load, switch, hybrid)
x three datasets (WikiText-2 with a 10k capped vocabulary, CoNLL-2003, SQuAD's dev file split by
article), d_model 128, 8 experts of hidden 128 (dense: one of hidden 128; dense_flops: one of hidden
2 x 128, the expert FLOPs of top-2). Seed 0 everywhere; CoNLL-2003 also seeds 1 and 2 of every mode,
so each mode comparison has a spread over three seeds (run names `conll2003-MODE` for seed 0,
`conll2003-MODE-seed1`, `-seed2`). Every epoch is `epoch_steps` batches: CoNLL and SQuAD reshuffle
each epoch, WikiText-2 continues where the last epoch stopped (150 x 35-token windows per epoch), so
each run has a few short epochs (CoNLL 3, WikiText-2 and SQuAD 2), each followed by a full
validation pass. Then `moe-lens record` replays the WikiText-2 `load` model over CoNLL-2003 and
SQuAD validation text (the expert x dataset view). The variants in EXTRA are trained too (`--no-extra`
leaves them out, `--extra-only` trains only them): `wikitext2-load-3layer`, the WikiText-2 `load`
recipe with MoE after each of 3 LSTM layers (issue 20's depth run).

What is kept, to stay under 45 MB in git: the valid traces of the first `record_tokens` tokens of
each split (8,000; 2,000 for seeds > 0, which serve the seed spread of the collapse and F1 figures;
metrics cover the whole split), a training batch every `record_every` steps with just the tokens it
references, hidden states (bfloat16 precision) of 300 valid tokens (100 for seeds > 0; 5,000 for
wikitext2-importance, the Clusters page's opening run) in the last
epoch only, no checkpoints (deleted at the end; `--keep-checkpoints` keeps them), and the PCA / UMAP
projections of those hidden states cached in each run, so the app's Clusters page opens at once.
Before the seeds: 21.5 minutes on a quiet 2-core CPU with `--jobs 2` (1292 s for 24 runs).
No training loop here: it calls moe_lens.train.train and moe_lens.probe.record_run.
"""
from __future__ import annotations

import argparse
import os
import shutil
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

from moe_lens.config import RunConfig

MODES = ("dense", "dense_flops", "naive_topk", "topk_mask", "noisy_topk", "importance", "load", "switch", "hybrid")
DATASETS = ("wikitext2", "conll2003", "squad")
SEEDS = {"wikitext2": (0,), "conll2003": (0, 1, 2), "squad": (0,)}  # CoNLL: the seed spread of every mode
SMALLER = dict(record_tokens=2000, hidden_sample=100)  # seeds > 0: enough for the spread, within the budget
# the run the app's Clusters page opens on draws every recorded hidden state: 5,000 of them (issue 21)
PER_RUN = {"wikitext2-importance": dict(hidden_sample=5000)}
# Variants beyond the mode grid: run name -> (dataset, mode, overrides), trained with the grid (each limited by
# --only and --modes): the depth run is MoE after each of 3 LSTM layers (issue 20).
EXTRA = {"wikitext2-load-3layer": ("wikitext2", "load", dict(num_layers=3, moe_layers="all"))}
PROBE_RUN, PROBE_SPLITS = "wikitext2-load", (("conll2003", "valid"), ("squad", "valid"))
GLOVE = "glove/glove.6B.50d.subset.txt"
COMMON = dict(d_model=128, expert_hidden=128, num_experts=8, seed=0, warmup_steps=50, record=True, record_every=25,
              record_tokens=8000, hidden_sample=300, hidden_bf16=True)  # fmt: skip
PER_DATASET = {
    "wikitext2": dict(vocab_size=10_000, d_embed=128, batch_size=32, lr=2e-3, clip=0.25, weight_decay=0.0,
                      dropout=0.1, epochs=2, epoch_steps=150),  # fmt: skip
    "conll2003": dict(embeddings=GLOVE, d_embed=50, lr=2e-3, dropout=0.3, epochs=3, epoch_steps=150, record_every=30),
    "squad": dict(embeddings=GLOVE, d_embed=50, lr=2e-3, dropout=0.2, epochs=2, epoch_steps=25),
}


def sample_config(dataset: str, mode: str, data_dir: str, out: str, seed: int = 0, run_name: str | None = None,
                  **overrides) -> RunConfig:
    """The RunConfig of one sample run (`overrides` on top: tests shrink it; EXTRA variants name their run).
    dense_flops is resolved by `RunConfig.for_mode` from the MoE fields of COMMON (top-2 of 8 experts of hidden 128)."""
    kw = {**COMMON, **PER_DATASET[dataset], **(SMALLER if seed else {}), "seed": seed, **overrides}
    if "embeddings" in kw and kw["embeddings"] == GLOVE:
        kw["embeddings"] = str(Path(data_dir) / GLOVE)
    name = run_name or f"{dataset}-{mode}" + (f"-seed{seed}" if seed else "")
    kw = {**kw, **PER_RUN.get(name, {}), **overrides}
    return RunConfig.for_mode(mode, dataset=dataset, data_dir=data_dir, runs_dir=out, run_name=name, **kw)


def _train_one(cfg_dict: dict, threads: int) -> tuple[str, float]:
    import torch

    from moe_lens.train import train

    torch.set_num_threads(threads)
    t0 = time.perf_counter()
    run_dir = train(RunConfig.from_dict(cfg_dict), progress=False)
    _keep_last_hidden(run_dir)
    return run_dir.name, time.perf_counter() - t0


def _probe(run_dir: str, data_dir: str, threads: int) -> list[str]:
    import torch

    from moe_lens.probe import record_run

    torch.set_num_threads(threads)
    out = []
    for dataset, split in PROBE_SPLITS:
        vm = record_run(run_dir, dataset, split, data_dir=data_dir, device="cpu")
        out.append(f"probe {Path(run_dir).name} over {dataset}/{split}: {vm}")
    _keep_last_hidden(Path(run_dir))
    return out


def _keep_last_hidden(run_dir: Path) -> None:
    """Hidden states of the last recorded epoch only (the Clusters page's default view)."""
    for split_dir in (run_dir / "hidden").glob("dataset=*/split=*"):
        epochs = sorted(split_dir.glob("epoch=*"), key=lambda p: int(p.name.split("=")[1]))
        for old in epochs[:-1]:
            shutil.rmtree(old)


def project_all(out: str | Path, runs: list[str]) -> int:
    """PCA and UMAP of every recorded hidden-state sample, cached in each run (the Clusters page then opens
    at once instead of waiting ~45 s for UMAP's JIT). Returns the number of projections written."""
    from moe_lens import projection
    from moe_lens.store import connect

    con, n = connect(out), 0
    for run in runs:
        for key in projection.hidden_keys(con, run).itertuples(index=False):
            for method in ("pca", "umap"):
                projection.project(con, Path(out) / run, dataset=key.dataset, split=key.split, epoch=int(key.epoch),
                                   layer=int(key.layer), method=method, into_run=True)  # fmt: skip
                n += 1
    return n


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--out", default="sample_runs")
    p.add_argument("--data-dir", default=os.environ.get("MOE_LENS_DATA"))
    p.add_argument("--only", nargs="*", choices=DATASETS, default=list(DATASETS))
    p.add_argument("--modes", nargs="*", choices=MODES, default=list(MODES))
    p.add_argument("--seeds", nargs="*", type=int, default=None, help="these seeds for every dataset (default: SEEDS)")
    p.add_argument("--jobs", type=int, default=2, help="runs trained at once (each on cores // jobs threads)")
    p.add_argument("--epochs", type=int, default=None, help="override every run's epochs (tests)")
    p.add_argument("--epoch-steps", type=int, default=None, help="override every run's epoch_steps (tests)")
    p.add_argument("--no-probe", action="store_true", help="skip the cross-dataset `moe-lens record` replay")
    p.add_argument("--keep-checkpoints", action="store_true")
    p.add_argument("--no-projections", action="store_true", help="skip caching PCA/UMAP of the hidden states")
    p.add_argument("--no-extra", action="store_true", help=f"leave out the extra variants ({', '.join(EXTRA)})")
    p.add_argument("--extra-only", action="store_true", help="train only the extra variants")
    p.add_argument("--project-only", action="store_true", help="only (re)cache the projections of --out's runs")
    args = p.parse_args(argv)
    if not args.data_dir:
        p.error("--data-dir (or $MOE_LENS_DATA) is required: the directory holding the datasets")
    overrides = {k: v for k, v in (("epochs", args.epochs), ("epoch_steps", args.epoch_steps)) if v is not None}
    cfgs = [] if args.extra_only else [
        sample_config(d, m, args.data_dir, args.out, seed=s, **overrides)
        for d in args.only for m in args.modes for s in (args.seeds if args.seeds is not None else SEEDS[d])]
    if not args.no_extra:
        cfgs += [sample_config(d, m, args.data_dir, args.out, run_name=name, **{**extra, **overrides})
                 for name, (d, m, extra) in EXTRA.items() if d in args.only and m in args.modes]
    if args.project_only:
        print(f"{project_all(args.out, [c.run_name for c in cfgs])} projections cached")
        return
    threads = max(1, (os.cpu_count() or 1) // max(1, args.jobs))
    t0 = time.perf_counter()
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        futures = {c.run_name: pool.submit(_train_one, c.to_dict(), threads) for c in cfgs}
        probe = None
        if not args.no_probe and PROBE_RUN in futures:
            futures[PROBE_RUN].result()  # the probe needs the trained WikiText-2 checkpoint
            probe = pool.submit(_probe, str(Path(args.out) / PROBE_RUN), args.data_dir, threads)
        for name, f in futures.items():
            print(f"{name}: {f.result()[1]:.0f} s", flush=True)
        if probe is not None:
            print("\n".join(probe.result()), flush=True)
    if not args.keep_checkpoints:
        for c in cfgs:
            shutil.rmtree(Path(args.out) / c.run_name / "checkpoints", ignore_errors=True)
    if not args.no_projections:
        print(f"{project_all(args.out, [c.run_name for c in cfgs])} projections cached", flush=True)
    print(f"{len(cfgs)} runs in {time.perf_counter() - t0:.0f} s -> {args.out}/")


if __name__ == "__main__":
    main()
