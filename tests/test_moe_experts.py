"""Issue 18: LoRA's alpha / r scaling (Hu et al. 2021) and the low-rank experts' initial variance."""
from __future__ import annotations

import math

import pytest
import torch

from moe_lens.config import MODES, RunConfig
from moe_lens.moe import MoELayer
from moe_lens.moe.banks import LowRankExperts, MLPExperts


def hand_worked_lora(dispatch: str) -> MoELayer:
    """d = h = 2, r = 1, alpha = 2: scale 2; identity base, A1 = [1, 0]^T, B1 = [1, 1], A2 = [0, 1]^T,
    B2 = [1, -1]."""
    layer = MoELayer(2, router="dense", expert_type="lora", expert_hidden=2, rank=1, lora_alpha=2.0, dispatch=dispatch)
    ex = layer.experts
    with torch.no_grad():
        for lin in (ex.base1, ex.base2):
            lin.weight.copy_(torch.eye(2))
            lin.bias.zero_()
        ex.a1.copy_(torch.tensor([[[1.0], [0.0]]]))
        ex.b1.copy_(torch.tensor([[[1.0, 1.0]]]))
        ex.a2.copy_(torch.tensor([[[0.0], [1.0]]]))
        ex.b2.copy_(torch.tensor([[[1.0, -1.0]]]))
    return layer


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_lora_update_is_scaled_by_alpha_over_r(dispatch: str) -> None:
    # x = (1, 2): pre = x + 2 * (x . A1) B1 = (1, 2) + 2 * (1, 1) = (3, 4) = h (all > 0)
    #             y = h + 2 * (h . A2) B2 = (3, 4) + 2 * 4 * (1, -1) = (11, -4)
    # x = (-1, 1): pre = (-1, 1) - 2 * (1, 1) = (-3, -1), h = 0, y = 0
    # x = (0.5, -1): pre = (0.5, -1) + (1, 1) = (1.5, 0) = h, h . A2 = 0, y = (1.5, 0)
    layer = hand_worked_lora(dispatch)
    x = torch.tensor([[1.0, 2.0], [-1.0, 1.0], [0.5, -1.0]])
    y = layer(x).y
    torch.testing.assert_close(y, torch.tensor([[11.0, -4.0], [0.0, 0.0], [1.5, 0.0]]))
    assert layer.dispatch_for(x) == dispatch


def test_lora_alpha_is_read_from_the_config_and_the_presets_keep_scale_one() -> None:
    for mode in ("lora", "hybrid"):
        cfg = RunConfig.for_mode(mode)
        assert cfg.lora_alpha == cfg.rank == 8
        assert MoELayer.from_config(cfg, 16).experts.scale == 1.0
    cfg = RunConfig.for_mode("lora", rank=4, lora_alpha=8)
    assert MoELayer.from_config(cfg, 16).experts.scale == 2.0
    with pytest.raises(ValueError, match="lora_alpha"):
        MoELayer(4, expert_type="lora", lora_alpha=0.0)


def test_lowrank_product_starts_at_the_mlp_weight_variance() -> None:
    torch.manual_seed(0)
    d, h, e, r = 64, 128, 8, 32
    low, mlp = LowRankExperts(d, h, e, r), MLPExperts(d, h, e)
    with torch.no_grad():
        w1, w2 = low.u1 @ low.v1, low.u2 @ low.v2  # (e, d, h), (e, h, d)
    for w, ref, fan_in in ((w1, mlp.w1, d), (w2, mlp.w2, h)):
        want = 1 / math.sqrt(3 * fan_in)  # std of U(-1/sqrt(f), 1/sqrt(f))
        assert w.std().item() == pytest.approx(want, rel=0.05)
        assert ref.std().item() == pytest.approx(want, rel=0.05)
    assert "lowrank" in MODES
