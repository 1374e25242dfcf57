"""Routers: which experts each token goes to, and with what gate. Shapes as in `moe/layer.py`.

Each router maps real tokens x (n, d) to a `Routing`; routers are built by name from `moe/registry.py`.
Formulas:
- `naive_topk`: G = TopK(softmax(x W_g)), kept probabilities not renormalised (SAiDL 2024 report).
- `topk_mask`: the same, renormalised to sum to 1 over the k kept experts.
- `noisy_topk` (Shazeer et al. 2017, eq. 3-5): H = x W_g + eps * (softplus(x W_noise) + noise_eps),
  eps ~ N(0, 1) in training only; G = softmax(KeepTopK(H, k)), i.e. softmax AFTER top-k over the
  kept logits. Also returns the smooth load probability P(x, i) (losses.smooth_load_prob). The
  noisy H only selects: `router_probs` and `logits` are the clean softmax(x W_g) and x W_g, in
  training as in evaluation.
- `switch` (Fedus et al. 2021): p = softmax(x W_g), expert = argmax p, gate = p[expert] (the
  probability, never a constant 1, so the router gets task gradient). With a capacity factor cf,
  in training each expert keeps its first ceil(cf * m / e) tokens of each group of m tokens, in
  order; the rest are dropped (gate 0, their output is the residual alone) and counted.
- `expert_choice` (Zhou et al. 2022): S = softmax(x W_g) (n, e); in each group of m tokens each
  expert takes its top C = ceil(c * m / e) tokens by S[:, i], gate = S[token, i]; a token may get
  0..e experts.
- `hash` (Roller et al. 2021): expert = the high bits of Knuth's multiplicative hash of the token
  id, floor(((id * 2654435761) mod 2^32) * e / 2^32), gate 1; no parameters, the no-learning
  baseline. (The low bits, id * 2654435761 mod e, are id mod e for e = 8: 2654435761 = 1 mod 16.)

Groups (`groups`, Switch and expert choice): `groups=G` splits the n rows into G groups of m = n / G
rows, row r in group r mod G; capacity is counted within each group. The language model passes its
(b, t) rows with G = t, so each time step is a group and no token's routing depends on a later
one; None is one group of all n rows (the bidirectional tagger and QA model).
- `dense`: one expert, gate 1 (the LSTM baseline).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from moe_lens.moe.losses import smooth_load_prob
from moe_lens.moe.cpu_runtime import ReusedMemory, pooled_linear
from moe_lens.moe.noisy_gate import noisy_topk_gate_softmax, randn_like, softmax_stats


@dataclass(frozen=True)
class Routing:
    """What a router decided for n real tokens, s slots per token (s = k; e for expert_choice). Immutable:
    the statistics the layer computes from it are a record of their own (`layer.RoutingStats`)."""

    # (n, s) int64 in [0, e); -1 marks an empty slot (expert_choice). Slot 0 holds the argmax of
    # router_probs for every router that leaves `assign` and `top1` None (the layer's statistics rely on it).
    expert_idx: Tensor
    gate: Tensor  # (n, s) gate the expert output is weighted by; 0 for empty/dropped slots
    router_probs: Tensor  # (n, e) the router's distribution over experts: softmax(logits), exactly
    logits: Tensor  # (n, e) pre-softmax router logits (z-loss); the clean x W_g for noisy_topk
    load_prob: Tensor | None = None  # (n, e) smooth P(x, i), noisy_topk in training only
    dropped: Tensor | None = None  # (n, s) bool: slot overflowed its expert's capacity
    # Assignments already sorted by expert (token (A,), expert (A,), gate (A,)); None: from expert_idx.
    assign: tuple[Tensor, Tensor, Tensor] | None = None
    # (n,) argmax of router_probs where slot 0 is not it (noisy_topk in training); None: slot 0
    top1: Tensor | None = None
    # (n,) logsumexp of logits and entropy (nats) of router_probs, detached, where the router computed them with its
    # softmax (noisy_topk in training, on the compiled CPU kernel); None: the layer computes them
    lse: Tensor | None = None
    entropy: Tensor | None = None


def top_k(t: Tensor, k: int) -> tuple[Tensor, Tensor]:
    """`t.topk(k, dim=-1)` (values, indices), largest first. For k <= 2 the indices come from one or
    two `argmax` passes and the values from one `gather` (whose backward is topk's scatter), a third
    less time than `topk` forward and backward for (8192, 64); ties may pick another index of the
    same value."""
    if k > 2 or t.shape[-1] < 2 or t.shape[0] == 0:
        return t.topk(k, dim=-1)
    with torch.no_grad():
        idx = t.argmax(dim=-1, keepdim=True)  # (n, 1)
        if k == 2:
            rest = t.scatter(-1, idx, float("-inf"))
            idx = torch.cat([idx, rest.argmax(dim=-1, keepdim=True)], dim=-1)  # (n, 2)
    return t.gather(-1, idx), idx


def group_count(n: int, groups: int | None) -> int:
    """G for n rows in `groups` groups of equal size (1 for None); raises if they do not divide n."""
    if groups is None:
        return 1
    if groups < 1 or n % groups:
        raise ValueError(f"groups={groups} for {n} rows; allowed: a divisor of the number of rows, or None")
    return groups


def hash_expert(token_ids: Tensor, e: int) -> Tensor:
    """floor(((id * 2654435761) mod 2^32) * e / 2^32): the high bits of Knuth's multiplicative hash.
    In int64 without overflow: id mod 2^32 < 2^32 times the constant < 2^32 would not fit, so the
    product is taken mod 2^32 in two 16-bit halves of the constant; then (< 2^32) * e < 2^63."""
    ids = token_ids.long() & 0xFFFFFFFF
    lo, hi = HashRouter.MULTIPLIER & 0xFFFF, HashRouter.MULTIPLIER >> 16
    h = (ids * lo + (((ids * hi) & 0xFFFF) << 16)) & 0xFFFFFFFF  # (id * M) mod 2^32
    return (h * e) >> 32


class Router(nn.Module):
    """Base: a linear gate W_g (d, e) without bias."""

    def __init__(self, d: int, num_experts: int, top_k: int, init: str = "default") -> None:
        super().__init__()
        self.num_experts, self.top_k = num_experts, top_k
        self.w_gate = nn.Linear(d, num_experts, bias=False)
        if init == "zeros":  # Shazeer et al. 2017 initialise W_g (and W_noise) to zero
            nn.init.zeros_(self.w_gate.weight)

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int | None = None) -> Routing:
        raise NotImplementedError


class TopKRouter(Router):
    """`naive_topk`: softmax, then top-k, the kept probabilities as they are."""

    renormalize = False

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int | None = None) -> Routing:
        logits = self.w_gate(x)  # (n, e)
        probs = logits.float().softmax(dim=-1)  # (n, e)
        gate, idx = top_k(probs, self.top_k)  # (n, k), (n, k)
        if self.renormalize:
            gate = gate / gate.sum(dim=-1, keepdim=True)
        return Routing(idx, gate, probs, logits)


class TopKMaskRouter(TopKRouter):
    """`topk_mask`: `naive_topk` with the k kept probabilities renormalised to sum to 1."""

    renormalize = True


class NoisyTopKRouter(Router):
    """Shazeer et al. 2017 noisy top-k gating with the smooth load estimator."""

    def __init__(self, d: int, num_experts: int, top_k: int, noise_eps: float = 1e-2, init: str = "default") -> None:
        super().__init__(d, num_experts, top_k, init)
        self.w_noise = nn.Linear(d, num_experts, bias=False)
        nn.init.zeros_(self.w_noise.weight)  # as Shazeer: noise std starts at softplus(0) + eps
        self.noise_eps = noise_eps
        self.cpu_memory = ReusedMemory()

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int | None = None) -> Routing:
        if not self.training:  # eval is deterministic: slot 0 is the argmax of probs
            clean = self.w_gate(x).float()  # (n, e)
            top_logits, idx = top_k(clean, self.top_k)  # (n, k)
            return Routing(idx, top_logits.softmax(dim=-1), clean.softmax(dim=-1), clean)
        e = self.num_experts
        # one matmul for both: [x W_g, x W_noise] (n, 2e); on the CPU its output, gradient and the gate's buffers
        # are reused across steps (cpu_runtime.ReusedMemory)
        logits2 = pooled_linear(x, torch.cat([self.w_gate.weight, self.w_noise.weight]), self.cpu_memory).float()
        clean = logits2[:, :e]  # (n, e)
        # (n, e) the clean distribution, recorded in training too; its argmax, logsumexp and entropy in the same pass
        probs, top1, lse, entropy = softmax_stats(clean)
        z = randn_like(clean, self.cpu_memory)  # (n, e) torch.randn_like's draw: H(x) = clean + z * std only selects
        if self.top_k < e:  # P, KeepTopK, the thresholds and G in one autograd function (moe/noisy_gate.py)
            load_prob, gate, idx = noisy_topk_gate_softmax(logits2, z, self.top_k, self.noise_eps, self.cpu_memory)
        else:  # every expert is always selected
            noise_std = F.softplus(logits2[:, e:]) + self.noise_eps  # (n, e)
            noisy = clean + z * noise_std
            load_prob = smooth_load_prob(clean, noisy, noise_std, self.top_k)
            top_logits, idx = top_k(noisy, self.top_k)  # (n, k)
            gate = top_logits.softmax(dim=-1)  # softmax after top-k, over the kept noisy logits
        return Routing(idx, gate, probs, clean, load_prob=load_prob, top1=top1, lse=lse, entropy=entropy)


class SwitchRouter(Router):
    """Fedus et al. 2021 top-1 routing with an optional capacity factor (training only)."""

    def __init__(self, d: int, num_experts: int, capacity_factor: float | None = None, init: str = "default") -> None:
        super().__init__(d, num_experts, 1, init)
        self.capacity_factor = capacity_factor

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int | None = None) -> Routing:
        logits = self.w_gate(x)  # (n, e)
        probs = logits.float().softmax(dim=-1)  # (n, e)
        gate, idx = probs.max(dim=-1, keepdim=True)  # (n, 1): the gate is the probability
        dropped = None
        if self.training and self.capacity_factor is not None:
            n, e = probs.shape
            g = group_count(n, groups)
            capacity = math.ceil(self.capacity_factor * (n // g) / e)  # per (group, expert)
            onehot = F.one_hot(idx[:, 0], e).reshape(n // g, g, e)  # (m, G, e): row r = (r // G, r mod G)
            position = (onehot.cumsum(dim=0) * onehot).sum(dim=-1).reshape(n, 1) - 1  # (n, 1) place in its queue
            dropped = position >= capacity  # (n, 1) device-side: no host sync
            gate = gate.masked_fill(dropped, 0.0)
        return Routing(idx, gate, probs, logits, dropped=dropped)


class ExpertChoiceRouter(Router):
    """Zhou et al. 2022: experts choose tokens; capacity C = ceil(c * m / e) tokens per expert and group of m."""

    def __init__(self, d: int, num_experts: int, capacity_factor: float | None = 2.0, init: str = "default") -> None:
        super().__init__(d, num_experts, num_experts, init)
        self.capacity_factor = capacity_factor if capacity_factor is not None else 2.0  # None: Zhou et al.'s c = 2

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int | None = None) -> Routing:
        logits = self.w_gate(x)  # (n, e)
        probs = logits.float().softmax(dim=-1)  # (n, e) token-to-expert affinity S
        n, e = probs.shape
        g = group_count(n, groups)
        m = n // g  # tokens per group
        capacity = min(m, math.ceil(self.capacity_factor * m / e))  # C per (group, expert)
        gate_ec, row = probs.reshape(m, g, e).permute(2, 1, 0).topk(capacity, dim=-1)  # (e, G, C) within each group
        token_ec = row * g + torch.arange(g, device=x.device).unsqueeze(1)  # (e, G, C) back to rows of x
        gate_ec, token_ec = gate_ec.reshape(e, g * capacity), token_ec.reshape(e, g * capacity)  # (e, G*C)
        expert_ec = torch.arange(e, device=x.device).unsqueeze(1).expand(e, g * capacity)  # (e, G*C)
        # Per-token view (n, e): slot j holds the token's j-th largest gate, -1 where unchosen.
        dense = probs.new_zeros(n, e).index_put_((token_ec.reshape(-1), expert_ec.reshape(-1)), gate_ec.reshape(-1))
        chosen = torch.zeros(n, e, dtype=torch.bool, device=x.device)
        chosen[token_ec.reshape(-1), expert_ec.reshape(-1)] = True
        order = torch.where(chosen, dense, torch.full_like(dense, -1.0)).argsort(dim=-1, descending=True, stable=True)
        gate = dense.gather(1, order)  # (n, e)
        expert_idx = torch.where(chosen.gather(1, order), order, torch.full_like(order, -1))  # (n, e)
        assign = (token_ec.reshape(-1), expert_ec.reshape(-1), gate_ec.reshape(-1))  # sorted by expert
        return Routing(expert_idx, gate, probs, logits, assign=assign)


class HashRouter(Router):
    """Roller et al. 2021: a fixed hash of the token id picks one expert; no learned parameters."""

    MULTIPLIER = 2654435761  # Knuth's multiplicative hash constant

    def __init__(self, d: int, num_experts: int) -> None:
        nn.Module.__init__(self)
        self.num_experts, self.top_k = num_experts, 1

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int | None = None) -> Routing:
        if token_ids is None:
            raise ValueError("router 'hash' needs token_ids: pass MoELayer(x, mask, token_ids=...)")
        idx = hash_expert(token_ids.reshape(-1, 1), self.num_experts)  # (n, 1)
        probs = F.one_hot(idx[:, 0], self.num_experts).float()  # (n, e)
        return Routing(idx, torch.ones_like(idx, dtype=torch.float32), probs, probs.log().clamp_min(-1e4))


class DenseRouter(Router):
    """One expert, gate 1: the model without routing (the LSTM baseline)."""

    def __init__(self, d: int, num_experts: int = 1) -> None:
        nn.Module.__init__(self)
        self.num_experts, self.top_k = 1, 1

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int | None = None) -> Routing:
        n = x.shape[0]
        idx = torch.zeros(n, 1, dtype=torch.long, device=x.device)
        ones = torch.ones(n, 1, device=x.device)
        return Routing(idx, ones, ones, torch.zeros_like(ones))
