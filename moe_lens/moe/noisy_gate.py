"""Shazeer et al. 2017 noisy top-k gating (eq. 3-5) and its smooth load estimator (eq. 8-10, appendix A)
as one autograd function over the router's logits, with a hand-written backward. Shapes as in `moe/layer.py`.

`noisy_topk_gate(logits2, z, k, noise_eps)` takes the clean and the noise logits side by side,
logits2 = x [W_g; W_noise]^T (n, 2e), one matmul instead of two, and a standard normal draw z (n, e):

    std   = softplus(x W_noise) + noise_eps                      (n, e)
    H     = x W_g + z * std                                      (n, e) noisy logits, they only select
    P     = Phi((x W_g - kth_excluding(H, k)) / std)             (n, e) smooth P(x, i)
    top   = the k largest H per token (values and indices)       (n, k)

the same maths as `losses.smooth_load_prob` and `routers.top_k`, gradients included: the gradient
reaches x W_g and x W_noise through P, through the two thresholds (the k-th and (k+1)-th largest H,
which depend on both) and through the kept noisy logits. The threshold comes from one top-(k+1):
entry i takes the (k+1)-th largest when it is among the top k, else the k-th, i.e. the k-th largest
of H with i left out. Phi is torch.special.ndtr's (1 + erf(u / sqrt 2)) / 2. The forward makes softplus, then H,
the top-(k+1) and u, then Phi; the backward 9 passes over (n, e); the plain formulas under autograd make about 40
(benchmarks/bench_moe_layer.py, docs/moe.md). On the CPU with the compiled kernel (csrc/noisy_gate.cpp) the forward
and the backward are each one pass per token row on ATen's vector maths. tests/test_noisy_gate.py checks values
against `losses.smooth_load_prob`, the backward against autograd of the plain formulas and by gradcheck in float64,
and the compiled passes against the PyTorch ops.

The router's other (n, e) work runs here too: `randn_like`, its noise draw (torch.randn's values bit for bit, made
faster on the compiled kernel, csrc/normal.cpp), and `softmax_stats`, its clean distribution with the top-1,
logsumexp and entropy the layer's statistics need, in one pass per row.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lens.moe.cpu_runtime import ReusedMemory, cpu_extension, empty_buffer

LOG_INV_SQRT_2PI = -0.5 * math.log(2 * math.pi)  # log of the standard normal density's constant
# PyTorch CPU capabilities whose torch.randn csrc/normal.cpp is checked to reproduce bit for bit
# (tests/test_fast_normal.py); elsewhere `randn_like` is torch.randn_like itself
RANDN_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


class _NoisyTopKGate(torch.autograd.Function):
    """(logits2 (n, 2e), z (n, e)) -> (P (n, e), top values (n, k), top indices (n, k), gate (n, k)); the gate is the
    softmax of the top values (the router's G), in the same pass on the compiled kernel."""

    @staticmethod
    def forward(ctx, logits2: Tensor, z: Tensor, k: int, noise_eps: float,
                memory: ReusedMemory | None) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        n, e = z.shape
        ext = _cpu_gate_kernel(logits2, z)
        ctx.ext, ctx.memory = ext, memory
        if ext is not None:  # the whole forward in one pass per row (csrc/noisy_gate.cpp)
            logits2, z = logits2.contiguous(), z.contiguous()
            std, u, load_prob = (empty_buffer(memory, z.shape, z.dtype, slot) for slot in ("std", "u", "prob"))
            top, idx, gate = z.new_empty(n, k), torch.empty(n, k + 1, dtype=torch.long), z.new_empty(n, k)
            ext.noisy_gate_forward(logits2, z, noise_eps, k, std, u, load_prob, top, idx, gate)
            ctx.save_for_backward(logits2, z, std, u, idx, gate)
            ctx.mark_non_differentiable(idx)
            return load_prob, top, idx[:, :k], gate
        clean, raw = logits2[:, :e], logits2[:, e:]  # (n, e) views
        std = F.softplus(raw).add_(noise_eps)  # (n, e)
        top, idx = torch.addcmul(clean, z, std).topk(k + 1, dim=-1)  # (n, k+1) of H, largest first
        kth, next_ = top[:, k - 1 : k], top[:, k : k + 1]  # (n, 1) the k-th and (k+1)-th largest of H
        # u = (clean - threshold) / std: the k-th largest everywhere, the (k+1)-th at the top k (the
        # entries with H > the (k+1)-th: with ties at the (k+1)-th both thresholds are equal).
        u = torch.sub(clean, kth).scatter_add_(1, idx[:, :k], (kth - next_).expand(n, k)).div_(std)
        load_prob = torch.special.ndtr(u)  # (n, e)
        gate = top[:, :k].softmax(dim=-1)  # softmax after top-k, over the kept noisy logits
        ctx.save_for_backward(logits2, z, std, u, idx, gate)
        ctx.mark_non_differentiable(idx)
        return load_prob, top[:, :k], idx[:, :k], gate

    @staticmethod
    def backward(ctx, g_prob: Tensor | None, g_top: Tensor | None, _g_idx: None,
                 g_gate: Tensor | None) -> tuple[Tensor, None, None, None, None]:
        logits2, z, std, u, idx, gate = ctx.saved_tensors  # idx (n, k+1)
        n, e = z.shape
        k = idx.shape[1] - 1
        if ctx.ext is not None:  # one pass per row (csrc/noisy_gate.cpp)
            g = empty_buffer(ctx.memory, logits2.shape, logits2.dtype, "grad")  # (n, 2e) gradient of logits2
            if g_prob is not None and not (g_prob.stride(-1) == 1 and g_prob.stride(0) in (0, e)):
                g_prob = g_prob.contiguous()  # a broadcast row (the load loss's column sums) stays one row
            ctx.ext.noisy_gate_backward(logits2, z, std, u, idx, g_prob, g_top.contiguous() if g_top is not None else None,
                                        gate, g_gate.contiguous() if g_gate is not None else None, g)  # fmt: skip
            return g, None, None, None, None
        g = logits2.new_empty(n, 2 * e)  # (n, 2e) gradient of logits2, both halves written below
        raw = logits2[:, e:]
        g_clean, g_raw = g[:, :e], g[:, e:]
        g_sparse = raw.new_zeros(n, k + 1)  # gradient of the top-(k+1) noisy logits H
        if g_top is not None:
            g_sparse[:, :k] += g_top
        if g_gate is not None:  # through the softmax: gate * (g_gate - sum(g_gate * gate))
            g_sparse[:, :k] += gate * (g_gate - (g_gate * gate).sum(dim=-1, keepdim=True))
        if g_prob is None:
            g_clean.zero_(), g_raw.zero_()
        else:
            # dP/d clean = phi(u) / std; the density's constant folded in: exp(log c - u^2 / 2)
            torch.addcmul(torch.full((), LOG_INV_SQRT_2PI, dtype=u.dtype, device=u.device), u, u, value=-0.5, out=g_clean)
            g_clean.exp_().mul_(g_prob).div_(std)  # G = g_prob * phi(u) / std
            # the thresholds: dP/d thr = -G; the (k+1)-th largest is the threshold of the top k, the k-th of the rest
            g_in = g_clean.gather(1, idx[:, :k]).sum(dim=1)  # (n,)
            g_sparse[:, k] -= g_in
            g_sparse[:, k - 1] -= g_clean.sum(dim=1) - g_in
            # dP/d std = phi(u) * (-u / std), times g_prob: -G * u; d std / d raw = sigmoid(raw)
            torch.mul(g_clean, u, out=g_raw).mul_(torch.sigmoid(raw)).neg_()
        # H = clean + z * std at the top-(k+1) entries: dH/d clean = 1, dH/d raw = z * sigmoid(raw)
        g_clean.scatter_add_(1, idx, g_sparse)
        g_raw.scatter_add_(1, idx, g_sparse * z.gather(1, idx) * torch.sigmoid(raw.gather(1, idx)))
        return g, None, None, None, None


def _cpu_gate_kernel(logits2: Tensor, z: Tensor) -> object | None:
    """The compiled CPU kernel (moe/cpu_runtime.cpu_extension) when it can run this forward: CPU float32 or float64
    operands of one dtype; else None (the PyTorch ops run)."""
    if logits2.device.type != "cpu" or z.device.type != "cpu" or logits2.dtype != z.dtype or z.dtype not in (
            torch.float32, torch.float64):  # fmt: skip
        return None
    ext = cpu_extension()
    return ext if ext is not None and hasattr(ext, "noisy_gate_forward") else None


def noisy_topk_gate(logits2: Tensor, z: Tensor, k: int, noise_eps: float,
                    memory: ReusedMemory | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Smooth load probability P (n, e), the k largest noisy logits (n, k) and their experts (n, k)
    from logits2 = [x W_g, x W_noise] (n, 2e) and the noise draw z (n, e); needs k < e. `memory`: where the compiled
    CPU path keeps its (n, e) buffers and the gradient between steps (the router's `cpu_memory`)."""
    return _NoisyTopKGate.apply(logits2, z, k, noise_eps, memory)[:3]


def noisy_topk_gate_softmax(logits2: Tensor, z: Tensor, k: int, noise_eps: float,
                            memory: ReusedMemory | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """`noisy_topk_gate` with the router's gate G = softmax of the k largest noisy logits in place of those logits:
    (P (n, e), G (n, k), experts (n, k)); on the compiled kernel the softmax and its backward come with the gate's
    passes (a softmax over rows of k = 2 took 0.2 ms forward and 0.14 backward as its own ops at n = 8192)."""
    prob, _, idx, gate = _NoisyTopKGate.apply(logits2, z, k, noise_eps, memory)
    return prob, gate, idx


def randn_like(t: Tensor, memory: ReusedMemory | None = None) -> Tensor:
    """torch.randn_like(t): the same values bit for bit, drawn from the default generator, which is left as
    torch.randn_like leaves it. On the CPU (float32, 16 or more elements, the compiled kernel, csrc/normal.cpp) the
    generator's mt19937 words come a whole 624-word state at a time and Box-Muller runs on ATen's threads: 0.36 ms
    instead of 1.8 for (8192, 64) on the 2-core CI machine. `memory`: where the block is kept between steps."""
    ext = _cpu_gate_kernel(t, t)
    if ext is None or t.dtype != torch.float32 or t.numel() < 16 or not hasattr(ext, "randn_fill") or (
            torch.backends.cpu.get_cpu_capability() not in RANDN_CAPABILITIES):  # fmt: skip
        return torch.randn_like(t)
    out = empty_buffer(memory, t.shape, t.dtype, "noise")
    ext.randn_fill(out, None)
    return out


class _SoftmaxStats(torch.autograd.Function):
    """logits (n, e) -> (probs = softmax(logits) (n, e), top1 (n,), lse (n,), entropy (n,)) in one compiled pass per
    row; only probs is differentiable (softmax's backward)."""

    @staticmethod
    def forward(ctx, logits: Tensor, ext: object) -> tuple[Tensor, Tensor, Tensor, Tensor]:  # type: ignore[override]
        n = logits.shape[0]
        probs = logits.new_empty(logits.shape)
        top1, lse, entropy = torch.empty(n, dtype=torch.long), logits.new_empty(n), logits.new_empty(n)
        ext.softmax_stats(logits, probs, top1, lse, entropy)
        ctx.save_for_backward(probs)
        ctx.mark_non_differentiable(top1, lse, entropy)
        return probs, top1, lse, entropy

    @staticmethod
    def backward(ctx, g_probs: Tensor, *_: None) -> tuple[Tensor, None]:  # type: ignore[override]
        (probs,) = ctx.saved_tensors
        return torch._softmax_backward_data(g_probs.contiguous(), probs, -1, probs.dtype), None


def softmax_stats(logits: Tensor) -> tuple[Tensor, Tensor, Tensor | None, Tensor | None]:
    """(probs = logits.softmax(-1) (n, e), top1 = probs.argmax(-1) (n,), lse (n,), entropy (n,)): the router's clean
    distribution and the per-token statistics the layer computes from it (`Routing.lse`, `Routing.entropy`: detached
    logsumexp and entropy in nats). On the compiled CPU kernel one pass per row (csrc/noisy_gate.cpp), 0.3 ms instead
    of 1.4 for the softmax, argmax, gathers and dot product at n = 8192, e = 64; elsewhere the softmax and argmax,
    with lse and entropy None (the layer computes them)."""
    ext = _cpu_gate_kernel(logits, logits)
    if ext is None or logits.dim() != 2 or logits.shape[1] == 0 or logits.stride(-1) != 1 or not hasattr(
            ext, "softmax_stats"):  # fmt: skip
        probs = logits.softmax(dim=-1)
        return probs, argmax_rows(probs), None, None
    return _SoftmaxStats.apply(logits, ext)


def argmax_rows(probs: Tensor) -> Tensor:
    """(n,) probs.argmax(dim=-1) (the first of equal maxima, NaN the largest), one pass per row on the compiled CPU
    kernel where it runs (torch's argmax over a short last dimension took 0.5 ms at n = 8192, e = 64)."""
    ext = _cpu_gate_kernel(probs, probs)
    if ext is None or probs.dim() != 2 or probs.shape[1] == 0:
        return probs.argmax(dim=-1)
    return ext.row_argmax(probs.detach().contiguous())
