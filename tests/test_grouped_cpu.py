"""The CPU grouped kernels (`_CPUGroupedMLP`, its compiled twin `_CPUGroupedMLPExt`, and
`_CPUGroupedLinear`) against autograd on a plain reference.

All have hand-written backward passes, so each is checked by torch.autograd.gradcheck in float64
(every input that takes a gradient, gates included) and against the same maths written with
ordinary differentiable ops, with empty expert groups and repeated tokens (expert_choice). The
layer-level tests run under both MLP kernels (`kernel` fixture)."""
from __future__ import annotations

import os
import shutil
import threading
import warnings

import pytest
import torch

from moe_lens.moe import cpu_runtime
from moe_lens.moe.banks import LowRankExperts, MLPExperts
from moe_lens.moe.cpu_runtime import ReusedMemory, cpu_extension, group_threads, kernel_threads, run_groups
from moe_lens.moe.grouped import Groups, _CPUGroupedLinear, grouped_linear
from moe_lens.moe.grouped_mlp import ByToken, _CPUGroupedMLP, _CPUGroupedMLPExt
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
    """Run the expert groups in this thread or on two worker threads (cpu_runtime.run_groups)."""
    monkeypatch.setattr(cpu_runtime, "GROUP_THREADS", request.param)
    return request.param


@pytest.fixture(params=["python", "compiled"])
def kernel(request, monkeypatch) -> str:
    """The MLP bank on the pure-PyTorch kernel (MOE_LENS_CPU_EXT=0) or on the compiled one."""
    monkeypatch.setenv(cpu_runtime.CPU_EXT_ENV, "0" if request.param == "python" else "1")
    if request.param == "compiled":
        _require_compiled()
    return request.param


def _require_compiled() -> None:
    """The compiled kernel must build in CI; elsewhere a machine without a C++ compiler skips."""
    if cpu_extension() is None:
        assert os.environ.get("CI") != "true", "the compiled CPU kernel did not build in CI"
        assert shutil.which("c++") is None and shutil.which("g++") is None, "a compiler is here, yet no build"
        pytest.skip("no C++ compiler: the compiled CPU kernel cannot be built here")


def _by_token(token: torch.Tensor, n: int) -> ByToken:
    """Each token's rows, sorted by token (written independently of `layer.by_token_rows`)."""
    ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.bincount(token, minlength=n).cumsum(0)])
    return ByToken(token.argsort(stable=True), ptr, None)


@pytest.mark.parametrize(("n", "k", "empty", "repeat"), [(9, 2, (2,), False), (11, 1, (1,), False), (9, 2, (), True)],
                         ids=["top2", "top1", "repeated-and-absent-tokens"])
@pytest.mark.parametrize("memory", [None, ReusedMemory()], ids=["fresh", "reused"])
def test_compiled_mlp_gradcheck(memory: ReusedMemory | None, threads: int, n: int, k: int, empty: tuple, repeat: bool) -> None:
    _require_compiled()
    tensors, token, expert, counts = _mlp_inputs(n=n, k=k, empty=empty, seed=7)
    if repeat:  # expert_choice-like: token 0 three times, token 1 never
        token = token.clone()
        token[token == 1] = 0
    rows, ptr, _ = _by_token(token, n)
    assert torch.autograd.gradcheck(lambda *t: _CPUGroupedMLPExt.apply(*t, token, counts, memory, rows, ptr), tensors)
    torch.testing.assert_close(_CPUGroupedMLPExt.apply(*tensors, token, counts, memory, rows, ptr),
                               _mlp_reference(*tensors, token, expert))  # fmt: skip
    if repeat:
        assert _CPUGroupedMLPExt.apply(*tensors, token, counts, memory, rows, ptr)[1].abs().max() == 0
    x, w1, b1, w2, b2, gate = tensors  # inputs that take no gradient (a hash router's gates, a frozen input)
    frozen = (x.detach(), w1, b1, w2, b2, gate.detach())
    assert torch.autograd.gradcheck(lambda w1, b1, w2, b2: _CPUGroupedMLPExt.apply(
        frozen[0], w1, b1, w2, b2, frozen[5], token, counts, memory, rows, ptr), (w1, b1, w2, b2))  # fmt: skip


def test_compiled_kernel_falls_back_with_a_warning_when_it_cannot_be_built(monkeypatch) -> None:
    def broken() -> None:
        raise OSError("no compiler here\nsecond line")

    monkeypatch.setenv(cpu_runtime.CPU_EXT_ENV, "1")
    monkeypatch.setattr(cpu_runtime, "_ext", {})
    monkeypatch.setattr(cpu_runtime, "_build_cpu_extension", broken)
    with pytest.warns(RuntimeWarning, match=r"could not be built \(OSError: no compiler here\); using the pure-PyTorch"):
        assert cpu_extension() is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once per process
        assert cpu_extension() is None
        torch.manual_seed(0)
        layer = MoELayer(8, 4, 2, router="topk_mask", expert_hidden=6)
        loop = MoELayer(8, 4, 2, router="topk_mask", expert_hidden=6, dispatch="loop")
        loop.load_state_dict(layer.state_dict())
        x = torch.randn(20, 8)
        torch.testing.assert_close(layer(x).y, loop(x).y)
    monkeypatch.setenv(cpu_runtime.CPU_EXT_ENV, "0")
    monkeypatch.setattr(cpu_runtime, "_build_cpu_extension", lambda: pytest.fail("built although turned off"))
    monkeypatch.setattr(cpu_runtime, "_ext", {})
    assert cpu_extension() is None


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


