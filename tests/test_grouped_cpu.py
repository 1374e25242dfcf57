"""The CPU grouped kernels (`_CPUGroupedMLP`, `_CPUGroupedLinear`) against autograd on a plain reference.

Both have hand-written backward passes, so each is checked by torch.autograd.gradcheck in float64
(every input that takes a gradient, gates included) and against the same maths written with
ordinary differentiable ops, with empty expert groups and repeated tokens (expert_choice)."""
from __future__ import annotations

import threading

import pytest
import torch

from moe_lens.moe import experts
from moe_lens.moe.experts import (
    Groups,
    LowRankExperts,
    MLPExperts,
    ReusedMemory,
    _CPUGroupedLinear,
    _CPUGroupedMLP,
    group_threads,
    grouped_linear,
    run_groups,
)
from moe_lens.moe.layer import MoELayer


def _assignments(n: int, e: int, k: int, empty: tuple[int, ...] = (), seed: int = 0):
    """(token, expert, gate) sorted by expert, with the experts in `empty` given no rows."""
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(e) if i not in empty])
    expert = allowed[torch.randint(0, len(allowed), (n * k,), generator=g)]
    token = torch.arange(n).repeat_interleave(k)
    order = expert.argsort(stable=True)
    counts = tuple(torch.bincount(expert, minlength=e).tolist())
    gate = torch.rand(n * k, generator=g, dtype=torch.float64)
    return token[order], expert[order], gate, counts


def _mlp_reference(x, w1, b1, w2, b2, gate, token, expert):
    h = torch.relu(torch.einsum("ad,adh->ah", x[token], w1[expert]) + b1[expert])
    z = torch.einsum("ah,ahd->ad", h, w2[expert]) + b2[expert]
    return torch.zeros_like(x).index_add(0, token, gate.unsqueeze(1) * z)


def _mlp_inputs(n=9, d=5, h=6, e=4, k=2, empty=(2,), seed=0):
    token, expert, gate, counts = _assignments(n, e, k, empty, seed)
    g = torch.Generator().manual_seed(seed + 1)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64, requires_grad=True)  # noqa: E731
    x, w1, b1, w2, b2 = r(n, d), r(e, d, h), r(e, h), r(e, h, d), r(e, d)
    return (x, w1, b1, w2, b2, gate.requires_grad_(True)), token, expert, counts


@pytest.fixture(params=[1, 2], ids=["serial", "threads"])
def threads(request, monkeypatch) -> int:
    """Run the expert groups in this thread or on two worker threads (experts.run_groups)."""
    monkeypatch.setattr(experts, "GROUP_THREADS", request.param)
    return request.param


@pytest.mark.parametrize("memory", [None, ReusedMemory()], ids=["fresh", "reused"])
def test_grouped_mlp_gradcheck_with_an_empty_expert(memory: ReusedMemory | None, threads: int) -> None:
    tensors, token, _, counts = _mlp_inputs()
    assert 0 in counts
    assert torch.autograd.gradcheck(lambda *t: _CPUGroupedMLP.apply(*t, token, counts, memory), tensors)


def _where(token: torch.Tensor) -> torch.Tensor:
    """Each token's row in expert order, for one row per token (what `dispatch_grouped` passes)."""
    return torch.empty_like(token).index_copy_(0, token, torch.arange(token.shape[0]))


@pytest.mark.parametrize("memory", [None, ReusedMemory()], ids=["fresh", "reused"])
def test_grouped_mlp_gradcheck_with_one_row_per_token(memory: ReusedMemory | None, threads: int) -> None:
    """k = 1: the outputs come back to token order by the gather `where`, not by index_add."""
    tensors, token, expert, counts = _mlp_inputs(n=11, k=1, empty=(1,), seed=6)
    where = _where(token)
    assert 0 in counts and sorted(token.tolist()) == list(range(11))
    assert torch.autograd.gradcheck(lambda *t: _CPUGroupedMLP.apply(*t, token, counts, memory, where), tensors)
    y = _CPUGroupedMLP.apply(*tensors, token, counts, memory, where)
    torch.testing.assert_close(y, _mlp_reference(*tensors, token, expert))


@pytest.mark.parametrize(("router", "k", "capacity", "given"),
                         [("switch", 1, None, True), ("topk_mask", 2, None, False), ("expert_choice", 1, 1.0, False)])
