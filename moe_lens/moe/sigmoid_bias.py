"""The `sigmoid_bias` router: auxiliary-loss-free load balancing (Wang et al. 2024, "Auxiliary-loss-free
load balancing strategy for mixture-of-experts", the router of DeepSeek-V3). Shapes as in `moe/layer.py`.

    s = sigmoid(x W_g)                          (n, e) affinity scores
    S = TopK(s + b, k)                          the k experts selected on the BIASED scores
    g_i = s_i / sum_{j in S} s_j,  i in S       gates from the UNBIASED scores, renormalised
    router_probs = s / sum_j s_j                (n, e) for the statistics; logits = log s, so that
                                                router_probs = softmax(logits) exactly, as every router

b (e,) is a buffer, not a parameter: no gradient reaches it and checkpoints carry it. After each
optimizer step the training loop calls `after_step` (moe/step_hooks.py), which moves it outside
the gradient by

    b_i += u * sign(mean_j load_j - load_i)

An overloaded expert's bias falls, so fewer tokens select it; the gates never see b, so the
balancing adds no aux loss and no gradient that competes with the task. u is `bias_update_rate`
(RunConfig; default 1e-2, see there).

Where the load is counted (a departure from the paper, measured in docs/moe.md): load_i is an
exponential moving average, over optimizer steps, of the assignments to expert i in training
forwards, `load_avg <- beta * load_avg + (1 - beta) * load_since` with beta = `load_ema` (0.9, about
the last 10 steps), where `load_since` counts the assignments since the last update on the device
(no host sync). Wang et al. count one step's batch, which at their scale holds millions of tokens.
A WikiText-2 step holds 32 x 35 correlated tokens: one step's load swings between 0.1 and 2.6 times
the mean while the 50-step average stays near 1, so the sign follows the noise, an expert that is
overloaded on average still gets +u on many steps, and the bias trails the router's drift. The
average only sets the sign: the update is still u * sign(.), outside the gradient. `load_avg` starts
at 0, and since sign(mean - load) does not change when the load is scaled, that equals the
bias-corrected average (the first update reads that step's load alone). `load_ema = 0` is the
paper's per-step count.

Slot 0 holds the selected expert with the largest gate. That is the argmax of `router_probs` until
the bias overrides a token's choice; the layer's statistics that read slot 0 (logsumexp, entropy)
are exact for any slot. With k = 1 the gate is the raw score s_i rather than s_i / s_i = 1: a
renormalised single gate is constantly 1 and gives the router no task gradient.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor

from moe_lens.moe.routers import Router, Routing, top_k


class SigmoidBiasRouter(Router):
    """Sigmoid scores, top-k on score + bias, gates from the unbiased scores (Wang et al. 2024)."""

    def __init__(self, d: int, num_experts: int, top_k: int, bias_update_rate: float = 1e-2, init: str = "default",
                 load_ema: float = 0.9) -> None:  # fmt: skip
        super().__init__(d, num_experts, top_k, init)
        if not bias_update_rate >= 0:
            raise ValueError(f"bias_update_rate={bias_update_rate}; allowed: >= 0")
        if not 0 <= load_ema < 1:
            raise ValueError(f"load_ema={load_ema}; allowed: 0 <= load_ema < 1 (0: the per-step count)")
        self.bias_update_rate, self.load_ema = bias_update_rate, load_ema
        self.register_buffer("bias", torch.zeros(num_experts))  # (e,) b, saved in the state_dict
        # (e,) assignments per expert since the last update; 0 after every step, so checkpoints need not hold it
        self.register_buffer("load_since", torch.zeros(num_experts), persistent=False)
        # (e,) the moving average the sign reads; checkpoints carry it, so a resumed run updates as an unbroken one
        self.register_buffer("load_avg", torch.zeros(num_experts))

    def forward(self, x: Tensor, token_ids: Tensor | None = None, groups: int | None = None) -> Routing:
        # per-token top-k: no capacity, so `groups` (the LM's time steps) changes nothing and routing is causal
        z = self.w_gate(x).float()  # (n, e)
        scores = torch.sigmoid(z)  # (n, e) s
        _, idx = top_k(scores.detach() + self.bias, self.top_k)  # (n, k) selected on s + b
        gate = scores.gather(1, idx)  # (n, k) unbiased scores of the selected experts
        if self.top_k > 1:
            gate = gate / gate.sum(dim=-1, keepdim=True)
            gate, order = gate.sort(dim=-1, descending=True)  # slot 0: the largest gate
            idx = idx.gather(1, order)
        if self.training:
            with torch.no_grad():
                self.load_since.index_add_(0, idx.reshape(-1), torch.ones(idx.numel(), device=idx.device))
        logits = F.logsigmoid(z)  # (n, e) log s: softmax(log s) = s / sum(s)
        probs = scores / scores.sum(dim=-1, keepdim=True)  # (n, e)
        return Routing(idx, gate, probs, logits)

    @torch.no_grad()
    def after_step(self) -> None:
        """Fold the assignments since the last call into the average, b_i += u * sign(mean - load_avg_i),
        then reset the count."""
        avg = self.load_avg.mul_(self.load_ema).add_(self.load_since, alpha=1 - self.load_ema)  # (e,)
        self.bias.add_(torch.sign(avg.mean() - avg), alpha=self.bias_update_rate)
        self.load_since.zero_()
