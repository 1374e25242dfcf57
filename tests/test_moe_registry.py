"""The router and expert-bank registries (moe/registry.py) against the config's choices, and the
layer's config parameters (`MoELayer.from_config`) against RunConfig."""
from __future__ import annotations

import dataclasses
import inspect
from types import SimpleNamespace

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
    router_options = set(inspect.signature(registry.build_router).parameters) - {"name", "d"} | set(registry.UNCONFIGURED)
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


def test_from_config_reads_every_layer_parameter_from_the_config() -> None:
    from moe_lens.moe import MoELayer

    fields = {f.name for f in dataclasses.fields(config.RunConfig)}
    assert set(MoELayer.config_fields()) <= fields
    assert {"router", "noise_eps", "tt_rank", "bias_update_rate", "dispatch"} <= set(MoELayer.config_fields())
    cfg = config.RunConfig.for_mode("switch", num_experts=5, expert_hidden=7, capacity_factor=2.5, w_z=0.3)
    layer = MoELayer.from_config(cfg, 6, layer=2)
    assert (layer.layer, layer.num_experts, layer.router.capacity_factor, layer.weights["z"]) == (2, 5, 2.5, 0.3)
    assert layer.experts.w1.shape == (5, 6, 7)


def test_from_config_raises_naming_a_missing_field() -> None:
    """The old `if hasattr(cfg, n)` silently dropped a field the config lacked (a rename)."""
    from moe_lens.moe import MoELayer

    cfg = {f.name: getattr(config.RunConfig(), f.name) for f in dataclasses.fields(config.RunConfig)}
    del cfg["noise_eps"], cfg["tt_rank"]
    with pytest.raises(AttributeError, match=r"^MoELayer.from_config: SimpleNamespace has no field noise_eps, "
                                             r"tt_rank \(every MoELayer parameter"):
        MoELayer.from_config(SimpleNamespace(**cfg), 8)


def test_layer_defaults_are_runconfig_defaults() -> None:
    """Each MoELayer default equals RunConfig's default of the same name (so a standalone layer and the
    default model agree). lora_alpha is the one documented difference: the layer's None means
    alpha = rank, which gives the same LoRA scale as RunConfig's 8.0 at RunConfig's default rank."""
    from moe_lens.moe import MoELayer
    from moe_lens.moe.layer import DISPATCHES

    run = {f.name: f.default for f in dataclasses.fields(config.RunConfig)}
    params = inspect.signature(MoELayer.__init__).parameters
    for name in MoELayer.config_fields():
        if name == "lora_alpha":
            continue
        assert params[name].default == run[name], f"MoELayer {name}={params[name].default!r}, RunConfig {run[name]!r}"
    assert params["lora_alpha"].default is None
    lora = dict(expert_type="lora", expert_hidden=4)
    cfg = config.RunConfig(**lora)
    assert MoELayer(8, **lora).experts.scale == MoELayer.from_config(cfg, 8).experts.scale == 1.0
    assert DISPATCHES == config.CHOICES["dispatch"]


# builder/constructor parameter -> the RunConfig field it carries, where the names differ
_CONFIG_NAME = {"init": "router_init", "train_base": "lora_train_base"}
# (owner, parameter) whose default differs from RunConfig's on purpose
_OWN_DEFAULT = {
    ("DenseRouter", "num_experts"),  # dense is one expert whatever it is given
    ("ExpertChoiceRouter", "capacity_factor"),  # Zhou et al.'s c = 2; RunConfig's None means "no capacity"
    ("LoRAExperts", "lora_alpha"), ("build_experts", "lora_alpha"),  # None: alpha = rank (see above)
}


def test_builder_and_class_defaults_are_runconfig_defaults() -> None:
    """noise_eps = 1e-2 was written four times: every default of a builder or registered class that
    carries a RunConfig field equals RunConfig's, apart from the documented _OWN_DEFAULT."""
    run = {f.name: f.default for f in dataclasses.fields(config.RunConfig)}
    owners = [registry.build_router, registry.build_experts, *registry.ROUTERS.values(),
              *registry.EXPERT_BANKS.values()]  # fmt: skip
    checked = 0
    for owner in owners:
        fn = owner.__init__ if isinstance(owner, type) else owner
        for name, p in inspect.signature(fn).parameters.items():
            field = _CONFIG_NAME.get(name, name)
            if p.default is inspect.Parameter.empty or field not in run or (owner.__name__, name) in _OWN_DEFAULT:
                continue
            assert p.default == run[field], f"{owner.__name__}({name}={p.default!r}), RunConfig {field}={run[field]!r}"
            checked += 1
    assert checked >= 10