def test_dispatch_gives_the_token_rows_only_for_one_assignment_per_token(
    monkeypatch, router: str, k: int, capacity: float | None, given: bool
) -> None:
    """`where` only when every token has exactly one assignment: not for top-2, nor for expert_choice
    at capacity 1 (n assignments, but some tokens twice and some never)."""
    seen = []
    combine = MLPExperts.combine_cpu

    def spy(self, x, token, gate, counts, where=None):
        seen.append(where)
        if where is not None:
            assert torch.equal(token[where], torch.arange(x.shape[0]))
        return combine(self, x, token, gate, counts, where)

    monkeypatch.setattr(MLPExperts, "combine_cpu", spy)
    torch.manual_seed(0)
    layer = MoELayer(8, 4, k, router=router, expert_hidden=6, capacity_factor=capacity)
    layer(torch.randn(40, 8))
    assert len(seen) == 1 and (seen[0] is not None) == given


@pytest.mark.parametrize("empty", [(), (0, 3)])
def test_grouped_mlp_equals_reference_in_value_and_gradient(empty: tuple[int, ...], threads: int) -> None:
    tensors, token, expert, counts = _mlp_inputs(n=30, e=5, k=2, empty=empty, seed=3)
    dy = torch.randn(30, 5, dtype=torch.float64)
    grads = []
    for fn in (lambda *t: _CPUGroupedMLP.apply(*t, token, counts, None), lambda *t: _mlp_reference(*t, token, expert)):
        y = fn(*tensors)
        grads.append((y.detach(), *torch.autograd.grad(y, tensors, dy)))
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)
    for i in empty:  # an expert without rows gets exact zero gradients
        assert grads[0][2][i].abs().max() == 0 and grads[0][3][i].abs().max() == 0


def test_grouped_linear_gradcheck_with_scale_bias_and_empty_group() -> None:
    token, expert, gate, counts = _assignments(7, 3, 2, empty=(1,), seed=4)
    g = torch.Generator().manual_seed(5)
    x = torch.randn(14, 4, generator=g, dtype=torch.float64, requires_grad=True)
    w = torch.randn(3, 4, 6, generator=g, dtype=torch.float64, requires_grad=True)
    b = torch.randn(3, 6, generator=g, dtype=torch.float64, requires_grad=True)
    s = gate.requires_grad_(True)
    assert torch.autograd.gradcheck(lambda *t: _CPUGroupedLinear.apply(*t, counts), (x, w, b, s))
    assert torch.autograd.gradcheck(lambda x, w, b: _CPUGroupedLinear.apply(x, w, b, None, counts), (x, w, b))
    assert torch.autograd.gradcheck(lambda x, w: _CPUGroupedLinear.apply(x, w, None, None, counts), (x, w))
    ref = torch.einsum("ap,apq->aq", x, w[expert]) + s.unsqueeze(1) * b[expert]
    out = grouped_linear(x, w, b, Groups(torch.tensor(counts).cumsum(0).int(), counts), scale=s)
    torch.testing.assert_close(out, ref)


