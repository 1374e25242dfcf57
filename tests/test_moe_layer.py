"""The MoE layer against a dense reference sum_i G_i(x) E_i(x), for every mode and expert type."""
from __future__ import annotations

import pytest
import torch

from moe_lens.config import MODES, RunConfig
from moe_lens.moe import MoELayer, losses
from moe_lens.moe.routers import Routing

D = 16


def make_layer(mode: str, **overrides) -> MoELayer:
    cfg = RunConfig.for_mode(mode, expert_hidden=12, **overrides)
    torch.manual_seed(0)
    return MoELayer.from_config(cfg, D)


def dense_gates(r: Routing, e: int) -> torch.Tensor:
    """(n, e) gate matrix G, built slot by slot with a Python loop (independent of the dispatch)."""
    n, s = r.expert_idx.shape
    g = torch.zeros(n, e)
    for t in range(n):
        for j in range(s):
            i = int(r.expert_idx[t, j])
            if i >= 0:
                g[t, i] += float(r.gate[t, j].detach())
    return g


def dense_reference(layer: MoELayer, x: torch.Tensor, r: Routing) -> torch.Tensor:
    """y = sum_i G_i(x) E_i(x) (+ shared), every expert run on every token."""
    g = dense_gates(r, layer.num_experts)
    y = sum(g[:, i : i + 1] * expert(x) for i, expert in enumerate(layer.experts.split()))
    shared = layer.experts.shared(x)
    return y + shared if shared is not None else y


def inputs(n: int = 40, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, D, generator=g), torch.randint(0, 1000, (n,), generator=g)


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
@pytest.mark.parametrize("training", [False, True])
def test_sparse_equals_dense_reference(mode: str, dispatch: str, training: bool) -> None:
    layer = make_layer(mode, dispatch=dispatch).train(training)
    x, ids = inputs()
    with torch.no_grad():
        out = layer(x, token_ids=ids)
        ref = dense_reference(layer, x, out.routing)
    assert out.y.shape == x.shape
    torch.testing.assert_close(out.y, ref, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("expert_type", ["mlp", "lora", "lowrank", "shared"])
@pytest.mark.parametrize("router", ["naive_topk", "topk_mask", "noisy_topk", "switch", "expert_choice"])
def test_every_expert_type_with_every_router(expert_type: str, router: str) -> None:
    top_k = 1 if router == "switch" else 2
    layer = MoELayer(D, 6, top_k, router=router, expert_type=expert_type, expert_hidden=10, rank=3,
                     capacity_factor=1.0 if router in ("switch", "expert_choice") else None).train()  # fmt: skip
    torch.nn.init.normal_(getattr(layer.experts, "b1", torch.empty(0)), std=0.3)  # LoRA B=0 at init: make it matter
    x, _ = inputs(30, seed=2)
    with torch.no_grad():
        out = layer(x)
        torch.testing.assert_close(out.y, dense_reference(layer, x, out.routing), atol=1e-5, rtol=1e-5)


def test_grouped_and_loop_dispatch_agree_in_value_and_gradient() -> None:
    x, _ = inputs(64)
    grads = []
    for dispatch in ("grouped", "loop"):
        layer = make_layer("baseline", dispatch=dispatch).eval()
        xx = x.clone().requires_grad_(True)
        out = layer(xx)
        (out.y.square().sum() + out.aux_loss).backward()
        grads.append((out.y.detach(), xx.grad, layer.experts.w1.grad, layer.router.w_gate.weight.grad))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-4)


def test_lora_expert_is_base_plus_low_rank_update() -> None:
    layer = MoELayer(D, 4, 2, router="topk_mask", expert_type="lora", expert_hidden=10, rank=3)
    ex = layer.experts
    torch.nn.init.normal_(ex.b1, std=0.5)
    torch.nn.init.normal_(ex.b2, std=0.5)
    x, _ = inputs(7)
    for i in range(4):
        w1 = ex.base1.weight.t() + ex.a1[i] @ ex.b1[i]  # (d, h)
        w2 = ex.base2.weight.t() + ex.a2[i] @ ex.b2[i]  # (h, d)
        ref = torch.relu(x @ w1 + ex.base1.bias) @ w2 + ex.base2.bias
        torch.testing.assert_close(ex.split()[i](x), ref, atol=1e-5, rtol=1e-5)


def test_lora_base_can_be_frozen() -> None:
    frozen = MoELayer(D, 4, 2, expert_type="lora", lora_train_base=False)
    assert not any(p.requires_grad for p in frozen.experts.base1.parameters())
    assert frozen.experts.a1.requires_grad and frozen.experts.b1.requires_grad
    assert MoELayer(D, 4, 2, expert_type="lora").experts.base1.weight.requires_grad


def test_lowrank_matrices_have_rank_r() -> None:
    layer = MoELayer(D, 4, 2, expert_type="lowrank", expert_hidden=12, rank=3)
    w1 = layer.experts.u1[0] @ layer.experts.v1[0]  # (d, h)
    assert w1.shape == (D, 12)
    assert torch.linalg.matrix_rank(w1.detach()) == 3


