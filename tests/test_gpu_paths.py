"""The CUDA paths that can be checked without a GPU (issue 26): the router in float32 under autocast, no
host sync in the training step, the grouped matmuls' dtype and alignment rules, cuDNN-friendly LSTM inputs."""
from __future__ import annotations

import inspect
import re
from types import SimpleNamespace

import pytest
import torch

from moe_lens.config import MODES, RunConfig
from moe_lens.moe import MoELayer
from moe_lens.moe import grouped as G


def _layer(mode: str, d: int = 256, e: int = 64) -> MoELayer:
    torch.manual_seed(0)
    shape = {} if MODES[mode].get("router") == "dense" else {"num_experts": e}  # dense: its own one-expert shape
    # dispatch="loop": routing does not depend on it, and the CPU kernel (built once, slowly) is not needed here
    cfg = RunConfig.for_mode(mode, expert_hidden=32, dispatch="loop", **shape)
    layer = MoELayer.from_config(cfg, d)
    with torch.no_grad():  # a trained router's scale: logits of several units, where bf16 rounding flips choices
        layer.router.w_gate.weight.mul_(8.0) if hasattr(layer.router, "w_gate") else None
    return layer.train()


@pytest.mark.parametrize("mode", [m for m in MODES if m not in ("dense_flops", "dense_params")])
def test_routing_under_bf16_autocast_equals_float32_routing(mode):
    """Every router of the MODES registry (one mode per preset): idx exactly, gates and probs to fp32
    rounding, under CPU bf16 autocast against no autocast, same weights and the same noise draw. On the
    code before (logits in bf16 under autocast) topk_mask and switch changed the experts of ~1% of tokens."""
    layer, n, t = _layer(mode), 2048, 32
    x = torch.randn(n, 256)
    ids = torch.randint(0, 33278, (n,))
    outs = []
    for autocast in (False, True):
        torch.manual_seed(7)
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            outs.append(layer(x, token_ids=ids, group=t).routing)
    ref, amp = outs
    assert torch.equal(ref.expert_idx, amp.expert_idx)
    assert amp.gate.dtype == torch.float32 and amp.router_probs.dtype == torch.float32
    torch.testing.assert_close(amp.gate, ref.gate, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(amp.router_probs, ref.router_probs, rtol=1e-5, atol=1e-6)
    if ref.dropped is not None:
        assert torch.equal(ref.dropped, amp.dropped)


def test_bf16_router_logits_would_change_the_top1_expert():
    """The reference the test above guards against: the router's matmul in bf16 gives another top-1 for
    some tokens at e = 64, d = 256 (so the equality above is not trivially true)."""
    layer = _layer("topk_mask")
    x = torch.randn(4096, 256)
    w = layer.router.w_gate.weight
    fp32 = (x @ w.t()).argmax(-1)
    bf16 = (x.bfloat16() @ w.bfloat16().t()).float().argmax(-1)
    assert (fp32 != bf16).float().mean() > 0.001


# ------------------------------------------------------------------------------------------- host sync
def test_the_training_loop_reads_nothing_back_per_step():
    """`_Loop.run_epoch`'s step holds no .item(), .tolist(), .cpu() or float(tensor): a sync would show here."""
    from moe_lens.train import _Loop

    src = inspect.getsource(_Loop.run_epoch)
    assert not re.search(r"\.item\(|\.tolist\(|\.cpu\(|\.numpy\(", src)


@pytest.mark.parametrize("mode", ["baseline", "switch", "hybrid", "noisy_topk", "dense"])
def test_lm_step_under_autocast_never_reads_a_tensor_on_the_host(mode, monkeypatch):
    """The LM step as `_Loop.run_epoch` runs it (forward, backward, clip, fused AdamW, StatsWindow) under
    CPU bf16 autocast, which takes the CUDA dispatch (device offsets, F.grouped_mm): with Tensor.item,
    tolist, numpy and __bool__ made to raise, three steps run."""
    from moe_lens.models import build_model
    from moe_lens.stats_window import StatsWindow
    from moe_lens.tasks import get_task
    from moe_lens.train import make_optimizer

    cfg = RunConfig.for_mode(mode, dataset="wikitext2", d_embed=16, d_model=16, num_layers=2, expert_hidden=16,
                             num_experts=4, batch_size=4, bptt=8, pos_tags=False)  # fmt: skip
    torch.manual_seed(0)
    model = build_model(cfg, 50).train()
    params = [p for p in model.parameters() if p.requires_grad]
    opt = make_optimizer(params, cfg, torch.device("cpu"))
    task, window, state = get_task("wikitext2", cfg), StatsWindow(torch.device("cpu")), None
    batches = [{"ids": torch.randint(0, 50, (4, 8)), "target": torch.randint(0, 50, (4, 8)),
                "token_idx": torch.arange(32).reshape(4, 8) + 32 * i, "ntokens": 32} for i in range(3)]  # fmt: skip

    def sync(*a, **k):
        raise AssertionError("host sync in the training step")

    for name in ("item", "tolist", "numpy", "__bool__"):
        monkeypatch.setattr(torch.Tensor, name, sync)
    for batch in batches:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            fwd = task.forward(model, batch, state)
        state = fwd.state
        opt.zero_grad(set_to_none=True)
        (fwd.loss + fwd.aux).backward()
        torch.nn.utils.clip_grad_norm_(params, cfg.clip)
        opt.step()
        window.update(fwd)
    monkeypatch.undo()
    assert torch.isfinite(fwd.loss).item()


# ------------------------------------------------------------------------------------- grouped dtypes
def test_grouped_mm_on_cuda_takes_only_16_bit_aligned_operands():
    def fake(dtype, cols):  # no CUDA here: a stand-in with what `_grouped_ok` reads
        return SimpleNamespace(device=SimpleNamespace(type="cuda"), dtype=dtype, shape=(10, cols),
                               element_size=lambda: torch.empty((), dtype=dtype).element_size())  # fmt: skip

    w = fake(torch.bfloat16, 256)
    assert G._grouped_ok(fake(torch.bfloat16, 256), w) == G.HAS_GROUPED_MM
    assert not G._grouped_ok(fake(torch.float32, 256), fake(torch.float32, 256))
    assert not G._grouped_ok(fake(torch.bfloat16, 4), w)  # 8-byte rows: the old bias operand in bf16


def test_cuda_autocast_runs_the_grouped_matmuls_in_bf16():
    rule = G.autocast_compute_dtype
    assert rule("cuda", torch.float32, True, torch.bfloat16) == torch.bfloat16
    assert rule("cuda", torch.float32, False, torch.bfloat16) == torch.float32
    assert rule("cuda", torch.bfloat16, True, torch.bfloat16) == torch.bfloat16
    assert rule("cpu", torch.float32, True, torch.bfloat16) == torch.float32  # CPU keeps its own rules


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_grouped_bias_operand_has_16_byte_rows_and_is_the_gathered_bias(dtype):
    assert G.bias_columns(dtype) * torch.empty((), dtype=dtype).element_size() == 16
    torch.manual_seed(0)
    expert = torch.tensor([0, 0, 1, 3, 3, 3])
    offs = G.make_groups(expert, 4).offs
    b, scale = torch.randn(4, 8).to(dtype), torch.rand(6).to(dtype)
    out = G.grouped_bias(b, offs, scale)
    torch.testing.assert_close(out.float(), (scale[:, None] * b[expert]).float(), rtol=1e-2, atol=1e-2)


# ------------------------------------------------------------------------------------------ LSTM inputs
def test_lstm_inputs_are_contiguous_and_batch_first():
    """cuDNN takes the LSTM inputs without a copy: contiguous (b, t, d). (The weights are flattened into one
    buffer by nn.LSTM when the model moves to CUDA; that cannot be seen on the CPU.)"""
    from moe_lens.models import build_model

    cfg = RunConfig.for_mode("baseline", dataset="wikitext2", d_embed=16, d_model=16, num_layers=2,
                             expert_hidden=16, num_experts=4, pos_tags=False, dispatch="loop")  # fmt: skip
    model = build_model(cfg, 50).train()
    seen = []
    for lstm in model.lstms:
        assert lstm.batch_first
        lstm.register_forward_pre_hook(lambda m, args: seen.append(args[0]))
    model(torch.randint(0, 50, (4, 8)), torch.arange(32).reshape(4, 8))
    assert len(seen) == len(model.lstms)
    assert all(x.is_contiguous() and x.shape[:2] == (4, 8) for x in seen)
