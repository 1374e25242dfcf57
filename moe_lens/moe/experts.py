"""Expert banks: e experts stored as stacked weights so one grouped matmul runs them all.

- `mlp`: E_i(x) = relu(x W1_i + b1_i) W2_i + b2_i, the two-layer ReLU experts of Shazeer et al. 2017.
- `lora`: one base MLP shared by all experts plus a rank-r adapter per expert on both matrices,
  W_i = W + (alpha / r) A_i B_i (Hu et al. 2021, LoRA, sec. 4.1: the alpha / r scaling, so the
  update's size does not change with r; B_i = 0 at init so every expert starts as the base). The
  base can be frozen (`train_base=False`), as in LoRA fine-tuning.
- `lowrank`: each expert's matrices factorised, W1_i = U1_i V1_i of rank r (the 2025 LSTM-MoE
  study's low-rank experts). U is drawn as nn.Linear draws a weight of its fan-in f (variance
  1/(3f)), V with variance 1/r, so each entry of U V has the variance 1/(3f) of the MLP's weight.
- `shared`: `mlp` experts plus one always-on shared MLP added to every token (DeepSeekMoE-style).

Every bank exposes `split()` (one function per expert, over `unbind` views of the stacked weights,
whose backward writes each weight gradient once: indexing `w[i]` per expert would allocate a full
(e, ...) gradient per expert) for the dense reference and the per-expert loop, and
`forward_grouped(x_sorted, groups, gate_sorted)` (all assignments sorted by expert, one grouped
matmul per matrix, returning gate-weighted outputs).

Grouped matmuls (`grouped_linear`) take `Groups`: `offs` (e,) int32 cumulative group ends computed
on the device, so a CUDA step needs no host sync and runs `F.grouped_mm`; on the CPU, where reading
the group sizes costs nothing, `counts` holds them on the host and `_CPUGroupedLinear` runs each
group as one fused `addmm` written straight into its rows of the output (bias and gate folded in,
no (A, q) temporaries), with a hand-written backward of the same kind. ATen's CPU `grouped_mm` is
itself a loop of `mm` per group, so this does the same matmuls minus the bias matmuls and the extra
passes over (A, q) (benchmarks/bench_moe_layer.py).

MLP banks (`mlp`, `shared`) also have `combine_cpu(x, token, gate, counts, by_token)`: the whole
gated bank as one autograd function from x (n, d) to y (n, d), which `dispatch_grouped` uses on
the CPU. `_CPUGroupedMLPExt` runs it on a compiled kernel (csrc/grouped_mlp.cpp, built on first use
by torch's extension loader; `cpu_extension`): one gather into expert order, two `addmm` and a ReLU
per expert group straight into their rows, and one pass summing each token's gated rows back
(`ByToken`, parallel over tokens); the backward fuses the gather of dy with the gate and the gate's
gradient, and the ReLU mask with a bias gradient. Where no compiler is at hand, `_CPUGroupedMLP`
does the same in PyTorch ops (three per group forward, eleven backward; a gate multiply and an
`index_add` back, or a gather when every token has one assignment), 5-10% slower. Every
hand-written backward pass is checked by gradcheck (tests/test_grouped_cpu.py). Their (A, d) and
(A, h) buffers, weight gradients and saved activations come from `ReusedMemory`, which hands a
block out again only once nothing else holds it, so a CPU step makes no page faults for them.
"""
from __future__ import annotations

