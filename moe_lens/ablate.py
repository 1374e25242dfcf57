"""`moe-lens ablate RUN`: the causal effect of each expert, the per-token loss change when it is removed.

The run's latest epoch checkpoint is loaded and evaluated on the model's own batched eval path (the task's
batches, `model.eval()`, no gradient), once as it is and once per (MoE layer, expert) with that expert
removed at the router (`moe/ablation.py`: its tokens go to their next choice, gates renormalised as the
router does). For every evaluated token the table holds

    delta_loss = loss with the expert removed - loss of the unablated forward      (nats)

where the loss is the one the task trains on, per token: the cross-entropy of the next token for the
language model (keyed by the token_idx of the input position, whose routing the traces record), of the
NER tag for the tagger. SQuAD's loss is per question, not per token: not supported.

Written to `<run>/ablation/dataset=D/split=S/part-L<layer>-E<expert>.parquet` (docs/traces.md), one file per
ablated expert (a repeated ablation replaces its own files), columns token_idx, layer, expert, epoch,
loss, base_loss, delta_loss, chose (the token's unablated routing at that layer included the expert). It
joins `tokens` on (run, dataset, split, token_idx); `store.connect` serves it as the `ablation` view.
`max_tokens` bounds the cost: whole eval batches are taken while they fit (the LM's first windows; the
tagger's batches evenly spaced over its length-sorted order). Rows are written for the tokens of the run's
tokens table only (the first `record_tokens` of the split when the run set it), so every row joins.
"""
from __future__ import annotations

import argparse
import os
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from moe_lens import data as mdata
from moe_lens.atomic import write_table_atomic
from moe_lens.config import RunConfig
from moe_lens.data.vocab import Vocab
from moe_lens.errors import MoeLensError
from moe_lens.health import read_json
from moe_lens.models import build_model
from moe_lens.moe.ablation import ablated
from moe_lens.rundir import latest_checkpoint
from moe_lens.tasks import get_task
from moe_lens.tasks.ner import IGNORE
from moe_lens.train import _to, resolve_device

SCHEMA = pa.schema([("token_idx", pa.int64()), ("layer", pa.int16()), ("expert", pa.int16()), ("epoch", pa.int32()),
                    ("loss", pa.float32()), ("base_loss", pa.float32()), ("delta_loss", pa.float32()),
                    ("chose", pa.bool_())])  # fmt: skip


def load_run(run_dir: Path, device: torch.device, data_dir: str | None, split: str):
    """(cfg, model in eval mode, split data, checkpoint payload) of the run's latest epoch checkpoint."""
    if not (run_dir / "config.json").is_file():
        raise MoeLensError(f"{run_dir}: not a run directory (no config.json)")
    cfg = RunConfig.from_dict({k: v for k, v in read_json(run_dir / "config.json").items() if k != "device"})
    if cfg.dataset == "squad":
        raise MoeLensError(f"{run_dir.name}: ablate needs a per-token loss; SQuAD's is per question "
                           "(allowed: wikitext2, conll2003 runs)")  # fmt: skip
    ckpt = latest_checkpoint(run_dir, epoch_end=True)
    if ckpt is None:
        raise MoeLensError(f"{run_dir}: no checkpoint (checkpoints/epoch-*.pt); train at least one epoch")
    payload = torch.load(ckpt, map_location=device, weights_only=False)
    vocab = Vocab.from_dict(payload["vocab"])
    if data_dir is None and cfg.data_dir and Path(cfg.data_dir).is_dir():
        data_dir = cfg.data_dir
    data = mdata.load_split(cfg.dataset, split, data_dir or os.environ.get("MOE_LENS_DATA"), vocab=vocab,
                            pos=False, progress=False)  # fmt: skip
    num_tags = payload["model"]["head.weight"].shape[0] if cfg.dataset == "conll2003" else 0
    model = build_model(cfg, len(vocab), num_tags=num_tags).to(device)
    model.load_state_dict(payload["model"])
    return cfg, model.eval(), data, payload


def moe_layers(model: nn.Module) -> nn.ModuleList:
    """The model's MoE layers in depth order (the LM holds them, the tagger's encoder does)."""
    return model.moes if hasattr(model, "moes") else model.enc.moes


