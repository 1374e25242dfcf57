"""The `sigmoid_bias` router (Wang et al. 2024): selection on score + bias, gates from the unbiased
scores, the bias update outside the gradient, and the training loop's after-step hook."""
from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from moe_lens.config import RunConfig
from moe_lens.moe import MoELayer, build_router
from moe_lens.moe.sigmoid_bias import SigmoidBiasRouter
from moe_lens.moe.step_hooks import step_hooks


def sig(z: float) -> float:
    return 1.0 / (1.0 + math.exp(-z))


def identity_router(k: int = 2, u: float = 0.05, load_ema: float | None = None) -> SigmoidBiasRouter:
    """e = d = 4 and W_g = I, so a token's logits are its features. `load_ema`: None keeps the default."""
    if load_ema is None:
        r = build_router("sigmoid_bias", 4, 4, k, bias_update_rate=u)
    else:
        r = SigmoidBiasRouter(4, 4, k, u, load_ema=load_ema)
    with torch.no_grad():
        r.w_gate.weight.copy_(torch.eye(4))
    return r


Z = torch.tensor([[2.0, 1.0, 0.0, -1.0]])  # s = (0.881, 0.731, 0.5, 0.269)


def test_hand_worked_bias_changes_the_selection_not_the_gate_formula() -> None:
    r = identity_router().eval()
    out = r(Z)
    s0, s1, s2, s3 = (sig(z) for z in (2.0, 1.0, 0.0, -1.0))
    assert out.expert_idx.tolist() == [[0, 1]]  # b = 0: the two largest scores
    torch.testing.assert_close(out.gate, torch.tensor([[s0 / (s0 + s1), s1 / (s0 + s1)]]))  # 0.5465, 0.4535
    torch.testing.assert_close(out.router_probs, torch.tensor([[s0, s1, s2, s3]]) / (s0 + s1 + s2 + s3))
    torch.testing.assert_close(out.logits.softmax(-1), out.router_probs)  # as every router: probs = softmax(logits)

    r.bias.copy_(torch.tensor([-1.0, 0.0, 0.5, 0.0]))  # s + b = (-0.119, 0.731, 1.0, 0.269): experts 2 and 1
    out = r(Z)
    assert sorted(out.expert_idx[0].tolist()) == [1, 2]
    assert out.expert_idx.tolist() == [[1, 2]]  # slot 0: the larger gate (unbiased s1 > s2)
    want = [s1 / (s1 + s2), s2 / (s1 + s2)]  # 0.5938, 0.4062: b does not enter the gates
    torch.testing.assert_close(out.gate, torch.tensor([want]))
    assert abs(want[0] - 0.5938) < 1e-4
    torch.testing.assert_close(out.router_probs, torch.tensor([[s0, s1, s2, s3]]) / (s0 + s1 + s2 + s3))


def test_top1_gate_is_the_raw_score_so_the_router_learns() -> None:
    r = identity_router(k=1).train()
    z = Z.clone().requires_grad_(True)
    out = r(z)
    torch.testing.assert_close(out.gate, torch.tensor([[sig(2.0)]]))  # not a constant 1
    out.gate.sum().backward()
    assert r.w_gate.weight.grad.abs().sum() > 0


def test_update_rule_sign_and_size_over_the_tokens_since_the_last_step() -> None:
    u = 0.05
    r = identity_router(u=u, load_ema=0.0).train()  # the paper's per-step count; the default average: below
    r(Z.repeat(3, 1))  # 3 tokens to experts 0, 1
    r(torch.tensor([[0.0, 0.0, 3.0, 2.0]]))  # one more forward before the step: 1 token to 2, 3
    r.eval()(Z.repeat(5, 1))  # evaluation does not count
    assert r.load_since.tolist() == [3.0, 3.0, 1.0, 1.0]
    r.after_step()  # mean load 2: experts 0, 1 above it, 2, 3 below
    torch.testing.assert_close(r.bias, torch.tensor([-u, -u, u, u]))
    assert r.load_since.tolist() == [0.0] * 4  # counted afresh for the next step
    r.train()(torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0]]))  # load (1, 1, 1, 1) = mean
    r.after_step()
    torch.testing.assert_close(r.bias, torch.tensor([-u, -u, u, u]))  # sign(0) = 0: unchanged
    r.after_step()  # no tokens since the last step: unchanged
    torch.testing.assert_close(r.bias, torch.tensor([-u, -u, u, u]))


