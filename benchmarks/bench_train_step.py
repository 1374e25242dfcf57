"""WikiText-2 LM training step at the 2025 LSTM-MoE study's size: where the step goes, MoE on vs identity.

Model: embedding 256, 2-layer LSTM 256, an MoE layer of 8 experts of hidden 256 after the first LSTM
(`--mode`, default `baseline`: noisy top-2, importance + load losses), the full WikiText-2 vocabulary
(33,278 words) in the output softmax, batch 64 x 35. The step is the one `moe_lens/train.py`'s
`_Loop.run_epoch` runs, built from the same pieces: `LMTask.forward` (model + cross-entropy),
backward, `clip_grad_norm_` + AdamW + the LR scheduler, `StatsWindow.update` (the loss windows),
`Recorder.add` (the recorder hand-off) and, every `train.LOG_EVERY` steps, `StatsWindow.log` into
`Metrics` and `RunState.save` (logging).

Parts, timed with synchronised timers (`perf_counter`, after `torch.cuda.synchronize` on CUDA):
- forward: hooks on the model's modules mark where each one starts and ends; backward: hooks on
  the gradients of the tensors between them mark where each one's backward starts and ends (on
  the CPU the autograd engine runs on the calling thread, so the marks are in step order).
  - MoE = the MoE layer and its residual LayerNorm, forward and backward (router, aux losses,
    experts);
  - output softmax = the output projection (256 x 33,278) and the cross-entropy, forward and backward;
  - LSTM = the rest of forward and backward: embedding, dropout, both LSTM layers;
- optimizer = zero_grad + clip_grad_norm_ + AdamW.step + scheduler;
- recorder = `Recorder.add` of the step's traces, run every step here and counted at its share of
  the training loop, one step in `record_every` (the config's, 100);
- other = `StatsWindow.update` every step, and `StatsWindow.log` + `RunState.save` run every step
  here and counted at one step in `LOG_EVERY` (50), plus the batch's `_to`.
Each part is the median over `--steps` steps; the step is the sum of the parts' medians (and the
median of the measured whole steps is printed next to it). The same steps are run, alternating, by a
second model whose MoE layer is the identity (y = x: no routing, nothing to record), for tokens/s
with the MoE on and off, in one run.

    MOE_LENS_DATA=... python benchmarks/bench_train_step.py [--steps 12] [--mode baseline] [--threads 2]
    python benchmarks/bench_train_step.py --random-ids    # no dataset: random ids of the 33,278-word vocab
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from collections import defaultdict
from dataclasses import replace
from pathlib import Path

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)  # runs from a checkout without `pip install -e .`
VOCAB = 33_278  # WikiText-2's full training vocabulary (words + <eos>)
PARTS = ("LSTM", "MoE", "output softmax", "optimizer", "recorder", "other")


def config(mode: str):
    from moe_lens.config import RunConfig

    return RunConfig.for_mode(mode, dataset="wikitext2", d_embed=256, d_model=256, num_layers=2, expert_hidden=256,
                              num_experts=8, batch_size=64, bptt=35, vocab_size=None, pos_tags=False,
                              record=True, device="cpu")  # fmt: skip


def batches(cfg, random_ids: bool, steps: int):
    """`steps` + 2 training batches of the LM task: WikiText-2's first windows, or random ids."""
    import numpy as np
    import torch

    from moe_lens.tasks import get_task
    from moe_lens.train import load_data

    if random_ids:
        split = type("Split", (), {})()
        split.token_ids = np.random.default_rng(0).integers(0, VOCAB, cfg.batch_size * cfg.bptt * (steps + 3) + 1)
        vocab = VOCAB
    else:
        data = load_data(cfg)
        split, vocab = data["train"], len(data["train"].vocab)
    task = get_task("wikitext2", cfg)
    out = list(zip(range(steps + 2), task.batches(split, train=True, seed=0)))
    return task, [b for _, b in out], vocab, torch


class Marks:
    """Timestamps of the step's phases: forward hooks on modules, gradient hooks on the tensors between them."""

    def __init__(self, device) -> None:
        self.device, self.t = device, {}

    def now(self) -> float:
        if self.device.type == "cuda":
            import torch

            torch.cuda.synchronize()
        return time.perf_counter()

    def mark(self, name: str) -> None:
        self.t[name] = self.now()

    def on_grad(self, tensor, name: str) -> None:
        if tensor.requires_grad:
            tensor.register_hook(lambda g: self.mark(name))


def instrument(model, marks: Marks) -> None:
    """Forward marks: moe start/end (with its LayerNorm), head start; backward marks: the gradient of
    the head's input (softmax backward done), of the LayerNorm's output (MoE backward starts) and of
    the MoE layer's input (MoE backward done)."""
    moe, norm = model.moes[0], model.norms[0]

    def moe_start(module, args) -> None:  # a pre-hook that returns None leaves the inputs alone
        marks.mark("moe_fwd_start")
        marks.on_grad(args[0], "moe_bwd_end")

    def moe_end(module, args, out) -> None:
        marks.mark("moe_fwd_end")
        marks.on_grad(out, "moe_bwd_start")

    def head_start(module, args) -> None:
        marks.mark("head_fwd_start")
        marks.on_grad(args[0], "head_bwd_end")

    moe.register_forward_pre_hook(moe_start)
    norm.register_forward_hook(moe_end)
    model.head.register_forward_pre_hook(head_start)


