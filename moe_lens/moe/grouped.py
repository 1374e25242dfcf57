"""Grouped matmuls: each expert group's rows times its own weights, on the device or the CPU. Shapes as
in `moe/layer.py`; A assignment rows sorted by expert into e groups.

`grouped_linear` takes `Groups`: `offs` (e,) int32 cumulative group ends computed on the device, so
a CUDA step needs no host sync and runs `F.grouped_mm`; on the CPU, where reading the group sizes
costs nothing, `counts` holds them on the host and `_CPUGroupedLinear` runs each group as one fused
`addmm` written straight into its rows of the output (bias and gate folded in, no (A, q)
temporaries), with a hand-written backward of the same kind (gradcheck: tests/test_grouped_cpu.py).
ATen's CPU `grouped_mm` is itself a loop of `mm` per group, so this does the same matmuls minus the
bias matmuls and the extra passes over (A, q) (benchmarks/bench_moe_layer.py). The whole gated MLP
bank fused into one autograd function is in moe/grouped_mlp.py.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def gmm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Grouped matmul: rows of x (A, p) in group g (rows offs[g-1]:offs[g]) times w[g] (p, q) -> (A, q)."""
    w = w.to(x.dtype)
    if _grouped_ok(x, w):
        return F.grouped_mm(x, w, offs=offs)
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()  # host sync: fallback path only
    return torch.cat([xs @ w[g] for g, xs in enumerate(x.split(counts))])


def grouped_bias(b: Tensor, offs: Tensor, scale: Tensor) -> Tensor:
    """(A, q): row r of group g gets scale[r] * b[g], as a grouped matmul [scale, 0, 0, 0] @ [b; 0; 0; 0].

    Gathering b[expert] instead would make an (A, q) index whose backward is a slow scatter; here the
    backward is a per-group matmul (a column sum), and the (A, c) operand keeps 16-byte rows (`bias_columns`).
    """
    c = bias_columns(scale.dtype)
    s4 = torch.cat([scale.unsqueeze(1), scale.new_zeros(scale.shape[0], c - 1)], dim=1)  # (A, c)
    b4 = torch.cat([b.unsqueeze(1), b.new_zeros(b.shape[0], c - 1, b.shape[1])], dim=1)  # (e, c, q)
    return gmm(s4, b4, offs)


