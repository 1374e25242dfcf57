"""MoE layer forward+backward: grouped dispatch vs the per-expert loop, in one run.

For n tokens, k in {1, 2}, e in {8, 32, 64}, two expert sizes (small: d=256, h=128, the size of
the published LSTM-MoE studies; large: d=512, h=1024) it reports tokens/s of each dispatch, their
ratio, peak extra memory, and the achieved GFLOP/s of the layer next to the plain matmul GFLOP/s
of this machine measured in the same run (the ceiling no dispatch can pass).

FLOPs counted: expert matmuls only, 2*d*h multiply-adds per matrix per assignment, two matrices,
x3 for forward + backward = 12 * d * h * n * k; the router adds ~1%. Each configuration runs in a
fresh subprocess so peak RSS belongs to it alone (CPU) or uses max_memory_allocated (CUDA).

    python benchmarks/bench_moe_layer.py [--device cpu|cuda] [--n 8192] [--reps 5]
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time

SIZES = {"small": (256, 128), "large": (512, 1024)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _median_time(fn, reps: int, device: str) -> float:
    fn()  # warm-up
    _sync(device)
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        _sync(device)
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure_one(device: str, n: int, d: int, h: int, e: int, k: int, dispatch: str, reps: int) -> dict:
    """Runs in a child process: time one (size, e, k, dispatch) and its peak memory."""
    import resource

    import torch

    from moe_lens.moe import MoELayer

    torch.manual_seed(0)
    router = "switch" if k == 1 else "topk_mask"
    layer = MoELayer(d, e, k, router=router, expert_hidden=h, dispatch=dispatch).to(device).train()
    x = torch.randn(n, d, device=device, requires_grad=True)
    dtype = torch.bfloat16 if device.startswith("cuda") else None
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def step() -> None:
        with torch.autocast(device.split(":")[0], dtype=dtype, enabled=dtype is not None):
            out = layer(x)
        out.y.float().square().mean().backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    if device.startswith("cuda"):
        torch.cuda.reset_peak_memory_stats()
    sec = _median_time(step, reps, device)
    if device.startswith("cuda"):
        peak_mb = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024
    gflops = 12 * d * h * n * k / sec / 1e9
    return {"sec": sec, "tok_s": n / sec, "gflops": gflops, "peak_mb": peak_mb}


def matmul_gflops(device: str, reps: int) -> float:
    """Plain fp32 (bf16 on CUDA) matmul rate of this machine, forward+backward shaped like the layer."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    a = torch.randn(8192, 512, device=device, dtype=dtype, requires_grad=True)
    w = torch.randn(512, 1024, device=device, dtype=dtype, requires_grad=True)

    grad = torch.randn(8192, 1024, device=device, dtype=dtype)

    def step() -> None:
        (a @ w).backward(grad)

    sec = _median_time(step, reps, device)
    return 3 * 2 * 8192 * 512 * 1024 / sec / 1e9


def auto_choice(device: str, d: int, h: int, e: int, k: int) -> str:
    import torch

    from moe_lens.moe import MoELayer

    layer = MoELayer(d, e, k, router="switch" if k == 1 else "topk_mask", expert_hidden=h)
    return layer.dispatch_for(torch.empty(1, d, device=device))


def child(args: argparse.Namespace) -> None:
    spec = json.loads(args.child)
    print(json.dumps(measure_one(**spec)))


def run_child(spec: dict) -> dict:
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--experts", default="8,32,64")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    import torch

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} n={args.n} "
          f"median of {args.reps}")  # fmt: skip
    ceiling = matmul_gflops(args.device, args.reps)
    print(f"plain matmul: {ceiling:.1f} GFLOP/s\n")
    print("| size | d | h | e | k | loop tok/s | grouped tok/s | auto = | auto / loop | auto GFLOP/s | % of matmul | loop MB | grouped MB |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size, (d, h) in SIZES.items():
        for e in (int(v) for v in args.experts.split(",")):
            for k in (1, 2):
                spec = dict(device=args.device, n=args.n, d=d, h=h, e=e, k=k, reps=args.reps)
                loop, grouped = run_child({**spec, "dispatch": "loop"}), run_child({**spec, "dispatch": "grouped"})
                choice = auto_choice(args.device, d, h, e, k)
                auto = grouped if choice == "grouped" else loop  # the layer's `auto` runs exactly that code
                print(f"| {size} | {d} | {h} | {e} | {k} | {loop['tok_s']:,.0f} | {grouped['tok_s']:,.0f} | {choice} | "
                      f"{auto['tok_s'] / loop['tok_s']:.2f}x | {auto['gflops']:.1f} | "
                      f"{100 * auto['gflops'] / ceiling:.0f}% | {loop['peak_mb']:.0f} | {grouped['peak_mb']:.0f} |",
                      flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
