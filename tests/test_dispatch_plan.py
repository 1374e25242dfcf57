"""The compiled CPU kernel's dispatch around the expert groups (csrc/grouped_mlp.cpp):

- `token_major_plan`, the counting sort of the slot routers' token-major assignments, against the general path
  it replaces (`expert.argsort(stable=True)`, the index ops, `bincount`, the inverse permutation by index_copy_);
- `forward_groups`' gather of each group's rows into expert order, against `torch.index_select` and per-group
  `torch.addmm` (bitwise: the same copies and the same BLAS calls on the same rows), and `backward_groups`' gather
  of the gated upstream gradient against torch indexing;
- the layer with the plan against the layer on the argsort path, bitwise in value and gradients."""
from __future__ import annotations

import pytest
import torch

from moe_lens.moe import cpu_runtime, grouped_mlp
from moe_lens.moe import layer as layer_mod
from moe_lens.moe.cpu_runtime import cpu_extension
from moe_lens.moe.grouped_mlp import token_major_plan
from moe_lens.moe.layer import MoELayer
from tests.test_grouped_cpu import _graph_nodes, _require_compiled


@pytest.fixture(autouse=True)
def compiled(monkeypatch) -> None:
    monkeypatch.setenv(cpu_runtime.CPU_EXT_ENV, "1")
    _require_compiled()


def _token_major(n: int, s: int, e: int, empty: tuple[int, ...] = (), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(e) if i not in empty])
    expert = allowed[torch.randint(0, len(allowed), (n * s,), generator=g)]
    return torch.arange(n).repeat_interleave(s), expert


@pytest.mark.parametrize(("n", "s", "e", "empty"), [(200, 2, 8, ()), (97, 1, 5, (0, 3)), (64, 3, 64, (63,)),
                                                    (1, 2, 4, ()), (300, 2, 1, ())])  # fmt: skip
def test_plan_equals_stable_argsort_bincount_and_inverse(n: int, s: int, e: int, empty: tuple[int, ...]) -> None:
    token, expert = _token_major(n, s, e, empty, seed=n)
    plan = token_major_plan(torch.empty(n, 3), token, expert, e)
    order = expert.argsort(stable=True)  # the general path of layer.dispatch_grouped
    a = n * s
    assert plan.order.shape == plan.token.shape == plan.by_token.rows.shape == (a,)
    assert torch.equal(plan.order, order)
    assert torch.equal(plan.token, token[order])
    assert plan.counts == tuple(torch.bincount(expert, minlength=e).tolist()) and len(plan.counts) == e
    assert all(plan.counts[i] == 0 for i in empty)
    assert torch.equal(plan.by_token.rows, torch.empty_like(order).index_copy_(0, order, torch.arange(a)))
    assert torch.equal(plan.by_token.ptr, torch.arange(0, a + 1, s)) and plan.by_token.per_token == s


def test_plan_leaves_other_assignments_to_the_general_path(monkeypatch) -> None:
    token, expert = _token_major(10, 2, 4)
    x = torch.empty(10, 3)
    repeated = token.clone()
    repeated[1] = 5  # expert_choice-like: not token-major
    assert token_major_plan(x, repeated, expert, 4) is None
    assert token_major_plan(x[:7], token[:14], expert[:14], 4) is not None
    assert token_major_plan(x[:6], token[:14], expert[:14], 4) is None  # 14 assignments are not s per token of 6
    empty = torch.zeros(0, dtype=torch.long)
    assert token_major_plan(x[:0], empty, empty, 4) is None  # no tokens
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert token_major_plan(x, token, expert, 4) is None
    monkeypatch.setenv(cpu_runtime.CPU_EXT_ENV, "0")  # the PyTorch kernel
    assert token_major_plan(x, token, expert, 4) is None
    monkeypatch.setattr(grouped_mlp, "cpu_extension", lambda: pytest.fail("the CPU kernel loaded for another device"))
    assert token_major_plan(x.to("meta"), token.to("meta"), expert.to("meta"), 4) is None  # as on CUDA


