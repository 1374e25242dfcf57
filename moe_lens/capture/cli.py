"""`moe-lens capture MODEL --dataset D --split S ...`: record a Hugging Face MoE model's routing (docs/capture.md).

The options are CaptureArgs's fields (moe_lens/capture/run.py), each default written there once.
"""
from __future__ import annotations

import argparse
from dataclasses import fields

from moe_lens.capture.adapters import ADAPTERS
from moe_lens.capture.run import CaptureArgs, capture

_HELP = {
    "dataset": "wikitext2 | conll2003 | squad",
    "split": "train | valid | test (the dataset's names)",
    "max_tokens": "record the first N subwords of the split (None: all)",
    "batch_size": "windows per forward",
    "context": "tokens per window, BOS included",
    "device": "auto | cpu | cuda | cuda:N",
    "dtype": "auto (bf16 on CUDA, fp32 on CPU) | bf16 | fp32",
    "runs_dir": "where the run directory is created",
    "run_name": "run directory name (default: <dataset>-capture-<UTC stamp>)",
    "record_probs": "also record the full router distribution per subword (probs/)",
    "tokenizer": "a local tokenizer directory (default: the model's own)",
    "revision": "hub revision (branch, tag or commit) of MODEL",
    "data_dir": "dataset files (default: $MOE_LENS_DATA, else ~/.cache/moe-lens/data)",
}


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser(
        "capture", help="record a pretrained Hugging Face MoE model's routing over a dataset split",
        description=f"Families (config.model_type): {', '.join(ADAPTERS)}. Needs pip install 'moe-lens[hf]'.")
    p.add_argument("model", metavar="MODEL", help="hub id or local directory")
    for f in fields(CaptureArgs):
        if f.name == "model":
            continue
        flag = "--" + f.name.replace("_", "-")
        if f.type in ("bool", bool):
            p.add_argument(flag, action="store_true", help=_HELP[f.name])
            continue
        kind = int if "int" in str(f.type) else str
        p.add_argument(flag, type=kind, default=f.default, help=f"{_HELP[f.name]} (default: {f.default})",
                       **({"choices": ("auto", "bf16", "fp32")} if f.name == "dtype" else {}))
    p.set_defaults(func=_run)


def _run(args: argparse.Namespace) -> int:
    cfg = CaptureArgs(**{f.name: getattr(args, f.name) for f in fields(CaptureArgs)})
    run_dir = capture(cfg)
    print(f"captured {cfg.model} -> {run_dir}")
    return 0
