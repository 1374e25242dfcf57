"""Gate properties of each router, noise only in training, gradients reaching every router."""
from __future__ import annotations

import pytest
import torch

from moe_lens.config import MODES, RunConfig
from moe_lens.moe import MoELayer, build_router

D, E = 12, 6


def x_(n: int = 50, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, D, generator=torch.Generator().manual_seed(seed))


def test_naive_topk_keeps_softmax_probabilities_without_renormalising() -> None:
    r = build_router("naive_topk", D, E, 2).eval()
    x = x_()
    out = r(x)
    probs = torch.softmax(x @ r.w_gate.weight.t(), dim=-1)
    torch.testing.assert_close(out.router_probs, probs)
    torch.testing.assert_close(out.gate, probs.topk(2).values)
    assert torch.all(out.gate.sum(-1) < 1)


def test_topk_mask_renormalises_the_kept_probabilities() -> None:
    r = build_router("topk_mask", D, E, 3).eval()
    x = x_()
    out = r(x)
    torch.testing.assert_close(out.gate.sum(-1), torch.ones(50))
    top = torch.softmax(x @ r.w_gate.weight.t(), -1).topk(3).values
    torch.testing.assert_close(out.gate, top / top.sum(-1, keepdim=True))


def test_noisy_topk_softmax_after_topk_and_noise_only_in_training() -> None:
    r = build_router("noisy_topk", D, E, 2)
    with torch.no_grad():
        r.w_noise.weight.normal_()
    x = x_()
    r.eval()
    a, b = r(x), r(x)
    assert torch.equal(a.expert_idx, b.expert_idx) and torch.equal(a.gate, b.gate)  # eval deterministic
    clean = x @ r.w_gate.weight.t()
    top = clean.topk(2)
    torch.testing.assert_close(a.gate, torch.softmax(top.values, -1))  # softmax over the kept logits
    torch.testing.assert_close(a.expert_idx, top.indices)
    assert a.load_prob is None
    r.train()
    c, d = r(x), r(x)
    assert not torch.equal(c.gate, d.gate)  # noise in training
    torch.testing.assert_close(c.gate.sum(-1), torch.ones(50))
    assert c.load_prob.shape == (50, E)


@pytest.mark.parametrize("router,k", [("naive_topk", 2), ("topk_mask", 3), ("noisy_topk", 2), ("switch", 1), ("hash", 1)])
def test_k_distinct_experts_in_range(router: str, k: int) -> None:
    r = build_router(router, D, E, k).train()
    out = r(x_(80), token_ids=torch.arange(80))
    assert out.expert_idx.shape == (80, k) and out.gate.shape == (80, k)
    assert out.expert_idx.min() >= 0 and out.expert_idx.max() < E
    assert all(len(set(row.tolist())) == k for row in out.expert_idx)
    assert torch.all(out.gate >= 0)


def test_switch_gate_is_the_router_probability_not_one() -> None:
    r = build_router("switch", D, E, 1).eval()
    x = x_()
    out = r(x)
    probs = torch.softmax(x @ r.w_gate.weight.t(), -1)
    torch.testing.assert_close(out.gate[:, 0], probs.max(-1).values)
    assert torch.all(out.gate < 1)


def test_expert_choice_each_expert_takes_its_top_c_tokens() -> None:
    r = build_router("expert_choice", D, E, E, capacity_factor=2.0).eval()
    x = x_(30)
    out = r(x)
    c = 10  # ceil(2 * 30 / 6)
    token, expert, gate = out.assign
    assert token.shape == (E * c,)
    probs = torch.softmax(x @ r.w_gate.weight.t(), -1)
    for i in range(E):
        chosen = token[expert == i]
        assert set(chosen.tolist()) == set(probs[:, i].topk(c).indices.tolist())
        torch.testing.assert_close(gate[expert == i], probs[chosen, i])
    assert out.expert_idx.shape == (30, E)
    assert int((out.expert_idx >= 0).sum()) == E * c


def test_hash_router_is_a_fixed_function_of_the_token_id() -> None:
    r = build_router("hash", D, E, 1)
    ids = torch.tensor([5, 17, 5, 99, 17])
    a = r(x_(5), ids).expert_idx[:, 0]
    b = r(x_(5, seed=9), ids).expert_idx[:, 0]  # other hidden states, same ids
    assert torch.equal(a, b) and a[0] == a[2] and a[1] == a[4]
    many = r(x_(6000), torch.arange(6000)).expert_idx[:, 0]
    assert torch.bincount(many, minlength=E).min() > 800  # spreads ids evenly
    with pytest.raises(ValueError, match="token_ids"):
        r(x_(5))


ROUTED_MODES = sorted(m for m in MODES if MODES[m]["router"] not in ("dense", "hash"))  # hash and dense learn no router


@pytest.mark.parametrize("mode", ROUTED_MODES)
def test_task_gradient_reaches_the_router_in_every_mode(mode: str) -> None:
    """Only the task loss (aux weights 0): top-1 modes included, the router must get gradient."""
    cfg = RunConfig.for_mode(mode, w_importance=0.0, w_load=0.0, w_switch=0.0, w_z=0.0, capacity_factor=None)
    torch.manual_seed(0)
    layer = MoELayer.from_config(cfg, D).train()
    if cfg.expert_type == "lora":
        torch.nn.init.normal_(layer.experts.b1, std=0.5)  # LoRA B=0 at init makes all experts equal
    out = layer(x_())
    (out.y * torch.randn_like(out.y)).sum().backward()
    grad = layer.router.w_gate.weight.grad
    assert grad is not None and grad.abs().sum() > 0


def test_topk_mask_with_k1_has_constant_gates() -> None:
    """Documented consequence of renormalising one gate: it is 1.0, so the router gets no task gradient."""
    out = build_router("topk_mask", D, E, 1)(x_())
    torch.testing.assert_close(out.gate, torch.ones(50, 1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_top_k_equals_torch_topk_in_values_indices_and_gradient(k: int) -> None:
    from moe_lens.moe.routers import top_k

    t = torch.randn(300, 9, generator=torch.Generator().manual_seed(k), requires_grad=True)
    w = torch.randn(300, k)
    got_v, got_i = top_k(t, k)
    want_v, want_i = t.topk(k, dim=-1)
    assert torch.equal(got_i, want_i)
    torch.testing.assert_close(got_v, want_v)
    (g1,) = torch.autograd.grad((got_v * w).sum(), t)
    (g2,) = torch.autograd.grad((want_v * w).sum(), t)
    torch.testing.assert_close(g1, g2)
    assert top_k(t[:0], k)[1].shape == (0, k)
