"""Expert ablation at the router (moe/ablation.py) against references built by hand from the weights.

- an expert that no token selects: ablating it changes nothing, bit for bit, for every router;
- all experts but one ablated: the layer equals that one expert run densely from its own weights
  (numpy-free: relu(x W1 + b1) W2 + b2 written out here), with the gate the router's rule gives;
- a token that chose an ablated expert takes the router's next choice, renormalised as the router does.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lens.moe import MoELayer
from moe_lens.moe.ablation import ablated

D, E = 8, 4
TOKEN_CHOICE = ["naive_topk", "topk_mask", "noisy_topk", "switch", "sigmoid_bias"]


def layer_for(router: str, k: int = 2) -> MoELayer:
    torch.manual_seed(0)
    k = 1 if router in ("switch", "hash") else k
    return MoELayer(D, E, k, router=router, expert_hidden=6).eval()


def inputs(n: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(1)
    x = torch.randn(n, D, generator=g)
    x[:, 0] = 1.0  # a constant feature: its router weight sets each expert's baseline logit
    return x, torch.randint(0, 1000, (n,), generator=g)


def expert_by_hand(layer: MoELayer, i: int, x: torch.Tensor) -> torch.Tensor:
    """E_i(x) = relu(x W1_i + b1_i) W2_i + b2_i from the bank's stacked weights."""
    b = layer.experts
    return F.relu(x @ b.w1[i] + b.b1[i]) @ b.w2[i] + b.b2[i]


@pytest.mark.parametrize("router", TOKEN_CHOICE)
def test_ablating_an_unused_expert_changes_nothing(router: str) -> None:
    layer = layer_for(router)
    with torch.no_grad():
        layer.router.w_gate.weight[3, 0] = -40.0  # expert 3's logit far below the others: never selected
        x, ids = inputs()
        base = layer(x, token_ids=ids)
        assert not (base.routing.expert_idx == 3).any()
        with ablated(layer, [3]):
            out = layer(x, token_ids=ids)
    assert torch.equal(out.y, base.y)  # exactly: the same routing, the same dispatch
    assert torch.equal(out.routing.gate, base.routing.gate)


@pytest.mark.parametrize("router", ["naive_topk", "topk_mask", "noisy_topk", "sigmoid_bias"])
def test_all_experts_but_one_equals_that_expert_alone(router: str) -> None:
    layer = layer_for(router)
    x, ids = inputs()
    with torch.no_grad(), ablated(layer, [0, 1, 2]):
        out = layer(x, token_ids=ids)
        ref = expert_by_hand(layer, 3, x)  # k = 2: every token had an ablated expert, all renormalise to gate 1
    assert (out.routing.expert_idx[:, 0] == 3).all()
    torch.testing.assert_close(out.y, ref, atol=1e-5, rtol=1e-5)


def test_switch_all_but_one_gate_rule() -> None:
    """Switch (k = 1): a token moved to expert 3 gets softmax over the one remaining expert = 1; a token that
    already chose 3 is left as it was, gate p_3."""
    layer = layer_for("switch")
    x, ids = inputs()
    with torch.no_grad():
        base = layer(x, token_ids=ids)
        with ablated(layer, [0, 1, 2]):
            out = layer(x, token_ids=ids)
        stayed = base.routing.expert_idx[:, 0] == 3
        gate = torch.where(stayed, base.routing.router_probs[:, 3], torch.ones(len(x)))
        ref = gate.unsqueeze(1) * expert_by_hand(layer, 3, x)
    assert 0 < stayed.sum() < len(x)
    torch.testing.assert_close(out.y, ref, atol=1e-5, rtol=1e-5)


def test_moved_tokens_take_the_next_choice_renormalised() -> None:
    """topk_mask: a token with expert a in its top 2 gets its 3rd choice, gates p / (p_kept sum); others unchanged."""
    layer = layer_for("topk_mask")
    x, ids = inputs()
    with torch.no_grad():
        base = layer(x, token_ids=ids)
        a = int(base.routing.expert_idx[0, 0])
        with ablated(layer, [a]):
            out = layer(x, token_ids=ids)
    p = base.routing.router_probs
    for t in range(len(x)):
        chosen = base.routing.expert_idx[t].tolist()
        if a in chosen:
            order = [int(i) for i in p[t].argsort(descending=True) if int(i) != a][:2]
            q = p[t, order] / p[t, order].sum()  # the softmax over e - 1 experts renormalises to the same
            assert out.routing.expert_idx[t].tolist() == order
            torch.testing.assert_close(out.routing.gate[t], q)
        else:
            assert torch.equal(out.routing.expert_idx[t], base.routing.expert_idx[t])
            assert torch.equal(out.routing.gate[t], base.routing.gate[t])


@pytest.mark.parametrize("router", ["hash", "expert_choice"])
def test_no_next_choice_routers_drop_the_ablated_expert(router: str) -> None:
    """hash and expert_choice: the ablated expert's assignments get gate 0, nothing else moves; the dense
    reference is sum over the other experts of gate * E_i(x)."""
    layer = layer_for(router)
    x, ids = inputs()
    with torch.no_grad():
        base = layer(x, token_ids=ids)
        with ablated(layer, [1]):
            out = layer(x, token_ids=ids)
        r = base.routing
        ref = torch.zeros_like(x)
        for j in range(r.expert_idx.shape[1]):
            for i in (0, 2, 3):
                on = (r.expert_idx[:, j] == i).unsqueeze(1)
                ref = ref + torch.where(on, r.gate[:, j : j + 1] * expert_by_hand(layer, i, x), 0.0)
    assert (base.routing.expert_idx == 1).any()
    torch.testing.assert_close(out.y, ref, atol=1e-5, rtol=1e-5)


def test_hooks_are_removed_and_bad_expert_refused() -> None:
    layer = layer_for("sigmoid_bias")
    bias = layer.router.bias.clone()
    with ablated(layer, [0]):
        pass
    assert not layer.router._forward_hooks and not layer.router.w_gate._forward_hooks
    assert torch.equal(layer.router.bias, bias)
    with pytest.raises(ValueError, match="expert 9"), ablated(layer, [9]):
        pass
