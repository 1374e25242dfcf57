"""The three recurrent models: stacked LSTM layers, some followed by a `moe.MoELayer` with a residual.

`cfg.num_layers` LSTM layers; `cfg.moe_layers` names (1-based) those followed by an MoE layer. The
default (2 layers, MoE after the first) is the model described below, built in the same order, so the
same seed draws the same weights; checkpoints of the one-MoE-layer names (`lstm1`, `moe`, `lstm2`,
`norm`) load through a key-renaming hook.

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
compute on padding. Every forward returns a `ModelOutput(logits, aux_loss, traces, state)`; its
`MoETrace`s hold the routing and its statistics of each MoE layer (`layer` its 0-based index among the MoE layers) with
the token_idx of each routed row and the hidden states that entered the layer, for the Recorder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import Tensor, nn
from torch.nn.utils.rnn import PackedSequence, pack_padded_sequence, pad_packed_sequence

from moe_lens.config import RunConfig
from moe_lens.data.case import CASE_CLASSES
from moe_lens.moe import MoELayer, Routing, RoutingStats

CASE_DIM = 8  # width of the casing-class embedding (cfg.case_features)


@dataclass
class MoETrace:
    layer: int  # the MoE layer's index among the model's MoE layers, 0-based (the traces' `layer` column)
    token_idx: Tensor  # (n,) stream position of each routed row
    routing: Routing  # what the router decided (immutable)
    stats: RoutingStats  # what the layer computed from it: load, importance, dropped, entropy, aux terms
    hidden: Tensor  # (n, d) what entered the MoE layer (detached)
    aux_loss: Tensor | None = None  # () this layer's weighted aux loss (detached)


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


class ModelOutput(NamedTuple):
    """What every model returns. `logits`: (b, t, V) for the LM, (b, t, tags) for the tagger, a pair
    of (b, tc) start and end logits for QA; `aux_loss` () summed over the MoE layers; one MoETrace
    per MoE layer, in depth order; `state` the LM's recurrent state per LSTM layer (None otherwise)."""

    logits: Any
    aux_loss: Tensor
    traces: list[MoETrace]
    state: Any = None


def _rename_old_keys(prefix: str, renames: dict[str, str]):
    """A load_state_dict pre-hook mapping the one-MoE-layer names of older checkpoints (`lstm1.`,
    `moe.`, ...) to the stacked ones (`lstms.0.`, `moes.0.`, ...)."""

    def hook(state_dict, module_prefix, *args) -> None:
        for key in list(state_dict):
            for old, new in renames.items():
                if key.startswith(module_prefix + prefix + old):
                    tail = key[len(module_prefix + prefix + old):]
                    state_dict[module_prefix + prefix + new + tail] = state_dict.pop(key)
                    break

    return hook


_OLD_NAMES = {"lstm1.": "lstms.0.", "lstm2.": "lstms.1.", "moe.": "moes.0.", "norm.": "norms.0."}


