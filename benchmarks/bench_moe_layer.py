"""MoE layer forward+backward: the layer's dispatch (`auto`) vs the per-expert loop, in one run.

For n tokens, k in {1, 2}, e in {8, 32, 64}, two expert sizes (small: d=256, h=128, the size of
the published LSTM-MoE studies; large: d=512, h=1024) it reports tokens/s of the per-expert loop
and of the grouped dispatch, their ratio, the dispatch `auto` picks, peak extra memory, and the
achieved GFLOP/s of the layer next to the plain matmul GFLOP/s of this machine measured in the
same run on the same shapes (the ceiling no dispatch can pass).

- Timing: both dispatches and the two matmul ceilings (dense, and per expert group) live in one
  process and their steps alternate, so a noisy neighbour or the allocator's state hits all four
  alike, and "% of matmul" is a ratio from the same minutes; each figure is the median of `--reps` steps. A step is
  the layer's forward and backward from a fixed upstream gradient (no loss ops are timed), with the
  input's gradient computed, as under an LSTM.
- Memory: each dispatch runs alone in a fresh subprocess: the peak RSS of two steps above the RSS
  before them on the CPU (the kernel's VmHWM, reset first through /proc/self/clear_refs), the peak
  of max_memory_allocated above the inputs and weights on CUDA.
- FLOPs counted: every matmul of the layer: the experts' 2 * d * h multiply-adds per matrix per
  assignment, two matrices, x3 for forward + backward (12 * d * h * k per token), and the router's
  6 * d * e per token.

    python benchmarks/bench_moe_layer.py [--device cpu|cuda] [--n 8192] [--reps 7]
    python benchmarks/bench_moe_layer.py --profile small,64,2    # where each dispatch's step goes
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without `pip install -e .`
SIZES = {"small": (256, 128), "large": (512, 1024)}


def _sync(device: str) -> None:
    import torch

    if device.startswith("cuda"):
        torch.cuda.synchronize()


def _layer(device: str, d: int, h: int, e: int, k: int, dispatch: str):
    import torch

    from moe_lens.moe import MoELayer

    torch.manual_seed(0)
    router = "switch" if k == 1 else "topk_mask"
    return MoELayer(d, e, k, router=router, expert_hidden=h, dispatch=dispatch).to(device).train()


def _stepper(layer, x, grad):
    import torch

    device = x.device.type
    dtype = torch.bfloat16 if device == "cuda" else None

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            y = layer(x).y
        y.backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def flops_per_token(d: int, h: int, e: int, k: int) -> int:
    return 12 * d * h * k + 6 * d * e


def grouped_ceiling_step(layer, x):
    """The dense ceiling's six matmuls run once per expert group, at the group sizes the layer's
    router gives x (`ceiling_step` per group, each with its own weights), scheduled as the layer
    schedules them (`cpu_runtime.run_groups`: on worker threads, one BLAS thread each, for large
    experts): what per-expert BLAS calls can reach on this machine before any gather, scatter,
    routing or autograd. A dispatch that runs one matmul per expert group cannot pass it; the gap
    between it and the dense ceiling is the cost of small matmuls, not of the dispatch. Returns the
    step and the number of routed rows it runs."""
    import torch

    from moe_lens.moe.cpu_runtime import group_threads, run_groups
    from moe_lens.moe.layer import assignments

    with torch.no_grad():
        _, expert, _ = assignments(layer.router(x, None))
    counts = tuple(torch.bincount(expert, minlength=layer.num_experts).tolist())
    d, h = layer.experts.w1.shape[1:]
    groups = [(ceiling_step(x.device.type, m, d, h),) if m else None for m in counts]
    threads = group_threads(d, h, counts) if x.device.type == "cpu" else 1

    def step() -> None:  # the groups run as the layer runs them: on worker threads for large experts
        run_groups(_run_each, groups, counts, threads)

    return step, sum(counts)


def _run_each(groups: list[tuple]) -> None:
    for (group,) in groups:
        group()


def time_both(device: str, n: int, d: int, h: int, e: int, k: int, reps: int) -> dict:
    """Runs in a child process: loop, grouped, the dense matmul ceiling and the per-expert matmul
    ceiling alternate step by step, so all four see the same machine; median seconds of each (and
    the number of routed assignments the per-expert ceiling ran)."""
    import torch

    torch.manual_seed(1)
    x = torch.randn(n, d, device=device, requires_grad=True)
    grad = torch.randn(n, d, device=device) / n
    layers = {name: _layer(device, d, h, e, k, name) for name in ("loop", "grouped")}
    steps = {name: _stepper(layer, x, grad) for name, layer in layers.items()}
    steps["ceiling"] = ceiling_step(device, n, d, h)
    steps["per_expert"], routed = grouped_ceiling_step(layers["grouped"], x.detach())
    times: dict[str, list[float]] = {name: [] for name in steps}
    for step in steps.values():
        step()  # warm-up
    for _ in range(reps):
        for name, step in steps.items():
            _sync(device)
            t0 = time.perf_counter()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
    return {**{name: statistics.median(t) for name, t in times.items()}, "routed": routed}


def peak_memory(device: str, n: int, d: int, h: int, e: int, k: int, dispatch: str) -> dict:
    """Runs in a child process: peak extra memory (MB) of two steps of one dispatch."""
    import resource

    import torch

    layer = _layer(device, d, h, e, k, dispatch)
    x = torch.randn(n, d, device=device, requires_grad=True)
    step = _stepper(layer, x, torch.randn(n, d, device=device) / n)
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        step(), step()
        return {"peak_mb": (torch.cuda.max_memory_allocated() - base) / 2**20}
    if _reset_peak_rss():  # Linux: the peak RSS of just these two steps, above the RSS before them
        base = _status_kb("VmRSS")
        step(), step()
        return {"peak_mb": (_status_kb("VmHWM") - base) / 1024}
    rss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # elsewhere: growth of the lifetime peak
    step(), step()
    return {"peak_mb": (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - rss0) / 1024}


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (VmHWM) of this process; False where that is not possible."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


def _status_kb(field: str) -> int:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def ceiling_step(device: str, n: int, d: int, h: int):
    """The plain matmul work of this machine on the layer's own shapes: the six matmuls of one dense
    d -> h -> d MLP over all n tokens, forward (X W1, H W2) and backward (dH = dY W2^T, dW2 = H^T dY,
    dX = dH W1^T, dW1 = X^T dH), into preallocated outputs: no autograd, no allocation, no routing.
    fp32 on the CPU, bf16 on CUDA. Its rate is 12 * n * d * h FLOPs per call."""
    import torch

    dtype = torch.bfloat16 if device.startswith("cuda") else torch.float32
    r = lambda *shape: torch.randn(*shape, device=device, dtype=dtype)  # noqa: E731
    x, w1, w2, hid, dy = r(n, d), r(d, h), r(h, d), r(n, h), r(n, d)
    out_h, out_y, out_w1, out_w2, out_x = r(n, h), r(n, d), r(d, h), r(h, d), r(n, d)

    def step() -> None:
        torch.mm(x, w1, out=out_h), torch.mm(hid, w2, out=out_y)
        torch.mm(dy, w2.t(), out=out_h), torch.mm(hid.t(), dy, out=out_w2)
        torch.mm(out_h, w1.t(), out=out_x), torch.mm(x.t(), out_h, out=out_w1)

    return step


def profile(device: str, n: int, size: str, e: int, k: int, dispatch: str, reps: int) -> None:
    """Where one dispatch's step goes: self time per op name, per step, from torch.profiler."""
    import torch
    from torch.profiler import profile as torch_profile

    d, h = SIZES[size]
    x = torch.randn(n, d, device=device, requires_grad=True)
    step = _stepper(_layer(device, d, h, e, k, dispatch), x, torch.randn(n, d, device=device) / n)
    step()
    with torch_profile() as prof:
        for _ in range(reps):
            step()
    events = sorted(prof.key_averages(), key=lambda ev: -ev.self_cpu_time_total)
    total = sum(ev.self_cpu_time_total for ev in events) / reps / 1e3
    mm = sum(ev.self_cpu_time_total for ev in events if ev.key in ("aten::mm", "aten::addmm")) / reps / 1e3
    print(f"{dispatch} {size} e={e} k={k}: {total:.1f} ms/step under the profiler; its matmuls (experts and router, "
          f"mm/addmm) {mm:.1f} ms = {flops_per_token(d, h, e, k) * n / mm / 1e6:.1f} GFLOP/s")  # fmt: skip
    for ev in events[:15]:
        print(f"  {ev.key:36s} {ev.self_cpu_time_total / reps / 1e3:8.2f} ms/step  {ev.count // reps:6d} calls/step")