def identity_moe():
    """Stands in for `MoELayer` in the identity model: y = x, no aux loss, no routing."""
    from torch import nn

    class Identity(nn.Module):
        def forward(self, x, token_ids=None, group=None):
            return x, x.new_zeros(()), None, None

    return Identity()


def build(cfg, vocab: int, identity: bool, args):
    import torch

    from moe_lens.models import build_model
    from moe_lens.train import make_optimizer

    torch.manual_seed(0)
    model = build_model(cfg, vocab)
    if identity:
        model.moes[0] = identity_moe()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, torch.device("cpu")) if args.fused else torch.optim.AdamW(
        params, lr=cfg.lr, weight_decay=cfg.weight_decay)  # the loop's optimizer, or the foreach AdamW (--foreach)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    return model.train(), params, opt, sched


def run(args: argparse.Namespace) -> None:
    import torch

    from moe_lens.record import Recorder
    from moe_lens.rundir import Metrics, RunState
    from moe_lens.stats_window import StatsWindow
    from moe_lens.train import LOG_EVERY, _to

    torch.set_num_threads(args.threads)
    cfg = config(args.mode)
    task, data, vocab, _ = batches(cfg, args.random_ids, args.steps)
    device = torch.device("cpu")
    print(f"mode={args.mode} torch={torch.__version__} threads={torch.get_num_threads()} vocab={vocab:,} "
          f"batch {cfg.batch_size}x{cfg.bptt} embed {cfg.d_embed} LSTM {cfg.num_layers}x{cfg.d_model} "
          f"{cfg.num_experts} experts of hidden {cfg.expert_hidden}, data={'random ids' if args.random_ids else 'WikiText-2'}; "
          f"{args.steps} steps of each model, alternating; record_every={cfg.record_every}, LOG_EVERY={LOG_EVERY}; "
          f"AdamW {'fused' if args.fused else 'foreach'}")  # fmt: skip
    tmp = tempfile.TemporaryDirectory()
    variants = {}
    for name, identity in (("MoE", False), ("identity", True)):
        run_dir = os.path.join(tmp.name, name)
        os.makedirs(run_dir)
        model, params, opt, sched = build(cfg, vocab, identity, args)
        marks = Marks(device)
        if not identity:
            instrument(model, marks)
        variants[name] = {"model": model, "params": params, "opt": opt, "sched": sched, "marks": marks,
                          "state": None, "window": StatsWindow(device), "metrics": Metrics(Path(run_dir)),
                          "recorder": None if identity else Recorder(Path(run_dir)),
                          "run_state": RunState.start(Path(run_dir), resume=False), "times": defaultdict(list)}
    for i, batch in enumerate(data):
        for name, v in variants.items():
            parts = step(task, cfg, v, batch, i, device, LOG_EVERY, _to)
            if i >= 2:  # two warm-up steps
                for part, sec in parts.items():
                    v["times"][part].append(sec)
    for v in variants.values():
        if v["recorder"] is not None:
            v["recorder"].close()
    report(variants, cfg, args)
    tmp.cleanup()


def step(task, cfg, v: dict, batch: dict, i: int, device, log_every: int, to) -> dict[str, float]:
    """One training step as `_Loop.run_epoch` runs it; seconds per part (recorder and logging unamortised)."""
    import torch

    marks, model = v["marks"], v["model"]
    marks.t.clear()
    t0 = marks.now()
    batch = to(batch, device)
    t_to = marks.now()
    fwd = task.forward(model, batch, v["state"])
    v["state"] = fwd.state
    if v["recorder"] is None:  # the identity model: no routing to add up or record
        fwd = replace(fwd, traces=[])
    loss = fwd.loss + fwd.aux
    t_fwd = marks.now()
    v["opt"].zero_grad(set_to_none=True)
    t_zero = marks.now()
    loss.backward()
    t_bwd = marks.now()
    torch.nn.utils.clip_grad_norm_(v["params"], cfg.clip)
    v["opt"].step()
    v["sched"].step()
    t_opt = marks.now()
    v["window"].update(fwd)
    t_win = marks.now()
    if v["recorder"] is not None:
        v["recorder"].add(fwd.traces, dataset="wikitext2", split="train", epoch=0, step=i)
    t_rec = marks.now()
    v["window"].log(v["metrics"], i + 1, 0, 1.0, v["opt"].param_groups[0]["lr"])
    v["run_state"].save(step=i + 1)
    t_log = marks.now()
    m = marks.t
    out = {"step": t_log - t0, "forward": t_fwd - t_to, "backward": t_bwd - t_zero}
    moe = softmax = 0.0
    if m:
        moe = (m["moe_fwd_end"] - m["moe_fwd_start"]) + (m["moe_bwd_end"] - m["moe_bwd_start"])
        softmax = (t_fwd - m["head_fwd_start"]) + (m["head_bwd_end"] - t_zero)
    else:  # the identity model: the head's share is not split off (it is the same work as in the MoE model)
        softmax = float("nan")
    out.update({"MoE": moe, "output softmax": softmax, "optimizer": t_opt - t_bwd + t_zero - t_fwd,
                "recorder": t_rec - t_win, "window": t_win - t_opt, "log": t_log - t_rec, "to": t_to - t0})
    out["LSTM"] = out["forward"] + out["backward"] - moe - (softmax if m else 0.0)
    return out


