"""The three recurrent models, each built around one `moe.MoELayer` with a residual around it.

- `LanguageModel` (WikiText-2): embedding -> LSTM -> MoE (residual, LayerNorm) -> LSTM -> softmax,
  the MoE between stacked LSTM layers as in Shazeer et al. 2017 (sec. 5.1); optional weight tying
  (Press & Wolf 2017). It is causal in every mode: the MoE layer routes each time step's b tokens
  as one group (`group=t`), so expert choice and Switch capacity compare a token only with the
  other tokens of its own step, never with later ones.
- `Tagger` (CoNLL-2003): embedding (optionally GloVe) -> BiLSTM -> MoE -> BiLSTM -> tag head, the
  SAiDL 2024 report's NER model; with `cfg.case_features` a small embedding of each token's casing
  class (tasks/ner.py) is concatenated to the word embedding before the first BiLSTM.
- `SpanQA` (SQuAD 1.1): context and question through the same BiLSTM -> MoE -> BiLSTM; the question
  is pooled by learned attention into q (b, 2h); start/end logits are bilinear scores
  C_j W_start q and C_j W_end q over CONTEXT positions only (DrQA, Chen et al. 2017). Reading the end
  logits from question positions is a known bug of one published implementation; a test guards it.

BiLSTMs run on packed sequences, so the MoE layer sees the packed data: real tokens only, no
compute on padding. Every forward returns `MoETrace`s: the routing of each MoE layer together with
the token_idx of each routed row and the hidden states that entered the layer, for the Recorder.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from moe_lens.config import RunConfig
from moe_lens.moe import MoELayer, Routing
from moe_lens.tasks.ner import CASE_CLASSES

CASE_DIM = 8  # width of the casing-class embedding (cfg.case_features)


@dataclass
class MoETrace:
    layer: int
    token_idx: Tensor  # (n,) stream position of each routed row
    routing: Routing
    hidden: Tensor  # (n, d) what entered the MoE layer (detached)


def _embedding(cfg: RunConfig, vocab_size: int, init: np.ndarray | None) -> nn.Embedding:
    emb = nn.Embedding(vocab_size, cfg.d_embed, padding_idx=None)
    if init is not None:
        if init.shape != (vocab_size, cfg.d_embed):
            raise ValueError(f"embeddings have shape {init.shape}; expected ({vocab_size}, d_embed={cfg.d_embed})")
        emb.weight.data.copy_(torch.from_numpy(init))
    emb.weight.requires_grad_(not cfg.freeze_embeddings)
    return emb


def _repack(p: PackedSequence, data: Tensor) -> PackedSequence:
    return PackedSequence(data, p.batch_sizes, p.sorted_indices, p.unsorted_indices)


class LanguageModel(nn.Module):
    def __init__(self, cfg: RunConfig, vocab_size: int, embedding_init: np.ndarray | None = None) -> None:
        super().__init__()
        self.emb = _embedding(cfg, vocab_size, embedding_init)
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm1 = nn.LSTM(cfg.d_embed, cfg.d_model, batch_first=True)
        self.moe = MoELayer.from_config(cfg, cfg.d_model)
        # LayerNorm after the residual sum: without it the stacked LM stays at the unigram solution
        # (measured: train loss flat at the unigram entropy for a whole epoch, with any residual MLP)
        self.norm = nn.LayerNorm(cfg.d_model)
        self.lstm2 = nn.LSTM(cfg.d_model, cfg.d_model, batch_first=True)
        self.head = nn.Linear(cfg.d_model, vocab_size)
        if cfg.tie_weights:
            if cfg.d_embed != cfg.d_model:
                raise ValueError(f"tie_weights needs d_embed == d_model (got {cfg.d_embed} and {cfg.d_model})")
            self.head.weight = self.emb.weight

    def forward(self, ids: Tensor, token_idx: Tensor, state: tuple | None = None):
        """ids, token_idx (b, t) -> logits (b, t, V), aux_loss, [MoETrace], new LSTM state."""
        s1, s2 = state if state is not None else (None, None)
        h, s1 = self.lstm1(self.drop(self.emb(ids)), s1)  # (b, t, d)
        b, t, d = h.shape
        flat = h.reshape(b * t, d)
        # group=t: row i*t + j is in group j, its time step, so routing never looks ahead (moe/layer.py)
        y, aux, routing = self.moe(flat, token_ids=ids.reshape(-1), group=t)
        h, s2 = self.lstm2(self.drop(self.norm(flat + y).reshape(b, t, d)), s2)
        trace = MoETrace(0, token_idx.reshape(-1), routing, flat.detach())
        return self.head(self.drop(h)), aux, [trace], (s1, s2)


class _BiEncoder(nn.Module):
    """Packed BiLSTM -> MoE (residual) -> BiLSTM; shared by the tagger and the QA model."""

    def __init__(self, cfg: RunConfig, d_in: int | None = None) -> None:
        super().__init__()
        h = cfg.d_model
        self.drop = nn.Dropout(cfg.dropout)
        self.lstm1 = nn.LSTM(d_in or cfg.d_embed, h, batch_first=True, bidirectional=True)  # d_in: default d_embed
        self.moe = MoELayer.from_config(cfg, 2 * h)
        self.lstm2 = nn.LSTM(2 * h, h, batch_first=True, bidirectional=True)

    def pack(self, x: Tensor, lengths: Tensor) -> PackedSequence:
        return pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)

    def first(self, x: Tensor, lengths: Tensor) -> PackedSequence:
        out, _ = self.lstm1(self.pack(self.drop(x), lengths))
        return out  # packed (n, 2h)

    def second(self, p: PackedSequence, total: int) -> Tensor:
        out, _ = self.lstm2(_repack(p, self.drop(p.data)))
        return pad_packed_sequence(out, batch_first=True, total_length=total)[0]  # (b, t, 2h)


class Tagger(nn.Module):
    def __init__(self, cfg: RunConfig, vocab_size: int, num_tags: int, embedding_init: np.ndarray | None = None):
        super().__init__()
        self.emb = _embedding(cfg, vocab_size, embedding_init)
        # casing embedding, trainable even when the word embedding is frozen; class 0 = padding
        self.case_emb = nn.Embedding(len(CASE_CLASSES), CASE_DIM, padding_idx=0) if cfg.case_features else None
        self.enc = _BiEncoder(cfg, cfg.d_embed + (CASE_DIM if cfg.case_features else 0))
        self.head = nn.Linear(2 * cfg.d_model, num_tags)

    def forward(self, ids: Tensor, token_idx: Tensor, lengths: Tensor, case: Tensor | None = None):
        """ids, token_idx, case (b, t), lengths (b,) -> tag logits (b, t, tags), aux_loss, [MoETrace].

        `case` (casing classes, tasks/ner.py) is required when the model was built with case_features."""
        x = self.emb(ids)  # (b, t, d_embed)
        if self.case_emb is not None:
            if case is None:
                raise ValueError("this Tagger was built with case_features=True; forward needs `case` (b, t)")
            x = torch.cat([x, self.case_emb(case)], dim=-1)  # (b, t, d_embed + CASE_DIM)
        p = self.enc.first(x, lengths)
        packed_ids = self.enc.pack(ids, lengths).data  # (n,) same row order as p.data
        packed_idx = self.enc.pack(token_idx, lengths).data
        y, aux, routing = self.enc.moe(p.data, token_ids=packed_ids)
        h = self.enc.second(_repack(p, p.data + y), ids.shape[1])
        trace = MoETrace(0, packed_idx, routing, p.data.detach())
        return self.head(self.enc.drop(h)), aux, [trace]


class SpanQA(nn.Module):
    def __init__(self, cfg: RunConfig, vocab_size: int, embedding_init: np.ndarray | None = None):
        super().__init__()
        self.emb = _embedding(cfg, vocab_size, embedding_init)
        self.enc = _BiEncoder(cfg)
        d2 = 2 * cfg.d_model
        self.q_attn = nn.Linear(d2, 1)
        self.w_start, self.w_end = nn.Linear(d2, d2, bias=False), nn.Linear(d2, d2, bias=False)

    def forward(self, c_ids: Tensor, c_idx: Tensor, c_len: Tensor, q_ids: Tensor, q_idx: Tensor, q_len: Tensor):
        """Context (b, tc) and question (b, tq) -> start, end logits (b, tc), aux_loss, [MoETrace]."""
        pc, pq = self.enc.first(self.emb(c_ids), c_len), self.enc.first(self.emb(q_ids), q_len)
        nc = pc.data.shape[0]
        x_in = torch.cat([pc.data, pq.data])  # (n_c + n_q, 2h): one MoE call routes both segments
        ids = torch.cat([self.enc.pack(c_ids, c_len).data, self.enc.pack(q_ids, q_len).data])
        idx = torch.cat([self.enc.pack(c_idx, c_len).data, self.enc.pack(q_idx, q_len).data])
        y, aux, routing = self.enc.moe(x_in, token_ids=ids)
        x = x_in + y
        c = self.enc.second(_repack(pc, x[:nc]), c_ids.shape[1])  # (b, tc, 2h)
        q = self.enc.second(_repack(pq, x[nc:]), q_ids.shape[1])  # (b, tq, 2h)
        q_mask = torch.arange(q.shape[1], device=q.device) < q_len.to(q.device).unsqueeze(1)  # (b, tq)
        alpha = self.q_attn(q).squeeze(-1).masked_fill(~q_mask, float("-inf")).softmax(-1)  # (b, tq)
        q_vec = torch.einsum("bt,btd->bd", alpha, q)  # (b, 2h)
        c_mask = torch.arange(c.shape[1], device=c.device) < c_len.to(c.device).unsqueeze(1)  # (b, tc)
        start = torch.einsum("btd,bd->bt", self.w_start(c), q_vec).masked_fill(~c_mask, float("-inf"))
        end = torch.einsum("btd,bd->bt", self.w_end(c), q_vec).masked_fill(~c_mask, float("-inf"))
        return start, end, aux, [MoETrace(0, idx, routing, x_in.detach())]


def build_model(cfg: RunConfig, vocab_size: int, *, num_tags: int = 0, embedding_init: np.ndarray | None = None):
    if cfg.dataset == "wikitext2":
        return LanguageModel(cfg, vocab_size, embedding_init)
    if cfg.dataset == "conll2003":
        return Tagger(cfg, vocab_size, num_tags, embedding_init)
    return SpanQA(cfg, vocab_size, embedding_init)


def count_parameters(model: nn.Module) -> dict[str, int]:
    total = sum(p.numel() for p in model.parameters())
    trainable = sum(p.numel() for p in model.parameters() if p.requires_grad)
    return {"num_params": total, "num_trainable": trainable}


__all__ = ["LanguageModel", "Tagger", "SpanQA", "MoETrace", "build_model", "count_parameters"]