import glob
import itertools
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from functools import partial
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

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
    backward is a per-group matmul (a column sum), and the (A, 4) operand keeps 16-byte alignment.
    """
    s4 = torch.cat([scale.unsqueeze(1), scale.new_zeros(scale.shape[0], 3)], dim=1)  # (A, 4)
    b4 = torch.cat([b.unsqueeze(1), b.new_zeros(b.shape[0], 3, b.shape[1])], dim=1)  # (e, 4, q)
    return gmm(s4, b4, offs)


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
        for g, (xg, yg, sg) in enumerate(zip(x.split(counts), y.split(counts), _split(scale, counts))):
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
        parts = zip(x.split(counts), dy.split(counts), _split(dx, counts), _split(scale, counts), _split(ds, counts))
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


class _CPUGroupedMLP(torch.autograd.Function):
    """The whole gated MLP bank on the CPU, one expert group at a time, from x (n, d) to y (n, d).

    Per group g with assignment rows `tok_g` and gates s_g (all from `dispatch_grouped`, sorted by expert):
        h = relu(x[tok_g] W1_g + b1_g)    z = h W2_g + b2_g    y[tok_g] += s_g * z
    so s * (h W2 + b2) = (s h) W2 + s b2, the gate-weighted expert output. The rows are gathered
    once into expert order (xs, (A, d)), every group's two matmuls write straight into their rows of
    the hidden (A, h) and output (A, d) buffers (bias folded into `addmm`), and one gate multiply and
    one `index_add` bring the outputs back to token order (with one assignment per token, `where`
    gives each token's row and one gather does it): three ops per group in the forward. The
    backward mirrors it: one gather of dy into expert order, per group
        u = dy W2^T   ds = rowsum(u * h) + dy b2   dz = s dy   dW2 = h^T dz   db2 = sum dz
        dpre = (s u) * [h > 0]   dW1 = xs^T dpre   db1 = sum dpre   dxs = dpre W1^T
    and one `index_add` (or gather) of dxs into dx. The (A, d) and (A, h) buffers, the weight
    gradients, and the xs and hidden activations saved for backward all come from `memory`
    (`ReusedMemory`), so a step allocates no large block afresh. The per-group work runs on worker
    threads for large experts (`group_threads`); every group writes only its own rows and its own
    slices of the gradients.
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, gate, token, counts, memory, where=None):  # type: ignore[override]
        a, d, h = token.shape[0], x.shape[1], w1.shape[-1]
        xs = torch.index_select(x, 0, token, out=_empty(memory, (a, d), x.dtype, "xs"))  # (A, d) expert order
        hidden = _empty(memory, (a, h), x.dtype, "hidden")  # (A, h)
        z = _empty(memory, (a, d), x.dtype, "z")  # (A, d)
        parts = zip(xs.split(counts), hidden.split(counts), z.split(counts),
                    w1.unbind(0), b1.unbind(0), w2.unbind(0), b2.unbind(0))  # fmt: skip
        threads = group_threads(d, h, counts)
        run_groups(_mlp_forward_groups, parts, counts, threads)
        y = _to_tokens(z.mul_(gate.unsqueeze(1)), token, where, x.shape)  # (n, d)
        ctx.save_for_backward(xs, w1, b1, w2, b2, gate, token, hidden, where)
        ctx.counts, ctx.memory, ctx.threads = counts, memory, threads
        return y

    @staticmethod
    def backward(ctx, dy_all):  # type: ignore[override]
        xs, w1, b1, w2, b2, gate, token, hidden, where = ctx.saved_tensors
        counts, memory = ctx.counts, ctx.memory
        need_x, need_w1, need_b1, need_w2, need_b2, need_gate = ctx.needs_input_grad[:6]
        shape = xs.shape  # (A, d)
        dys = torch.index_select(dy_all.contiguous(), 0, token, out=_empty(memory, shape, xs.dtype, "dys"))
        dxs = _empty(memory, shape, xs.dtype, "z") if need_x else None  # the forward's z block is free again
        dw1, db1, dw2, db2 = (_grad_like(t, counts, memory, name) if need else None
                              for t, need, name in zip((w1, b1, w2, b2), (need_w1, need_b1, need_w2, need_b2),
                                                       ("w1", "b1", "w2", "b2")))  # fmt: skip
        dgate = torch.empty_like(gate) if need_gate else None
        parts = zip(xs.split(counts), dys.split(counts), _split(dxs, counts), hidden.split(counts),
                    gate.unsqueeze(1).split(counts), _split(dgate, counts), w1.transpose(1, 2).unbind(0),
                    w2.transpose(1, 2).unbind(0), b2.unbind(0), _unbind(dw1), _unbind(db1), _unbind(dw2),
                    _unbind(db2))  # fmt: skip
        run_groups(_mlp_backward_groups, parts, counts, ctx.threads)
        dx = _to_tokens(dxs, token, where, dy_all.shape) if need_x else None
        return dx, dw1, db1, dw2, db2, dgate, None, None, None, None


