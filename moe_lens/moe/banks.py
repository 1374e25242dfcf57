"""Expert banks: e experts stored as stacked weights so one grouped matmul runs them all.

- `mlp`: E_i(x) = relu(x W1_i + b1_i) W2_i + b2_i, the two-layer ReLU experts of Shazeer et al. 2017.
- `lora`: one base MLP shared by all experts plus a rank-r adapter per expert on both matrices,
  W_i = W + (alpha / r) A_i B_i (Hu et al. 2021, LoRA, sec. 4.1: the alpha / r scaling, so the
  update's size does not change with r; B_i = 0 at init so every expert starts as the base). The
  base can be frozen (`train_base=False`), as in LoRA fine-tuning.
- `lowrank`: each expert's matrices factorised, W1_i = U1_i V1_i of rank r (the 2025 LSTM-MoE
  study's low-rank experts). U is drawn as nn.Linear draws a weight of its fan-in f (variance
  1/(3f)), V with variance 1/r, so each entry of U V has the variance 1/(3f) of the MLP's weight.
- `shared`: `mlp` experts plus one always-on shared MLP added to every token (DeepSeekMoE-style).
- `ttlora`: in moe/ttlora.py.

Every bank exposes `split()` (one function per expert, over `unbind` views of the stacked weights,
whose backward writes each weight gradient once: indexing `w[i]` per expert would allocate a full
(e, ...) gradient per expert) for the dense reference and the per-expert loop, and
`forward_grouped(x_sorted, groups, gate_sorted)` (all assignments sorted by expert, one grouped
matmul per matrix, `grouped.grouped_linear`, returning gate-weighted outputs). The MLP banks
(`mlp`, `shared`) also have `combine_cpu(x, token, gate, counts, by_token)`: the whole gated bank
as one autograd function from x (n, d) to y (n, d) on the CPU (`grouped_mlp._CPUGroupedMLPExt` on the
compiled kernel, else `grouped_mlp._CPUGroupedMLP`). Banks are built by name from `moe/registry.py`.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lens.moe.cpu_runtime import ReusedMemory, cpu_extension
from moe_lens.moe.grouped import Groups, grouped_linear
from moe_lens.moe.grouped_mlp import ByToken, _CPUGroupedMLP, _CPUGroupedMLPExt


def _mlp(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
    return F.relu(x @ w1 + b1) @ w2 + b2  # (m, d)


def _lowrank(u1: Tensor, v1: Tensor, c1: Tensor, u2: Tensor, v2: Tensor, c2: Tensor, x: Tensor) -> Tensor:
    h = F.relu((x @ u1) @ v1 + c1)  # (m, h)
    return (h @ u2) @ v2 + c2  # (m, d)


def _uniform(shape: tuple[int, ...], fan_in: float) -> nn.Parameter:
    """U(-1/sqrt(fan_in), 1/sqrt(fan_in)), variance 1/(3 fan_in): nn.Linear's default init range."""
    bound = 1.0 / math.sqrt(fan_in)
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class MLPExperts(nn.Module):
    """e independent two-layer ReLU MLPs, d -> h -> d."""

    def __init__(self, d: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1, self.b1 = _uniform((num_experts, d, hidden), d), _uniform((num_experts, hidden), d)
        self.w2, self.b2 = _uniform((num_experts, hidden, d), hidden), _uniform((num_experts, d), hidden)
        self.cpu_memory = ReusedMemory()  # the CPU kernel's large buffers, reused across steps

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        return [partial(_mlp, *p) for p in zip(*(t.unbind(0) for t in (self.w1, self.b1, self.w2, self.b2)))]

    def combine_cpu(self, x: Tensor, token: Tensor, gate: Tensor, counts: tuple[int, ...], by_token: ByToken) -> Tensor:
        """sum over assignments of gate * E_expert(x[token]), (n, d), fused per expert group (CPU only):
        the compiled kernel where it is built, else `_CPUGroupedMLP`."""
        params = (p.to(x.dtype) for p in (self.w1, self.b1, self.w2, self.b2))
        if cpu_extension() is not None:
            return _CPUGroupedMLPExt.apply(x, *params, gate, token, counts, self.cpu_memory, by_token.rows, by_token.ptr,
                                           by_token.per_token)  # fmt: skip
        where = by_token.rows if by_token.per_token == 1 else None
        return _CPUGroupedMLP.apply(x, *params, gate, token, counts, self.cpu_memory, where)

    def forward_grouped(self, x: Tensor, groups: Groups, gate: Tensor) -> Tensor:
        h = F.relu(grouped_linear(x, self.w1, self.b1, groups), inplace=True)  # (A, h)
        return grouped_linear(h * gate.unsqueeze(1), self.w2, self.b2, groups, scale=gate)  # (A, d) gated

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class LoRAExperts(nn.Module):
    """A shared base MLP plus a rank-r LoRA adapter per expert on each of its two matrices, scaled by
    alpha / r, alpha = `lora_alpha` (None: alpha = r, scale 1)."""

    def __init__(self, d: int, hidden: int, num_experts: int, rank: int, train_base: bool = True,
                 lora_alpha: float | None = None) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.scale = (lora_alpha if lora_alpha is not None else rank) / rank  # Hu et al. 2021: delta W = (alpha / r) A B
        self.base1, self.base2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        for p in (*self.base1.parameters(), *self.base2.parameters()):
            p.requires_grad_(train_base)
        self.a1, self.a2 = _uniform((num_experts, d, rank), d), _uniform((num_experts, hidden, rank), hidden)
        self.b1 = nn.Parameter(torch.zeros(num_experts, rank, hidden))  # zero: expert = base at init
        self.b2 = nn.Parameter(torch.zeros(num_experts, rank, d))

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        return [partial(self._one, *p) for p in zip(*(t.unbind(0) for t in (self.a1, self.b1, self.a2, self.b2)))]

    def _one(self, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
        h = F.relu(self.base1(x) + self.scale * ((x @ a1) @ b1))  # (m, h)
        return self.base2(h) + self.scale * ((h @ a2) @ b2)  # (m, d)

    def forward_grouped(self, x: Tensor, groups: Groups, gate: Tensor) -> Tensor:
        lora1 = grouped_linear(grouped_linear(x, self.a1, None, groups), self.b1, None, groups)  # (A, h)
        h = F.relu(self.base1(x) + self.scale * lora1)  # (A, h)
        hg = h * gate.unsqueeze(1)  # the gate folded in before the last matmul: (A, h) is cheaper than (A, d)
        base = F.linear(hg, self.base2.weight.to(hg.dtype)) + gate.unsqueeze(1) * self.base2.bias.to(hg.dtype)
        lora2 = grouped_linear(grouped_linear(hg, self.a2, None, groups), self.b2, None, groups)  # (A, d)
        return base + self.scale * lora2  # (A, d) gated

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class LowRankExperts(nn.Module):
    """e two-layer ReLU MLPs whose matrices are products U V of rank r."""

    def __init__(self, d: int, hidden: int, num_experts: int, rank: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        # U as nn.Linear (variance 1/(3 fan_in)), V with variance 1/r: U V has the MLP weight's variance
        self.u1, self.v1 = _uniform((num_experts, d, rank), d), _uniform((num_experts, rank, hidden), rank / 3)
        self.u2, self.v2 = _uniform((num_experts, hidden, rank), hidden), _uniform((num_experts, rank, d), rank / 3)
        self.c1, self.c2 = _uniform((num_experts, hidden), d), _uniform((num_experts, d), hidden)

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        params = (self.u1, self.v1, self.c1, self.u2, self.v2, self.c2)
        return [partial(_lowrank, *p) for p in zip(*(t.unbind(0) for t in params))]

    def forward_grouped(self, x: Tensor, groups: Groups, gate: Tensor) -> Tensor:
        h = F.relu(grouped_linear(grouped_linear(x, self.u1, None, groups), self.v1, self.c1, groups), inplace=True)
        hg = h * gate.unsqueeze(1)  # (A, h)
        return grouped_linear(grouped_linear(hg, self.u2, None, groups), self.v2, self.c2, groups, scale=gate)  # (A, d)

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class SharedExperts(MLPExperts):
    """Routed MLP experts plus one shared MLP that every token goes through with weight 1."""

    def __init__(self, d: int, hidden: int, num_experts: int) -> None:
        super().__init__(d, hidden, num_experts)
        self.shared_mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def shared(self, x: Tensor) -> Tensor | None:
        return self.shared_mlp(x)  # (n, d)
