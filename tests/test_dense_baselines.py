"""Issue 18 item 9: dense baselines matched to an MoE's expert FLOPs (`dense_flops`) or weights (`dense_params`)."""
from __future__ import annotations

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

from moe_lens.config import MODES, RunConfig
from moe_lens.moe import MoELayer

D, N = 16, 64


def test_presets_resolve_from_the_moe_they_match() -> None:
    moe = RunConfig.for_mode("noisy_topk")  # the defaults: k = 2, e = 8, h = 128
    for mode, hidden in (("dense_flops", moe.top_k * moe.expert_hidden),
                         ("dense_params", moe.num_experts * moe.expert_hidden)):  # fmt: skip
        cfg = RunConfig.for_mode(mode)
        assert (cfg.router, cfg.num_experts, cfg.top_k, cfg.expert_hidden) == ("dense", 1, 1, hidden)
        assert cfg.dense_match == mode.removeprefix("dense_")
        assert RunConfig.from_dict(cfg.to_dict()) == cfg  # config.json reads back unchanged
        assert cfg.to_dict()["dense_match"] == cfg.dense_match
    assert RunConfig.for_mode("dense_flops", top_k=1, num_experts=4, expert_hidden=64).expert_hidden == 64
    assert RunConfig.for_mode("dense_flops", top_k=3, num_experts=4, expert_hidden=64).expert_hidden == 192
    assert RunConfig.for_mode("dense_params", num_experts=4, expert_hidden=64).expert_hidden == 256
    assert RunConfig.for_mode("dense").expert_hidden == 128 and RunConfig.for_mode("dense").dense_match is None
    with pytest.raises(ValueError, match="top_k=5 > num_experts=4"):
        RunConfig.for_mode("dense_flops", top_k=5, num_experts=4)
    with pytest.raises(ValueError, match="dense_match"):
        RunConfig(dense_match="flops")  # a routed MoE cannot claim to be a dense baseline
    assert {"dense_flops", "dense_params"} <= set(MODES)


def expert_flops(layer: MoELayer, x: torch.Tensor) -> int:
    """Counted matmul FLOPs of one forward, less the router's x W_g (2 n d e; eval: no noise matmul)."""
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        layer(x)
    return counter.get_total_flops() - (2 * x.shape[0] * D * layer.num_experts if layer.num_experts > 1 else 0)


@pytest.mark.parametrize("k,e,h", [(2, 8, 12), (1, 4, 20), (3, 6, 8)])
def test_dense_flops_spends_the_expert_flops_and_dense_params_holds_the_weights(k: int, e: int, h: int) -> None:
    x = torch.randn(N, D)
    moe_cfg = RunConfig.for_mode("topk_mask", top_k=k, num_experts=e, expert_hidden=h, dispatch="loop")
    moe = MoELayer.from_config(moe_cfg, D).eval()
    flops = MoELayer.from_config(RunConfig.for_mode("dense_flops", top_k=k, num_experts=e, expert_hidden=h,
                                                    dispatch="loop"), D).eval()  # fmt: skip
    params = MoELayer.from_config(RunConfig.for_mode("dense_params", top_k=k, num_experts=e, expert_hidden=h,
                                                     dispatch="loop"), D).eval()  # fmt: skip
    assert expert_flops(moe, x) == expert_flops(flops, x) == N * k * 4 * D * h  # two matmuls per assignment
    weights = lambda layer: layer.experts.w1.numel() + layer.experts.w2.numel()  # noqa: E731
    assert weights(params) == weights(moe) == e * 2 * D * h
    assert flops.num_experts == params.num_experts == 1


def test_dense_means_one_expert_everywhere_from_one_fact() -> None:
    """config.DENSE_SHAPE is the one place saying what router 'dense' is: the preset, a RunConfig built with more
    experts (config.json then records the one expert the model has) and a standalone MoELayer all read it."""
    from moe_lens.config import DENSE_SHAPE, MODES
    from moe_lens.moe import MoELayer

    assert DENSE_SHAPE == {"num_experts": 1, "top_k": 1}
    assert {k: MODES["dense"][k] for k in DENSE_SHAPE} == DENSE_SHAPE
    for cfg in (RunConfig.for_mode("dense", num_experts=8, top_k=2), RunConfig(router="dense", num_experts=8, top_k=2)):
        assert (cfg.num_experts, cfg.top_k) == (1, 1) and cfg.to_dict()["num_experts"] == 1
    layer = MoELayer(16, num_experts=8, top_k=2, router="dense", expert_hidden=8)
    assert (layer.num_experts, layer.top_k) == (1, 1)
