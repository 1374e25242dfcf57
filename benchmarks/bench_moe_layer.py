"""MoE layer forward+backward in one `--mode` (router, aux losses and experts): moe-lens vs the reference loop layer.

For n tokens, e in {8, 32, 64}, two expert sizes (small: d=256, h=128, the size of the published
LSTM-MoE studies; large: d=512, h=1024), the mode's k (`--k` to change it) and 1 or 2 threads, it
reports tokens/s of the reference per-expert loop layer and of the grouped dispatch, their ratio, the
router's share of the grouped step, peak extra memory, and the achieved GFLOP/s of the layer next to
the plain matmul GFLOP/s of this machine measured in the same run on the same shapes (the ceiling no
dispatch can pass).

- The mode (`--mode`, any `config.MODES` entry; default `baseline`: Shazeer's noisy top-2 with the
  importance and load losses, w = 0.1 each) sets the router and the aux-loss weights of both layers.
- Reference: the same mode and weights with `dispatch="loop"` (select, run, index_add per expert);
  for the noisy_topk router its router is `PlainNoisyTopKRouter`: Shazeer's formulas as researchers
  write them (two matmuls, softplus, `topk(k+1)` for the threshold, `ndtr`, under autograd), the
  moe-lens router before issue 25. Same maths and, for the same noise draw, the same outputs (checked
  at the start of every timed configuration).
- Router share: the router's forward, the layer's statistics and weighted aux losses, and their
  backward (from a fixed gradient of the gates), timed in the same alternation, over the grouped step.

- Timing: both dispatches and the two matmul ceilings (dense, and per expert group) live in one
  process and their steps alternate, so a noisy neighbour or the allocator's state hits all four
  alike, and "% of matmul" is a ratio from the same minutes; each figure is the median of `--reps` steps. A step is
  the layer's forward and backward from a fixed upstream gradient of y plus the weighted aux loss
  (the aux losses are timed), with the input's gradient computed, as under an LSTM.
- Memory: each dispatch runs alone in a fresh subprocess: the peak RSS of two steps above the RSS
  before them on the CPU (the kernel's VmHWM, reset first through /proc/self/clear_refs), the peak
  of max_memory_allocated above the inputs and weights on CUDA.
- FLOPs counted: every matmul of the layer: the experts' 2 * d * h multiply-adds per matrix per
  assignment, two matrices, x3 for forward + backward (12 * d * h * k per token), and the router's
  6 * d * e per token per router matrix (two for noisy_topk in training: W_g and W_noise).

    python benchmarks/bench_moe_layer.py [--mode baseline] [--device cpu|cuda] [--n 8192] [--reps 7] [--threads 1,2]
    python benchmarks/bench_moe_layer.py --profile small,64,2    # where each layer's step goes
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


def _layer(device: str, d: int, h: int, e: int, k: int, dispatch: str, mode: str = "baseline"):
    """The moe-lens layer of `mode` (`dispatch="reference"`: the reference loop layer, see the docstring)."""
    import torch

    from moe_lens.config import RunConfig
    from moe_lens.moe import MoELayer

    torch.manual_seed(0)
    cfg = RunConfig.for_mode(mode, num_experts=e, top_k=k, expert_hidden=h)
    cfg.dispatch = "loop" if dispatch == "reference" else dispatch
    layer = MoELayer.from_config(cfg, d)
    if dispatch == "reference" and cfg.router == "noisy_topk":
        plain = PlainNoisyTopKRouter(d, e, k, noise_eps=cfg.noise_eps)
        plain.load_state_dict(layer.router.state_dict())
        layer.router = plain
    return layer.to(device).train()


def _plain_router_class():
    from moe_lens.moe.routers import NoisyTopKRouter

    class Plain(NoisyTopKRouter):
        """Shazeer et al. 2017 noisy top-k gating as the plain formulas (the reference's router)."""

        def forward(self, x, token_ids=None, groups=None):
            import torch
            import torch.nn.functional as F

            from moe_lens.moe.losses import smooth_load_prob
            from moe_lens.moe.routers import Routing, top_k

            clean = self.w_gate(x).float()  # (n, e)
            probs = clean.softmax(dim=-1)
            noise_std = F.softplus(self.w_noise(x).float()) + self.noise_eps  # (n, e)
            noisy = clean + torch.randn_like(clean) * noise_std
            load_prob = smooth_load_prob(clean, noisy, noise_std, self.top_k)  # topk(k+1), ndtr
            top_logits, idx = top_k(noisy, self.top_k)
            return Routing(idx, top_logits.softmax(dim=-1), probs, clean, load_prob=load_prob,
                           top1=clean.argmax(dim=-1))  # fmt: skip

    return Plain


def PlainNoisyTopKRouter(*args, **kwargs):  # a class built on first use: torch is imported lazily
    return _plain_router_class()(*args, **kwargs)


def _stepper(layer, x, grad, ids=None):
    import torch

    device = x.device.type
    dtype = torch.bfloat16 if device == "cuda" else None
    one = torch.ones((), device=x.device)

    def step() -> None:
        with torch.autocast(device, dtype=dtype, enabled=dtype is not None):
            out = layer(x, token_ids=ids)
        if out.aux_loss.requires_grad:  # the weighted aux losses' backward with the experts'
            torch.autograd.backward([out.y, out.aux_loss], [grad, one])
        else:
            out.y.backward(grad)
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def router_stepper(layer, x, ids=None):
    """The router part of the layer's step: the router, the layer's statistics and weighted aux loss,
    and their backward from a fixed gradient of the gates (what the experts would send back)."""
    import torch

    from moe_lens.moe.layer import assignments

    with torch.no_grad():
        n_slots = layer.router(x, ids).gate.shape[1]
    g_gate = torch.randn(x.shape[0], n_slots, device=x.device) / x.shape[0]

    def step() -> None:
        r = layer.router(x, ids)
        _, expert, gate = assignments(r)
        loss = layer._weighted_aux(layer._statistics(r, expert, gate))
        if r.gate.requires_grad:
            loss = loss + (r.gate * g_gate).sum()
        if loss.requires_grad:
            loss.backward()
        layer.zero_grad(set_to_none=True)
        x.grad = None

    return step


def router_matrices(layer) -> int:
    """Router weight matrices multiplied per token in training: W_g, plus W_noise for noisy_topk."""
    return sum(1 for name in ("w_gate", "w_noise") if hasattr(layer.router, name))


def flops_per_token(d: int, h: int, e: int, k: int, router_mats: int = 1) -> int:
    return 12 * d * h * k + 6 * d * e * router_mats


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
        _, expert, _ = assignments(layer.router(x, torch.arange(x.shape[0], device=x.device)))
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


def time_both(device: str, n: int, d: int, h: int, e: int, k: int, reps: int, mode: str = "baseline",
              threads: int | None = None) -> dict:
    """Runs in a child process: the reference loop layer, grouped, the router part, the dense matmul
    ceiling and the per-expert matmul ceiling alternate step by step, so all five see the same
    machine; median seconds of each, their spread (min, max), and the number of routed assignments
    the per-expert ceiling ran."""
    import torch

    if threads:
        torch.set_num_threads(threads)
    torch.manual_seed(1)
    x = torch.randn(n, d, device=device, requires_grad=True)
    grad = torch.randn(n, d, device=device) / n
    ids = torch.randint(0, 33278, (n,), device=device)  # token ids (the hash router reads them)
    layers = {name: _layer(device, d, h, e, k, name, mode) for name in ("reference", "grouped")}
    same = _same_outputs(layers, x, ids)
    steps = {name: _stepper(layer, x, grad, ids) for name, layer in layers.items()}
    steps["router"] = router_stepper(layers["grouped"], x, ids)
    steps["ceiling"] = ceiling_step(device, n, d, h)
    if hasattr(layers["grouped"].experts, "w1"):  # MLP banks; the FLOP columns assume MLP experts
        steps["per_expert"], routed = grouped_ceiling_step(layers["grouped"], x.detach())
    else:  # LoRA, low-rank, TT-LoRA experts: no per-expert ceiling
        steps["per_expert"], routed = (lambda: None), 0
    times: dict[str, list[float]] = {name: [] for name in steps}
    cpu: dict[str, list[float]] = {name: [] for name in steps}  # process CPU seconds (all threads) per step
    for step in steps.values():
        step()  # warm-up
    for _ in range(reps):
        for name, step in steps.items():
            _sync(device)
            t0, c0 = time.perf_counter(), time.process_time()
            step()
            _sync(device)
            times[name].append(time.perf_counter() - t0)
            cpu[name].append(time.process_time() - c0)
    ratios = [r / g for r, g in zip(times["reference"], times["grouped"])]  # paired: the same minute
    cpu_ratios = [r / g for r, g in zip(cpu["reference"], cpu["grouped"])]
    return {**{name: statistics.median(t) for name, t in times.items()}, "ratios": ratios, "routed": routed,
            "cpu_ratios": cpu_ratios,
            "router_mats": router_matrices(layers["grouped"]), "same": same}  # fmt: skip


def _same_outputs(layers: dict, x, ids) -> bool:
    """Whether the reference and the grouped layer give the same y and aux loss for the same noise draw."""
    import torch

    outs = []
    with torch.no_grad():
        for layer in layers.values():
            torch.manual_seed(5)
            out = layer(x, token_ids=ids)
            outs.append((out.y, out.aux_loss))
    (y0, a0), (y1, a1) = outs
    return bool(torch.allclose(y0, y1, rtol=1e-4, atol=1e-5) and torch.allclose(a0, a1, rtol=1e-4, atol=1e-6))


def peak_memory(device: str, n: int, d: int, h: int, e: int, k: int, dispatch: str, mode: str = "baseline",
                threads: int | None = None) -> dict:
    """Runs in a child process: peak extra memory (MB) of two steps of one layer."""
    import resource

    import torch

    if threads:
        torch.set_num_threads(threads)
    layer = _layer(device, d, h, e, k, dispatch, mode)
    x = torch.randn(n, d, device=device, requires_grad=True)
    ids = torch.randint(0, 33278, (n,), device=device)
    step = _stepper(layer, x, torch.randn(n, d, device=device) / n, ids)
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


def profile(device: str, n: int, size: str, e: int, k: int, dispatch: str, reps: int, mode: str = "baseline") -> None:
    """Where one layer's step goes: self time per op name, per step, from torch.profiler."""
    import torch
    from torch.profiler import profile as torch_profile

    d, h = SIZES[size]
    x = torch.randn(n, d, device=device, requires_grad=True)
    layer = _layer(device, d, h, e, k, dispatch, mode)
    ids = torch.randint(0, 33278, (n,), device=device)
    step = _stepper(layer, x, torch.randn(n, d, device=device) / n, ids)
    step()
    with torch_profile() as prof:
        for _ in range(reps):
            step()
    events = sorted(prof.key_averages(), key=lambda ev: -ev.self_cpu_time_total)
    total = sum(ev.self_cpu_time_total for ev in events) / reps / 1e3
    mm = sum(ev.self_cpu_time_total for ev in events if ev.key in ("aten::mm", "aten::addmm")) / reps / 1e3
    print(f"{dispatch} {size} e={e} k={k}: {total:.1f} ms/step under the profiler; its matmuls (experts and router, "
          f"mm/addmm) {mm:.1f} ms = {flops_per_token(d, h, e, k, router_matrices(layer)) * n / mm / 1e6:.1f} GFLOP/s")  # fmt: skip
    for ev in events[:15]:
        print(f"  {ev.key:36s} {ev.self_cpu_time_total / reps / 1e3:8.2f} ms/step  {ev.count // reps:6d} calls/step")


def auto_choice(device: str, d: int, h: int, e: int, k: int, mode: str) -> str:
    import torch

    return _layer("cpu", d, h, e, k, "auto", mode).dispatch_for(torch.empty(1, d, device=device))


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
    from moe_lens.config import MODES

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--mode", default="baseline", choices=tuple(MODES), help="router and aux losses of both layers")
    p.add_argument("--device", default="cpu")
    p.add_argument("--n", type=int, default=8192)
    p.add_argument("--reps", type=int, default=7)
    p.add_argument("--experts", default="8,32,64")
    p.add_argument("--k", type=int, help="experts per token (default: the mode's top_k)")
    p.add_argument("--sizes", default="small,large")
    p.add_argument("--threads", default="1,2", help="comma-separated torch thread counts (CPU)")
    p.add_argument("--no-memory", action="store_true", help="skip the peak-memory subprocesses")
    p.add_argument("--profile", metavar="SIZE,E,K", help="profile one configuration (both layers) instead")
    p.add_argument("--child", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        return child(args)
    if args.profile:
        size, e, k = args.profile.split(",")
        for dispatch in ("reference", "grouped"):
            profile(args.device, args.n, size, int(e), int(k), dispatch, 3, args.mode)
        return None
    import torch

    k = args.k or MODES[args.mode].get("top_k", 2)
    print(f"mode={args.mode} device={args.device} torch={torch.__version__} n={args.n} k={k} "
          f"median of {args.reps} alternating steps (spread: min-max over the steps)")  # fmt: skip
    print("reference = the per-expert loop layer with the plain router formulas, same mode; moe-lens = the layer's "
          f"`auto` dispatch ({auto_choice(args.device, 8, 8, 4, min(k, 4), args.mode)} here); ratio = reference / "
          "moe-lens per step pair; router = router + statistics + aux losses, forward and backward, over the "
          "moe-lens step; matmul = the plain matmul rate of a dense MLP on the expert shapes; GFLOP/s assume MLP experts, count the "
          "router matmuls; ratio at the matmul rate = reference time / (the layer's FLOPs at that rate): what a layer "
          "of nothing but its matmuls would reach; cpu-time ratio = the paired ratio of process CPU seconds (all "
          "threads), less sensitive than wall time to other processes.\n")  # fmt: skip
    print("| threads | size | d | h | e | k | reference tok/s | moe-lens tok/s | ratio (spread) | router share | "
          "GFLOP/s | matmul GFLOP/s | % of matmul | per-expert GFLOP/s | ratio at the matmul rate | cpu-time ratio | "
          "ref MB | moe-lens MB | same outputs |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for threads in (int(t) for t in args.threads.split(",")):
        for size in args.sizes.split(","):
            d, h = SIZES[size]
            for e in (int(v) for v in args.experts.split(",")):
                spec = dict(device=args.device, n=args.n, d=d, h=h, e=e, k=k, mode=args.mode, threads=threads)
                sec = run_child({**spec, "what": "time", "reps": args.reps})
                mem = {name: {"peak_mb": float("nan")} if args.no_memory else
                       run_child({**spec, "what": "memory", "dispatch": name}) for name in ("reference", "grouped")}
                ratios = sec["ratios"]
                gflops = flops_per_token(d, h, e, k, sec["router_mats"]) * args.n / sec["grouped"] / 1e9
                ceiling = 12 * args.n * d * h / sec["ceiling"] / 1e9
                per_expert = 12 * sec["routed"] * d * h / sec["per_expert"] / 1e9 if sec["routed"] else float("nan")
                # the ratio a layer doing only its matmuls (router's included) at the dense matmul rate would reach
                bound = sec["reference"] * ceiling / (flops_per_token(d, h, e, k, sec["router_mats"]) * args.n / 1e9)
                cpu = sec["cpu_ratios"]
                print(f"| {threads} | {size} | {d} | {h} | {e} | {k} | {args.n / sec['reference']:,.0f} | "
                      f"{args.n / sec['grouped']:,.0f} | {statistics.median(ratios):.2f}x ({min(ratios):.2f}-{max(ratios):.2f}) | "
                      f"{100 * sec['router'] / sec['grouped']:.0f}% | {gflops:.1f} | {ceiling:.1f} | "
                      f"{100 * gflops / ceiling:.0f}% | {per_expert:.1f} | {bound:.2f}x | {statistics.median(cpu):.2f}x | "
                      f"{mem['reference']['peak_mb']:.0f} | "
                      f"{mem['grouped']['peak_mb']:.0f} | {'yes' if sec['same'] else 'NO'} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
