"""Expert ablation at the router: remove experts from one `MoELayer`, so that the tokens that chose them go to
their next choice, with gates renormalised the way the router itself normalises (docs/moe.md, "Ablation").

`ablated(layer, experts)` is a context manager (its hooks are always removed, as `capture` is scoped) that
registers a forward hook on the layer's router. The hook leaves the router's `Routing` untouched for every
token whose selected experts contain no ablated one, so an expert that receives no tokens changes nothing,
bit for bit. For each token that did select an ablated expert, the router runs again with the ablated
experts' logits set to MASK before its own selection, and the token takes that routing:

- `naive_topk`, `topk_mask`, `switch`: softmax over the logits with the ablated ones at MASK (their
  probability is exactly 0, so the softmax renormalises over the remaining experts), then the router's own
  top-k, and its own gate rule (the probability; the probability renormalised over the k kept).
- `noisy_topk` (evaluation, no noise): top-k of the masked clean logits, softmax over the kept ones.
- `sigmoid_bias`: the ablated scores sigmoid(MASK) = 0 and their bias set to MASK for the call, so they
  are never selected; gates renormalised over the kept unbiased scores, as the router does.
- `expert_choice` (Zhou et al. 2022): experts choose tokens, so a token has no "next choice". The ablated
  expert's assignments get gate 0 (its output is removed); the other experts keep the tokens they chose.
- `hash`, `dense`: no logits to mask and no second choice; the token's slot on an ablated expert gets gate
  0, so its MoE output is the residual alone (as a Switch token dropped for capacity).

When k exceeds the experts left, the router may still select an ablated expert in a spare slot; every slot
on an ablated expert is given gate 0, so no ablated expert ever contributes. MASK is finite (-1e30), not
-inf: exp underflows to exactly 0 in float32 and bfloat16 alike, and the layer's entropy statistic
(sum p * logit) stays finite (0 * -inf would be NaN).

For evaluation (`model.eval()`): a training-mode router draws noise, and running it twice would differ.
"""
from __future__ import annotations

from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from dataclasses import replace

import torch
from torch import Tensor, nn

from moe_lens.moe.routers import Routing

MASK = -1e30  # the logit (and sigmoid_bias bias) an ablated expert gets; see the module docstring


@contextmanager
def masked_logits(router: nn.Module, ablate: Tensor) -> Iterator[None]:
    """Within the block, `router`'s logits x W_g of the experts where `ablate` (e,) is True are MASK (and a
    sigmoid_bias router's bias there is MASK too). Restored on exit."""
    handles = []
    if hasattr(router, "w_gate"):
        handles.append(router.w_gate.register_forward_hook(lambda m, a, out: out.masked_fill(ablate, MASK)))
    saved = router.bias.detach().clone() if isinstance(getattr(router, "bias", None), Tensor) else None
    try:
        if saved is not None:
            with torch.no_grad():
                router.bias.masked_fill_(ablate, MASK)
        yield
    finally:
        for h in handles:
            h.remove()
        if saved is not None:
            with torch.no_grad():
                router.bias.copy_(saved)


def reroute(router: nn.Module, args: tuple, out: Routing, ablate: Tensor) -> Routing:
    """The routing with the experts where `ablate` (e,) is True removed, from the router's own `out` for the
    inputs `args` (the module docstring's rules)."""
    if out.assign is not None:  # expert_choice: drop the ablated experts' assignments, nothing moves
        token, expert, gate = out.assign
        slot_on = (out.expert_idx >= 0) & ablate[out.expert_idx.clamp_min(0)]  # (n, s)
        return replace(out, gate=out.gate.masked_fill(slot_on, 0.0),
                       assign=(token, expert, gate.masked_fill(ablate[expert], 0.0)))  # fmt: skip
    hit = ablate[out.expert_idx]  # (n, k) slots on an ablated expert
    rows = hit.any(dim=1)  # (n,) tokens that chose one
    if not hasattr(router, "w_gate") or not bool(rows.any()):  # hash, dense: gate 0; or nothing to move
        return replace(out, gate=out.gate.masked_fill(hit, 0.0))
    with masked_logits(router, ablate):
        new = type(router).forward(router, *args)  # the router's own selection and normalisation
    r = rows.unsqueeze(1)  # (n, 1)
    idx = torch.where(r, new.expert_idx, out.expert_idx)  # (n, k)
    gate = torch.where(r, new.gate, out.gate).masked_fill(ablate[idx], 0.0)  # (n, k) spare ablated slots: 0
    dropped = out.dropped if out.dropped is None or new.dropped is None else torch.where(r, new.dropped, out.dropped)
    pick = lambda a, b: None if a is None or b is None else torch.where(rows if a.dim() == 1 else r, a, b)  # noqa: E731
    return replace(out, expert_idx=idx, gate=gate, router_probs=torch.where(r, new.router_probs, out.router_probs),
                   logits=torch.where(r, new.logits.to(out.logits.dtype), out.logits), dropped=dropped,
                   top1=pick(new.top1, out.top1), lse=pick(new.lse, out.lse), entropy=pick(new.entropy, out.entropy))  # fmt: skip


@contextmanager
def ablated(layer: nn.Module, experts: Sequence[int]) -> Iterator[None]:
    """Within the block, `layer` (an `MoELayer`) routes as if `experts` were removed; `experts` empty: unchanged."""
    e = layer.num_experts
    bad = [i for i in experts if not 0 <= int(i) < e]
    if bad:
        raise ValueError(f"expert {bad[0]} of MoE layer {layer.layer}; allowed: 0..{e - 1}")
    if not len(experts):
        yield
        return
    ablate = torch.zeros(e, dtype=torch.bool, device=next(layer.parameters()).device)
    ablate[list(map(int, experts))] = True
    handle = layer.router.register_forward_hook(lambda m, args, out: reroute(m, args, out, ablate))
    try:
        yield
    finally:
        handle.remove()


__all__ = ["MASK", "ablated", "masked_logits", "reroute"]