class ByToken(NamedTuple):
    """Each token's assignment rows in expert order, as CSR: the rows of token t are
    rows[ptr[t]:ptr[t+1]] (int64, in slot order). `per_token` is the number of rows of every token
    when it is the same for all (k for the slot routers), else None (expert_choice)."""

    rows: Tensor  # (A,)
    ptr: Tensor  # (n + 1,)
    per_token: int | None


class _CPUGroupedMLPExt(torch.autograd.Function):
    """The gated MLP bank of `_CPUGroupedMLP` on the compiled kernel (csrc/grouped_mlp.cpp): the
    same matmuls per expert group, with the passes around them fused and the GIL released.

    Forward: one gather of x into expert order (xs), per group h = relu(xs W1 + b1) and
    z = h W2 + b2 into their rows, then y[t] = sum of gate_r * z_r over the rows r of token t
    (`ByToken`, parallel over tokens: no zero fill, no scatter). z is kept ungated, so the gate's
    gradient is one dot product per row. Backward:
        dz_r = gate_r * dy[token_r]   ds_r = dy[token_r] . z_r            (one fused gather pass)
        per group: dpre = (dz W2^T) * [h > 0]   dW2 = h^T dz   db2 = colsum dz
                   dW1 = xs^T dpre   db1 = colsum dpre (fused with the mask)   dxs = dpre W1^T
        dx[t] = sum of dxs_r over the rows r of token t.
    Per group: three ops forward, six backward (eleven in `_CPUGroupedMLP`), none from Python.
    Buffers come from `memory` as there; worker threads for large experts as there (`run_groups`).
    """

    @staticmethod
    def forward(ctx, x, w1, b1, w2, b2, gate, token, counts, memory, rows, ptr):  # type: ignore[override]
        ext = cpu_extension()
        a, d, h = token.shape[0], x.shape[1], w1.shape[-1]
        xs = torch.index_select(x, 0, token, out=_empty(memory, (a, d), x.dtype, "xs"))  # (A, d) expert order
        hidden = _empty(memory, (a, h), x.dtype, "hidden")  # (A, h)
        z = _empty(memory, (a, d), x.dtype, "z")  # (A, d) ungated expert outputs
        threads = group_threads(d, h, counts)
        run_groups(partial(_ext_groups, ext.forward_groups, (xs, hidden, z, w1, b1, w2, b2)), _spans(counts), counts,
                   threads)  # fmt: skip
        y = x.new_empty(x.shape)
        ext.combine_rows(z, gate, rows, ptr, y)
        ctx.save_for_backward(xs, w1, w2, gate, token, hidden, z, rows, ptr)
        ctx.counts, ctx.memory, ctx.threads, ctx.ext = counts, memory, threads, ext
        return y

    @staticmethod
    def backward(ctx, dy):  # type: ignore[override]
        ext = ctx.ext  # the forward's module, whatever MOE_LENS_CPU_EXT says now
        xs, w1, w2, gate, token, hidden, z, rows, ptr = ctx.saved_tensors
        counts, memory = ctx.counts, ctx.memory
        need_x, need_w1, need_b1, need_w2, need_b2, need_gate = ctx.needs_input_grad[:6]
        dz = _empty(memory, xs.shape, xs.dtype, "dys")  # (A, d) gate * dy in expert order
        dgate = torch.empty_like(gate) if need_gate else None
        ext.gather_scale_dot(dy.contiguous(), token, gate, z, dz, dgate)
        dxs = dz if need_x else None  # each group's dxs rows overwrite its dz rows once they are used
        dw1 = _grad_like(w1, counts, memory, "w1") if need_w1 else None
        db1 = _grad_like(w1[:, 0], counts, memory, "b1") if need_b1 else None
        dw2 = _grad_like(w2, counts, memory, "w2") if need_w2 else None
        db2 = _grad_like(w2[:, 0], counts, memory, "b2") if need_b2 else None
        run_groups(partial(_ext_groups, ext.backward_groups, (xs, dz, hidden, dxs, w1, w2, dw1, db1, dw2, db2)),
                   _spans(counts), counts, ctx.threads)  # fmt: skip
        dx = None
        if need_x:
            dx = dy.new_empty(dy.shape)
            ext.combine_rows(dxs, None, rows, ptr, dx)
        return dx, dw1, db1, dw2, db2, dgate, None, None, None, None, None


