"""The CPU runtime of the expert banks: the compiled kernel's loader, the worker-thread pool that runs
expert groups side by side, and `ReusedMemory`, which keeps the large per-step buffers between steps.

None of this changes a number: the pool only schedules the per-group kernels of `moe/grouped.py`
(each group writes only its own rows), and `ReusedMemory` only decides which storage a buffer lives
in. Module globals (`GROUP_THREADS`, the pools, the loaded kernel) are per process; tests and
benchmarks set `GROUP_THREADS` here.
"""
from __future__ import annotations

import glob
import math
import os
import sys
import threading
import warnings
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor

import torch
from torch import Tensor

# The compiled CPU kernel (csrc/grouped_mlp.cpp) is built on first use by torch's JIT extension
# loader (a C++ compiler and ninja; about a minute, once per machine, cached under TORCH_EXTENSIONS_DIR
# or ~/.cache/torch_extensions). MOE_LENS_CPU_EXT=0 turns it off; where it cannot be built, a
# warning says why and the pure-PyTorch kernel (`_CPUGroupedMLP`, the same results) runs instead.
CPU_EXT_ENV = "MOE_LENS_CPU_EXT"
CPU_EXT_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), "csrc", "grouped_mlp.cpp")
CPU_EXT_SOURCES = [CPU_EXT_SOURCE] + [os.path.join(os.path.dirname(CPU_EXT_SOURCE), f) for f in (
    "noisy_gate.cpp", "normal.cpp")]  # one module
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


def capability_flags(cap: str) -> list[str]:
    """The C++ flags of the compiled kernel for PyTorch's CPU capability `cap` (DEFAULT, AVX2, AVX512, ...)."""
    # On x86 the kernel is built for the capability PyTorch's own kernels run at (AVX2 or AVX-512), and ATen's vector
    # maths (at::vec, csrc/noisy_gate.cpp) with it: its Vectorized types and the Sleef functions libtorch_cpu carries.
    # At AVX-512 the 16-lane Sleef functions are about twice as fast as the 8-lane ones on the CI machine (softplus
    # 0.70 -> 0.38 ms, erf 0.29 -> 0.18 ms over (8192, 64) on 2 threads); elsewhere at::vec is its portable scalar code.
    # csrc/normal.cpp reproduces torch.randn of the same capability from these macros.
    avx2 = ["-mavx2", "-mfma", "-mf16c"]
    if cap.startswith("AVX512"):
        flags = avx2 + ["-mavx512f", "-mavx512dq", "-mavx512vl", "-mavx512bw", "-DCPU_CAPABILITY=AVX512",
                        "-DCPU_CAPABILITY_AVX512"]  # fmt: skip
    elif cap.startswith("AVX"):
        flags = avx2 + ["-DCPU_CAPABILITY=AVX2", "-DCPU_CAPABILITY_AVX2"]
    else:
        flags = []
    return ["-O3", "-fopenmp-simd"] + flags


def _build_cpu_extension() -> object:
    from torch.utils import cpp_extension

    cap = torch.backends.cpu.get_cpu_capability()  # DEFAULT, AVX2, AVX512, ...: one build per capability
    name = f"moe_lens_cpu_{cap.lower()}"
    flags = capability_flags(cap)
    # ATen's at::parallel_for is a header template: it runs in parallel only when the extension itself is compiled
    # with OpenMP (torch's own OpenMP runtime is the one already loaded); without it every parallel_for ran serially.
    omp = ["-fopenmp"] if torch._C.has_openmp and sys.platform.startswith("linux") else []
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
        return cpp_extension.load(name, CPU_EXT_SOURCES, extra_cflags=flags + omp, extra_ldflags=omp)
    finally:
        os.environ["PATH"] = path


# Expert groups on worker threads (CPU), for the pure-PyTorch kernel; the compiled kernel runs groups side by side
# on its own OpenMP threads instead (`kernel_threads`). For large experts in groups of a few hundred rows,
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
    """How many threads run the expert groups of one CPU step on the PyTorch kernel: `kernel_threads`' count for
    experts of at least THREADED_MIN_WEIGHT weights per matrix, else 1 (`GROUP_THREADS` forces it)."""
    if GROUP_THREADS is None and d * h < THREADED_MIN_WEIGHT:
        return 1
    return kernel_threads(counts)


def kernel_threads(counts: tuple[int, ...]) -> int:
    """How many threads the compiled kernel (csrc/grouped_mlp.cpp) runs the expert groups of one CPU step on, whole
    groups per thread with each group's matmuls on its thread (ATen's OpenMP pool, no GIL): this thread's intra-op
    thread count when the non-empty groups average fewer than THREADED_MAX_ROWS rows, else 1 (each group's matmuls
    then use every thread). Unlike `run_groups`' worker threads (PyTorch kernel), there is no Python part per op, so
    small experts gain too: e = 64, d = 256, h = 128, k = 2 on 2 threads, the 64 groups' forward and backward
    matmuls 45.8 -> 41 ms (docs/moe.md). `GROUP_THREADS` forces the count."""
    if GROUP_THREADS is not None:
        return GROUP_THREADS
    groups = sum(c > 0 for c in counts)
    if groups < 2 or sum(counts) >= THREADED_MAX_ROWS * groups:
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


def empty_buffer(memory: ReusedMemory | None, shape: tuple[int, ...] | torch.Size, dtype: torch.dtype, slot: str) -> Tensor:
    return memory.empty(shape, dtype, slot) if memory is not None else torch.empty(shape, dtype=dtype)


def empty_grad(w: Tensor, counts: tuple[int, ...], memory: ReusedMemory | None = None, slot: str = "") -> Tensor:
    """An uninitialised gradient for stacked expert weights w (e, ...), zero where a group is empty."""
    grad = empty_buffer(memory, w.shape, w.dtype, slot)
    for g, c in enumerate(counts):
        if c == 0:
            grad[g].zero_()
    return grad


class _PooledLinear(torch.autograd.Function):
    """x w^T (no bias) with its output and the gradient of x in `memory`'s blocks: the same matmuls as F.linear."""

    @staticmethod
    def forward(ctx, x: Tensor, w: Tensor, memory: ReusedMemory) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(x, w)
        ctx.memory = memory
        return torch.mm(x, w.t(), out=memory.empty((x.shape[0], w.shape[0]), x.dtype, "linear"))

    @staticmethod
    def backward(ctx, g: Tensor) -> tuple[Tensor | None, Tensor | None, None]:  # type: ignore[override]
        x, w = ctx.saved_tensors
        dx = torch.mm(g, w, out=ctx.memory.empty(x.shape, x.dtype, "linear_dx")) if ctx.needs_input_grad[0] else None
        dw = g.t().mm(x) if ctx.needs_input_grad[1] else None
        return dx, dw, None


def pooled_linear(x: Tensor, w: Tensor, memory: ReusedMemory | None) -> Tensor:
    """F.linear(x, w) for a 2-D x; on the CPU (float32/float64, no autocast) with the (n, out) output and x's (n, in)
    gradient in `memory`'s blocks, reused across steps. Fresh blocks of several MB page-fault on every step (about
    2 us a page on the CI machine, docs/moe.md); the router's logits and their gradient are two of them."""
    if memory is None or x.device.type != "cpu" or x.dim() != 2 or x.dtype != w.dtype or torch.is_autocast_enabled("cpu"):
        return torch.nn.functional.linear(x, w)
    return _PooledLinear.apply(x, w, memory)