def test_padding_changes_no_output_loss_or_statistic() -> None:
    torch.manual_seed(3)
    b, t = 4, 9
    x = torch.randn(b, t, D)
    mask = torch.ones(b, t, dtype=torch.bool)
    mask[1, 5:] = False
    mask[3, 2:] = False
    x_garbage = x.masked_fill(~mask.unsqueeze(-1), 1e3)  # wild padding values must not matter
    for mode in ("baseline", "switch", "expert_choice", "importance"):
        layer = make_layer(mode).train()
        torch.manual_seed(7)
        padded = layer(x_garbage, mask)
        torch.manual_seed(7)
        real = layer(x[mask])  # the same real tokens, no padding at all
        assert padded.y.shape == (b, t, D)
        torch.testing.assert_close(padded.y[mask], real.y)
        assert torch.all(padded.y[~mask] == 0)
        torch.testing.assert_close(padded.aux_loss, real.aux_loss)
        for name in ("load", "importance", "num_dropped", "entropy"):
            torch.testing.assert_close(getattr(padded.stats, name), getattr(real.stats, name))
        for name, v in real.stats.aux.items():
            torch.testing.assert_close(padded.stats.aux[name], v)
        assert padded.routing.expert_idx.shape[0] == int(mask.sum())


def test_routing_statistics_shapes_and_values() -> None:
    layer = make_layer("baseline").eval()
    x, _ = inputs(50)
    _, _, r, s = layer(x)
    e, k = 8, 2
    assert r.expert_idx.shape == (50, k) and r.gate.shape == (50, k)
    assert r.router_probs.shape == (50, e) and s.entropy.shape == (50,)
    assert s.load.shape == (e,) and s.importance.shape == (e,)
    g = dense_gates(r, e)
    torch.testing.assert_close(s.importance, g.sum(dim=0))  # summed over tokens, not experts
    torch.testing.assert_close(s.load, (g > 0).sum(dim=0).float())
    assert float(s.load.sum()) == 50 * k and float(s.num_dropped) == 0


def test_switch_capacity_drops_tokens_to_the_residual_and_counts_them() -> None:
    torch.manual_seed(0)
    layer = MoELayer(D, 4, 1, router="switch", capacity_factor=0.5).train()
    with torch.no_grad():
        layer.router.w_gate.weight.zero_()
        layer.router.w_gate.weight[0] += 5.0 * torch.ones(D)  # pushes every token to expert 0 ...
    x = torch.rand(40, D)  # ... (positive inputs)
    out = layer(x)
    capacity = 5  # ceil(0.5 * 40 / 4)
    assert float(out.stats.load[0]) == capacity
    assert float(out.stats.num_dropped) == 40 - capacity
    dropped = out.routing.dropped[:, 0]
    assert torch.all(out.y[dropped] == 0)  # expert output 0: the model's residual passes x through
    assert torch.all(out.y[~dropped].abs().sum(-1) > 0)
    assert not layer.eval()(x).routing.dropped  # no capacity limit at evaluation


@pytest.mark.parametrize("mode", sorted(MODES))
@pytest.mark.parametrize("training", [False, True])
def test_entropy_and_z_loss_match_their_direct_formulas(mode: str, training: bool) -> None:
    """The layer reads logsumexp off the softmax at the top-1 expert (losses.logsumexp_at_top1); its
    entropy and z-loss must equal the direct formulas on the routing it returns, in every mode."""
    layer = make_layer(mode).train(training)
    x, ids = inputs(60)
    _, _, r, s = layer(x, token_ids=ids)
    torch.testing.assert_close(r.router_probs, r.logits.float().softmax(dim=-1), atol=1e-6, rtol=1e-6)
    if r.top1 is not None:  # noisy_topk in training: slot 0 is the noisy choice, top1 the clean argmax
        torch.testing.assert_close(r.router_probs.gather(1, r.top1[:, None]).squeeze(1), r.router_probs.amax(-1))
    elif r.assign is None:  # slot 0 is the argmax, which the statistics rely on
        torch.testing.assert_close(r.router_probs.gather(1, r.expert_idx[:, :1]).squeeze(1), r.router_probs.amax(-1))
    torch.testing.assert_close(s.entropy, losses.entropy(r.router_probs), atol=2e-6, rtol=1e-5)
    torch.testing.assert_close(s.aux["z"], losses.z_loss(r.logits), atol=1e-6, rtol=1e-5)


def test_z_loss_gradient_through_the_top1_identity_is_the_direct_one() -> None:
    layer = make_layer("topk_mask", w_z=1.0).train()
    x, _ = inputs(60)
    out = layer(x)
    (got,) = torch.autograd.grad(out.aux_loss, layer.router.w_gate.weight)
    (want,) = torch.autograd.grad(losses.z_loss(layer.router.w_gate(x)), layer.router.w_gate.weight)
    torch.testing.assert_close(got, want, atol=1e-6, rtol=1e-5)


def test_routing_is_immutable_and_the_statistics_are_their_own_record() -> None:
    """The router's Routing is returned as it was made: the layer puts load, importance, dropped count,
    entropy and aux terms in a RoutingStats of its own instead of filling in the Routing."""
    import dataclasses

    from moe_lens.moe import RoutingStats

    layer = make_layer("switch").train()
    x, _ = inputs(30)
    out = layer(x)
    assert isinstance(out.stats, RoutingStats) and out.stats.load.shape == (layer.num_experts,)
    # lse and entropy: the router's own, from its softmax pass (noisy_topk on the compiled CPU kernel), not the layer's
    assert [f.name for f in dataclasses.fields(out.routing)] == [
        "expert_idx", "gate", "router_probs", "logits", "load_prob", "dropped", "assign", "top1", "lse", "entropy"]  # fmt: skip
    with pytest.raises(dataclasses.FrozenInstanceError):
        out.routing.gate = out.routing.gate * 0
    with pytest.raises(AttributeError):
        out.stats.load = out.stats.load * 0