class LanguageModel(nn.Module):
    def __init__(self, cfg: RunConfig, vocab_size: int, embedding_init: np.ndarray | None = None) -> None:
        super().__init__()
        self.emb = _embedding(cfg, vocab_size, embedding_init)
        self.drop = nn.Dropout(cfg.dropout)
        self.moe_after = cfg.moe_after()  # 1-based LSTM layers followed by an MoE layer
        self.lstms, self.moes, self.norms = nn.ModuleList(), nn.ModuleList(), nn.ModuleList()
        for i in range(1, cfg.num_layers + 1):  # built in depth order: the default draws today's weights
            self.lstms.append(nn.LSTM(cfg.d_embed if i == 1 else cfg.d_model, cfg.d_model, batch_first=True))
            if i in self.moe_after:
                self.moes.append(MoELayer.from_config(cfg, cfg.d_model, layer=len(self.moes)))
                # LayerNorm after the residual sum: without it the stacked LM stays at the unigram solution
                # (measured: train loss flat at the unigram entropy for a whole epoch, with any residual MLP)
                self.norms.append(nn.LayerNorm(cfg.d_model))
        self.head = nn.Linear(cfg.d_model, vocab_size)
        if cfg.tie_weights:
            if cfg.d_embed != cfg.d_model:
                raise ValueError(f"tie_weights needs d_embed == d_model (got {cfg.d_embed} and {cfg.d_model})")
            self.head.weight = self.emb.weight
        self._register_load_state_dict_pre_hook(_rename_old_keys("", _OLD_NAMES))

    def forward(self, ids: Tensor, token_idx: Tensor, state: tuple | None = None) -> ModelOutput:
        """ids, token_idx (b, t) -> logits (b, t, V), aux_loss, [MoETrace per MoE layer], LSTM state per layer."""
        states = list(state) if state is not None else [None] * len(self.lstms)
        h, aux, traces = self.emb(ids), None, []
        b, t = ids.shape
        for i, lstm in enumerate(self.lstms, start=1):
            h, states[i - 1] = lstm(self.drop(h), states[i - 1])  # (b, t, d)
            if i in self.moe_after:
                j = len(traces)
                flat = h.reshape(b * t, -1)  # (b*t, d)
                # group=t: row i*t + j is in group j, its time step, so routing never looks ahead (moe/layer.py)
                y, layer_aux, routing, stats = self.moes[j](flat, token_ids=ids.reshape(-1), group=t)
                h = self.norms[j](flat + y).reshape(b, t, -1)
                aux = layer_aux if aux is None else aux + layer_aux
                traces.append(MoETrace(j, token_idx.reshape(-1), routing, stats, flat.detach(), layer_aux.detach()))
        return ModelOutput(self.head(self.drop(h)), aux, traces, tuple(states))


class _BiEncoder(nn.Module):
    """Packed BiLSTM layers, some followed by an MoE layer (residual); shared by the tagger and the QA
    model. `run` takes several packed segments (QA: context and question) through the same layers, and
    routes all their tokens in one MoE call per MoE layer."""

    def __init__(self, cfg: RunConfig, d_in: int | None = None) -> None:
        super().__init__()
        h = cfg.d_model
        self.drop = nn.Dropout(cfg.dropout)
        self.moe_after = cfg.moe_after()
        self.lstms, self.moes = nn.ModuleList(), nn.ModuleList()
        for i in range(1, cfg.num_layers + 1):  # d_in: default d_embed
            self.lstms.append(nn.LSTM((d_in or cfg.d_embed) if i == 1 else 2 * h, h, batch_first=True, bidirectional=True))
            if i in self.moe_after:
                self.moes.append(MoELayer.from_config(cfg, 2 * h, layer=len(self.moes)))

    def pack(self, x: Tensor, lengths: Tensor) -> PackedSequence:
        return pack_padded_sequence(x, lengths.cpu(), batch_first=True, enforce_sorted=False)

    def run(self, xs: list[Tensor], lengths: list[Tensor], ids: list[Tensor], idx: list[Tensor]):
        """Padded segments xs[s] (b, t_s, d_in) -> padded outputs [(b, t_s, 2h)], aux_loss, [MoETrace]."""
        ps = [self.lstms[0](self.pack(self.drop(x), ln))[0] for x, ln in zip(xs, lengths)]  # packed (n_s, 2h)
        packed_ids = torch.cat([self.pack(i, ln).data for i, ln in zip(ids, lengths)])  # same row order as p.data
        packed_idx = torch.cat([self.pack(i, ln).data for i, ln in zip(idx, lengths)])
        aux, traces = None, []
        for i in range(1, len(self.lstms) + 1):
            if i > 1:
                ps = [self.lstms[i - 1](_repack(p, self.drop(p.data)))[0] for p in ps]
            if i in self.moe_after:
                j = len(traces)
                x_in = torch.cat([p.data for p in ps])  # (sum n_s, 2h): one MoE call routes every segment
                y, layer_aux, routing, stats = self.moes[j](x_in, token_ids=packed_ids)
                mixed = x_in + y
                ps = [_repack(p, part) for p, part in zip(ps, mixed.split([p.data.shape[0] for p in ps]))]
                aux = layer_aux if aux is None else aux + layer_aux
                traces.append(MoETrace(j, packed_idx, routing, stats, x_in.detach(), layer_aux.detach()))
        outs = [pad_packed_sequence(p, batch_first=True, total_length=x.shape[1])[0] for p, x in zip(ps, xs)]
        return outs, aux, traces