def eval_batches(task, data, max_tokens: int | None, *, prefix: bool) -> list[dict]:
    """Whole eval batches, in the eval order, while their tokens fit in `max_tokens` (at least one). `prefix`
    (the LM, whose state runs on from window to window): the first ones; otherwise batches evenly spaced over
    the eval order (the tagger's are sorted by sentence length: a prefix would hold only the shortest)."""
    batches = list(task.batches(data, train=False, seed=0))
    total = sum(b["ntokens"] for b in batches)
    if max_tokens is None or total <= max_tokens:
        return batches
    if not prefix:
        step = total / max_tokens
        batches = [batches[int(i)] for i in np.arange(0, len(batches), step)]
    out, total = [], 0
    for batch in batches:
        if out and total + batch["ntokens"] > max_tokens:
            break
        out.append(batch)
        total += batch["ntokens"]
    return out


def token_losses(model: nn.Module, dataset: str, batches: list[dict], device: torch.device
                 ) -> Iterator[tuple[np.ndarray, np.ndarray, list]]:  # fmt: skip
    """Per batch: (token_idx (n,), per-token loss (n,), the forward's MoE traces), on the eval path."""
    state = None
    with torch.no_grad():
        for batch in batches:
            b = _to(batch, device)
            if dataset == "wikitext2":
                logits, _, traces, state = model(b["ids"], b["token_idx"], state)  # (b, t, V), carried state
                loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), b["target"].reshape(-1),
                                       reduction="none")  # (b*t,)
                idx = b["token_idx"].reshape(-1)
            else:
                logits, _, traces, _ = model(b["ids"], b["token_idx"], b["lengths"], b.get("case"))  # (b, t, tags)
                real = b["labels"] != IGNORE  # (b, t)
                loss = F.cross_entropy(logits.float()[real], b["labels"][real], reduction="none")  # (n,)
                idx = b["token_idx"][real]
            yield idx.cpu().numpy(), loss.cpu().numpy(), traces


def parse_experts(text: str, num_experts: int) -> list[int]:
    """`all` or a comma list `i,j` of experts in 0..num_experts-1 (one-line error naming --experts otherwise)."""
    if text == "all":
        return list(range(num_experts))
    try:
        got = [int(s) for s in text.split(",") if s.strip()]
    except ValueError:
        raise MoeLensError(f"--experts {text!r}; allowed: all, or a comma list like 0,3") from None
    bad = [i for i in got if not 0 <= i < num_experts]
    if bad or not got:
        raise MoeLensError(f"--experts {text!r}; allowed: all, or experts in 0..{num_experts - 1}")
    return got


