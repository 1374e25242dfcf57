"""Each auxiliary loss against a value worked by hand, and the smooth load estimator against Monte Carlo."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_lens.moe import MoELayer, losses


def phi(z: float) -> float:
    return 0.5 * (1 + math.erf(z / math.sqrt(2)))


def test_cv_squared_by_hand() -> None:
    # mean 2, population variance 2/3 -> (2/3) / 4 = 1/6
    assert float(losses.cv_squared(torch.tensor([1.0, 2.0, 3.0]))) == pytest.approx(1 / 6, rel=1e-6)
    assert float(losses.cv_squared(torch.tensor([4.0, 4.0]))) == 0.0
    assert float(losses.cv_squared(torch.tensor([5.0]))) == 0.0  # one expert: nothing to balance


def test_importance_loss_by_hand() -> None:
    gates = torch.tensor([[0.5, 0.5, 0.0], [0.0, 1.0, 0.0]])  # (n=2, e=3)
    # importance = column sums = [0.5, 1.5, 0]; mean 2/3; var = (1/36 + 25/36 + 16/36) / 3 = 7/18
    torch.testing.assert_close(losses.importance(gates), torch.tensor([0.5, 1.5, 0.0]))
    assert float(losses.importance_loss(gates)) == pytest.approx((7 / 18) / (4 / 9), rel=1e-6)  # 0.875


def test_smooth_load_probability_by_hand() -> None:
    clean = torch.tensor([[1.0, 0.0, -1.0]])
    noisy = torch.tensor([[1.2, 0.1, -0.5]])
    std = torch.tensor([[1.0, 2.0, 1.0]])
    p = losses.smooth_load_prob(clean, noisy, std, k=1)
    # expert 0 is in the top-1: threshold = 2nd largest of H = 0.1 -> Phi((1.0 - 0.1) / 1)
    # expert 1 is out: threshold = largest of H = 1.2 -> Phi((0.0 - 1.2) / 2)
    # expert 2 is out: Phi((-1.0 - 1.2) / 1)
    expected = torch.tensor([[phi(0.9), phi(-0.6), phi(-2.2)]])
    torch.testing.assert_close(p, expected)
    assert float(losses.load_loss(p)) == pytest.approx(float(losses.cv_squared(expected[0])), rel=1e-6)


def test_switch_loss_by_hand() -> None:
    probs = torch.tensor([[0.7, 0.3], [0.4, 0.6], [0.9, 0.1]])
    # top-1 = [0, 1, 0]: f = [2/3, 1/3]; P = [2/3, 1/3]; e * sum f P = 2 * (4/9 + 1/9) = 10/9
    assert float(losses.switch_loss(probs, probs.argmax(-1))) == pytest.approx(10 / 9, rel=1e-6)
    uniform = torch.full((4, 4), 0.25)
    assert float(losses.switch_loss(uniform, torch.arange(4))) == pytest.approx(1.0)


def test_z_loss_by_hand() -> None:
    logits = torch.tensor([[0.0, 0.0], [math.log(3.0), 0.0]])
    # logsumexp: ln 2 and ln 4 = 2 ln 2 -> mean of squares = (1 + 4) / 2 * (ln 2)^2
    assert float(losses.z_loss(logits)) == pytest.approx(2.5 * math.log(2) ** 2, rel=1e-6)


def test_entropy_by_hand() -> None:
    p = torch.tensor([[0.5, 0.5, 0.0], [1.0, 0.0, 0.0]])
    torch.testing.assert_close(losses.entropy(p), torch.tensor([math.log(2), 0.0]))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_smooth_load_estimator_matches_monte_carlo(k: int) -> None:
    """P(x, i) = Pr(i stays in the top k when only its own noise is redrawn), Shazeer et al. 2017 app. A."""
    rng = np.random.default_rng(k)
    e, n, draws = 5, 6, 200_000
    clean = rng.normal(size=(n, e))
    std = rng.uniform(0.3, 1.5, size=(n, e))
    noisy = clean + rng.normal(size=(n, e)) * std
    p = losses.smooth_load_prob(*(torch.tensor(a) for a in (clean, noisy, std)), k=k).numpy()
    for t in range(n):
        for i in range(e):
            others = np.delete(noisy[t], i)
            kth_excluding = np.sort(others)[::-1][k - 1]
            resampled = clean[t, i] + rng.normal(size=draws) * std[t, i]
            mc = np.mean(resampled > kth_excluding)
            tol = 5 * math.sqrt(max(mc * (1 - mc), 1e-4) / draws)
            assert abs(p[t, i] - mc) < tol, (t, i, p[t, i], mc)


def test_layer_aux_loss_is_the_weighted_sum_of_the_components() -> None:
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 2, router="noisy_topk", w_importance=0.3, w_load=0.2, w_z=0.05).train()
    out = layer(torch.randn(20, 8))
    a = out.stats.aux
    torch.testing.assert_close(out.aux_loss, 0.3 * a["importance"] + 0.2 * a["load"] + 0.05 * a["z"])
    # the load loss uses the smooth estimator in training, so it has a gradient
    a["load"].backward()
    assert layer.router.w_noise.weight.grad.abs().sum() > 0


def test_layer_rejects_invalid_arguments() -> None:
    with pytest.raises(ValueError, match="top_k=5 > num_experts=4"):
        MoELayer(8, 4, 5)
    with pytest.raises(ValueError, match="rank=0"):
        MoELayer(8, 4, 2, expert_type="lora", rank=0)
    with pytest.raises(ValueError, match="capacity_factor=0"):
        MoELayer(8, 4, 1, router="switch", capacity_factor=0)
    with pytest.raises(ValueError, match="unknown expert_type 'x'"):
        MoELayer(8, 4, 2, expert_type="x")