def bias_columns(dtype: torch.dtype) -> int:
    """Columns of `grouped_bias`'s padded scale operand: 16 bytes per row (4 in fp32, 8 in bf16/fp16), the
    alignment F.grouped_mm needs. With 4 bf16 columns (8 bytes) CUDA fell back to the per-group loop."""
    return max(1, 16 // torch.empty((), dtype=dtype).element_size())


class Groups(NamedTuple):
    """How the A sorted assignment rows split into the e experts' groups."""

    offs: Tensor  # (e,) int32 cumulative group ends, on x's device
    # The e group sizes on the host, which selects the CPU kernels: None on CUDA (reading them would
    # sync) and under CPU autocast (the kernels write into fp32 outputs), where F.grouped_mm runs.
    counts: tuple[int, ...] | None


def make_groups(expert_sorted: Tensor, e: int) -> Groups:
    """Groups of assignments already sorted by expert: (A,) int64 expert ids -> offsets (and host sizes on CPU)."""
    counts = torch.zeros(e, dtype=torch.int32, device=expert_sorted.device).index_add_(
        0, expert_sorted, torch.ones_like(expert_sorted, dtype=torch.int32)
    )
    cpu_kernels = expert_sorted.device.type == "cpu" and not torch.is_autocast_enabled("cpu")
    host = tuple(counts.tolist()) if cpu_kernels else None
    return Groups(counts.cumsum(0, dtype=torch.int32), host)


def grouped_linear(x: Tensor, w: Tensor, b: Tensor | None, groups: Groups, scale: Tensor | None = None) -> Tensor:
    """(A, q): row r of group g is x[r] @ w[g] + scale[r] * b[g] (scale 1 if None; no bias if b is None)."""
    x = x.to(compute_dtype(x))  # CUDA autocast: bf16 operands, so F.grouped_mm runs (no fallback, no sync)
    scale = scale.to(x.dtype) if scale is not None else None
    w = w.to(x.dtype)
    b = b.to(x.dtype) if b is not None else None
    if groups.counts is not None:
        return _CPUGroupedLinear.apply(x, w, b, scale, groups.counts)
    y = gmm(x, w, groups.offs)
    if b is None:
        return y
    return y + grouped_bias(b, groups.offs, scale if scale is not None else x.new_ones(x.shape[0]))


class _CPUGroupedLinear(torch.autograd.Function):
    """Per group g: y_g = x_g w_g + s_g b_g^T as one addmm into y's rows; backward the same way.

    Gradients: dx_g = dy_g w_g^T, dw_g = x_g^T dy_g, db_g = s_g^T dy_g (column sums when s = 1),
    ds_g = dy_g b_g. A Python loop over the e groups (not over tokens): each iteration is one BLAS call.
    """

    @staticmethod
    def forward(ctx, x, w, b, scale, counts):  # type: ignore[override]
        ctx.save_for_backward(x, w, b, scale)
        ctx.counts = counts
        y = x.new_empty(x.shape[0], w.shape[-1])
        for g, (xg, yg, sg) in enumerate(zip(x.split(counts), y.split(counts), split_rows(scale, counts))):
            if b is None:
                torch.mm(xg, w[g], out=yg)
            elif sg is None:
                torch.addmm(b[g], xg, w[g], out=yg)
            else:
                torch.outer(sg, b[g], out=yg).addmm_(xg, w[g])
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        x, w, b, scale = ctx.saved_tensors
        counts = ctx.counts
        need_x, need_w, need_b, need_s = ctx.needs_input_grad[:4]
        dy = dy.contiguous()
        dx = x.new_empty(x.shape) if need_x else None
        dw = torch.empty_like(w) if need_w else None
        db = torch.empty_like(b) if need_b else None
        ds = torch.empty_like(scale) if need_s else None
        parts = zip(x.split(counts), dy.split(counts), split_rows(dx, counts), split_rows(scale, counts), split_rows(ds, counts))
        for g, (xg, dyg, dxg, sg, dsg) in enumerate(parts):
            if need_x:
                torch.mm(dyg, w[g].t(), out=dxg)
            if need_w:
                torch.mm(xg.t(), dyg, out=dw[g])
            if need_b:
                torch.sum(dyg, 0, out=db[g]) if sg is None else torch.mv(dyg.t(), sg, out=db[g])
            if need_s:
                torch.mv(dyg, b[g], out=dsg)
        return dx, dw, db, ds, None

def split_rows(t: Tensor | None, counts: tuple[int, ...]) -> Sequence[Tensor | None]:
    return t.split(counts) if t is not None else (None,) * len(counts)


def compute_dtype(x: Tensor) -> torch.dtype:
    """The dtype the grouped matmuls run in: under CUDA autocast its 16-bit dtype (F.grouped_mm on CUDA
    takes only bf16/fp16, and autocast does not cast its inputs), else x's own. An fp32 x under CUDA
    autocast (the layer fed by an fp32 tensor, as in benchmarks/bench_moe_layer.py) would otherwise
    fall back to the per-group loop, which reads the group sizes on the host."""
    return autocast_compute_dtype(x.device.type, x.dtype, torch.is_autocast_enabled(x.device.type),
                                  torch.get_autocast_dtype(x.device.type))  # fmt: skip


def autocast_compute_dtype(device_type: str, dtype: torch.dtype, autocast: bool, autocast_dtype: torch.dtype) -> torch.dtype:
    """`compute_dtype` as a pure rule (tests/test_gpu_paths.py checks it without a GPU)."""
    if device_type == "cuda" and autocast and dtype == torch.float32:
        return autocast_dtype
    return dtype


def _grouped_ok(x: Tensor, w: Tensor) -> bool:
    """grouped_mm needs 16-byte-aligned rows (e.g. dims divisible by 4 in fp32) and, on CUDA, 16-bit floats."""
    size = x.element_size()
    aligned = (x.shape[1] * size) % 16 == 0 and (w.shape[-1] * size) % 16 == 0
    dtype_ok = x.device.type == "cpu" or x.dtype in (torch.bfloat16, torch.float16)
    return HAS_GROUPED_MM and aligned and dtype_ok