def _spans(counts: tuple[int, ...]) -> list[tuple[int, int, int]]:
    """(group, first row, end row) of each group, for `run_groups` to split among threads."""
    ends = itertools.accumulate(counts)
    return [(g, end - c, end) for g, (c, end) in enumerate(zip(counts, ends))]


def _ext_groups(kernel: Callable, tensors: tuple, spans: list[tuple[int, int, int]]) -> None:
    if not spans:  # every group empty (no tokens)
        return
    ids, starts, ends = zip(*spans)
    kernel(*tensors, list(ids), list(starts), list(ends))


# The compiled CPU kernel (csrc/grouped_mlp.cpp) is built on first use by torch's JIT extension
# loader (a C++ compiler and ninja; about 40 s, once per machine, cached under TORCH_EXTENSIONS_DIR
# or ~/.cache/torch_extensions). MOE_LENS_CPU_EXT=0 turns it off; where it cannot be built, a
# warning says why and the pure-PyTorch kernel (`_CPUGroupedMLP`, the same results) runs instead.
CPU_EXT_ENV = "MOE_LENS_CPU_EXT"
CPU_EXT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "grouped_mlp.cpp")
_ext: dict[str, object] = {}
_ext_lock = threading.Lock()


def cpu_extension() -> object | None:
    """The compiled CPU kernel module, built or loaded once per process; None when turned off by
    MOE_LENS_CPU_EXT=0 or when it cannot be built (with a warning naming the reason)."""
    if os.environ.get(CPU_EXT_ENV, "1") == "0":
        return None
    with _ext_lock:
        if "module" not in _ext:
            try:
                _ext["module"] = _build_cpu_extension()
            except Exception as err:  # no compiler, ninja or headers: say why, run the PyTorch kernel
                reason = (str(err).strip().splitlines() or [""])[0][:200]
                warnings.warn(f"moe-lens: the compiled CPU expert kernel could not be built ({type(err).__name__}: "
                              f"{reason}); using the pure-PyTorch kernel (same results, slower). "
                              f"Set {CPU_EXT_ENV}=0 to skip the attempt.", RuntimeWarning, stacklevel=2)  # fmt: skip
                _ext["module"] = None
        return _ext["module"]


def _build_cpu_extension() -> object:
    from torch.utils import cpp_extension

    cap = torch.backends.cpu.get_cpu_capability()  # DEFAULT, AVX2, AVX512, ...: one build per capability
    name = f"moe_lens_cpu_{cap.lower()}"
    flags = ["-O3", "-fopenmp-simd"] + (["-mavx2", "-mfma"] if cap.startswith("AVX") else [])
    build_dir = cpp_extension._get_build_directory(name, False)  # where torch's loader keeps it
    if not glob.glob(os.path.join(build_dir, f"{name}*.so")):
        print(f"moe-lens: compiling the CPU expert kernel into {build_dir} (once per machine, about a minute)",
              file=sys.stderr, flush=True)  # fmt: skip
    path = os.environ.get("PATH", "")
    try:
        import ninja  # the PyPI package, whose binary is not on PATH in a venv used without activating it

        os.environ["PATH"] = ninja.BIN_DIR + os.pathsep + path
    except ImportError:
        pass
    try:
        return cpp_extension.load(name, [CPU_EXT_SOURCE], extra_cflags=flags)
    finally:
        os.environ["PATH"] = path


def _to_tokens(rows: Tensor, token: Tensor, where: Tensor | None, shape: torch.Size) -> Tensor:
    """(n, d) token-order sums of the rows (A, d) in expert order: out[token[r]] += rows[r]. With one
    row per token, `where` (n,) gives each token's row and this is one gather, without the zero fill
    and with half the time of the scatter (`index_add`)."""
    if where is not None:
        return torch.index_select(rows, 0, where)
    return rows.new_zeros(shape).index_add_(0, token, rows)