def report(variants: dict, cfg, args) -> None:
    from moe_lens.train import LOG_EVERY

    med = {name: {p: statistics.median(t) for p, t in v["times"].items()} for name, v in variants.items()}
    rng = {name: {p: (min(t), max(t)) for p, t in v["times"].items()} for name, v in variants.items()}
    tokens = cfg.batch_size * cfg.bptt
    m, r = med["MoE"], rng["MoE"]
    parts = {"LSTM": m["LSTM"], "MoE": m["MoE"], "output softmax": m["output softmax"], "optimizer": m["optimizer"],
             "recorder": m["recorder"] / cfg.record_every,
             "other": m["window"] + m["to"] + m["log"] / LOG_EVERY}  # fmt: skip
    total = sum(parts.values())
    print(f"\nMoE model, median over {args.steps} steps (ms); the step = the sum of the parts "
          f"({1e3 * total:.0f} ms; median measured step with recorder and logging every step: {1e3 * m['step']:.0f} ms)\n")
    print("| part | ms / step | share of the step | spread (min-max ms per call) |")
    print("|---|---|---|---|")
    spread = {"LSTM": r["LSTM"], "MoE": r["MoE"], "output softmax": r["output softmax"], "optimizer": r["optimizer"],
              "recorder": r["recorder"], "other": r["window"]}  # fmt: skip
    for p, sec in parts.items():
        note = {"recorder": f" (per call {1e3 * m['recorder']:.1f} ms, 1 step in {cfg.record_every})",
                "other": f" (window {1e3 * m['window']:.2f} + batch {1e3 * m['to']:.2f} ms every step, log + state "
                         f"{1e3 * m['log']:.1f} ms 1 step in {LOG_EVERY})"}.get(p, "")  # fmt: skip
        lo, hi = spread[p]
        print(f"| {p} | {1e3 * sec:.1f}{note} | {100 * sec / total:.1f}% | {1e3 * lo:.1f}-{1e3 * hi:.1f} |")
    ident = med["identity"]
    ident_total = ident["forward"] + ident["backward"] + ident["optimizer"] + ident["window"] + ident["to"] \
        + ident["log"] / LOG_EVERY
    paired = [a / b for a, b in zip(_loop_steps(variants["MoE"]["times"]), _loop_steps(variants["identity"]["times"]))]
    print(f"\n| model | ms / step | tokens/s |\n|---|---|---|\n| MoE ({args.mode}) | {1e3 * total:.0f} | "
          f"{tokens / total:,.0f} |\n| MoE replaced by identity | {1e3 * ident_total:.0f} | {tokens / ident_total:,.0f} |")
    print(f"\nMoE step / identity step, per pair of steps run back to back: median {statistics.median(paired):.3f} "
          f"(spread {min(paired):.3f}-{max(paired):.3f})")
    print(f"\nTargets: MoE {100 * parts['MoE'] / total:.1f}% of the step (<= 20%); not LSTM/MoE/softmax "
          f"{100 * (parts['optimizer'] + parts['recorder'] + parts['other']) / total:.1f}% (<= 5%, optimizer included), "
          f"{100 * (parts['recorder'] + parts['other']) / total:.1f}% without the optimizer")  # fmt: skip


def _loop_steps(times: dict) -> list[float]:
    """Each step's seconds with the recorder and logging at the loop's cadence (see `report`)."""
    from moe_lens.train import LOG_EVERY

    return [f + b + o + w + t + lg / LOG_EVERY for f, b, o, w, t, lg in
            zip(times["forward"], times["backward"], times["optimizer"], times["window"], times["to"], times["log"])]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--steps", type=int, default=12, help="timed steps of each model (after 2 warm-up steps)")
    p.add_argument("--mode", default="baseline")
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--foreach", dest="fused", action="store_false",
                   help="the foreach AdamW the loop used before issue 25, instead of train.make_optimizer's fused one")
    p.add_argument("--random-ids", action="store_true", help="random ids of the 33,278-word vocabulary, no dataset")
    run(p.parse_args())


if __name__ == "__main__":
    main()
