"""The `ttlora` expert bank: one shared base MLP plus a tensor-train adapter per expert (Kunwar et al.
2025, TT-LoRA MoE; the tensor-train format of Oseledets 2011). Shapes as in `moe/layer.py`.

    E_i(x) = relu(x (W1 + dW1_i) + b1) (W2 + dW2_i) + b2

W1 (d, h), W2 (h, d), b1, b2 are shared by all experts (frozen with `train_base=False`, as LoRA
fine-tuning does). Each delta is a tensor train over a factorisation of its input and output sizes,
d = d1 * d2 and h = h1 * h2 (`balanced_factors`: the two factors closest to sqrt(n)):

    dW1_i[(a1, a2), (c1, c2)] = G1[a1] G2[a2] G3[c1] G4[c2]        a_j < d_j, c_j < h_j

a product of matrices G_k[n] (r_{k-1}, r_k) with ranks (1, r, r, r, 1), r = `tt_rank`; dW2 the
same over (h1, h2, d1, d2). An expert then holds 2 * (n1 r + n2 r^2 + n3 r^2 + n4 r) numbers instead
of LoRA's 2 * (d + h) r (at d = 256, h = 128: 1,120 for TT rank 4, 6,144 for LoRA rank 8). The last
core of each train is 0 at init, so every expert starts as the base MLP (as LoRA's B = 0); the
other cores are Gaussian, scaled so that the train over the first three cores has entries of
variance 1 / fan_in, the variance of LoRA's A.

Forward: the deltas are contracted to full matrices each step (e * d * h numbers, cheap next to
the A rows they multiply) and added to the base, so both dispatches run a plain MLP bank:
`forward_grouped` with `grouped.grouped_linear`, `split` for the per-expert loop.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from functools import partial

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lens.moe.grouped import Groups, grouped_linear


def balanced_factors(n: int) -> tuple[int, int]:
    """(a, b) with a * b = n and a the largest divisor of n not above sqrt(n): 128 -> (8, 16)."""
    a = max(f for f in range(1, math.isqrt(n) + 1) if n % f == 0)
    return a, n // a


def tt_core_shapes(n_in: int, n_out: int, rank: int) -> list[tuple[int, int, int]]:
    """The four core shapes (r_{k-1}, n_k, r_k) of an (n_in, n_out) matrix's train."""
    modes = (*balanced_factors(n_in), *balanced_factors(n_out))
    ranks = (1, rank, rank, rank, 1)
    return [(ranks[k], modes[k], ranks[k + 1]) for k in range(4)]


def tt_matrix(cores: list[Tensor] | nn.ParameterList, n_in: int, n_out: int) -> Tensor:
    """Contract each expert's train: cores (e, r_{k-1}, n_k, r_k) -> (e, n_in, n_out)."""
    t = cores[0][:, 0]  # (e, n1, r1)
    for core in cores[1:]:
        t = torch.einsum("epa,eanb->epnb", t, core).flatten(1, 2)  # (e, n1 ... nk, r_k)
    return t.reshape(t.shape[0], n_in, n_out)  # the last rank is 1


def _train(e: int, n_in: int, n_out: int, rank: int) -> nn.ParameterList:
    shapes = tt_core_shapes(n_in, n_out, rank)
    stds = (1 / math.sqrt(n_in), 1 / math.sqrt(rank), 1 / math.sqrt(rank))  # product variance 1 / n_in
    cores = [nn.Parameter(torch.randn(e, *s) * std) for s, std in zip(shapes[:3], stds)]
    return nn.ParameterList([*cores, nn.Parameter(torch.zeros(e, *shapes[3]))])  # last core 0: dW = 0


def _mlp(w1: Tensor, b1: Tensor, w2: Tensor, b2: Tensor, x: Tensor) -> Tensor:
    return F.relu(x @ w1 + b1) @ w2 + b2  # (m, d)


class TTLoRAExperts(nn.Module):
    """A shared base MLP plus a tensor-train adapter of rank `tt_rank` per expert on both matrices."""

    def __init__(self, d: int, hidden: int, num_experts: int, tt_rank: int = 4, train_base: bool = True) -> None:
        super().__init__()
        if not isinstance(tt_rank, int) or tt_rank < 1:
            raise ValueError(f"tt_rank={tt_rank!r}; allowed: an integer >= 1")
        self.num_experts, self.d, self.hidden = num_experts, d, hidden
        self.base1, self.base2 = nn.Linear(d, hidden), nn.Linear(hidden, d)
        for p in (*self.base1.parameters(), *self.base2.parameters()):
            p.requires_grad_(train_base)
        self.cores1 = _train(num_experts, d, hidden, tt_rank)  # dW1: (d1, d2, h1, h2)
        self.cores2 = _train(num_experts, hidden, d, tt_rank)  # dW2: (h1, h2, d1, d2)

    def weights(self) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """Each expert's full MLP: W1 (e, d, h), b1 (e, h), W2 (e, h, d), b2 (e, d)."""
        e = self.num_experts
        w1 = (self.base1.weight.t() + tt_matrix(self.cores1, self.d, self.hidden)).contiguous()
        w2 = (self.base2.weight.t() + tt_matrix(self.cores2, self.hidden, self.d)).contiguous()
        return w1, self.base1.bias.expand(e, -1), w2, self.base2.bias.expand(e, -1)

    def split(self) -> list[Callable[[Tensor], Tensor]]:
        return [partial(_mlp, *p) for p in zip(*(t.unbind(0) for t in self.weights()))]

    def forward_grouped(self, x: Tensor, groups: Groups, gate: Tensor) -> Tensor:
        w1, b1, w2, b2 = self.weights()
        h = F.relu(grouped_linear(x, w1, b1, groups))  # (A, h)
        return grouped_linear(h * gate.unsqueeze(1), w2, b2, groups, scale=gate)  # (A, d) gate-weighted

    def shared(self, x: Tensor) -> Tensor | None:
        return None
