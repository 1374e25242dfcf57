"""Expert banks: e experts stored as stacked weights so one grouped matmul runs them all.

- `mlp`: E_i(x) = relu(x W1_i + b1_i) W2_i + b2_i, the two-layer ReLU experts of Shazeer et al. 2017.
- `lora`: one base MLP shared by all experts plus a rank-r adapter per expert on both matrices,
  W_i = W + A_i B_i (Hu et al. 2021, LoRA; B_i = 0 at init so every expert starts as the base).
  The base can be frozen (`train_base=False`), as in LoRA fine-tuning.
- `lowrank`: each expert's matrices factorised, W1_i = U1_i V1_i of rank r (the 2025 LSTM-MoE
  study's low-rank experts).
- `shared`: `mlp` experts plus one always-on shared MLP added to every token (DeepSeekMoE-style).

Every bank exposes `split()` (one function per expert, over `unbind` views of the stacked weights,
whose backward writes each weight gradient once: indexing `w[i]` per expert would allocate a full
(e, ...) gradient per expert) for the dense reference and the per-expert loop, and
`forward_grouped(x_sorted, offs, gate_sorted)` (all assignments sorted by expert, one `grouped_mm`
per matrix, returning gate-weighted outputs; `offs` (e,) int32 cumulative group ends, computed on
the device so the step needs no host sync).
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

HAS_GROUPED_MM = hasattr(F, "grouped_mm")


def gmm(x: Tensor, w: Tensor, offs: Tensor) -> Tensor:
    """Grouped matmul: rows of x (A, p) in group g (rows offs[g-1]:offs[g]) times w[g] (p, q) -> (A, q)."""
    w = w.to(x.dtype)
    if _grouped_ok(x, w):
        return F.grouped_mm(x, w, offs=offs)
    counts = torch.diff(offs, prepend=offs.new_zeros(1)).tolist()  # host sync: fallback path only
    return torch.cat([xs @ w[g] for g, xs in enumerate(x.split(counts))])


def grouped_bias(b: Tensor, offs: Tensor, scale: Tensor) -> Tensor:
    """(A, q): row r of group g gets scale[r] * b[g], as a grouped matmul [scale, 0, 0, 0] @ [b; 0; 0; 0].

    Gathering b[expert] instead would make an (A, q) index whose backward is a slow scatter; here the
    backward is a per-group matmul (a column sum), and the (A, 4) operand keeps 16-byte alignment.
    """
    s4 = torch.cat([scale.unsqueeze(1), scale.new_zeros(scale.shape[0], 3)], dim=1)  # (A, 4)
    b4 = torch.cat([b.unsqueeze(1), b.new_zeros(b.shape[0], 3, b.shape[1])], dim=1)  # (e, 4, q)
    return gmm(s4, b4, offs)


def _mlp(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
    return F.relu(x @ w1 + b1) @ w2 + b2  # (m, d)


def _lowrank(u1: Tensor, v1: Tensor, c1: Tensor, u2: Tensor, v2: Tensor, c2: Tensor, x: Tensor) -> Tensor:
    h = F.relu((x @ u1) @ v1 + c1)  # (m, h)
    return (h @ u2) @ v2 + c2  # (m, d)


def _grouped_ok(x: Tensor, w: Tensor) -> bool:
    """grouped_mm needs 16-byte-aligned rows (e.g. dims divisible by 4 in fp32) and, on CUDA, 16-bit floats."""
    size = x.element_size()
    aligned = (x.shape[1] * size) % 16 == 0 and (w.shape[-1] * size) % 16 == 0
    dtype_ok = x.device.type == "cpu" or x.dtype in (torch.bfloat16, torch.float16)
    return HAS_GROUPED_MM and aligned and dtype_ok


def _uniform(shape: tuple[int, ...], fan_in: int) -> nn.Parameter:
    bound = 1.0 / math.sqrt(fan_in)  # nn.Linear's default init range
    return nn.Parameter(torch.empty(shape).uniform_(-bound, bound))


class MLPExperts(nn.Module):
    """e independent two-layer ReLU MLPs, d -> h -> d."""

    def __init__(self, d: int, hidden: int, num_experts: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.w1, self.b1 = _uniform((num_experts, d, hidden), d), _uniform((num_experts, hidden), d)
        self.w2, self.b2 = _uniform((num_experts, hidden, d), hidden), _uniform((num_experts, d), hidden)

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        return [partial(_mlp, *p) for p in zip(*(t.unbind(0) for t in (self.w1, self.b1, self.w2, self.b2)))]

    def forward_grouped(self, x: Tensor, offs: Tensor, gate: Tensor) -> Tensor:
        h = F.relu(gmm(x, self.w1, offs) + grouped_bias(self.b1, offs, torch.ones_like(gate)))  # (A, h)
        return gmm(h * gate.unsqueeze(1), self.w2, offs) + grouped_bias(self.b2, offs, gate)  # (A, d) gated

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class LoRAExperts(nn.Module):
    """A shared base MLP plus a rank-r LoRA adapter per expert on each of its two matrices."""

    def __init__(self, d: int, hidden: int, num_experts: int, rank: int, train_base: bool = True) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.base1, self.base2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        for p in (*self.base1.parameters(), *self.base2.parameters()):
            p.requires_grad_(train_base)
        self.a1, self.a2 = _uniform((num_experts, d, rank), d), _uniform((num_experts, hidden, rank), hidden)
        self.b1 = nn.Parameter(torch.zeros(num_experts, rank, hidden))  # zero: expert = base at init
        self.b2 = nn.Parameter(torch.zeros(num_experts, rank, d))

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        return [partial(self._one, *p) for p in zip(*(t.unbind(0) for t in (self.a1, self.b1, self.a2, self.b2)))]

    def _one(self, a1: Tensor, b1: Tensor, a2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
        h = F.relu(self.base1(x) + (x @ a1) @ b1)  # (m, h)
        return self.base2(h) + (h @ a2) @ b2  # (m, d)

    def forward_grouped(self, x: Tensor, offs: Tensor, gate: Tensor) -> Tensor:
        h = F.relu(self.base1(x) + gmm(gmm(x, self.a1, offs), self.b1, offs))  # (A, h)
        hg = h * gate.unsqueeze(1)  # the gate folded in before the last matmul: (A, h) is cheaper than (A, d)
        base = F.linear(hg, self.base2.weight.to(hg.dtype)) + gate.unsqueeze(1) * self.base2.bias.to(hg.dtype)
        return base + gmm(gmm(hg, self.a2, offs), self.b2, offs)  # (A, d) gated

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class LowRankExperts(nn.Module):
    """e two-layer ReLU MLPs whose matrices are products U V of rank r."""

    def __init__(self, d: int, hidden: int, num_experts: int, rank: int) -> None:
        super().__init__()
        self.num_experts = num_experts
        self.u1, self.v1 = _uniform((num_experts, d, rank), d), _uniform((num_experts, rank, hidden), rank)
        self.u2, self.v2 = _uniform((num_experts, hidden, rank), hidden), _uniform((num_experts, rank, d), rank)
        self.c1, self.c2 = _uniform((num_experts, hidden), d), _uniform((num_experts, d), hidden)

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        params = (self.u1, self.v1, self.c1, self.u2, self.v2, self.c2)
        return [partial(_lowrank, *p) for p in zip(*(t.unbind(0) for t in params))]

    def forward_grouped(self, x: Tensor, offs: Tensor, gate: Tensor) -> Tensor:
        h = F.relu(gmm(gmm(x, self.u1, offs), self.v1, offs) + grouped_bias(self.c1, offs, torch.ones_like(gate)))
        hg = h * gate.unsqueeze(1)  # (A, h)
        return gmm(gmm(hg, self.u2, offs), self.v2, offs) + grouped_bias(self.c2, offs, gate)  # (A, d) gated

    def shared(self, x: Tensor) -> Tensor | None:
        return None


class SharedExperts(MLPExperts):
    """Routed MLP experts plus one shared MLP that every token goes through with weight 1."""

    def __init__(self, d: int, hidden: int, num_experts: int) -> None:
        super().__init__(d, hidden, num_experts)
        self.shared_mlp = nn.Sequential(nn.Linear(d, hidden), nn.ReLU(), nn.Linear(hidden, d))

    def shared(self, x: Tensor) -> Tensor | None:
        return self.shared_mlp(x)  # (n, d)


def build_experts(
    expert_type: str, d: int, hidden: int, num_experts: int, *, rank: int = 8, train_base: bool = True
) -> nn.Module:
    """The expert bank named `expert_type` (one of config.EXPERT_TYPES)."""
    if rank <= 0:
        raise ValueError(f"rank={rank}; allowed: an integer >= 1")
    if expert_type == "mlp":
        return MLPExperts(d, hidden, num_experts)
    if expert_type == "lora":
        return LoRAExperts(d, hidden, num_experts, rank, train_base)
    if expert_type == "lowrank":
        return LowRankExperts(d, hidden, num_experts, rank)
    if expert_type == "shared":
        return SharedExperts(d, hidden, num_experts)
    raise ValueError(f"unknown expert_type {expert_type!r}; allowed: mlp, lora, lowrank, shared")
