"""Named-entity tagging on CoNLL-2003: one label per token, sentences bucketed by length.

Loss: cross-entropy over real tokens (padding label -100 is ignored). Metrics: token accuracy over
real tokens only (the SAiDL 2024 report's accuracy also counted padding) and entity-level F1.

With `cfg.case_features`, each batch also carries `case` (b, t): the casing class of every token
(`CASE_CLASSES`), the word-shape feature of neural NER taggers (Collobert et al. 2011's caps
feature; Chiu & Nichols 2016 use similar classes). GloVe 6B is uncased, so without it a frozen
embedding cannot tell "Apple" from "apple", and every unseen word is the same `<unk>`.
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from moe_lens.data.case import CASE_CLASSES, case_classes, split_cases  # noqa: F401  (re-exported)
from moe_lens.distributed import SINGLE, Shard
from moe_lens.tasks import Forward
from moe_lens.tasks.batching import DistributedBucketSampler, gather_padded
from moe_lens.tasks.metrics import entity_f1

IGNORE = -100


class NERTask:
    name = "ner"

    def __init__(self, cfg, shard: Shard = SINGLE) -> None:
        self.cfg, self.shard = cfg, shard
        self.max_len = cfg.max_len or 128
        self._cases: dict[int, tuple[object, np.ndarray]] = {}  # id(split) -> (split, (n,) classes)

    def cases(self, split) -> np.ndarray:
        """(n,) casing classes of `split`, computed on first use and cached on the task (the split is
        kept in the cache too, so its id cannot be reused by another object)."""
        hit = self._cases.get(id(split))
        if hit is None:
            hit = self._cases[id(split)] = (split, split_cases(split))
        return hit[1]

    def _sequences(self, split) -> tuple[np.ndarray, np.ndarray]:
        """(starts, lengths) of the split's non-empty sentences, capped at max_len."""
        starts = split.seq_offsets[:-1]
        lengths = np.minimum(np.diff(split.seq_offsets), self.max_len)
        keep = lengths > 0
        return starts[keep], lengths[keep]

    def sampler(self, split, *, train: bool, seed: int = 0) -> DistributedBucketSampler:
        """This rank's share of the split's length-bucketed batches; `set_epoch(e)` before each epoch."""
        return DistributedBucketSampler(self._sequences(split)[1], self.cfg.batch_size, self.shard, shuffle=train,
                                        seed=seed)  # fmt: skip

    def batches(self, split, *, train: bool, seed: int = 0, epoch: int = 0,
                sampler: DistributedBucketSampler | None = None) -> Iterator[dict]:
        """The batches `sampler` picks (default: a fresh one, shuffled by `seed`; `epoch` is unused)."""
        starts, lengths = self._sequences(split)
        pad = split.vocab.pad_id if split.vocab.pad_id is not None else 0
        cases = self.cases(split) if self.cfg.case_features else None
        for sel in sampler if sampler is not None else self.sampler(split, train=train, seed=seed):
            s, ln = starts[sel], lengths[sel]
            batch = {
                "ids": torch.from_numpy(gather_padded(split.token_ids, s, ln, pad)),
                "token_idx": torch.from_numpy(gather_padded(np.arange(len(split.token_ids)), s, ln, 0)),
                "labels": torch.from_numpy(gather_padded(split.labels, s, ln, IGNORE)),
                "lengths": torch.from_numpy(ln.astype(np.int64)),
                "ntokens": int(ln.sum()),
            }
            if cases is not None:
                batch["case"] = torch.from_numpy(gather_padded(cases, s, ln, 0))  # (b, t)
            yield batch

    def loss_count(self, batch: dict) -> int:
        """How many tokens the batch's mean task loss averages over (the data-parallel loss weight)."""
        return batch["ntokens"]

    def init_state(self):
        return None

    def forward(self, model, batch: dict, state) -> Forward:
        # logits (b, t, tags); `case` is in the batch only with cfg.case_features
        logits, aux, traces, _ = model(batch["ids"], batch["token_idx"], batch["lengths"], batch.get("case"))
        loss = F.cross_entropy(logits.float().reshape(-1, logits.shape[-1]), batch["labels"].reshape(-1),
                               ignore_index=IGNORE)  # fmt: skip
        return Forward(loss, aux, traces, None, out=logits)

    def eval_update(self, acc: dict, batch: dict, fwd: Forward) -> None:
        real = batch["labels"] != IGNORE  # (b, t)
        acc.setdefault("pred", []).append(fwd.out.argmax(-1)[real])  # (n,) device, no sync
        acc.setdefault("idx", []).append(batch["token_idx"][real])
        acc["loss_sum"] = acc.get("loss_sum", 0.0) + fwd.loss.detach().double() * batch["ntokens"]
        acc["count"] = acc.get("count", 0) + batch["ntokens"]

    def eval_totals(self, acc: dict, split, device: torch.device) -> dict[str, torch.Tensor]:
        """Sums over this rank's batches: the loss, the token count, and the predicted label of every token
        of the split (0 where another rank, or no batch, predicted it: each token is in one rank's batch)."""
        pred = torch.zeros(len(split.labels), dtype=torch.int64, device=device)  # (N,)
        if acc.get("idx"):
            pred[torch.cat(acc["idx"]).to(device)] = torch.cat(acc["pred"]).to(device)
        z = torch.zeros((), dtype=torch.float64, device=device)
        return {"loss_sum": z + acc.get("loss_sum", 0.0), "count": z + acc.get("count", 0), "pred": pred}

    def eval_metrics(self, totals: dict, split) -> dict[str, float]:
        pred = totals["pred"].cpu().numpy()  # tokens past max_len count as predicted label 0
        gold = split.labels
        seq_start = np.zeros(len(gold), dtype=bool)
        seq_start[split.seq_offsets[:-1]] = True
        out = {"loss": float(totals["loss_sum"]) / max(float(totals["count"]), 1.0), "accuracy": 100 * float((gold == pred).mean())}
        out.update(entity_f1(gold, pred, seq_start, split.label_names))
        return out
