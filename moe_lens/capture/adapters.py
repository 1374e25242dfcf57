"""One small adapter per Hugging Face MoE family, keyed by `config.model_type` (no attribute probing).

An adapter says, for one family and the transformers versions it was tested on:
  - which decoder layers are sparse, by the family's own config rule (`decoder_sparse_step`,
    `mlp_only_layers`, `first_k_dense_replace`, Switch's `encoder_sparse_step`), giving the real layer index;
  - where the router module sits in such a layer, and the class it must be (checked by name, so a
    transformers release that moves it fails loudly instead of recording something else);
  - how to read the router module's OWN output into (expert, gate, dropped): the experts and combine weights the
    model passes to its experts. Top-k is never recomputed from logits (DeepSeek-V3 selects on sigmoid + a
    correction bias within group limits; GPT-OSS and Granite take top-k of raw logits, then softmax over k);
  - the router's full distribution as the model defines it (for `entropy` and `router_probs`):
    softmax of the logits, except DeepSeek-V3: its sigmoid scores normalised to sum 1.

Shapes: n tokens (batch x time, flattened), e experts, k experts per token.
The table of families and tested versions is docs/capture.md (it is generated from ADAPTERS in a test).
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import torch
from torch import nn

TESTED = ">=5.25,<6"  # transformers releases these adapters are tested on (CI: 5.25.0); pyproject [hf] pins it


class Routed(NamedTuple):
    """What one sparse layer's router decided for n tokens."""

    expert: torch.Tensor  # (n, k) int64: the experts whose outputs the model combined
    gate: torch.Tensor  # (n, k) float32: the weight each expert output was multiplied by
    dropped: torch.Tensor | None  # (n, k) bool: over capacity (Switch), its expert never ran; None: never
    probs: torch.Tensor  # (n, e) float32: the router's full distribution (entropy, --record-probs)


@dataclass(frozen=True)
class Adapter:
    model_type: str
    versions: str  # tested transformers range
    sparse: Callable[[Any, int], bool]  # (config, layer index) -> the layer has an MoE block
    layers: Callable[[nn.Module], nn.ModuleList]  # the decoder (Switch: encoder) layers
    router: Callable[[nn.Module], nn.Module]  # one layer -> its router module
    router_class: str  # the router's class name, checked
    read: Callable[[Any], Routed]  # the router module's output -> Routed
    num_experts: Callable[[Any], int]
    top_k: Callable[[Any], int]
    shared_gate: Callable[[nn.Module], nn.Module] | None = None  # layer -> Linear whose sigmoid gates a shared expert
    encoder_only: bool = False  # Switch: run the encoder side only
    note: str = ""


def _softmax(logits: torch.Tensor) -> torch.Tensor:
    return torch.softmax(logits.float().reshape(-1, logits.shape[-1]), dim=-1)  # (n, e)


def _topk_triple(out: tuple) -> Routed:
    """Routers returning (router_logits, top_k_weights, top_k_index): Mixtral, Qwen2/3-MoE, OLMoE, Granite, GPT-OSS."""
    logits, weights, index = out
    return Routed(index.reshape(-1, index.shape[-1]), weights.float().reshape(-1, weights.shape[-1]), None,
                  _softmax(logits))


def _deepseek(out: tuple) -> Routed:
    """DeepSeek-V3: the selection used sigmoid + e_score_correction_bias with group limits; the weights are the
    unbiased sigmoid scores (normalised over k if norm_topk_prob) times routed_scaling_factor, as passed on."""
    logits, weights, index = out
    scores = torch.sigmoid(logits.float().reshape(-1, logits.shape[-1]))  # (n, e)
    return Routed(index.reshape(-1, index.shape[-1]), weights.float().reshape(-1, weights.shape[-1]), None,
                  scores / scores.sum(-1, keepdim=True))


def _switch(out: tuple) -> Routed:
    """Switch top-1: a one-hot dispatch mask with over-capacity tokens zeroed, the max probability, the logits.
    A dropped token's expert is the router's argmax (the one whose capacity refused it; Switch's own rule)."""
    mask, top_prob, logits = out  # (b, t, e), (b, t, 1), (b, t, e)
    e = mask.shape[-1]
    mask = mask.reshape(-1, e)
    dropped = mask.sum(-1) == 0  # (n,)
    expert = torch.where(dropped, logits.reshape(-1, e).argmax(-1), mask.argmax(-1))  # (n,)
    return Routed(expert[:, None], top_prob.float().reshape(-1, 1), dropped[:, None], _softmax(logits))