def auto_choice(device: str, d: int, h: int, e: int, k: int) -> str:
    import torch

    return _layer("cpu", d, h, e, k, "auto").dispatch_for(torch.empty(1, d, device=device))


def child(args: argparse.Namespace) -> None:
    spec = json.loads(args.child)
    fn = {"time": time_both, "memory": peak_memory}[spec.pop("what")]
    print(json.dumps(fn(**spec)))


def run_child(spec: dict) -> dict:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [ROOT, os.environ.get("PYTHONPATH")]))}
    out = subprocess.run([sys.executable, __file__, "--child", json.dumps(spec)], capture_output=True, text=True, env=env)
    if out.returncode != 0:
        raise RuntimeError(out.stderr.strip().splitlines()[-1])
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--experts", default="8,32,64")
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--profile", metavar="SIZE,E,K", help="profile one configuration (both dispatches) instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.profile:
        size, e, k = args.profile.split(",")
        for dispatch in ("loop", "grouped"):
            profile(args.device, args.n, size, int(e), int(k), dispatch, 3)
        return None
    import torch

    print(f"device={args.device} torch={torch.__version__} threads={torch.get_num_threads()} n={args.n} "
          f"median of {args.reps} alternating steps")  # fmt: skip
    sizes = args.sizes.split(",")
    print("matmul = the plain matmul rate on the same shapes (a dense MLP's six matmuls over all n tokens into "
          "preallocated outputs); per-expert = the same six matmuls run per expert group at the routed group sizes, "
          "preallocated. Both are timed in the same process, alternating with the two dispatches.\n")  # fmt: skip
    print("| size | d | h | e | k | loop tok/s | grouped tok/s | auto = | auto / loop | auto GFLOP/s | matmul GFLOP/s "
          "| % of matmul | per-expert GFLOP/s | % of per-expert | loop MB | grouped MB |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for size in sizes:
        d, h = SIZES[size]
        for e in (int(v) for v in args.experts.split(",")):
            for k in (1, 2):
                spec = dict(device=args.device, n=args.n, d=d, h=h, e=e, k=k)
                sec = run_child({**spec, "what": "time", "reps": args.reps})
                mem = {name: run_child({**spec, "what": "memory", "dispatch": name}) for name in ("loop", "grouped")}
                choice = auto_choice(args.device, d, h, e, k)
                auto = sec[choice]  # the layer's `auto` runs exactly that code
                gflops = flops_per_token(d, h, e, k) * args.n / auto / 1e9
                ceiling = 12 * args.n * d * h / sec["ceiling"] / 1e9
                per_expert = 12 * sec["routed"] * d * h / sec["per_expert"] / 1e9
                print(f"| {size} | {d} | {h} | {e} | {k} | {args.n / sec['loop']:,.0f} | {args.n / sec['grouped']:,.0f} | "
                      f"{choice} | {sec['loop'] / auto:.2f}x | {gflops:.1f} | {ceiling:.1f} | {100 * gflops / ceiling:.0f}% | "
                      f"{per_expert:.1f} | {100 * gflops / per_expert:.0f}% | "
                      f"{mem['loop']['peak_mb']:.0f} | {mem['grouped']['peak_mb']:.0f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
