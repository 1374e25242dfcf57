"""The mixture-of-experts layer: route, dispatch, combine, and return the routing.

    y(x) = sum_i G_i(x) E_i(x)  (+ S(x) for a shared expert)      Shazeer et al. 2017, eq. 1

Shape letters (used in comments across moe_lens):
    b  batch            t  time steps         d  model dim (the layer's input and output)
    e  experts          k  experts per token  s  routing slots per token (k; e for expert_choice)
    n  real tokens (padding removed)          A  (token, expert) assignments, n * s or e * C
    h  expert hidden

`MoELayer.forward(x, mask, token_ids, group) -> MoEOutput(y, aux_loss, routing, stats)`: the router's
immutable `Routing` and the layer's `RoutingStats` computed from it. Padding never
reaches the router: with a mask, the real tokens are gathered first (models that already hold packed
sequences pass those and no mask), so padding cannot touch a loss or a statistic.

`group=G` (no mask) makes the routers that compare tokens with each other (Switch capacity, expert
choice) compare only within each of G groups, row r of the flattened x in group r mod G: the
language model passes x (b, t, d) with G = t, so each time step is a group and a token's output
never depends on a later token of the batch (tests/test_moe_causal.py). None: the whole batch is one
group (the bidirectional tagger and QA model, which see the whole sequence anyway).

Dispatch has two implementations, measured by benchmarks/bench_moe_layer.py (docs/moe.md); `auto`
is `grouped`, which was at least as fast as the loop in every measured configuration:
- `grouped`: sort the A assignments by expert (device-side offsets, no host sync on CUDA), then
  - CUDA: gather rows, one `grouped_mm` per expert matrix, `index_add` the gate-weighted outputs back;
  - CPU: the group sizes are read on the host (free there; with the compiled kernel the slot routers'
    assignments are sorted by one O(A) counting sort, `grouped_mlp.token_major_plan`) and each expert
    group runs as fused BLAS calls straight from x to y, with hand-written backward passes: MLP and
    shared experts in one autograd function, on the compiled kernel (`grouped_mlp._CPUGroupedMLPExt`,
    built on first use) or, where it cannot be built, in PyTorch (`grouped_mlp._CPUGroupedMLP`); the
    other expert types chain `grouped.grouped_linear`;
- `loop`: the straightforward per-expert loop (select, run, index_add), the baseline.
"""
from __future__ import annotations

import inspect
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch import Tensor, nn

from moe_lens.config import DENSE_SHAPE
from moe_lens.moe import losses
from moe_lens.moe.grouped import HAS_GROUPED_MM, make_groups
from moe_lens.moe.grouped_mlp import ByToken, token_major_plan
from moe_lens.moe.registry import build_experts, build_router
from moe_lens.moe.routers import Routing

DISPATCHES = ("auto", "grouped", "loop")


class RoutingStats(NamedTuple):
    """What the layer computes from a `Routing`, over the real tokens: its own record, so the router's
    returned `Routing` is never changed after the fact."""

    load: Tensor  # (e,) assignments kept per expert
    importance: Tensor  # (e,) gate mass per expert, differentiable in the gates
    num_dropped: Tensor  # () dropped (token, slot) assignments
    entropy: Tensor  # (n,) router entropy, nats
    aux: dict[str, Tensor]  # each unweighted aux loss by name: importance, load, switch, z


class MoEOutput(NamedTuple):
    y: Tensor  # same shape as x; zero at padding positions
    aux_loss: Tensor  # () weighted sum of the auxiliary losses
    routing: Routing  # what the router decided
    stats: RoutingStats  # what the layer computed from it