def _mlp_forward_groups(parts: list[tuple]) -> None:
    for xg, hg, zg, w1g, b1g, w2g, b2g in parts:
        torch.addmm(b1g, xg, w1g, out=hg).relu_()
        torch.addmm(b2g, hg, w2g, out=zg)


def _mlp_backward_groups(parts: list[tuple]) -> None:
    for xg, dy, dxg, h, s, ds, w1t, w2t, b2g, dw1g, db1g, dw2g, db2g in parts:
        u = torch.mm(dy, w2t)  # (m, h)
        if ds is not None:
            torch.addmv(torch.linalg.vecdot(u, h), dy, b2g, out=ds)
        if dw2g is not None or db2g is not None:
            dz = dy.mul_(s)  # dys is this backward's own buffer
            if dw2g is not None:
                torch.mm(h.t(), dz, out=dw2g)
            if db2g is not None:
                torch.sum(dz, 0, out=db2g)
        dpre = torch.ops.aten.threshold_backward.grad_input(u.mul_(s), h, 0, grad_input=u)  # (m, h), in u
        if dw1g is not None:
            torch.mm(xg.t(), dpre, out=dw1g)
        if db1g is not None:
            torch.sum(dpre, 0, out=db1g)
        if dxg is not None:
            torch.mm(dpre, w1t, out=dxg)


# Expert groups on worker threads (CPU). For large experts in groups of a few hundred rows,
# running whole groups side by side on one BLAS thread each beats running each group's matmuls on
# all BLAS threads: 6-10% shorter steps for d = 512, h = 1024 at e = 32 and 64 on the 2-core CI
# machine. For small experts (d = 256, h = 128) it is 8-20% slower, the Python part of each op
# weighing more under the GIL; for groups of 1024+ rows (e = 8) it gains nothing and each worker
# thread's malloc arena keeps its temporaries (40-90 MB more peak memory)
# (benchmarks/bench_moe_layer.py, docs/moe.md). So threads are used from THREADED_MIN_WEIGHT
# elements per expert matrix (d * h, between the two measured sizes) and below THREADED_MAX_ROWS
# rows per non-empty group on average.
THREADED_MIN_WEIGHT = 1 << 18
THREADED_MAX_ROWS = 1024
GROUP_THREADS: int | None = None  # None: automatic (group_threads); an int forces it (tests, benchmarks)
_pools: dict[int, ThreadPoolExecutor] = {}  # worker count -> pool, for the process in _pools_pid
_pools_pid = os.getpid()
_pool_lock = threading.Lock()


def group_threads(d: int, h: int, counts: tuple[int, ...]) -> int:
    """How many threads run the expert groups of one CPU step: this thread's intra-op thread count
    for experts of at least THREADED_MIN_WEIGHT weights per matrix whose non-empty groups average
    fewer than THREADED_MAX_ROWS rows, else 1 (and 1 for fewer than two non-empty groups)."""
    if GROUP_THREADS is not None:
        return GROUP_THREADS
    groups = sum(c > 0 for c in counts)
    if d * h < THREADED_MIN_WEIGHT or groups < 2 or sum(counts) >= THREADED_MAX_ROWS * groups:
        return 1
    return torch.get_num_threads()


def _worker_pool(workers: int) -> ThreadPoolExecutor:
    """A pool of `workers` threads with one intra-op (BLAS) thread each; one pool per worker count
    (never shut down under a caller that may still submit), all made again after a fork."""
    global _pools_pid
    with _pool_lock:
        if _pools_pid != os.getpid():  # a forked child: the parent's worker threads do not exist here
            _pools.clear()
            _pools_pid = os.getpid()
        if workers not in _pools:
            _pools[workers] = ThreadPoolExecutor(workers, thread_name_prefix="moe-lens-experts",
                                                 initializer=torch.set_num_threads, initargs=(1,))  # fmt: skip
        return _pools[workers]


