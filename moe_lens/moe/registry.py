"""The registries of routers and expert banks: name -> class, the one place a new one is added.

`build_router` and `build_experts` read them; `config.ROUTERS` and `config.EXPERT_TYPES` (the
choices of `--router` / `--expert-type`, torch-free) must equal their keys in order, which
tests/test_moe_registry.py checks. Adding a router is its file, one line in ROUTERS, one name in
config.ROUTERS, and its test; an expert bank the same with EXPERT_BANKS and config.EXPERT_TYPES.

A class receives, by keyword, those of the builder's options that its constructor names, so each
class declares what it reads by its signature (SwitchRouter takes no `noise_eps`). Every
constructor parameter must be one of the builder's options (tests/test_moe_registry.py), so a
parameter renamed on one side fails a test instead of silently taking its default.
"""
from __future__ import annotations

import inspect
from typing import Any

from torch import nn

from moe_lens.moe.banks import LoRAExperts, LowRankExperts, MLPExperts, SharedExperts
from moe_lens.moe.routers import (
    DenseRouter,
    ExpertChoiceRouter,
    HashRouter,
    NoisyTopKRouter,
    Router,
    SwitchRouter,
    TopKMaskRouter,
    TopKRouter,
)
from moe_lens.moe.sigmoid_bias import SigmoidBiasRouter
from moe_lens.moe.ttlora import TTLoRAExperts

ROUTERS: dict[str, type[Router]] = {
    "dense": DenseRouter,  # one expert, gate 1: the LSTM baseline
    "naive_topk": TopKRouter,  # softmax, top-k, not renormalised (SAiDL 2024)
    "topk_mask": TopKMaskRouter,  # softmax, top-k, renormalised
    "noisy_topk": NoisyTopKRouter,  # Shazeer et al. 2017
    "switch": SwitchRouter,  # Fedus et al. 2021
    "expert_choice": ExpertChoiceRouter,  # Zhou et al. 2022
    "hash": HashRouter,  # Roller et al. 2021
    "sigmoid_bias": SigmoidBiasRouter,  # Wang et al. 2024 (moe/sigmoid_bias.py)
}

EXPERT_BANKS: dict[str, type[nn.Module]] = {
    "mlp": MLPExperts,  # Shazeer et al. 2017
    "lora": LoRAExperts,  # shared base + rank-r adapters (Hu et al. 2021)
    "lowrank": LowRankExperts,  # U V factorised experts
    "shared": SharedExperts,  # + an always-on shared expert (DeepSeekMoE)
    "ttlora": TTLoRAExperts,  # shared base + tensor-train adapters (Kunwar et al. 2025; moe/ttlora.py)
}

# The positional arguments every router / bank takes; the builders' other keywords are options.
ROUTER_CORE = ("d",)
BANK_CORE = ("d", "hidden", "num_experts")
# Constructor options no RunConfig field sets: they keep their documented default when built from a config.
# Listed by name, so a renamed option still fails tests/test_moe_registry.py.
UNCONFIGURED = {"load_ema": "sigmoid_bias: beta of the load average its bias update reads (docs/moe.md)"}


def build_router(
    name: str,
    d: int,
    num_experts: int,
    top_k: int,
    *,
    capacity_factor: float | None = None,
    noise_eps: float = 1e-2,
    bias_update_rate: float = 1e-2,
    init: str = "default",
) -> Router:
    """The router named `name` (one of ROUTERS), given the options its constructor names."""
    options = dict(num_experts=num_experts, top_k=top_k, capacity_factor=capacity_factor, noise_eps=noise_eps,
                   bias_update_rate=bias_update_rate, init=init)  # fmt: skip
    cls = _lookup(ROUTERS, "router", name)
    return cls(d, **_taken(cls, options))


def build_experts(
    expert_type: str, d: int, hidden: int, num_experts: int, *, rank: int = 8, train_base: bool = True,
    lora_alpha: float | None = None, tt_rank: int = 4,
) -> nn.Module:
    """The expert bank named `expert_type` (one of EXPERT_BANKS), given the options its constructor names."""
    if rank <= 0:
        raise ValueError(f"rank={rank}; allowed: an integer >= 1")
    if lora_alpha is not None and not lora_alpha > 0:
        raise ValueError(f"lora_alpha={lora_alpha}; allowed: > 0")
    options = dict(rank=rank, train_base=train_base, lora_alpha=lora_alpha, tt_rank=tt_rank)
    cls = _lookup(EXPERT_BANKS, "expert_type", expert_type)
    return cls(d, hidden, num_experts, **_taken(cls, options))


def constructor_options(cls: type, core: tuple[str, ...]) -> list[str]:
    """The constructor parameters of `cls` other than `core`: the options it reads."""
    params = inspect.signature(cls.__init__).parameters
    return [p for p in params if p != "self" and p not in core]


def _taken(cls: type, options: dict[str, Any]) -> dict[str, Any]:
    params = inspect.signature(cls.__init__).parameters
    return {k: v for k, v in options.items() if k in params}


def _lookup(registry: dict[str, type], what: str, name: str) -> type:
    if name not in registry:
        raise ValueError(f"unknown {what} {name!r}; allowed: {', '.join(registry)}")
    return registry[name]


__all__ = ["ROUTERS", "EXPERT_BANKS", "build_router", "build_experts", "constructor_options"]