@pytest.mark.parametrize(("router", "k", "capacity", "per_token"),
                         [("switch", 1, None, 1), ("topk_mask", 2, None, 2), ("noisy_topk", 3, None, 3),
                          ("expert_choice", 1, 1.0, None), ("expert_choice", 2, 1.5, None)])  # fmt: skip
def test_dispatch_gives_each_token_its_rows_in_slot_order(
    monkeypatch, router: str, k: int, capacity: float | None, per_token: int | None
) -> None:
    """The slot routers' rows come from the sort's inverse permutation, k per token in slot order;
    expert_choice (some tokens several times, some never, even at capacity 1 with n assignments)
    gets rows sorted by token. Either way token[rows[ptr[t]:ptr[t+1]]] is all t."""
    seen = []
    combine = MLPExperts.combine_cpu

    def spy(self, x, token, gate, counts, by_token):
        seen.append((token, by_token))
        return combine(self, x, token, gate, counts, by_token)

    monkeypatch.setattr(MLPExperts, "combine_cpu", spy)
    torch.manual_seed(0)
    layer = MoELayer(8, 4, k, router=router, expert_hidden=6, capacity_factor=capacity).eval()  # no noise
    x = torch.randn(40, 8)
    layer(x)
    ((token, (rows, ptr, got)),) = seen
    assert got == per_token
    counts = torch.diff(ptr)
    assert ptr[0] == 0 and sorted(rows.tolist()) == list(range(token.shape[0]))
    assert torch.equal(token[rows], torch.arange(40).repeat_interleave(counts))
    if per_token is None:
        assert (counts != 1).any()  # expert_choice: some token has no row or several
        return
    assert torch.equal(counts, torch.full((40,), per_token))
    routing = layer.router(x)
    expert_sorted = routing.expert_idx.reshape(-1).sort(stable=True).values
    assert torch.equal(expert_sorted[rows].view(40, per_token), routing.expert_idx)  # row j of token t: slot j


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
def test_fused_cpu_path_is_the_one_auto_runs_and_matches_the_loop(threads: int, kernel: str, router: str, k: int) -> None:
    """`auto` on the CPU is the grouped dispatch, which runs MLP experts through the compiled kernel
    (`_CPUGroupedMLPExt`) where it is built, else through `_CPUGroupedMLP`."""
    torch.manual_seed(0)
    x = torch.randn(50, 8, requires_grad=True)
    outs = []
    for dispatch in ("auto", "loop"):
        torch.manual_seed(1)
        layer = MoELayer(8, 6, k, router=router, expert_hidden=12, dispatch=dispatch)
        if dispatch == "auto":
            assert layer.dispatch_for(x) == "grouped" and isinstance(layer.experts, MLPExperts)
        out = layer(x)
        if dispatch == "auto":
            expected = {"python": "_CPUGroupedMLPBackward", "compiled": "_CPUGroupedMLPExtBackward"}[kernel]
            assert expected in _graph_nodes(out.y)
        (out.y.square().sum() + out.aux_loss).backward()
        outs.append((out.y.detach(), layer.experts.w1.grad, layer.experts.b2.grad, layer.router.w_gate.weight.grad))
    for a, b in zip(*outs):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def _graph_nodes(y: torch.Tensor) -> set[str]:
    """The names of the autograd nodes y depends on."""
    seen, names, todo = set(), set(), [y.grad_fn]
    while todo:
        node = todo.pop()
        if node is not None and id(node) not in seen:
            seen.add(id(node))
            names.add(node.name())
            todo.extend(f for f, _ in node.next_functions)
    return names


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


def test_reused_gradient_memory_never_overwrites_a_live_gradient(threads: int, kernel: str) -> None:
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


def test_reused_hidden_memory_is_never_shared_by_two_pending_backwards(threads: int, kernel: str) -> None:
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


