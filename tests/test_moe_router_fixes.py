"""Issue 18, smaller router fixes: the hash router's bits and noisy_topk's recorded probabilities."""
from __future__ import annotations

import numpy as np
import pytest
import torch
from scipy import stats

from moe_lens.config import RunConfig
from moe_lens.moe import MoELayer, build_router

WIKITEXT2_VOCAB = 33_278  # the WikiText-2 word-level vocabulary, including <unk>


@pytest.mark.parametrize("e", [8, 16, 6])
def test_hash_uses_high_bits_not_id_mod_e_and_is_balanced(e: int) -> None:
    ids = np.arange(WIKITEXT2_VOCAB, dtype=np.int64)
    router = build_router("hash", 4, e, 1)
    got = router(torch.zeros(len(ids), 4), torch.from_numpy(ids)).expert_idx[:, 0].numpy()
    # independent: Python integers, no overflow
    want = np.array([((int(i) * 2654435761) % 2**32) * e // 2**32 for i in ids])
    np.testing.assert_array_equal(got, want)
    assert np.mean(got == ids % e) < 1.5 / e  # the old hash was id mod e for e = 8 and 16
    counts = np.bincount(got, minlength=e)
    chi2 = ((counts - len(ids) / e) ** 2 / (len(ids) / e)).sum()
    assert chi2 < stats.chi2.ppf(0.999, e - 1), counts


def test_hash_of_large_ids_does_not_overflow() -> None:
    ids = torch.tensor([2**31 - 1, 2**32 - 1, 123456789])
    got = build_router("hash", 4, 7, 1)(torch.zeros(3, 4), ids).expert_idx[:, 0].tolist()
    assert got == [((i * 2654435761) % 2**32) * 7 // 2**32 for i in ids.tolist()]


def test_noisy_topk_router_probs_are_the_clean_softmax_in_training() -> None:
    cfg = RunConfig.for_mode("baseline", num_experts=6, expert_hidden=8)  # importance + load losses
    torch.manual_seed(0)
    layer = MoELayer.from_config(cfg, 10).train()
    with torch.no_grad():
        layer.router.w_noise.weight.normal_()  # noise large enough to change the selection
    x = torch.randn(80, 10, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(7)
    _, _, r, s = layer(x)
    xn = x.numpy().astype(np.float64)
    wg, wn = layer.router.w_gate.weight.detach().numpy(), layer.router.w_noise.weight.detach().numpy()
    clean = xn @ wg.T  # (n, e)
    np.testing.assert_allclose(r.logits.detach().numpy(), clean, atol=1e-5)
    softmax = np.exp(clean - clean.max(1, keepdims=True))
    softmax /= softmax.sum(1, keepdims=True)
    np.testing.assert_allclose(r.router_probs.detach().numpy(), softmax, atol=1e-6)
    # the noisy values only select: the same draw, redone by hand
    torch.manual_seed(7)
    eps = torch.randn(80, 6).numpy().astype(np.float64)
    std = np.log1p(np.exp(xn @ wn.T)) + cfg.noise_eps
    noisy = clean + eps * std
    top = np.argsort(-noisy, axis=1, kind="stable")[:, :2]
    assert (top[:, 0] != clean.argmax(1)).any()  # the noise did change some choices
    np.testing.assert_array_equal(np.sort(r.expert_idx.numpy(), 1), np.sort(top, 1))
    kept = np.take_along_axis(noisy, r.expert_idx.numpy(), 1)
    np.testing.assert_allclose(r.gate.detach().numpy(), np.exp(kept) / np.exp(kept).sum(1, keepdims=True), atol=1e-5)
    # losses: importance over the gates, load over Shazeer's smooth estimator (eq. 8-10), both CV^2
    gates = np.zeros((80, 6))
    np.put_along_axis(gates, r.expert_idx.numpy(), r.gate.detach().numpy(), 1)
    srt = -np.sort(-noisy, 1)
    thr = np.where(noisy > srt[:, 2:3], srt[:, 2:3], srt[:, 1:2])  # k-th largest with i left out
    load = stats.norm.cdf((clean - thr) / std).sum(0)
    cv2 = lambda v: v.var() / (v.mean() ** 2 + 1e-10)  # noqa: E731
    assert s.aux["importance"].item() == pytest.approx(cv2(gates.sum(0)), rel=1e-4)
    assert s.aux["load"].item() == pytest.approx(cv2(load), rel=1e-4)
    # statistics of the clean distribution: top-1 for the z-loss and entropy is its argmax
    lse = np.log(np.exp(clean).sum(1))
    assert s.aux["z"].item() == pytest.approx((lse**2).mean(), rel=1e-5)
    np.testing.assert_allclose(s.entropy.detach().numpy(), -(softmax * np.log(softmax)).sum(1), atol=1e-5)
