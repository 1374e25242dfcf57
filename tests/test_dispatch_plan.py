"""The compiled CPU kernel's dispatch around the expert groups (csrc/grouped_mlp.cpp):

- `forward_groups`' gather of each group's rows into expert order, against `torch.index_select` and per-group
  `torch.addmm` (bitwise: the same copies and the same BLAS calls on the same rows)."""
from __future__ import annotations

import pytest
import torch

from moe_lens.moe import cpu_runtime
from moe_lens.moe.cpu_runtime import cpu_extension
from tests.test_grouped_cpu import _require_compiled


@pytest.fixture(autouse=True)
def compiled(monkeypatch) -> None:
    monkeypatch.setenv(cpu_runtime.CPU_EXT_ENV, "1")
    _require_compiled()


def _token_major(n: int, s: int, e: int, empty: tuple[int, ...] = (), seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    allowed = torch.tensor([i for i in range(e) if i not in empty])
    expert = allowed[torch.randint(0, len(allowed), (n * s,), generator=g)]
    return torch.arange(n).repeat_interleave(s), expert


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
