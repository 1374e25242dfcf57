"""`moe-lens record RUN --dataset D --split S`: replay a trained checkpoint over any dataset's split.

One model's routing can then be compared across WikiText, CoNLL and SQuAD text: the probe split's
tokens are encoded with the run's own vocabulary, annotated as usual, and recorded under
`dataset=D/split=S/epoch=<checkpoint epoch>` of the same run. A language model reads any split as
a token stream; a tagger reads any split's sentences (WikiText: lines); the QA model needs SQuAD.
Metrics of the replay (perplexity of an LM on CoNLL text, say) go to metrics.parquet under split
`probe:D:S`. A task metric that does not apply (a tagger's F1 over text without NER labels) is
skipped with one warning line; the routing is still recorded. A replay that fails part-way
removes the partition it was writing, so no partial traces are left unmarked.
"""
from __future__ import annotations

import sys
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch

from moe_lens import data as mdata
from moe_lens.config import RunConfig
from moe_lens.data.vocab import Vocab
from moe_lens.errors import MoeLensError
from moe_lens.health import read_json
from moe_lens.models import build_model
from moe_lens.record import Recorder, clear_partition
from moe_lens.rundir import Metrics, latest_checkpoint
from moe_lens.tasks import get_task
from moe_lens.train import evaluate, hidden_sample, resolve_device


def record_run(run_dir: str | Path, dataset: str, split: str, *, data_dir: str | None = None,
               record_probs: bool = False, device: str = "auto",
               warn: Callable[[str], None] | None = None) -> dict[str, float]:
    """Record the routing of run_dir's latest epoch checkpoint over (dataset, split); returns the replay
    metrics ({} when the task metric does not apply). `warn` gets one-line warnings (default: stderr)."""
    warn = warn or (lambda msg: print(f"moe-lens record: warning: {msg}", file=sys.stderr))
    run_dir = Path(run_dir)
    if not (run_dir / "config.json").is_file():
        raise MoeLensError(f"{run_dir}: not a run directory (no config.json)")
    cfg = RunConfig.from_dict(read_json(run_dir / "config.json"))
    ckpt = latest_checkpoint(run_dir, epoch_end=True)
    if ckpt is None:
        raise MoeLensError(f"{run_dir}: no checkpoint yet (checkpoints/epoch-*.pt); train at least one epoch")
    if cfg.dataset == "squad" and dataset != "squad":
        raise MoeLensError(f"a SQuAD span-QA model needs question/context pairs; --dataset {dataset} has none")
    dev = resolve_device(device)
    payload = torch.load(ckpt, map_location=dev, weights_only=False)
    vocab = Vocab.from_dict(payload["vocab"])
    split_data = mdata.load_split(dataset, split, data_dir or cfg.data_dir, vocab=vocab, pos=cfg.pos_tags)
    num_tags = payload["model"]["head.weight"].shape[0] if cfg.dataset == "conll2003" else 0
    model = build_model(cfg, len(vocab), num_tags=num_tags).to(dev)
    model.load_state_dict(payload["model"])
    has_labels = cfg.dataset != "conll2003" or split_data.labels is not None
    if not has_labels:  # a tagger over unlabelled text: routing only (the batches still carry labels)
        split_data.labels = np.zeros(len(split_data), dtype=np.int64)
        warn(f"a {cfg.dataset} tagger over {dataset} text: {dataset} has no NER labels, so accuracy and F1 "
             f"are skipped; the routing is recorded")  # fmt: skip
    epoch = payload["epoch"]
    clear_partition(run_dir, dataset, split, epoch)  # a repeated probe replaces, never duplicates
    recorder = Recorder(run_dir, record_probs=record_probs, hidden_bf16=cfg.hidden_bf16)
    recorder.write_tokens(split_data.tokens, dataset, split, limit=cfg.record_tokens)
    keep = hidden_sample(len(split_data), cfg.hidden_sample, cfg.seed, within=cfg.record_tokens)
    task = get_task(cfg.dataset, cfg)
    try:
        vm = evaluate(task, model, split_data, dev, epoch=epoch, step=payload["step"], recorder=recorder, keep=keep,
                      score=has_labels)  # fmt: skip
        recorder.close()
    except BaseException as e:
        try:
            recorder.close()
        except Exception:  # noqa: BLE001 - the replay's own error is the one reported
            pass
        clear_partition(run_dir, dataset, split, epoch)
        if not isinstance(e, Exception):  # Ctrl-C: stop, without partial traces
            raise
        reason = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise MoeLensError(f"replay of {run_dir.name} over {dataset}/{split} failed part-way ({reason}); removed its "
                           f"partial traces (dataset={dataset}/split={split}/epoch={epoch})") from e  # fmt: skip
    metrics = Metrics(run_dir, keep_until_step=10**18)
    metrics.rows = [r for r in metrics.rows if r["split"] != f"probe:{dataset}:{split}"]
    metrics.add_many(payload["step"], payload["epoch"], f"probe:{dataset}:{split}", vm)
    metrics.flush()
    return vm
