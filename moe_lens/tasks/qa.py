"""Extractive span QA on SQuAD 1.1: question + context in, start/end over context positions out.

Examples are bucketed by context length; context and question are each capped at `max_len`
(256 by default, the SAiDL 2024 setup). Training drops examples whose answer lies past the cap.
Loss: CE(start) + CE(end). Decoding: the span (i, j), i <= j < i + 15, maximising
log p_start(i) + log p_end(j) (DrQA). Metrics: official EM/F1 on the answer text, and exact
start/end accuracy (both boundaries right, the SAiDL report's accuracy).
"""
from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import torch
import torch.nn.functional as F

from moe_lens.data.squad_eval import span_text
from moe_lens.distributed import SINGLE, Shard
from moe_lens.tasks import Forward
from moe_lens.tasks.batching import DistributedBucketSampler, gather_padded
from moe_lens.tasks.metrics import squad_scores

MAX_ANSWER = 15


class QATask:
    name = "qa"

    def __init__(self, cfg, shard: Shard = SINGLE) -> None:
        self.cfg, self.shard = cfg, shard
        self.max_len = cfg.max_len or 256

    def _examples(self, split, train: bool) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(examples, c_len, q_len): the usable examples' indices and every example's capped lengths."""
        x = split.extras
        c_len = np.minimum(x["c_end"] - x["c_start"], self.max_len)
        q_len = np.minimum(x["q_end"] - x["q_start"], self.max_len)
        ok = (c_len > 0) & (q_len > 0)
        if train:
            ok &= x["ans_end"] < c_len  # the answer must lie inside the capped context
        return np.flatnonzero(ok), c_len, q_len

    def sampler(self, split, *, train: bool, seed: int = 0) -> DistributedBucketSampler:
        """This rank's share of the split's batches, bucketed by context length; `set_epoch(e)` before each epoch."""
        examples, c_len, _ = self._examples(split, train)
        return DistributedBucketSampler(c_len[examples], self.cfg.batch_size, self.shard, shuffle=train, seed=seed)

    def batches(self, split, *, train: bool, seed: int = 0, epoch: int = 0,
                sampler: DistributedBucketSampler | None = None) -> Iterator[dict]:
        """The batches `sampler` picks (default: a fresh one, shuffled by `seed`; `epoch` is unused)."""
        x = split.extras
        examples, c_len, q_len = self._examples(split, train)
        pad = split.vocab.pad_id if split.vocab.pad_id is not None else 0
        positions = np.arange(len(split.token_ids))
        for sel in sampler if sampler is not None else self.sampler(split, train=train, seed=seed):
            ex = examples[sel]
            cs, cl, qs, ql = x["c_start"][ex], c_len[ex], x["q_start"][ex], q_len[ex]
            yield {
                "c_ids": torch.from_numpy(gather_padded(split.token_ids, cs, cl, pad)),
                "c_idx": torch.from_numpy(gather_padded(positions, cs, cl, 0)),
                "c_len": torch.from_numpy(cl.astype(np.int64)),
                "q_ids": torch.from_numpy(gather_padded(split.token_ids, qs, ql, pad)),
                "q_idx": torch.from_numpy(gather_padded(positions, qs, ql, 0)),
                "q_len": torch.from_numpy(ql.astype(np.int64)),
                "start": torch.from_numpy(np.minimum(x["ans_start"][ex], cl - 1)),
                "end": torch.from_numpy(np.minimum(x["ans_end"][ex], cl - 1)),
                "example": torch.from_numpy(ex),
                "ntokens": int(cl.sum() + ql.sum()),
            }

    def loss_count(self, batch: dict) -> int:
        """How many examples the batch's mean task loss averages over (the data-parallel loss weight)."""
        return int(batch["c_len"].shape[0])

    def init_state(self):
        return None

    def forward(self, model, batch: dict, state) -> Forward:
        (start, end), aux, traces, _ = model(batch["c_ids"], batch["c_idx"], batch["c_len"],
                                             batch["q_ids"], batch["q_idx"], batch["q_len"])  # fmt: skip
        loss = F.cross_entropy(start.float(), batch["start"]) + F.cross_entropy(end.float(), batch["end"])
        return Forward(loss, aux, traces, None, out=(start, end))

    def eval_update(self, acc: dict, batch: dict, fwd: Forward) -> None:
        i, j = decode(*fwd.out)
        acc.setdefault("i", []).append(i)
        acc.setdefault("j", []).append(j)
        acc.setdefault("ex", []).append(batch["example"])
        acc.setdefault("exact", []).append((i == batch["start"].to(i.device)) & (j == batch["end"].to(j.device)))
        n = batch["c_len"].shape[0]
        acc["loss_sum"] = acc.get("loss_sum", 0.0) + fwd.loss.detach().double() * n
        acc["count"] = acc.get("count", 0) + n

    def eval_totals(self, acc: dict, split, device: torch.device) -> dict[str, torch.Tensor]:
        """Sums over this rank's batches: the loss, the example count, and per example of the split its
        decoded (i, j), whether it was evaluated, and whether both boundaries were exact (0 elsewhere)."""
        n = len(split.extras["c_start"])
        out = {k: torch.zeros(n, dtype=torch.int64, device=device) for k in ("i", "j", "seen", "exact")}
        if acc.get("ex"):
            ex = torch.cat(acc["ex"]).to(device)  # (m,) example ids, each in one rank's batch
            out["i"][ex], out["j"][ex] = torch.cat(acc["i"]).to(device), torch.cat(acc["j"]).to(device)
            out["seen"][ex], out["exact"][ex] = 1, torch.cat(acc["exact"]).to(device).long()
        z = torch.zeros((), dtype=torch.float64, device=device)
        return {**out, "loss_sum": z + acc.get("loss_sum", 0.0), "count": z + acc.get("count", 0)}

    def eval_metrics(self, totals: dict, split) -> dict[str, float]:
        t = {k: v.cpu().numpy() for k, v in totals.items()}
        ex = np.flatnonzero(t["seen"])  # the evaluated examples
        x = split.extras
        preds = []
        for e in ex:  # one string slice per example, not per token
            preds.append(span_text(x["contexts"][e], x["char_offsets"][e], t["i"][e], t["j"][e]))
        out = squad_scores(preds, [x["answers"][e] for e in ex])
        out["exact_span"] = 100 * float(t["exact"][ex].mean()) if len(ex) else 0.0
        out["loss"] = float(t["loss_sum"]) / max(float(t["count"]), 1.0)
        return out


def decode(start: torch.Tensor, end: torch.Tensor, max_answer: int = MAX_ANSWER) -> tuple[torch.Tensor, torch.Tensor]:
    """(b, t) start/end logits -> (b,) best i, (b,) best j with i <= j < i + max_answer."""
    t = start.shape[1]
    score = start.float().log_softmax(-1).unsqueeze(2) + end.float().log_softmax(-1).unsqueeze(1)  # (b, t, t)
    band = torch.ones(t, t, dtype=torch.bool, device=start.device).triu().tril(max_answer - 1)
    score = score.masked_fill(~band, float("-inf")).reshape(start.shape[0], -1)
    best = score.argmax(-1)
    return best // t, best % t
