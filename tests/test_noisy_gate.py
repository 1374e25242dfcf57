"""moe/noisy_gate.py's fused noisy top-k gate against the plain formulas under autograd: values
(losses.smooth_load_prob, topk) and gradients (gradcheck in float64, and autograd of the plain formulas)."""
from __future__ import annotations

import os

import pytest
import torch
import torch.nn.functional as F

from moe_lens.moe.losses import smooth_load_prob
from moe_lens.moe import noisy_gate
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


def _pytorch_ops(monkeypatch: pytest.MonkeyPatch) -> None:
    """The gate's PyTorch-ops forward (CUDA, or a CPU without the compiled kernel) instead of the compiled one."""
    monkeypatch.setattr(noisy_gate, "_cpu_gate_kernel", lambda *args: None)


def _need_compiled() -> None:
    if noisy_gate._cpu_gate_kernel(torch.zeros(1, 4), torch.zeros(1, 2)) is None:
        if os.environ.get("CI") == "true":
            pytest.fail("the compiled CPU kernel did not build")
        pytest.skip("no compiled CPU kernel here")


@pytest.mark.parametrize("e", [16, 19])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_compiled_gate_equals_the_pytorch_ops(k: int, dtype: torch.dtype, e: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """csrc/noisy_gate.cpp (forward and backward in one pass per row) gives the PyTorch ops' experts exactly and their
    values and gradients to rounding, on random logits with a NaN row (NaN counts as the largest, as in topk) and e = 19
    (a partial vector at the row's end). Not bit for bit: its vector maths runs 8 lanes wide, PyTorch's kernels 16 on
    AVX-512, and the sums add in another order; with ties the values and P are the same and only which tied expert is
    picked may differ (topk leaves it unspecified)."""
    _need_compiled()
    g = torch.Generator().manual_seed(k)
    n = 517  # blocks of 8 or 16 rows (one per vector lane) and a remainder row by row
    logits2 = torch.randn(n, 2 * e, generator=g, dtype=dtype)
    z = torch.randn(n, e, generator=g, dtype=dtype)
    logits2[7, 3] = float("nan")
    weights = torch.randn(n, e, generator=g, dtype=dtype), torch.randn(n, k, generator=g, dtype=dtype)

    def run() -> list[torch.Tensor]:
        x = logits2.clone().requires_grad_(True)
        prob, top, idx = noisy_topk_gate(x, z, k, NOISE_EPS)
        ((prob * weights[0]).nansum() + (top * weights[1]).nansum()).backward()
        return [prob, top, idx, x.grad]

    compiled = run()
    _pytorch_ops(monkeypatch)
    for got, want in zip(compiled, run()):
        torch.testing.assert_close(got.nan_to_num(7.0), want.nan_to_num(7.0), rtol=0, atol=0 if got.dtype == torch.long
                                   else 1e-5 if dtype == torch.float32 else 1e-12)  # fmt: skip

    tied = torch.randint(0, 3, (n, 2 * e), generator=g).to(dtype)  # many equal logits, no noise
    zero = torch.zeros(n, e, dtype=dtype)
    p1, t1, i1 = noisy_topk_gate(tied, zero, k, NOISE_EPS)  # PyTorch ops
    monkeypatch.undo()
    p0, t0, i0 = noisy_topk_gate(tied, zero, k, NOISE_EPS)  # compiled
    torch.testing.assert_close(p0, p1)
    assert torch.equal(t0, t1)
    assert torch.equal(tied[:, :e].gather(1, i0), tied[:, :e].gather(1, i1))  # tied experts, equal logits


def test_compiled_backward_takes_any_upstream_layout(monkeypatch: pytest.MonkeyPatch) -> None:
    """The compiled backward reads a broadcast row of g_P in place (the load loss's column sums) and copies any other
    layout (here a transposed one); either gives the PyTorch ops' gradient."""
    _need_compiled()
    logits2, z = _inputs(33, 12, 5)
    up = torch.randn(12, 33, dtype=torch.float64)

    def grads() -> list[torch.Tensor]:
        out = []
        for upstream in (lambda p: p.sum(dim=0).pow(2).sum(), lambda p: (p * up.t()).sum()):
            prob = noisy_topk_gate(logits2, z, 2, NOISE_EPS)[0]
            out.append(torch.autograd.grad(upstream(prob), logits2)[0])
        return out

    compiled = grads()
    _pytorch_ops(monkeypatch)
    for got, want in zip(compiled, grads()):
        torch.testing.assert_close(got, want)


def test_row_argmax_is_torch_argmax() -> None:
    """The router's top-1 (`argmax_rows`): torch.argmax(dim=-1) on ties (the first) and NaN (the first NaN)."""
    _need_compiled()
    g = torch.Generator().manual_seed(0)
    for dtype in (torch.float32, torch.float64):
        x = torch.randint(0, 4, (300, 13), generator=g).to(dtype)
        x[5, 7] = x[5, 2] = x[9, 0] = float("nan")
        x[11] = float("nan")
        x[12] = float("-inf")
        assert torch.equal(noisy_gate.argmax_rows(x), x.argmax(dim=-1))


@pytest.mark.parametrize("k", [1, 2, 3])
def test_pytorch_ops_path_equals_the_plain_formulas(k: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """The PyTorch-ops forward (used on CUDA) keeps the plain formulas' values and passes gradcheck."""
    _pytorch_ops(monkeypatch)
    logits2, z = _inputs(64, 8, seed=k)
    got, want = noisy_topk_gate(logits2, z, k, NOISE_EPS), _plain(logits2, z, k)
    torch.testing.assert_close(got[0], want[0])
    torch.testing.assert_close(got[1], want[1])
    assert torch.equal(got[2], want[2])
    assert torch.autograd.gradcheck(lambda t: noisy_topk_gate(t, z, k, NOISE_EPS)[:2], (logits2,))


@pytest.mark.parametrize("path", ["compiled", "pytorch"])
@pytest.mark.parametrize("k", [1, 2, 3])
def test_gate_softmax_equals_the_softmax_of_the_kept_logits(k: int, path: str, monkeypatch: pytest.MonkeyPatch) -> None:
    """`noisy_topk_gate_softmax` (the router's G folded into the gate's passes): G = softmax of the k largest noisy
    logits, the same experts and P, and gradcheck in float64 of P and G together, on either path."""
    if path == "compiled":
        _need_compiled()
    else:
        _pytorch_ops(monkeypatch)
    logits2, z = _inputs(37, 7, seed=20 + k)
    prob, gate, idx = noisy_gate.noisy_topk_gate_softmax(logits2, z, k, NOISE_EPS)
    want_prob, want_top, want_idx = _plain(logits2, z, k)
    torch.testing.assert_close(prob, want_prob)
    torch.testing.assert_close(gate, want_top.softmax(dim=-1))
    assert torch.equal(idx, want_idx)
    assert torch.autograd.gradcheck(lambda t: noisy_gate.noisy_topk_gate_softmax(t, z, k, NOISE_EPS)[:2], (logits2,))


@pytest.mark.parametrize("e", [16, 19, 64])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_softmax_stats_equal_softmax_argmax_logsumexp_and_entropy(e: int, dtype: torch.dtype) -> None:
    """The router's one-pass clean distribution (`softmax_stats`) on a strided view as the router passes it: probs is
    torch's softmax to rounding, top1 the argmax of those probs (the first of equal ones, 0 for a NaN row), lse
    torch.logsumexp and entropy `losses.entropy`, with -inf logits (probability 0) and ties."""
    from moe_lens.moe import losses

    _need_compiled()
    g = torch.Generator().manual_seed(e)
    logits2 = (3 * torch.randn(203, 2 * e, generator=g)).to(dtype)
    logits2[7, :e] = 0.5  # all equal: the first
    logits2[8, 3] = logits2[8, 1] = logits2[8, :e].max() + 1  # a tie for the largest
    logits2[9, [0, 2, 5]] = float("-inf")
    logits2[10, 4] = float("nan")
    logits2[11, 1:e] = float("-inf")  # one finite logit: probability 1, entropy 0
    clean = logits2[:, :e]
    probs, top1, lse, entropy = noisy_gate.softmax_stats(clean)
    want = clean.softmax(dim=-1)
    tol = dict(atol=1e-6, rtol=1e-5) if dtype == torch.float32 else dict(atol=1e-13, rtol=1e-12)
    torch.testing.assert_close(probs, want, equal_nan=True, **tol)
    assert torch.equal(top1, probs.argmax(dim=-1))
    keep = torch.ones(203, dtype=torch.bool)
    keep[10] = False  # NaN row: everything NaN, top1 the first NaN
    assert torch.equal(top1[keep], want[keep].argmax(dim=-1)) and top1[10] == 0 and top1[7] == 0 and top1[8] == 1
    torch.testing.assert_close(lse[keep], torch.logsumexp(clean, dim=-1)[keep], **tol)
    plain = -torch.where(want > 0, want * want.log(), torch.zeros_like(want)).sum(dim=-1)  # 0 log 0 = 0
    torch.testing.assert_close(entropy[keep], plain[keep], atol=1e-5 if dtype == torch.float32 else 1e-12,
                               rtol=1e-4 if dtype == torch.float32 else 1e-10)  # fmt: skip
    if dtype == torch.float32:
        torch.testing.assert_close(entropy[keep], losses.entropy(want)[keep], atol=1e-5, rtol=1e-4)
    assert entropy[11] == 0 and probs[10].isnan().all() and lse[10].isnan() and entropy[10].isnan()


def test_softmax_stats_gradient_is_softmax_backward() -> None:
    _need_compiled()
    logits2 = torch.randn(30, 14, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: noisy_gate.softmax_stats(t[:, :7])[0], (logits2,))
    probs, _, lse, entropy = noisy_gate.softmax_stats(logits2[:, :7])
    assert probs.requires_grad and not lse.requires_grad and not entropy.requires_grad


def test_softmax_stats_without_the_kernel_leave_lse_and_entropy_to_the_layer(monkeypatch: pytest.MonkeyPatch) -> None:
    _pytorch_ops(monkeypatch)
    logits = torch.randn(20, 5)
    probs, top1, lse, entropy = noisy_gate.softmax_stats(logits)
    assert torch.equal(probs, logits.softmax(dim=-1)) and torch.equal(top1, probs.argmax(dim=-1))
    assert lse is None and entropy is None