def _no_grad_call(work: Callable[[list[tuple]], None], parts: list[tuple]) -> None:
    with torch.no_grad():  # grad mode is per thread; the kernels write into out= buffers
        work(parts)


def run_groups(work: Callable[[list[tuple]], None], parts: Iterable[tuple], counts: tuple[int, ...], threads: int) -> None:
    """work(list of per-group operand tuples) over the non-empty groups: in this thread, or split
    into `threads` lists of about equal rows (largest group first to the least loaded list), each
    run on a worker thread of `_worker_pool`."""
    todo = [(c, p) for c, p in zip(counts, parts) if c]
    if threads <= 1 or len(todo) < 2:
        work([p for _, p in todo])
        return
    lists: list[list[tuple]] = [[] for _ in range(threads)]
    rows = [0] * threads
    for c, p in sorted(todo, key=lambda cp: -cp[0]):
        j = rows.index(min(rows))
        lists[j].append(p)
        rows[j] += c
    pool = _worker_pool(threads)
    for future in [pool.submit(_no_grad_call, work, part) for part in lists if part]:
        future.result()


class ReusedMemory:
    """Memory kept from one CPU step to the next for the large buffers of an expert bank: the weight
    gradients, the rows in expert order (A, d) and hidden activations (A, h) saved for backward,
    and the (A, d) output and upstream-gradient buffers.

    A stacked weight gradient (e, p, q) is as large as the bank's weights (128 MB for e = 64,
    d = 512, h = 1024) and the hidden activations (A, h) are 32-64 MB at n = 8192. On the CPU fresh
    blocks that large page-fault on every step: glibc returns them to the OS when freed, and
    PyTorch's CPU allocator caches nothing (its CUDA allocator does, so CUDA never comes here). The
    page faults cost up to a fifth of a step (docs/moe.md).

    `empty(shape, dtype, slot)` hands out a kept block of `slot` again only when nothing but this
    pool refers to its storage (`torch._C._storage_Use_Count`, the check Inductor's CUDA-graph trees
    use for the same purpose) and it is large enough. A gradient still alive as `param.grad` before
    `zero_grad()`, held by the user, or viewed, and activations still saved for a backward that has
    not run, are never written over; a new block is made instead. Each slot keeps at most `keep`
    blocks (two: `param.grad` kept between steps with `zero_grad(set_to_none=False)` holds one while
    the next gradient is made in the other), a block too small for a request is replaced.
    """

    def __init__(self, keep: int = 2) -> None:
        self.keep = keep
        self._blocks: dict[str, list] = {}
        self._lock = threading.Lock()  # two threads running the same layer never get the same block

    def empty(self, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, slot: str) -> Tensor:
        if _USE_COUNT is None:  # torch without the use count: every buffer is fresh
            return torch.empty(shape, dtype=dtype)
        nbytes = math.prod(shape) * dtype.itemsize
        with self._lock:
            blocks = self._blocks.setdefault(slot, [])
            free = [i for i, st in enumerate(blocks) if _USE_COUNT(st._cdata) == 1]  # only this pool holds it
            for i in free:
                if blocks[i].nbytes() >= nbytes:
                    return torch.empty(0, dtype=dtype).set_(blocks[i], 0, shape)
            out = torch.empty(shape, dtype=dtype)
            if len(blocks) < self.keep:
                blocks.append(out.untyped_storage())
            elif free:  # replace a free block that was too small
                blocks[free[0]] = out.untyped_storage()
            return out

    def __getstate__(self) -> dict:  # copies and pickles of a module start with an empty pool
        return {"keep": self.keep}

    def __setstate__(self, state: dict) -> None:
        self.__init__(state["keep"])


_USE_COUNT = getattr(torch._C, "_storage_Use_Count", None)


def _empty(memory: ReusedMemory | None, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, slot: str) -> Tensor:
    return memory.empty(shape, dtype, slot) if memory is not None else torch.empty(shape, dtype=dtype)


def _grad_like(w: Tensor, counts: tuple[int, ...], memory: ReusedMemory | None = None, slot: str = "") -> Tensor:
    """An uninitialised gradient for stacked expert weights w (e, ...), zero where a group is empty."""
    grad = _empty(memory, w.shape, w.dtype, slot)
    for g, c in enumerate(counts):
        if c == 0:
            grad[g].zero_()
    return grad