@pytest.mark.parametrize("bad", [4, -1])
def test_plan_rejects_an_expert_id_out_of_range(bad: int) -> None:
    token, expert = _token_major(10, 2, 4)
    expert[7] = bad
    with pytest.raises(IndexError, match=rf"expert id {bad} of assignment 7 out of range \[0, 4\)"):
        token_major_plan(torch.empty(10, 3), token, expert, 4)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_forward_groups_gathers_each_groups_rows_bitwise(threads: int, dtype: torch.dtype) -> None:
    """xs is x[token] and hidden, z are the per-group addmm of those rows, bit for bit, on 1 or 2 threads."""
    n, s, e, d, h = 300, 2, 6, 16, 24
    token, expert = _token_major(n, s, e, empty=(2,), seed=3)
    order = expert.argsort(stable=True)
    token = token[order]
    counts = torch.bincount(expert, minlength=e).tolist()
    g = torch.Generator().manual_seed(4)
    x, w1, b1, w2, b2 = (torch.randn(*shape, generator=g, dtype=dtype)
                         for shape in ((n, d), (e, d, h), (e, h), (e, h, d), (e, d)))  # fmt: skip
    ends = torch.tensor(counts).cumsum(0).tolist()
    spans = [(i, end - c, end) for i, (c, end) in enumerate(zip(counts, ends)) if c]
    ids, starts, stops = (list(col) for col in zip(*spans))
    xs = torch.full((n * s, d), float("nan"), dtype=dtype)  # every row must be written
    hidden, z = torch.empty(n * s, h, dtype=dtype), torch.empty(n * s, d, dtype=dtype)
    cpu_extension().forward_groups(x, token, xs, hidden, z, w1, b1, w2, b2, ids, starts, stops, threads)
    ref_xs = torch.index_select(x, 0, token)
    ref_hidden, ref_z = torch.empty_like(hidden), torch.empty_like(z)
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # the kernel runs each group's matmuls on one thread
    try:
        for i, start, stop in spans:
            hg = ref_hidden[start:stop]
            torch.addmm(b1[i], ref_xs[start:stop], w1[i], out=hg).relu_()
            torch.addmm(b2[i], hg, w2[i], out=ref_z[start:stop])
    finally:
        torch.set_num_threads(before)
    assert torch.equal(xs, ref_xs) and torch.equal(hidden, ref_hidden) and torch.equal(z, ref_z)
    bad = token.clone()
    bad[5] = n
    with pytest.raises(IndexError, match=rf"token {n} out of range"):
        cpu_extension().forward_groups(x, bad, xs, hidden, z, w1, b1, w2, b2, ids, starts, stops, threads)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize(("router", "k"), [("switch", 1), ("noisy_topk", 2), ("topk_mask", 3)])
def test_layer_with_the_plan_equals_the_argsort_path_bitwise(monkeypatch, threads: int, router: str, k: int) -> None:
    """A training step (noise drawn from the same seed) gives the same y, aux loss and gradients, bit for bit,
    with the counting sort and with the general argsort path (the plan turned off)."""
    monkeypatch.setattr(cpu_runtime, "GROUP_THREADS", threads)
    calls = []

    def spy(*args):
        calls.append(token_major_plan(*args))
        return calls[-1]

    results = []
    for plan in (spy, lambda *args: None):
        monkeypatch.setattr(layer_mod, "token_major_plan", plan)
        torch.manual_seed(0)
        moe = MoELayer(16, 6, k, router=router, expert_hidden=12, w_importance=0.1, w_load=0.1).train()
        x = torch.randn(150, 16, requires_grad=True)
        out = moe(x)
        ((out.y * torch.randn(150, 16)).sum() + out.aux_loss).backward()
        assert "_CPUGroupedMLPExtBackward" in _graph_nodes(out.y)
        results.append([out.y, out.aux_loss, x.grad, *(p.grad for p in moe.parameters() if p.grad is not None)])
    assert len(calls) == 1 and calls[0] is not None  # the first run took the plan
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("threads", [1, 2])
def test_backward_groups_gathers_the_gated_upstream_gradient_per_group(threads: int) -> None:
    """dz = gate * dy[token] (bit for bit, one rounding either way), ds = dy[token] . z, and dW2 = hidden^T dz as
    the per-group torch.mm of those rows, with each group's gather fused into its backward."""
    n, s, e, d, h = 200, 2, 5, 16, 24
    token, expert = _token_major(n, s, e, empty=(1,), seed=8)
    token = token[expert.argsort(stable=True)]
    counts = torch.bincount(expert, minlength=e).tolist()
    g = torch.Generator().manual_seed(9)
    a = n * s
    dy, z, xs, w1, w2 = (torch.randn(*shape, generator=g, dtype=torch.float64)
                         for shape in ((n, d), (a, d), (a, d), (e, d, h), (e, h, d)))  # fmt: skip
    gate, hidden = torch.rand(a, generator=g, dtype=torch.float64), torch.randn(a, h, generator=g, dtype=torch.float64).relu()
    ends = torch.tensor(counts).cumsum(0).tolist()
    spans = [(i, end - c, end) for i, (c, end) in enumerate(zip(counts, ends)) if c]
    ids, starts, stops = (list(col) for col in zip(*spans))
    dz, ds, dw2 = torch.full_like(z, float("nan")), torch.full_like(gate, float("nan")), torch.zeros_like(w2)
    ext = cpu_extension()
    ext.backward_groups(dy, token, gate, z, dz, ds, xs, hidden, None, w1, w2, None, None, dw2, None, ids, starts, stops,
                        threads)  # fmt: skip
    assert torch.equal(dz, gate.unsqueeze(1) * dy[token])
    torch.testing.assert_close(ds, (dy[token] * z).sum(1))
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        for i, start, stop in spans:
            assert torch.equal(dw2[i], torch.mm(hidden[start:stop].t(), dz[start:stop]))
    finally:
        torch.set_num_threads(before)
    assert dw2[1].abs().max() == 0  # the empty expert's slice untouched
    bad = token.clone()
    bad[3] = -1
    with pytest.raises(IndexError, match="token -1 out of range"):
        ext.backward_groups(dy, bad, gate, z, dz, ds, xs, hidden, None, w1, w2, None, None, dw2, None, ids, starts,
                            stops, threads)  # fmt: skip
