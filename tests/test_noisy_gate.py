"""moe/noisy_gate.py's fused noisy top-k gate against the plain formulas under autograd: values
(losses.smooth_load_prob, topk) and gradients (gradcheck in float64, and autograd of the plain formulas)."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from moe_lens.moe.losses import smooth_load_prob
from moe_lens.moe.noisy_gate import noisy_topk_gate

NOISE_EPS = 1e-2


def _inputs(n: int, e: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    logits2 = torch.randn(n, 2 * e, generator=g, dtype=torch.float64, requires_grad=True)
    return logits2, torch.randn(n, e, generator=g, dtype=torch.float64)


def _plain(logits2: torch.Tensor, z: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Shazeer's formulas as the router wrote them before the fused function."""
    e = z.shape[1]
    clean = logits2[:, :e]
    std = F.softplus(logits2[:, e:]) + NOISE_EPS
    noisy = clean + z * std
    top, idx = noisy.topk(k, dim=-1)
    return smooth_load_prob(clean, noisy, std, k), top, idx


@pytest.mark.parametrize("k", [1, 2, 3])
def test_values_and_gradients_equal_the_plain_formulas(k: int) -> None:
    logits2, z = _inputs(40, 6, k)
    got, want = noisy_topk_gate(logits2, z, k, NOISE_EPS), _plain(logits2, z, k)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert torch.equal(got[2], want[2])
    g = torch.Generator().manual_seed(9)
    up_p, up_top = torch.randn(40, 6, generator=g, dtype=torch.float64), torch.randn(40, k, generator=g, dtype=torch.float64)
    for weights in ((1, 1), (1, 0), (0, 1)):  # both outputs, the load probability alone, the kept logits alone
        grads = [torch.autograd.grad(weights[0] * (out[0] * up_p).sum() + weights[1] * (out[1] * up_top).sum(), logits2)[0]
                 for out in (noisy_topk_gate(logits2, z, k, NOISE_EPS), _plain(logits2, z, k))]  # fmt: skip
        torch.testing.assert_close(grads[0], grads[1])


@pytest.mark.parametrize("k", [1, 2])
def test_gradcheck_float64(k: int) -> None:
    logits2, z = _inputs(7, 5, 10 + k)
    assert torch.autograd.gradcheck(lambda t: noisy_topk_gate(t, z, k, NOISE_EPS)[:2], (logits2,))


def test_gradient_when_only_the_load_sum_is_used() -> None:
    """The layer's use: CV^2 of the column sums, whose upstream gradient is a broadcast (stride 0)."""
    logits2, z = _inputs(30, 8, 3)
    grads = []
    for fn in (noisy_topk_gate, lambda *a: _plain(*a[:3])):
        load = fn(logits2, z, 2, NOISE_EPS)[0].sum(dim=0)
        grads.append(torch.autograd.grad(load.var() / load.mean() ** 2, logits2)[0])
    torch.testing.assert_close(grads[0], grads[1])