def _unbind(t: Tensor | None) -> tuple:
    return t.unbind(0) if t is not None else itertools.repeat(None)


def _split(t: Tensor | None, counts: tuple[int, ...]) -> tuple:
    return t.split(counts) if t is not None else (None,) * len(counts)


def _mlp(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
    return F.relu(x @ w1 + b1) @ w2 + b2  # (m, d)


def _lowrank(u1: Tensor, v1: Tensor, c1: Tensor, u2: Tensor, v2: Tensor, c2: Tensor, x: Tensor) -> Tensor:
    h = F.relu((x @ u1) @ v1 + c1)  # (m, h)
    return (h @ u2) @ v2 + c2  # (m, d)


def _grouped_ok(x: Tensor, w: Tensor) -> bool:
    """grouped_mm needs 16-byte-aligned rows (e.g. dims divisible by 4 in fp32) and, on CUDA, 16-bit floats."""
    size = x.element_size()
    aligned = (x.shape[1] * size) % 16 == 0 and (w.shape[-1] * size) % 16 == 0
    dtype_ok = x.device.type == "cpu" or x.dtype in (torch.bfloat16, torch.float16)
    return HAS_GROUPED_MM and aligned and dtype_ok


def _uniform(shape: tuple[int, ...], fan_in: float) -> nn.Parameter:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in): nn.Linear's default init range."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class MLPExperts(nn.Module):
    """e independent two-layer ReLU MLPs, d -> h -> d."""

    def __init__(self, d: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1, self.b1 = _uniform((num_experts, d, hidden), d), _uniform((num_experts, hidden), d)
        self.w2, self.b2 = _uniform((num_experts, hidden, d), hidden), _uniform((num_experts, d), hidden)
        self.cpu_memory = ReusedMemory()  # the CPU kernel's large buffers, reused across steps

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        return [partial(_mlp, *p) for p in zip(*(t.unbind(0) for t in (self.w1, self.b1, self.w2, self.b2)))]

    def combine_cpu(self, x: Tensor, token: Tensor, gate: Tensor, counts: tuple[int, ...], by_token: ByToken) -> Tensor:
        """sum over assignments of gate * E_expert(x[token]), (n, d), fused per expert group (CPU only):
        the compiled kernel where it is built, else `_CPUGroupedMLP`."""
        params = (p.to(x.dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        if cpu_extension() is not None:
            return _CPUGroupedMLPExt.apply(x, *params, gate, token, counts, self.cpu_memory, by_token.rows, by_token.ptr)
        where = by_token.rows if by_token.per_token == 1 else None
        return _CPUGroupedMLP.apply(x, *params, gate, token, counts, self.cpu_memory, where)

    def forward_grouped(self, x: Tensor, groups: Groups, gate: Tensor) -> Tensor:
        h = F.relu(grouped_linear(x, self.w1, self.b1, groups), inplace=True)  # (A, h)
        return grouped_linear(h * gate.unsqueeze(1), self.w2, self.b2, groups, scale=gate)  # (A, d) gated

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class LoRAExperts(nn.Module):
    """A shared base MLP plus a rank-r LoRA adapter per expert on each of its two matrices, scaled by
    alpha / r (None: alpha = r, scale 1)."""

    def __init__(self, d: int, hidden: int, num_experts: int, rank: int, train_base: bool = True,
                 alpha: float | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.scale = (alpha if alpha is not None else rank) / rank  # Hu et al. 2021: delta W = (alpha / r) A B
        self.base1, self.base2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        for p in (*self.base1.parameters(), *self.base2.parameters()):
            p.requires_grad_(train_base)
        self.a1, self.a2 = _uniform((num_experts, d, rank), d), _uniform((num_experts, hidden, rank), hidden)
        self.b1 = nn.Parameter(torch.zeros(num_experts, rank, hidden))  # zero: expert = base at init
        self.b2 = nn.Parameter(torch.zeros(num_experts, rank, d))

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        return [partial(self._one, *p) for p in zip(*(t.unbind(0) for t in (self.a1, self.b1, self.a2, self.b2)))]

    def _one(self, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
        h = F.relu(self.base1(x) + self.scale * ((x @ a1) @ b1))  # (m, h)
        return self.base2(h) + self.scale * ((h @ a2) @ b2)  # (m, d)

    def forward_grouped(self, x: Tensor, groups: Groups, gate: Tensor) -> Tensor:
        lora1 = grouped_linear(grouped_linear(x, self.a1, None, groups), self.b1, None, groups)  # (A, h)
        h = F.relu(self.base1(x) + self.scale * lora1)  # (A, h)
        hg = h * gate.unsqueeze(1)  # the gate folded in before the last matmul: (A, h) is cheaper than (A, d)
        base = F.linear(hg, self.base2.weight.to(hg.dtype)) + gate.unsqueeze(1) * self.base2.bias.to(hg.dtype)
        lora2 = grouped_linear(grouped_linear(hg, self.a2, None, groups), self.b2, None, groups)  # (A, d)
        return base + self.scale * lora2  # (A, d) gated

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class LowRankExperts(nn.Module):
    """e two-layer ReLU MLPs whose matrices are products U V of rank r."""

    def __init__(self, d: int, hidden: int, num_experts: int, rank: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        # U as nn.Linear (variance 1/(3 fan_in)), V with variance 1/r: U V has the MLP weight's variance
        self.u1, self.v1 = _uniform((num_experts, d, rank), d), _uniform((num_experts, rank, hidden), rank / 3)
        self.u2, self.v2 = _uniform((num_experts, hidden, rank), hidden), _uniform((num_experts, rank, d), rank / 3)
        self.c1, self.c2 = _uniform((num_experts, hidden), d), _uniform((num_experts, d), hidden)

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        params = (self.u1, self.v1, self.c1, self.u2, self.v2, self.c2)
        return [partial(_lowrank, *p) for p in zip(*(t.unbind(0) for t in params))]

    def forward_grouped(self, x: Tensor, groups: Groups, gate: Tensor) -> Tensor:
        h = F.relu(grouped_linear(grouped_linear(x, self.u1, None, groups), self.v1, self.c1, groups), inplace=True)
        hg = h * gate.unsqueeze(1)  # (A, h)
        return grouped_linear(grouped_linear(hg, self.u2, None, groups), self.v2, self.c2, groups, scale=gate)  # (A, d)

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class SharedExperts(MLPExperts):
    """Routed MLP experts plus one shared MLP that every token goes through with weight 1."""

    def __init__(self, d: int, hidden: int, num_experts: int) -> None:
        super().__init__(d, hidden, num_experts)
        self.shared_mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def shared(self, x: Tensor) -> Tensor | None:
        return self.shared_mlp(x)  # (n, d)


def build_experts(
    expert_type: str, d: int, hidden: int, num_experts: int, *, rank: int = 8, train_base: bool = True,
    lora_alpha: float | None = None, tt_rank: int = 4,
) -> nn.Module:
    """The expert bank named `expert_type` (one of config.EXPERT_TYPES)."""
    if rank <= 0:
        raise ValueError(f"rank={rank}; allowed: an integer >= 1")
    if lora_alpha is not None and not lora_alpha > 0:
        raise ValueError(f"lora_alpha={lora_alpha}; allowed: > 0")
    if expert_type == "mlp":
        return MLPExperts(d, hidden, num_experts)
    if expert_type == "lora":
        return LoRAExperts(d, hidden, num_experts, rank, train_base, lora_alpha)
    if expert_type == "lowrank":
        return LowRankExperts(d, hidden, num_experts, rank)
    if expert_type == "shared":
        return SharedExperts(d, hidden, num_experts)
    if expert_type == "ttlora":  # imported here: moe/ttlora.py imports this module
        from moe_lens.moe.ttlora import TTLoRAExperts

        return TTLoRAExperts(d, hidden, num_experts, tt_rank, train_base)
    raise ValueError(f"unknown expert_type {expert_type!r}; allowed: mlp, lora, lowrank, shared, ttlora")