@pytest.mark.parametrize(("router", "k"), [("topk_mask", 2), ("switch", 1)])
def test_fused_cpu_path_is_the_one_auto_runs_and_matches_the_loop(threads: int, router: str, k: int) -> None:
    """`auto` on the CPU is the grouped dispatch, which runs MLP experts through _CPUGroupedMLP."""
    torch.manual_seed(0)
    x = torch.randn(50, 8, requires_grad=True)
    outs = []
    for dispatch in ("auto", "loop"):
        torch.manual_seed(1)
        layer = MoELayer(8, 6, k, router=router, expert_hidden=12, dispatch=dispatch)
        if dispatch == "auto":
            assert layer.dispatch_for(x) == "grouped" and isinstance(layer.experts, MLPExperts)
        out = layer(x)
        (out.y.square().sum() + out.aux_loss).backward()
        outs.append((out.y.detach(), layer.experts.w1.grad, layer.experts.b2.grad, layer.router.w_gate.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_lowrank_grouped_matches_loop_gradients() -> None:
    torch.manual_seed(0)
    x = torch.randn(40, 8)
    grads = []
    for dispatch in ("grouped", "loop"):
        torch.manual_seed(2)
        layer = MoELayer(8, 5, 2, router="topk_mask", expert_type="lowrank", expert_hidden=6, rank=3, dispatch=dispatch)
        assert isinstance(layer.experts, LowRankExperts)
        layer(x).y.square().sum().backward()
        grads.append([p.grad for p in layer.parameters()])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_reused_gradient_memory_never_overwrites_a_live_gradient(threads: int) -> None:
    """Steps with zero_grad(set_to_none=True) reuse one block; a gradient still held (param.grad, a
    saved reference, a view) is never written over, and accumulation into a kept .grad stays exact."""
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 2, router="topk_mask", expert_hidden=6)
    x = torch.randn(40, 8)

    def grad_of_w1() -> torch.Tensor:
        layer(x).y.square().sum().backward()
        return layer.experts.w1.grad

    first = grad_of_w1()
    expected, a = first.clone(), first.data_ptr()
    layer.zero_grad(set_to_none=True)
    second = grad_of_w1()  # `first` is still held, so its block is not reused
    b = second.data_ptr()
    assert b != a
    torch.testing.assert_close(first, expected)
    del first  # block a is free again
    layer.zero_grad(set_to_none=True)
    view = second[1:]  # a view keeps block b alive
    del second
    third = grad_of_w1()
    assert third.data_ptr() == a
    torch.testing.assert_close(view, expected[1:])
    torch.testing.assert_close(third, expected)
    del view, third
    layer.zero_grad(set_to_none=True)
    assert grad_of_w1().data_ptr() in (a, b)
    assert all(len(blocks) <= 2 for blocks in layer.experts.cpu_memory._blocks.values())
    layer.zero_grad(set_to_none=False)  # accumulate into a kept .grad: the other block is the summand
    torch.testing.assert_close(grad_of_w1(), expected)
    torch.testing.assert_close(grad_of_w1(), 2 * expected)


def test_reused_hidden_memory_is_never_shared_by_two_pending_backwards(threads: int) -> None:
    """Two forwards before their backwards (gradient accumulation), then batches of other sizes:
    every gradient equals the one the same layer gives with no reused memory at all."""
    torch.manual_seed(0)
    layer = MoELayer(8, 4, 2, router="topk_mask", expert_hidden=6)
    batches = [torch.randn(n, 8) for n in (40, 40, 25, 60, 25)]

    def grads(reuse: bool) -> list[torch.Tensor]:
        layer.experts.cpu_memory = ReusedMemory() if reuse else None
        layer.zero_grad(set_to_none=True)
        first, second = layer(batches[0]).y, layer(batches[1]).y  # both saved hiddens pending
        (first.square().sum() + second.pow(3).sum()).backward()
        out = [layer.experts.w1.grad.clone(), layer.experts.w2.grad.clone()]
        for x in batches[2:]:  # smaller, larger, smaller: kept blocks are reused or replaced
            layer.zero_grad(set_to_none=True)
            xg = x.clone().requires_grad_(True)
            layer(xg).y.square().sum().backward()
            out += [layer.experts.w1.grad.clone(), xg.grad]
        return out

    for a, b in zip(grads(reuse=True), grads(reuse=False)):
        torch.testing.assert_close(a, b)


def test_groups_run_on_threads_for_large_experts_only() -> None:
    assert group_threads(256, 128, (5, 7, 9)) == 1  # small experts: the GIL makes threads slower
    assert group_threads(512, 1024, (5, 7, 9)) == torch.get_num_threads()
    assert group_threads(512, 1024, (0, 12, 0)) == 1  # one non-empty group: nothing to split
    assert group_threads(512, 1024, (1024, 1100, 0)) == 1  # groups big enough for all BLAS threads


def test_run_groups_covers_every_non_empty_group_once_and_raises_worker_errors() -> None:
    seen: list[int] = []
    lock = threading.Lock()

    def work(parts: list[tuple]) -> None:
        assert not torch.is_grad_enabled()
        with lock:
            seen.extend(p[0] for p in parts)

    counts = (4, 0, 9, 1, 0, 6)
    with torch.no_grad():
        run_groups(work, [(g,) for g in range(6)], counts, threads=2)
    assert sorted(seen) == [0, 2, 3, 5]

    def fail(parts: list[tuple]) -> None:
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        run_groups(fail, [(g,) for g in range(6)], counts, threads=2)


def test_one_worker_pool_per_thread_count_whose_workers_keep_one_blas_thread() -> None:
    pool2 = experts._worker_pool(2)
    assert experts._worker_pool(2) is pool2
    assert pool2.submit(torch.get_num_threads).result() == 1  # one BLAS thread per worker ...
    caller = torch.get_num_threads()
    pool3 = experts._worker_pool(3)
    assert pool3 is not pool2 and torch.get_num_threads() == caller  # ... and the caller keeps its own
    assert pool3.submit(torch.get_num_threads).result() == 1
    assert experts._worker_pool(2) is pool2  # still usable by a caller that holds it