def ablate_run(run_dir: str | Path, *, split: str = "valid", layer: int | None = None, experts: str = "all",
               max_tokens: int | None = None, data_dir: str | None = None, device: str = "cpu",
               log=print) -> list[Path]:  # fmt: skip
    """Ablate each chosen expert of each chosen MoE layer; write one Parquet part per expert; return the paths."""
    run_dir = Path(run_dir)
    dev = resolve_device(device)
    cfg, model, data, payload = load_run(run_dir, dev, data_dir, split)
    layers = moe_layers(model)
    if cfg.num_experts < 2 or cfg.router == "dense":
        raise MoeLensError(f"{run_dir.name}: a dense run has one expert; nothing to ablate")
    if layer is not None and not 0 <= layer < len(layers):
        raise MoeLensError(f"--layer {layer}; allowed: 0..{len(layers) - 1} (the run's MoE layers)")
    chosen = parse_experts(experts, cfg.num_experts)
    batches = eval_batches(get_task(cfg.dataset, cfg), data, max_tokens, prefix=cfg.dataset == "wikitext2")
    t0 = time.perf_counter()
    idx_parts, base_parts, routed = [], [], {}
    for idx, loss, traces in token_losses(model, cfg.dataset, batches, dev):
        idx_parts.append(idx)
        base_parts.append(loss)
        for tr in traces:  # the unablated routing: which experts each token chose, per layer
            routed.setdefault(tr.layer, []).append((tr.token_idx.cpu().numpy(), tr.routing.expert_idx.cpu().numpy()))
    token_idx, base = np.concatenate(idx_parts), np.concatenate(base_parts)
    # rows only for tokens in the run's tokens table (the first record_tokens of the split), so every row joins
    keep = token_idx < cfg.record_tokens if cfg.record_tokens is not None else np.ones(len(token_idx), bool)
    log(f"unablated forward: {len(token_idx):,} tokens in {time.perf_counter() - t0:.1f} s")
    dest = run_dir / "ablation" / f"dataset={cfg.dataset}" / f"split={split}"
    written = []
    for li in [layer] if layer is not None else range(len(layers)):
        choice = _chose_lookup(routed[li])
        for e in chosen:
            t1 = time.perf_counter()
            with ablated(layers[li], [e]):
                loss = np.concatenate([lo for _, lo, _ in token_losses(model, cfg.dataset, batches, dev)])
            chose = choice(token_idx, e)[keep]
            n = int(keep.sum())
            table = pa.table({"token_idx": token_idx[keep], "layer": np.full(n, li, np.int16),
                              "expert": np.full(n, e, np.int16), "epoch": np.full(n, payload["epoch"], np.int32),
                              "loss": loss[keep].astype(np.float32), "base_loss": base[keep].astype(np.float32),
                              "delta_loss": (loss - base)[keep].astype(np.float32), "chose": chose},
                             schema=SCHEMA)  # fmt: skip
            path = dest / f"part-L{li}-E{e}.parquet"
            write_table_atomic(table, path)
            written.append(path)
            log(f"layer {li} expert {e}: mean delta_loss {float((loss - base)[keep].mean()):+.5f} over {n:,} tokens "
                f"({int(chose.sum()):,} chose it), {time.perf_counter() - t1:.1f} s")  # fmt: skip
    return written


def _chose_lookup(parts: list[tuple[np.ndarray, np.ndarray]]):
    """A function (token_idx (n,), expert) -> (n,) bool: the token's unablated routing included the expert."""
    idx = np.concatenate([p[0] for p in parts])
    experts = np.concatenate([p[1] for p in parts])  # (n, s), -1 for an empty slot
    order = np.argsort(idx, kind="stable")
    idx, experts = idx[order], experts[order]

    def chose(token_idx: np.ndarray, e: int) -> np.ndarray:
        pos = np.searchsorted(idx, token_idx)
        return (experts[np.minimum(pos, len(idx) - 1)] == e).any(axis=1)

    return chose


def add_commands(subparsers: argparse._SubParsersAction) -> None:
    p = subparsers.add_parser("ablate", help="per-token loss change when each expert is removed (causal importance)",
                              description=__doc__.split("\n\n")[0])  # fmt: skip
    p.add_argument("run", help="run directory (or name under --runs-dir); needs checkpoints/epoch-*.pt")
    p.add_argument("--split", default="valid")
    p.add_argument("--layer", type=int, default=None, help="one MoE layer (0-based; default: every MoE layer)")
    p.add_argument("--experts", default="all", help="all, or a comma list of experts, e.g. 0,3")
    p.add_argument("--max-tokens", type=int, default=None, help="evaluate whole eval batches up to this many tokens")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--data-dir", default=None)
    p.add_argument("--device", default="cpu")
    p.set_defaults(func=_ablate)


def _ablate(args: argparse.Namespace) -> int:
    run_dir = Path(args.run) if Path(args.run).is_dir() else Path(args.runs_dir) / args.run
    if not run_dir.is_dir():
        raise MoeLensError(f"run {args.run!r}: no such directory (nor under --runs-dir {args.runs_dir})")
    if args.max_tokens is not None and args.max_tokens < 1:
        raise MoeLensError(f"--max-tokens {args.max_tokens}; allowed: >= 1")
    paths = ablate_run(run_dir, split=args.split, layer=args.layer, experts=args.experts, max_tokens=args.max_tokens,
                       data_dir=args.data_dir, device=args.device)  # fmt: skip
    print(f"wrote {len(paths)} part(s) to {paths[0].parent}")
    return 0


__all__ = ["SCHEMA", "ablate_run", "moe_layers", "parse_experts", "token_losses"]
