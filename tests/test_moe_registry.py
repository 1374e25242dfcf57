"""The router and expert-bank registries (moe/registry.py) against the config's choices, and the
layer's config parameters (`MoELayer.from_config`) against RunConfig."""
from __future__ import annotations

import inspect

import pytest
import torch

from moe_lens import config
from moe_lens.moe import registry


def test_config_choices_are_the_registry_keys_in_order() -> None:
    assert config.ROUTERS == tuple(registry.ROUTERS)
    assert config.EXPERT_TYPES == tuple(registry.EXPERT_BANKS)
    assert config.CHOICES["router"] == tuple(registry.ROUTERS)
    assert config.CHOICES["expert_type"] == tuple(registry.EXPERT_BANKS)


def test_every_constructor_parameter_is_a_builder_option() -> None:
    """A class reads the builder options its constructor names; a parameter the builder does not pass
    (renamed on one side) would silently keep its default, so it fails here."""
    router_options = set(inspect.signature(registry.build_router).parameters) - {"name", "d"}
    bank_options = set(inspect.signature(registry.build_experts).parameters) - {"expert_type", *registry.BANK_CORE}
    for name, cls in registry.ROUTERS.items():
        extra = set(registry.constructor_options(cls, registry.ROUTER_CORE)) - router_options
        assert not extra, f"router {name}: {cls.__name__} takes {extra}, which build_router never passes"
    for name, cls in registry.EXPERT_BANKS.items():
        extra = set(registry.constructor_options(cls, registry.BANK_CORE)) - bank_options
        assert not extra, f"expert bank {name}: {cls.__name__} takes {extra}, which build_experts never passes"


@pytest.mark.parametrize("name", list(registry.ROUTERS))
def test_build_router_gives_the_registered_class_with_its_options(name: str) -> None:
    r = registry.build_router(name, 6, 4, 2, capacity_factor=1.5, noise_eps=0.05, bias_update_rate=0.2, init="zeros")
    assert type(r) is registry.ROUTERS[name]
    if name == "noisy_topk":
        assert r.noise_eps == 0.05
    if name in ("switch", "expert_choice"):
        assert r.capacity_factor == 1.5
    if name == "sigmoid_bias":
        assert r.bias_update_rate == 0.2
    if hasattr(r, "w_gate"):
        assert not r.w_gate.weight.any()  # init="zeros" reached the router
    assert registry.build_router("topk_mask", 6, 4, 2).renormalize and not registry.build_router(
        "naive_topk", 6, 4, 2).renormalize  # fmt: skip
    assert registry.build_router("expert_choice", 6, 4, 4).capacity_factor == 2.0  # None: Zhou et al.'s c = 2


@pytest.mark.parametrize("name", list(registry.EXPERT_BANKS))
def test_build_experts_gives_the_registered_class_with_its_options(name: str) -> None:
    bank = registry.build_experts(name, 8, 6, 3, rank=2, train_base=False, lora_alpha=4.0, tt_rank=5)
    assert type(bank) is registry.EXPERT_BANKS[name] and bank.num_experts == 3
    if name == "lora":
        assert bank.scale == 2.0 and not bank.base1.weight.requires_grad
    if name == "lowrank":
        assert bank.u1.shape == (3, 8, 2)
    if name == "ttlora":
        core = bank.cores1[1]  # (e, r, n, r)
        assert (core.shape[1], core.shape[3]) == (5, 5) and not bank.base1.weight.requires_grad
    assert bank.split()[0](torch.zeros(1, 8)).shape == (1, 8)


def test_unknown_names_raise_naming_the_allowed_ones() -> None:
    with pytest.raises(ValueError, match=r"unknown router 'top2'; allowed: dense, naive_topk, .*sigmoid_bias$"):
        registry.build_router("top2", 4, 4, 2)
    with pytest.raises(ValueError, match=r"unknown expert_type 'moe'; allowed: mlp, lora, lowrank, shared, ttlora$"):
        registry.build_experts("moe", 4, 4, 2)