def _every_layer(config: Any, i: int) -> bool:
    return True


def _qwen_sparse(config: Any, i: int) -> bool:  # Qwen2MoeDecoderLayer / Qwen3MoeDecoderLayer __init__
    return i not in config.mlp_only_layers and config.num_experts > 0 and (i + 1) % config.decoder_sparse_step == 0


def _deepseek_sparse(config: Any, i: int) -> bool:  # DeepseekV3DecoderLayer __init__
    return i >= config.first_k_dense_replace


def _switch_sparse(config: Any, i: int) -> bool:  # SwitchTransformersStack __init__, encoder side
    step = config.encoder_sparse_step
    return (i % step == 1 or step == 1) if step > 0 else False


def _decoder_layers(model: nn.Module) -> nn.ModuleList:
    return model.base_model.layers


def _num_local(config: Any) -> int:
    return config.num_local_experts


def _num_experts(config: Any) -> int:
    return config.num_experts


def _n_routed(config: Any) -> int:
    return config.n_routed_experts


def _per_tok(config: Any) -> int:
    return config.num_experts_per_tok


_V5 = TESTED
ADAPTERS: dict[str, Adapter] = {a.model_type: a for a in [
    Adapter("mixtral", _V5, _every_layer, _decoder_layers, lambda layer: layer.mlp.gate, "MixtralTopKRouter",
            _topk_triple, _num_local, _per_tok, note="softmax, top-k, renormalised over k"),
    Adapter("qwen2_moe", _V5, _qwen_sparse, _decoder_layers, lambda layer: layer.mlp.gate, "Qwen2MoeTopKRouter",
            _topk_triple, _num_experts, _per_tok, shared_gate=lambda layer: layer.mlp.shared_expert_gate,
            note="softmax, top-k (renormalised if norm_topk_prob); shared expert gated by sigmoid"),
    Adapter("qwen3_moe", _V5, _qwen_sparse, _decoder_layers, lambda layer: layer.mlp.gate, "Qwen3MoeTopKRouter",
            _topk_triple, _num_experts, _per_tok, note="softmax, top-k (renormalised if norm_topk_prob)"),
    Adapter("olmoe", _V5, _every_layer, _decoder_layers, lambda layer: layer.mlp.gate, "OlmoeTopKRouter",
            _topk_triple, _num_experts, _per_tok, note="softmax, top-k (renormalised if norm_topk_prob)"),
    Adapter("deepseek_v3", _V5, _deepseek_sparse, _decoder_layers, lambda layer: layer.mlp.gate,
            "DeepseekV3TopkRouter", _deepseek, _n_routed, _per_tok,
            note="sigmoid + correction bias, group-limited top-k, x routed_scaling_factor; probs: sigmoid / sum"),
    Adapter("gpt_oss", _V5, _every_layer, _decoder_layers, lambda layer: layer.mlp.router, "GptOssTopKRouter",
            _topk_triple, _num_local, _per_tok, note="top-k of raw logits, softmax over k"),
    Adapter("granitemoe", _V5, _every_layer, _decoder_layers, lambda layer: layer.block_sparse_moe.router,
            "GraniteMoeTopKRouter", _topk_triple, _num_local, _per_tok, note="top-k of raw logits, softmax over k"),
    Adapter("switch_transformers", _V5, _switch_sparse, lambda model: model.get_encoder().block,
            lambda layer: layer.layer[-1].mlp.router, "SwitchTransformersTop1Router", _switch, _num_experts,
            lambda config: 1, encoder_only=True, note="encoder side; top-1 argmax with expert capacity (dropped)"),
]}  # fmt: skip


def sparse_layers(model: nn.Module, adapter: Adapter) -> list[tuple[int, nn.Module]]:
    """(real layer index, router module) of each sparse layer; the router's class is checked by name."""
    config = model.config
    out = []
    for i, layer in enumerate(adapter.layers(model)):
        if not adapter.sparse(config, i):
            continue
        router = adapter.router(layer)
        if type(router).__name__ != adapter.router_class:
            raise RuntimeError(f"{adapter.model_type} layer {i}: router is {type(router).__name__}, expected "
                               f"{adapter.router_class} (transformers layout outside the tested range {adapter.versions})")
        out.append((i, router))
    return out