def test_reused_step_buffers_are_never_written_over_while_held(threads: int, kernel: str) -> None:
    """The noisy router's logits, gate buffers and gradients and the bank's output and input gradient come from
    ReusedMemory blocks (no fresh pages each step). Each step's routing, output and x.grad, held through the next
    step, are unchanged by it; dropped, their blocks are used again; two forwards before one backward get separate
    blocks; every value and gradient equals a layer's with no reused memory at all."""
    def run(reuse: bool) -> tuple[list[torch.Tensor], set[int]]:
        torch.manual_seed(0)
        layer = MoELayer(8, 6, 2, router="noisy_topk", expert_hidden=6, w_importance=0.1, w_load=0.1)
        if not reuse:
            layer.router.cpu_memory = layer.experts.cpu_memory = None
        results, ptrs, held, snapshots = [], [], [], []
        for n in (40, 40, 40, 25, 60, 40):
            x = torch.randn(n, 8, requires_grad=True)
            out = layer(x)
            (out.y.square().sum() + out.aux_loss).backward()
            for now, then in zip(held, snapshots):  # the previous step's, still held through this one
                assert torch.equal(now, then)
            held = [out.y, out.routing.logits, out.routing.load_prob, out.routing.gate, x.grad]
            snapshots = [t.detach().clone() for t in held]
            results += snapshots + [p.grad.clone() for p in layer.parameters()]
            ptrs += [t.data_ptr() for t in held]
            layer.zero_grad(set_to_none=True)
            del out, x
        a, b = (torch.randn(30, 8, requires_grad=True) for _ in range(2))
        outs = [layer(a), layer(b)]  # both pending: their buffers are both alive
        sum(o.y.pow(3).sum() + o.aux_loss for o in outs).backward()
        results += [a.grad, b.grad] + [p.grad for p in layer.parameters()]
        return results, ptrs

    reused, ptrs = run(reuse=True)
    assert ptrs[11] == ptrs[1]  # step 3's logits get step 1's block again (step 2 held its own through step 3)
    for a, b in zip(reused, run(reuse=False)[0]):
        assert torch.equal(a, b)


def test_groups_run_on_threads_for_large_experts_only() -> None:
    assert group_threads(256, 128, (5, 7, 9)) == 1  # small experts: the GIL makes threads slower
    assert group_threads(512, 1024, (5, 7, 9)) == torch.get_num_threads()
    assert group_threads(512, 1024, (0, 12, 0)) == 1  # one non-empty group: nothing to split
    assert group_threads(512, 1024, (1024, 1100, 0)) == 1  # groups big enough for all BLAS threads


def test_compiled_kernel_runs_whole_groups_on_its_threads_below_1024_rows() -> None:
    threads = torch.get_num_threads()
    assert kernel_threads((5, 7, 9)) == threads  # small or large experts alike: no GIL in the compiled kernel
    assert kernel_threads((256,) * 64) == threads
    assert kernel_threads((0, 12, 0)) == 1  # one non-empty group: nothing to split
    assert kernel_threads((1024, 1100, 0)) == 1  # groups big enough for every BLAS thread


def test_compiled_kernel_parallel_for_uses_every_thread() -> None:
    """at::parallel_for in the extension is a header template: compiled without OpenMP it ran serially (and, in a
    serial 'parallel region', kept each op on one thread). The build passes -fopenmp, so it uses every thread."""
    _require_compiled()
    before = torch.get_num_threads()
    try:
        torch.set_num_threads(2)
        assert cpu_extension().parallel_for_threads() == 2
    finally:
        torch.set_num_threads(before)


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
    pool2 = cpu_runtime._worker_pool(2)
    assert cpu_runtime._worker_pool(2) is pool2
    assert pool2.submit(torch.get_num_threads).result() == 1  # one BLAS thread per worker ...
    caller = torch.get_num_threads()
    pool3 = cpu_runtime._worker_pool(3)
    assert pool3 is not pool2 and torch.get_num_threads() == caller  # ... and the caller keeps its own
    assert pool3.submit(torch.get_num_threads).result() == 1
    assert cpu_runtime._worker_pool(2) is pool2  # still usable by a caller that holds it


def test_kernel_build_is_announced_in_one_line_with_its_duration(tmp_path, monkeypatch, capfd) -> None:
    from torch.utils import cpp_extension

    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / name))
    monkeypatch.setattr(cpp_extension, "load", lambda name, sources, extra_cflags, extra_ldflags: "module")
    assert cpu_runtime._build_cpu_extension() == "module"
    lines = capfd.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and "compiling the CPU expert kernel" in lines[0] and "about a minute" in lines[0]
    (tmp_path / "built").mkdir()
    monkeypatch.setattr(cpp_extension, "_get_build_directory", lambda name, verbose: str(tmp_path / "built"))
    (tmp_path / "built" / f"moe_lens_cpu_{torch.backends.cpu.get_cpu_capability().lower()}.so").write_bytes(b"")
    cpu_runtime._build_cpu_extension()
    assert capfd.readouterr().err == ""  # already built: no announcement


def test_per_group_operands_are_placed_by_field_name() -> None:
    """Each group's operands are a NamedTuple filled by name: a missing or misspelt field raises, and
    the keyword order of the columns does not matter (a positional zip would swap them silently)."""
    from moe_lens.moe.grouped_mlp import MLPGroup, per_group

    cols = {n: [f"{n}{g}" for g in range(3)] for n in MLPGroup._fields}
    parts = per_group(MLPGroup, 3, **dict(reversed(list(cols.items()))))
    assert [p.w2 for p in parts] == ["w20", "w21", "w22"] and parts[1].x == "x1"
    with pytest.raises(TypeError):
        per_group(MLPGroup, 3, **{**{n: v for n, v in cols.items() if n != "b2"}, "b_2": cols["b2"]})
