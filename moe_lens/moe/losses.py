"""Auxiliary load-balancing losses, each a pure function of routing tensors.

- `cv_squared`: squared coefficient of variation, Var(v) / (Mean(v)^2 + eps), population variance,
  eps = 1e-10, as tensor2tensor's `cv_squared` that Shazeer et al. 2017 released with the paper.
- `importance_loss`: CV^2 of Importance_i = sum_x G_i(x) (Shazeer et al. 2017, eq. 6), the column
  sums of the dense gate matrix, i.e. summed over TOKENS (axis 0), one value per expert.
- `load_loss`: CV^2 of Load_i = sum_x P(x, i), the smooth load estimator (Shazeer et al. 2017,
  eq. 8-10, appendix A); `smooth_load_prob` computes P(x, i) on the pre-softmax logit scale.
- `switch_loss`: e * sum_i f_i * P_i (Fedus et al. 2021, eq. 4), f_i the share of tokens whose
  argmax is i, P_i the mean router probability of i.
- `z_loss`: mean_x logsumexp(logits(x))^2 (Zoph et al. 2022, ST-MoE, eq. 5).

Every function takes only real tokens: the layer removes padding before routing, so padding
cannot reach a loss (a regression test checks it).
"""
from __future__ import annotations

import math

import torch
from torch import Tensor

CV_EPS = 1e-10


def cv_squared(v: Tensor) -> Tensor:
    """Var(v) / (Mean(v)^2 + eps) over a 1-D tensor; 0 for fewer than two entries."""
    if v.numel() < 2:
        return v.new_zeros(())
    v = v.float()
    mean = v.mean()
    return ((v - mean) ** 2).mean() / (mean**2 + CV_EPS)


def importance(gates: Tensor) -> Tensor:
    """(n, e) dense gates -> (e,) importance: the sum over tokens (axis 0), not over experts."""
    return gates.sum(dim=0)


def importance_loss(gates: Tensor) -> Tensor:
    return cv_squared(importance(gates))


def smooth_load_prob(clean: Tensor, noisy: Tensor, noise_std: Tensor, k: int) -> Tensor:
    """P(x, i) = Phi((clean_i - kth_excluding(H, k, i)) / noise_std_i), shape (n, e).

    kth_excluding(H, k, i) is the k-th largest entry of the noisy logits H with entry i left out:
    the (k+1)-th largest of H when i is among the top k of H, else the k-th largest. `clean`,
    `noisy` and the threshold are all pre-softmax logits (comparing clean logits with softmaxed
    thresholds is a known bug of other implementations).
    """
    e = noisy.shape[-1]
    if k >= e:  # every expert is always selected
        return torch.ones_like(clean)
    top = noisy.topk(k + 1, dim=-1).values  # (n, k+1)
    thr_if_in = top[:, k : k + 1]  # (n, 1) (k+1)-th largest: threshold when i itself is in the top k
    thr_if_out = top[:, k - 1 : k]  # (n, 1) k-th largest
    is_in = noisy > thr_if_in  # (n, e)
    prob_if_in = torch.special.ndtr((clean - thr_if_in) / noise_std)  # Phi, the standard normal CDF
    prob_if_out = torch.special.ndtr((clean - thr_if_out) / noise_std)
    return torch.where(is_in, prob_if_in, prob_if_out)


def load_loss(load_prob: Tensor) -> Tensor:
    """(n, e) smooth P(x, i) -> CV^2 of Load_i = sum over tokens of P(x, i)."""
    return cv_squared(load_prob.sum(dim=0))


def switch_loss(router_probs: Tensor, top1: Tensor) -> Tensor:
    """e * sum_i f_i * P_i with f_i = share of tokens whose top-1 expert is i (before capacity drops),
    P_i = mean router probability of expert i; equals 1 under perfect balance."""
    n, e = router_probs.shape
    if n == 0:
        return router_probs.new_zeros(())
    f = torch.zeros(e, device=top1.device, dtype=router_probs.dtype).index_add_(
        0, top1, torch.ones_like(top1, dtype=router_probs.dtype)
    ) / n  # (e,) no gradient: argmax is not differentiable
    p = router_probs.mean(dim=0)  # (e,)
    return e * (f * p).sum()


def z_loss(logits: Tensor) -> Tensor:
    """mean over tokens of logsumexp(logits)^2 (ST-MoE router z-loss)."""
    return z_loss_from_lse(torch.logsumexp(logits.float(), dim=-1))


def logsumexp_at_top1(logits: Tensor, probs: Tensor, top1: Tensor) -> Tensor:
    """(n,) logsumexp of each token's logits, read off its softmax at the top-1 expert j:
    p_j = exp(l_j - lse), so lse = l_j - log p_j, with p_j >= 1/e keeping the log well conditioned.

    `probs` must be softmax(logits) (every router's `router_probs` is). Two gathers instead of the
    four passes over (n, e) of `torch.logsumexp`; differentiable (through the softmax) when the
    z-loss is weighted. The layer feeds it to `z_loss_from_lse` and `entropy_from_lse`.
    """
    j = top1.reshape(-1, 1)
    return logits.float().gather(1, j).squeeze(1) - probs.float().gather(1, j).squeeze(1).log()


def z_loss_from_lse(lse: Tensor) -> Tensor:
    """`z_loss` from precomputed per-token logsumexp (n,)."""
    return lse.pow(2).mean() if lse.numel() else lse.new_zeros(())


def entropy_from_lse(probs: Tensor, logits: Tensor, lse: Tensor) -> Tensor:
    """(n,) entropy in nats of probs = softmax(logits): H = -sum_i p_i (l_i - lse) = lse - sum_i p_i l_i,
    one pass over (n, e) instead of `entropy`'s three; clamped at 0 against rounding."""
    return (lse - torch.linalg.vecdot(probs.float(), logits.float())).clamp_min(0.0)


def entropy(probs: Tensor) -> Tensor:
    """(n, e) probabilities -> (n,) entropy in nats (0 log 0 = 0)."""
    p = probs.float()
    return -(p * torch.log(p.clamp_min(1e-30))).sum(dim=-1)


def normalized_entropy(counts: Tensor) -> float:
    """Entropy of a usage histogram divided by log(e); 1.0 = uniform (helper for logs and tests)."""
    e = counts.numel()
    if e < 2 or counts.sum() <= 0:
        return 1.0
    return float(entropy((counts / counts.sum()).unsqueeze(0))[0] / math.log(e))