def test_default_sign_reads_the_moving_average_of_the_load() -> None:
    """beta = 0.9: load_avg <- 0.9 load_avg + 0.1 load_since, then b += u sign(mean(load_avg) - load_avg)."""
    u = 0.05
    r = identity_router(u=u).train()
    assert r.load_ema == 0.9 and r.load_avg.tolist() == [0.0] * 4
    r(Z.repeat(3, 1))
    r(torch.tensor([[0.0, 0.0, 3.0, 2.0]]))  # load (3, 3, 1, 1), as above
    r.after_step()  # avg 0.1 * (3, 3, 1, 1) = (0.3, 0.3, 0.1, 0.1), mean 0.2: the per-step signs
    torch.testing.assert_close(r.load_avg, torch.tensor([0.3, 0.3, 0.1, 0.1]))
    torch.testing.assert_close(r.bias, torch.tensor([-u, -u, u, u]))
    assert r.load_since.tolist() == [0.0] * 4
    r(torch.tensor([[3.0, 2.0, 0.0, 0.0], [0.0, 0.0, 3.0, 2.0]]))  # load (1, 1, 1, 1): per step, no change
    r.after_step()  # avg 0.9 * (0.3, 0.3, 0.1, 0.1) + 0.1 = (0.37, 0.37, 0.19, 0.19), mean 0.28: 0, 1 still above
    torch.testing.assert_close(r.load_avg, torch.tensor([0.37, 0.37, 0.19, 0.19]))
    torch.testing.assert_close(r.bias, torch.tensor([-2 * u, -2 * u, 2 * u, 2 * u]))
    r(torch.tensor([[0.0, 0.0, 3.0, 2.0]]).repeat(4, 1))  # load (0, 0, 4, 4)
    r.after_step()  # avg (0.333, 0.333, 0.571, 0.571), mean 0.452: the signs turn
    torch.testing.assert_close(r.load_avg, torch.tensor([0.333, 0.333, 0.571, 0.571]))
    torch.testing.assert_close(r.bias, torch.tensor([-u, -u, u, u]))
    sd = r.state_dict()  # a resumed run continues the average
    assert "load_avg" in sd and "load_since" not in sd
    torch.testing.assert_close(sd["load_avg"], r.load_avg)


def test_moving_average_follows_the_mean_load_where_the_per_step_sign_follows_the_median() -> None:
    """e = 2, k = 1. Expert 0 takes (0.9, 0.9, 0.9, 1.9) of every 4 steps' loads against a mean of 1: over-
    loaded on average (1.15) but below the mean in 3 steps of 4, as an expert whose load comes in bursts.
    Per step its bias gains u 3 times and loses it once per cycle: +20u after 40 steps, the wrong way.
    The average (hand-worked: 0.09, 0.171, 0.2439, then 0.4095 > 0.2783 at the first burst) reads
    expert 0 as overloaded from step 4 on: +3u, then -u every step, -34u after 40 steps."""
    u = 0.01
    for load_ema, want in ((0.0, 20 * u), (0.9, -34 * u)):
        r = SigmoidBiasRouter(2, 2, 1, u, load_ema=load_ema)
        for t in range(40):
            r.load_since.copy_(torch.tensor([1.9, 0.1] if t % 4 == 3 else [0.9, 1.1]))
            r.after_step()
        torch.testing.assert_close(r.bias, torch.tensor([want, -want]))


def test_load_ema_outside_its_range_is_refused() -> None:
    for bad in (-0.1, 1.0):
        with pytest.raises(ValueError, match="load_ema"):
            SigmoidBiasRouter(4, 4, 2, load_ema=bad)


