"""What differs per task: batching, the model's head and loss, the evaluation metric.

Each task implements the `Task` interface used by the one training loop (`moe_lens.train`):

    sampler(split, train, seed)        -> this rank's batch order, with set_epoch(e, start=k) (the loop calls
                                          it every epoch; CoNLL/SQuAD: batching.DistributedBucketSampler,
                                          LM: lm.WindowSampler)
    batches(split, train, seed, epoch, sampler)
                                       -> iterator of CPU tensor dicts (the sampler's batches, default a fresh
                                          sampler); "ntokens" = real tokens
                                          (train: CoNLL/SQuAD shuffle by seed; the LM starts its
                                          short epochs where the last one stopped, by epoch)
    forward(model, batch, state)       -> Forward(loss, aux_loss, traces, state)   (on the device), from the
                                          model's ModelOutput(logits, aux_loss, traces, state)
    loss_count(batch)                  -> the tokens (examples for SQuAD) the batch's mean loss averages over
                                          (under torchrun the weight of the rank's loss, moe_lens/distributed.py)
    eval_update(acc, batch, fwd)       -> accumulate device tensors, no host sync
    eval_totals(acc, split)            -> {name: device tensor}, sums over this rank's batches
    eval_metrics(totals, split)        -> {"loss": ..., "ppl" | "accuracy", "f1" | "em", "f1", ...}

Batches of variable-length sequences are bucketed by length (sorted, chunked, batch order
shuffled), so padding is minimal, and the BiLSTMs pack them, so no compute is spent on it.

Under torchrun every rank draws the same global batches and yields its own share of each (`Shard`,
moe_lens/distributed.py): `eval_totals` returns sums over that share, which the loop all-reduces before
`eval_metrics(totals, split)` turns them into the metrics a single process would compute.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from torch import Tensor

from moe_lens.distributed import SINGLE, Shard


@dataclass
class Forward:
    loss: Tensor  # () task loss, mean over real tokens / examples
    aux: Tensor  # () weighted auxiliary loss of the MoE layers
    traces: list  # [MoETrace]
    state: Any = None  # recurrent state carried across batches (LM), else None
    out: Any = None  # task outputs for evaluation (logits, ...)


def get_task(dataset: str, cfg: Any, shard: Shard = SINGLE):
    """The task of `dataset`; `shard`: this process's data-parallel rank, whose share of each batch it yields."""
    from moe_lens.tasks.lm import LMTask
    from moe_lens.tasks.ner import NERTask
    from moe_lens.tasks.qa import QATask

    return {"wikitext2": LMTask, "conll2003": NERTask, "squad": QATask}[dataset](cfg, shard)
