"""The compiled CPU kernel's dispatch around the expert groups (csrc/grouped_mlp.cpp):

- `token_major_plan`, the counting sort of the slot routers' token-major assignments, against the general path
  it replaces (`expert.argsort(stable=True)`, the index ops, `bincount`, the inverse permutation by index_copy_);
- `forward_groups`' gather of each group's rows into expert order, against `torch.index_select` and per-group
  `torch.addmm` (bitwise: the same copies and the same BLAS calls on the same rows), and every gradient
  `backward_groups` writes (without the expert outputs z) against autograd of the plain per-expert formulas;
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


def _per_expert_reference(dy, token, expert, gate, xs, w1, b1, w2, b2):
    """Autograd of the plain per-expert formulas, in float64: h = relu(xs W1 + b1), z = h W2 + b2, y[t] = sum of
    gate * z over t's rows; the gradients of <y, dy> by gate, xs, W1, b1, W2, b2 (written apart from the kernel)."""
    leaves = [t.detach().double().requires_grad_(True) for t in (gate, xs, w1, b1, w2, b2)]
    gate, xs, w1, b1, w2, b2 = leaves
    y = torch.zeros(dy.shape, dtype=torch.float64)
    for i in expert.unique().tolist():
        rows = (expert == i).nonzero().squeeze(1)
        z = torch.relu(xs[rows] @ w1[i] + b1[i]) @ w2[i] + b2[i]
        y = y.index_add(0, token[rows], gate[rows].unsqueeze(1) * z)
    return torch.autograd.grad((y * dy.double()).sum(), leaves)


WANTED = {"all": ("ds", "dxs", "dw1", "db1", "dw2", "db2"), "ds": ("ds",), "w2": ("dw2", "db2"),
          "x-b1": ("dxs", "db1")}  # fmt: skip


