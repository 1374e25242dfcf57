"""RunConfig validation: bad values raise ValueError naming the value and the allowed range."""
from __future__ import annotations

import pytest

from moe_lens.config import MODES, RunConfig


@pytest.mark.parametrize(
    "kwargs,needle",
    [
        (dict(top_k=9, num_experts=8), "top_k=9 > num_experts=8; allowed: 1..8"),
        (dict(mode="bogus"), "unknown mode 'bogus'; allowed: dense, naive_topk"),
        (dict(expert_type="conv"), "unknown expert_type 'conv'; allowed: mlp, lora, lowrank, shared"),
        (dict(router="random"), "unknown router 'random'"),
        (dict(rank=0), "rank=0; allowed: an integer >= 1"),
        (dict(rank=-3), "rank=-3"),
        (dict(capacity_factor=0.0), "capacity_factor=0.0; allowed: > 0"),
        (dict(capacity_factor=-1.0), "capacity_factor=-1.0"),
        (dict(num_experts=0, top_k=1), "num_experts=0"),
        (dict(dataset="imagenet"), "unknown dataset 'imagenet'; allowed: wikitext2, conll2003, squad"),
        (dict(router="switch", top_k=2), "top_k=2 with router 'switch'"),
        (dict(router="topk_mask", w_load=0.1), "w_load=0.1 with router 'topk_mask'"),
        (dict(dropout=1.0), "dropout=1.0"),
    ],
)
def test_invalid_configuration_names_value_and_allowed_range(kwargs: dict, needle: str) -> None:
    with pytest.raises(ValueError) as err:
        RunConfig(**kwargs)
    assert needle in str(err.value)


def test_every_mode_builds_and_round_trips() -> None:
    for mode in MODES:
        cfg = RunConfig.for_mode(mode, dataset="conll2003", num_experts=4 if mode != "dense" else 1)
        assert cfg.mode == mode
        assert RunConfig.from_dict({**cfg.to_dict(), "versions": {}}) == cfg


def test_mode_fields_stay_overridable() -> None:
    cfg = RunConfig.for_mode("hybrid", num_experts=16, rank=4, w_switch=0.1, capacity_factor=2.0, noise_eps=0.1)
    assert (cfg.router, cfg.expert_type, cfg.num_experts, cfg.rank, cfg.w_switch) == ("switch", "lora", 16, 4, 0.1)
    with pytest.raises(ValueError, match="unknown mode"):
        RunConfig.for_mode("nope")