class Tagger(nn.Module):
    def __init__(self, cfg: RunConfig, vocab_size: int, num_tags: int, embedding_init: np.ndarray | None = None):
        super().__init__()
        self.emb = _embedding(cfg, vocab_size, embedding_init)
        # casing embedding, trainable even when the word embedding is frozen; class 0 = padding
        self.case_emb = nn.Embedding(len(CASE_CLASSES), CASE_DIM, padding_idx=0) if cfg.case_features else None
        self.enc = _BiEncoder(cfg, cfg.d_embed + (CASE_DIM if cfg.case_features else 0))
        self.head = nn.Linear(2 * cfg.d_model, num_tags)
        self._register_load_state_dict_pre_hook(_rename_old_keys("enc.", _OLD_NAMES))

    def forward(self, ids: Tensor, token_idx: Tensor, lengths: Tensor, case: Tensor | None = None) -> ModelOutput:
        """ids, token_idx, case (b, t), lengths (b,) -> tag logits (b, t, tags), aux_loss, [MoETrace].

        `case` (casing classes, tasks/ner.py) is required when the model was built with case_features."""
        x = self.emb(ids)  # (b, t, d_embed)
        if self.case_emb is not None:
            if case is None:
                raise ValueError("this Tagger was built with case_features=True; forward needs `case` (b, t)")
            x = torch.cat([x, self.case_emb(case)], dim=-1)  # (b, t, d_embed + CASE_DIM)
        (h,), aux, traces = self.enc.run([x], [lengths], [ids], [token_idx])
        return ModelOutput(self.head(self.enc.drop(h)), aux, traces)


class SpanQA(nn.Module):
    def __init__(self, cfg: RunConfig, vocab_size: int, embedding_init: np.ndarray | None = None):
        super().__init__()
        self.emb = _embedding(cfg, vocab_size, embedding_init)
        self.enc = _BiEncoder(cfg)
        d2 = 2 * cfg.d_model
        self.q_attn = nn.Linear(d2, 1)
        self.w_start, self.w_end = nn.Linear(d2, d2, bias=False), nn.Linear(d2, d2, bias=False)
        self._register_load_state_dict_pre_hook(_rename_old_keys("enc.", _OLD_NAMES))

    def forward(self, c_ids: Tensor, c_idx: Tensor, c_len: Tensor, q_ids: Tensor, q_idx: Tensor,
                q_len: Tensor) -> ModelOutput:
        """Context (b, tc) and question (b, tq) -> (start, end) logits (b, tc), aux_loss, [MoETrace]."""
        (c, q), aux, traces = self.enc.run([self.emb(c_ids), self.emb(q_ids)], [c_len, q_len], [c_ids, q_ids],
                                           [c_idx, q_idx])  # (b, tc, 2h), (b, tq, 2h)
        q_mask = torch.arange(q.shape[1], device=q.device) < q_len.to(q.device).unsqueeze(1)  # (b, tq)
        alpha = self.q_attn(q).squeeze(-1).masked_fill(~q_mask, float("-inf")).softmax(-1)  # (b, tq)
        q_vec = torch.einsum("bt,btd->bd", alpha, q)  # (b, 2h)
        c_mask = torch.arange(c.shape[1], device=c.device) < c_len.to(c.device).unsqueeze(1)  # (b, tc)
        start = torch.einsum("btd,bd->bt", self.w_start(c), q_vec).masked_fill(~c_mask, float("-inf"))
        end = torch.einsum("btd,bd->bt", self.w_end(c), q_vec).masked_fill(~c_mask, float("-inf"))
        return ModelOutput((start, end), aux, traces)


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


__all__ = ["LanguageModel", "Tagger", "SpanQA", "MoETrace", "ModelOutput", "build_model", "count_parameters"]