@pytest.mark.parametrize("wanted", list(WANTED))
@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_backward_groups_equals_autograd_of_the_per_expert_formulas(threads: int, dtype: torch.dtype,
                                                                    wanted: str) -> None:
    """Every gradient backward_groups writes, the gate's ds = (dy W2^T) . h + dy . b2 (no z read) and db2 among them,
    equals autograd of the plain per-expert formulas, with zero gates (a row's ds is still dy . z there, its other
    gradients zero) and an empty expert (its slices untouched), for any subset of wanted outputs; dW2 is bit for
    bit the per-group torch.mm of hidden^T and gate * dy[token] (the gate product rounded once, as before)."""
    n, s, e, d, h = 200, 2, 5, 16, 24
    token, expert = _token_major(n, s, e, empty=(1,), seed=8)
    order = expert.argsort(stable=True)
    token, expert = token[order], expert[order]
    counts = torch.bincount(expert, minlength=e).tolist()
    g = torch.Generator().manual_seed(9)
    a = n * s
    dy, xs, w1, b1, w2, b2 = (torch.randn(*shape, generator=g, dtype=dtype)
                              for shape in ((n, d), (a, d), (e, d, h), (e, h), (e, h, d), (e, d)))  # fmt: skip
    gate = torch.rand(a, generator=g, dtype=dtype)
    gate[::7] = 0  # zero gates: a zero gradient but for ds
    hidden = torch.relu(torch.bmm(xs.unsqueeze(1), w1[expert]).squeeze(1) + b1[expert])  # (A, h) as saved
    ends = torch.tensor(counts).cumsum(0).tolist()
    spans = [(i, end - c, end) for i, (c, end) in enumerate(zip(counts, ends)) if c]
    ids, starts, stops = (list(col) for col in zip(*spans))
    out = {"ds": torch.full_like(gate, float("nan")), "dxs": torch.full_like(xs, float("nan")),
           **{name: torch.zeros_like(w) for name, w in (("dw1", w1), ("db1", b1), ("dw2", w2), ("db2", b2))}}  # fmt: skip
    out = {name: t if name in WANTED[wanted] else None for name, t in out.items()}
    ext = cpu_extension()
    args = lambda tok: (dy, tok, gate, b2, out["ds"], xs, hidden, out["dxs"], w1, w2, out["dw1"], out["db1"],
                        out["dw2"], out["db2"], ids, starts, stops, threads)  # fmt: skip
    ext.backward_groups(*args(token))
    ref = dict(zip(("ds", "dxs", "dw1", "db1", "dw2", "db2"), _per_expert_reference(dy, token, expert, gate, xs, w1,
                                                                                    b1, w2, b2)))  # fmt: skip
    tol = {} if dtype == torch.float64 else {"rtol": 1e-5, "atol": 1e-5}
    for name in WANTED[wanted]:
        torch.testing.assert_close(out[name], ref[name].to(dtype), **tol, msg=name)
        if name != "ds" and name != "dxs":
            assert out[name][1].abs().max() == 0, f"{name}: the empty expert's slice was written"
    if out["ds"] is not None:
        assert (out["ds"][::7] != 0).all()  # a zero gate still gets dy . z
    if out["dxs"] is not None:
        assert out["dxs"][::7].abs().max() == 0  # and passes nothing back
    if out["dw2"] is not None:
        before = torch.get_num_threads()
        torch.set_num_threads(1)  # the kernel runs each group's matmuls on one thread
        try:
            for i, start, stop in spans:
                dz = gate[start:stop].unsqueeze(1) * dy[token[start:stop]]  # fresh, as the kernel's scratch
                assert torch.equal(out["dw2"][i], torch.mm(hidden[start:stop].t(), dz))
        finally:
            torch.set_num_threads(before)
    bad = token.clone()
    bad[3] = -1
    with pytest.raises(IndexError, match="token -1 out of range"):
        ext.backward_groups(*args(bad))


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_combined_kernels_sum_by_token_bitwise(threads: int, dtype: torch.dtype) -> None:
    """forward_groups_combined's y and backward_groups_combined's dx (each group's rows summed into the token's row as
    they are made, under a per-token lock) equal, bit for bit, the z and dxs of the kernels that write the (A, d)
    arrays, summed by token as fl(g0 z0) + fl(g1 z1) (fl(dxs0) + fl(dxs1)): for tokens with two rows, one row and none
    (zeroed), on 1 and 2 threads, repeated (the threads' order of arrival changes no bit)."""
    n, e, d, h = 240, 5, 16, 24
    token, expert = _token_major(n, 2, e, empty=(3,), seed=11)
    keep = torch.ones(token.shape[0], dtype=torch.bool)
    keep[1:40:2] = False  # tokens 0..19 keep only their first row
    keep[200:210] = False  # tokens 100..104 keep no row
    token, expert = token[keep], expert[keep]
    order = expert.argsort(stable=True)
    token, expert = token[order], expert[order]
    a = token.shape[0]
    counts = torch.bincount(expert, minlength=e).tolist()
    g = torch.Generator().manual_seed(12)
    x, dy, w1, b1, w2, b2 = (torch.randn(*shape, generator=g, dtype=dtype)
                             for shape in ((n, d), (n, d), (e, d, h), (e, h), (e, h, d), (e, d)))  # fmt: skip
    gate = torch.rand(a, generator=g, dtype=dtype)
    ends = torch.tensor(counts).cumsum(0).tolist()
    spans = [(i, end - c, end) for i, (c, end) in enumerate(zip(counts, ends)) if c]
    ids, starts, stops = (list(col) for col in zip(*spans))
    ext = cpu_extension()
    xs, hidden, z = torch.empty(a, d, dtype=dtype), torch.empty(a, h, dtype=dtype), torch.empty(a, d, dtype=dtype)
    ext.forward_groups(x, token, xs, hidden, z, w1, b1, w2, b2, ids, starts, stops, threads)
    dxs = torch.empty(a, d, dtype=dtype)
    ext.backward_groups(dy, token, gate, b2, None, xs, hidden, dxs, w1, w2, None, None, None, None, ids, starts, stops,
                        threads)  # fmt: skip

    def by_token(rows: torch.Tensor) -> torch.Tensor:  # fl(r0) + fl(r1) per token, in torch (no fused multiply-add)
        out = torch.zeros(n, d, dtype=dtype)
        first = torch.ones(a, dtype=torch.bool)
        seen = torch.zeros(n, dtype=torch.bool)
        for r in range(a):  # the first row of each token (in expert order) is written, the second added
            first[r] = not seen[token[r]]
            seen[token[r]] = True
        out[token[first]] = rows[first]
        return out.index_put_((token[~first],), out[token[~first]] + rows[~first])

    want_y, want_dx = by_token(gate.unsqueeze(1) * z), by_token(dxs)
    for _ in range(3):
        y = torch.full((n, d), float("nan"), dtype=dtype)
        xs2, hidden2 = torch.empty_like(xs), torch.empty_like(hidden)
        ext.forward_groups_combined(x, token, xs2, hidden2, gate, y, w1, b1, w2, b2, ids, starts, stops, threads)
        assert torch.equal(xs2, xs) and torch.equal(hidden2, hidden) and torch.equal(y, want_y)
        dx = torch.full((n, d), float("nan"), dtype=dtype)
        ext.backward_groups_combined(dy, token, gate, b2, None, xs, hidden, dx, w1, w2, None, None, None, None, ids,
                                     starts, stops, threads)  # fmt: skip
        assert torch.equal(dx, want_dx)
    assert y[100:105].abs().max() == 0 and dx[100:105].abs().max() == 0