def test_no_gradient_reaches_the_bias_and_the_optimizer_never_sees_it() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 2, router="sigmoid_bias", expert_hidden=6).train()
    layer.router.bias.copy_(torch.tensor([0.3, -0.2, 0.1, 0.0]))
    out = layer(torch.randn(20, 8))
    (out.y * torch.randn_like(out.y)).sum().backward()
    assert not layer.router.bias.requires_grad and layer.router.bias.grad is None
    assert all(p is not layer.router.bias for p in layer.parameters())  # AdamW's decay cannot shrink it
    assert layer.router.w_gate.weight.grad.abs().sum() > 0  # the gates still teach the router
    assert float(out.aux_loss) == 0.0  # no aux loss in the mode


def test_bias_is_in_the_state_dict_and_loads_back() -> None:
    torch.manual_seed(0)
    a = MoELayer.from_config(RunConfig.for_mode("sigmoid_bias", num_experts=4), 8)
    a.router.bias.copy_(torch.tensor([0.5, -0.5, 0.25, 0.0]))
    sd = a.state_dict()
    assert "router.bias" in sd and "router.load_since" not in sd  # the count is 0 after every step
    b = MoELayer.from_config(RunConfig.for_mode("sigmoid_bias", num_experts=4), 8)
    b.load_state_dict(sd)
    assert torch.equal(b.router.bias, a.router.bias)


def test_bias_alone_balances_a_skewed_router() -> None:
    """W_g fixed and skewed towards experts 0 and 1: the bias updates alone bring max/mean load near 1."""
    torch.manual_seed(0)
    r = build_router("sigmoid_bias", 8, 8, 2, bias_update_rate=0.01).eval()
    with torch.no_grad():
        r.w_gate.weight.normal_(0, 0.5)
        r.w_gate.weight[:2] += 0.3
    g = torch.Generator().manual_seed(1)
    x = lambda: torch.randn(512, 8, generator=g).abs()  # noqa: E731  (positive features: experts 0, 1 win)

    def imbalance() -> float:  # max/mean load over 20 batches, the bias held fixed
        load = sum(torch.bincount(r(x()).expert_idx.reshape(-1), minlength=8).float() for _ in range(20))
        return float(load.max() / load.mean())

    assert imbalance() > 3.5  # 4 = every token on experts 0 and 1
    r.train()
    for _ in range(300):
        r(x())
        r.after_step()
    assert imbalance() < 1.2


def test_step_hooks_finds_each_router_once() -> None:
    model = torch.nn.ModuleList([MoELayer(8, 4, 2, router="sigmoid_bias"), MoELayer(8, 4, 2, router="topk_mask")])
    hooks = step_hooks(model)
    assert [h.__self__ for h in hooks] == [model[0].router]


@pytest.mark.integration
def test_training_loop_runs_the_hook_once_per_step(real_data_dir: Path, tmp_path: Path, monkeypatch) -> None:
    from moe_lens.train import train

    calls: list[int] = []
    original = SigmoidBiasRouter.after_step

    def counting(self: SigmoidBiasRouter) -> None:
        calls.append(int(self.load_since.sum()))  # tokens x k routed in this step's forward
        original(self)

    monkeypatch.setattr(SigmoidBiasRouter, "after_step", counting)
    cfg = RunConfig.for_mode("sigmoid_bias", dataset="wikitext2", data_dir=str(real_data_dir), runs_dir=str(tmp_path),
                             run_name="sb", d_embed=16, d_model=16, expert_hidden=16, num_experts=4, batch_size=4,
                             bptt=8, vocab_size=300, pos_tags=False, max_steps=5, max_eval_batches=1, warmup_steps=1)  # fmt: skip
    run_dir = train(cfg, progress=False)
    assert calls == [4 * 8 * 2] * 5  # once per step, after that step's tokens were counted
    payload = torch.load(sorted(run_dir.rglob("*.pt"))[-1], weights_only=False)
    biases = [v for k, v in payload["model"].items() if k.endswith("router.bias")]
    assert len(biases) == 1 and biases[0].abs().sum() > 0  # the checkpoint carries the moved bias