class MoELayer(nn.Module):
    """Router + expert bank + statistics. Every parameter but d and layer is the RunConfig field of the
    same name and default (`from_config` reads them by this signature; tests/test_moe_registry.py
    checks the defaults), except lora_alpha: None means alpha = rank, RunConfig's 8.0 at its rank 8."""

    def __init__(
        self,
        d: int,
        num_experts: int = 8,
        top_k: int = 2,
        *,
        router: str = "noisy_topk",
        expert_type: str = "mlp",
        expert_hidden: int = 128,
        rank: int = 8,
        lora_train_base: bool = True,
        lora_alpha: float | None = None,
        capacity_factor: float | None = None,
        noise_eps: float = 1e-2,
        bias_update_rate: float = 1e-2,
        tt_rank: int = 4,
        router_init: str = "default",
        w_importance: float = 0.0,
        w_load: float = 0.0,
        w_switch: float = 0.0,
        w_z: float = 0.0,
        dispatch: str = "auto",
        layer: int = 0,
    ) -> None:
        super().__init__()
        self.layer = layer  # index among the model's MoE layers, 0-based (the traces' `layer` column)
        if top_k > num_experts:
            raise ValueError(f"top_k={top_k} > num_experts={num_experts}; allowed: 1..{num_experts}")
        if capacity_factor is not None and not capacity_factor > 0:
            raise ValueError(f"capacity_factor={capacity_factor}; allowed: > 0, or None")
        if dispatch not in DISPATCHES:
            raise ValueError(f"unknown dispatch {dispatch!r}; allowed: {', '.join(DISPATCHES)}")
        if router == "dense":  # one expert, every token to it (config.DENSE_SHAPE)
            num_experts, top_k = DENSE_SHAPE["num_experts"], DENSE_SHAPE["top_k"]
        self.num_experts, self.top_k = num_experts, top_k
        self.router = build_router(
            router, d, num_experts, top_k, capacity_factor=capacity_factor, noise_eps=noise_eps, init=router_init,
            bias_update_rate=bias_update_rate,
        )
        self.experts = build_experts(expert_type, d, expert_hidden, num_experts, rank=rank, train_base=lora_train_base,
                                     lora_alpha=lora_alpha, tt_rank=tt_rank)  # fmt: skip
        self.weights = {"importance": w_importance, "load": w_load, "switch": w_switch, "z": w_z}
        self.dispatch = dispatch
        # Data-parallel training (moe_lens/distributed.py sets it): a differentiable sum over the ranks of the
        # (4e + 2,) vector of the aux losses' batch sums, so the aux losses are those of the global batch.
        self.reduce_stats: Callable[[Tensor], Tensor] | None = None

    @classmethod
    def config_fields(cls) -> tuple[str, ...]:
        """The parameters of `__init__` that `from_config` reads from a config: all but d and layer."""
        return tuple(p for p in inspect.signature(cls.__init__).parameters if p not in ("self", "d", "layer"))

    @classmethod
    def from_config(cls, cfg: object, d: int, layer: int = 0) -> MoELayer:
        """Build from a RunConfig (any object with a field for every name in `config_fields`); `layer`:
        its MoE-layer index. A name the config lacks raises, naming it: a renamed field is never dropped."""
        names = cls.config_fields()
        missing = [n for n in names if not hasattr(cfg, n)]
        if missing:
            raise AttributeError(f"MoELayer.from_config: {type(cfg).__name__} has no field {', '.join(missing)} "
                                 f"(every MoELayer parameter but d and layer is read from the config)")  # fmt: skip
        return cls(d, layer=layer, **{n: getattr(cfg, n) for n in names})

    def forward(self, x: Tensor, mask: Tensor | None = None, token_ids: Tensor | None = None,
                group: int | None = None) -> MoEOutput:
        d = x.shape[-1]
        xf = x.reshape(-1, d)  # (b*t, d)
        keep = None
        if mask is not None and group is not None:
            raise ValueError("MoELayer: pass `group` or `mask`, not both (groups are rows r mod G of the unmasked x)")
        if mask is not None:
            keep = mask.reshape(-1).nonzero().squeeze(1)  # (n,) real-token rows
            xf = xf[keep]  # (n, d)
            token_ids = token_ids.reshape(-1)[keep] if token_ids is not None else None
        routing = route_fp32(self.router, xf, token_ids, group)
        token, expert, gate = assignments(routing)
        # the statistics and aux losses before the experts run: the router's (n, e) outputs are still in cache (after
        # the experts, their per-token gathers and sums took 0.8 ms more at n = 8192, e = 64 on the CPU)
        stats = self._statistics(routing, expert, gate)
        aux_loss = self._weighted_aux(stats)
        run = dispatch_grouped if self.dispatch_for(xf) == "grouped" else dispatch_loop
        y = run(self.experts, xf, token, expert, gate, self.num_experts)  # (n, d)
        shared = self.experts.shared(xf)
        if shared is not None:
            y = y + shared
        if keep is not None:
            y = y.new_zeros(x.numel() // d, d).index_copy(0, keep, y)  # padding rows stay 0
        return MoEOutput(y.reshape(x.shape), aux_loss, routing, stats)

    def dispatch_for(self, x: Tensor) -> str:
        """The dispatch used for x: `grouped` under `auto` (benchmarks/bench_moe_layer.py: never slower
        than the loop on the CPU, small or large experts); `loop` where there is no grouped matmul on
        CUDA (torch without F.grouped_mm)."""
        if self.dispatch != "auto":
            return self.dispatch
        if x.is_cuda and not HAS_GROUPED_MM:
            return "loop"
        return "grouped"

    def _statistics(self, r: Routing, expert: Tensor, gate: Tensor) -> RoutingStats:
        """Load, importance, dropped count, entropy and each unweighted aux loss of routing r, whose
        assignments (A,) are `expert` and `gate`."""
        e = self.num_experts
        kept = gate.new_ones(gate.shape) if r.dropped is None else (~r.dropped).reshape(-1).to(gate.dtype)
        load = gate.new_zeros(e).index_add(0, expert, kept)  # (e,)
        importance = gate.new_zeros(e).index_add(0, expert, gate)  # (e,) differentiable in the gates
        num_dropped = (kept.numel() - kept.sum()).detach()
        # Slot 0 holds the argmax of router_probs unless the router says otherwise (`top1`, noisy_topk
        # in training) or sets `assign` (expert_choice).
        if r.top1 is not None:
            top1 = r.top1
        else:
            top1 = r.expert_idx[:, 0] if r.assign is None else r.router_probs.argmax(dim=-1)  # (n,)
        if r.lse is not None and r.entropy is not None and not self.weights.get("z"):
            lse, entropy = r.lse, r.entropy  # (n,) the router's, from its softmax pass: no z-loss gradient wanted
        else:
            lse = losses.logsumexp_at_top1(r.logits, r.router_probs, top1)  # (n,)
            entropy = losses.entropy_from_lse(r.router_probs.detach(), r.logits.detach(), lse.detach())  # (n,)
        load_for_loss = r.load_prob.sum(dim=0) if r.load_prob is not None else load
        if self.training and self.reduce_stats is not None:
            aux = self._global_aux(r, importance, load_for_loss, top1, lse)
            return RoutingStats(load, importance, num_dropped, entropy, aux)
        aux = {
            "importance": losses.cv_squared(importance),
            "load": losses.cv_squared(load_for_loss),
            "switch": losses.switch_loss(r.router_probs, top1),
            "z": losses.z_loss_from_lse(lse),
        }
        return RoutingStats(load, importance, num_dropped, entropy, aux)

    def _global_aux(self, r: Routing, importance: Tensor, load_for_loss: Tensor, top1: Tensor,
                    lse: Tensor) -> dict[str, Tensor]:
        """The four aux losses of the GLOBAL batch under data parallelism: each is a function of batch sums
        (importance (e,), load (e,), top-1 counts (e,), router-probability sums (e,), sum of lse^2, token
        count), which `reduce_stats` sums over the ranks in one differentiable all-reduce. Its backward sums
        the ranks' gradients; DDP then averages over the ranks, so the gradient is the single-process one."""
        e = self.num_experts
        probs = r.router_probs.float()  # (n, e)
        counts = probs.new_zeros(e).index_add_(0, top1, probs.new_ones(top1.shape))  # (e,) no gradient
        sums = torch.cat([importance.float(), load_for_loss.float(), counts, probs.sum(dim=0),
                          lse.float().pow(2).sum().reshape(1), probs.new_full((1,), probs.shape[0])])  # (4e + 2,)
        sums = self.reduce_stats(sums)
        imp, load, f, p = sums[: 4 * e].reshape(4, e).unbind(0)
        n = sums[4 * e + 1].clamp_min(1.0)
        return {"importance": losses.cv_squared(imp), "load": losses.cv_squared(load),
                "switch": e * ((f / n) * (p / n)).sum(), "z": sums[4 * e] / n}

    def _weighted_aux(self, stats: RoutingStats) -> Tensor:
        """() the sum of the aux losses weighted by w_importance, w_load, w_switch, w_z (zero weights skipped)."""
        total = stats.importance.new_zeros(())
        for name, w in self.weights.items():
            if w:
                total = total + w * stats.aux[name]
        return total



def route_fp32(router, x: Tensor, token_ids: Tensor | None, group: int | None) -> Routing:
    """The router in float32 whatever the autocast: its matmul, softmax, top-k and noise maths (Switch
    Transformer's selective precision, Fedus et al. 2021). Under bf16 autocast the logits were bf16 and
    0.7% of tokens got another top-1 expert at e = 64, d = 256 (tests/test_router_fp32.py)."""
    with torch.autocast(x.device.type, enabled=False):  # float64 (gradcheck) stays float64
        return router(x.to(torch.promote_types(x.dtype, torch.float32)), token_ids, group)

def assignments(r: Routing) -> tuple[Tensor, Tensor, Tensor]:
    """Flatten routing into (token (A,), expert (A,), gate (A,)); empty slots (-1) are left out."""
    if r.assign is not None:
        return r.assign
    n, s = r.expert_idx.shape
    token = torch.arange(n, device=r.expert_idx.device).repeat_interleave(s)  # (n*s,)
    return token, r.expert_idx.reshape(-1), r.gate.reshape(-1)


def dispatch_grouped(experts: nn.Module, x: Tensor, token: Tensor, expert: Tensor, gate: Tensor, e: int) -> Tensor:
    """Sort assignments by expert, run every expert with grouped matmuls, index_add back. (n, d)."""
    plan = token_major_plan(x, token, expert, e) if hasattr(experts, "combine_cpu") else None
    if plan is not None:  # compiled CPU kernel, slot router: one O(A) counting sort instead of the argsort path
        return experts.combine_cpu(x, plan.token, gate[plan.order].to(x.dtype), plan.counts, plan.by_token)
    order = expert.argsort(stable=True)  # (A,)
    by_token = token
    token, expert, gate = token[order], expert[order], gate[order]
    groups = make_groups(expert, e)  # device offsets; host sizes (the CPU kernels) on the CPU only
    if groups.counts is not None and hasattr(experts, "combine_cpu"):
        rows = by_token_rows(by_token, order, token, x.shape[0])
        return experts.combine_cpu(x, token, gate.to(x.dtype), groups.counts, rows)  # (n, d), fused per group
    out = experts.forward_grouped(x.index_select(0, token), groups, gate.to(x.dtype))  # (A, d), gate-weighted
    return out.new_zeros(x.shape[0], x.shape[1]).index_add_(0, token, out)


def by_token_rows(unsorted: Tensor, order: Tensor, token: Tensor, n: int) -> ByToken:
    """Each token's rows in expert order (CPU). `unsorted` is the token of each assignment before
    the sort by expert (`order`), `token` after it. The slot routers give token-major assignments,
    s per token (arange(n).repeat_interleave(s)): then the rows are the inverse of `order`, s per
    token, with no sort. Otherwise (expert_choice) the rows are sorted by token."""
    a = order.shape[0]
    s = a // n if n else 0  # assignments per token, if all tokens have the same number
    if s and a == s * n and torch.equal(unsorted, torch.arange(n).repeat_interleave(s)):  # O(A), CPU only
        rows = torch.empty_like(order).index_copy_(0, order, torch.arange(a))
        return ByToken(rows, torch.arange(0, a + 1, s), s)
    ptr = torch.zeros(n + 1, dtype=torch.long)
    torch.cumsum(torch.bincount(token, minlength=n), 0, out=ptr[1:])
    return ByToken(token.argsort(stable=True), ptr, None)


def dispatch_loop(experts: nn.Module, x: Tensor, token: Tensor, expert: Tensor, gate: Tensor, e: int) -> Tensor:
    """The per-expert loop: for each expert select its assignments, run it, index_add back. (n, d)."""
    y = x.new_zeros(x.shape)
    for i, run in enumerate(experts.split()):
        sel = (expert == i).nonzero().squeeze(1)  # (m,)
        if sel.numel() == 0:
            continue
        tok = token[sel]
        y.index_add_(0, tok, run(x[tok]) * gate[sel].unsqueeze(1).to(x.dtype))
    return y
