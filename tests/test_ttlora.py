"""The `ttlora` expert bank against a dense reference built loop by loop in numpy: the tensor-train
contraction, the layer's output and every parameter's gradient, under both dispatches."""
from __future__ import annotations

import itertools
from functools import reduce

import numpy as np
import pytest
import torch

from moe_lens.moe import MoELayer
from moe_lens.moe.banks import LoRAExperts
from moe_lens.moe.ttlora import TTLoRAExperts, balanced_factors, tt_matrix

D, H, E, R = 6, 4, 3, 2  # d = 2 * 3, h = 2 * 2


def np_train(cores: list[np.ndarray]) -> np.ndarray:
    """One expert's cores (r_{k-1}, n_k, r_k) -> the full (n1 n2, n3 n4) matrix, entry by entry."""
    modes = [c.shape[1] for c in cores]
    full = np.zeros(modes)
    for idx in itertools.product(*map(range, modes)):
        full[idx] = reduce(np.matmul, [c[:, i, :] for c, i in zip(cores, idx)])[0, 0]
    return full.reshape(modes[0] * modes[1], modes[2] * modes[3])


def np_core_grads(cores: list[np.ndarray], dw: np.ndarray) -> list[np.ndarray]:
    """dL/dG_k from dL/dW, entry by entry: dW[idx] * (product left of core k)^T (product right of it)^T."""
    modes = [c.shape[1] for c in cores]
    dw = dw.reshape(modes)
    grads = [np.zeros_like(c) for c in cores]
    for idx in itertools.product(*map(range, modes)):
        mats = [c[:, i, :] for c, i in zip(cores, idx)]
        for k in range(4):
            left = reduce(np.matmul, mats[:k], np.ones((1, 1)))  # (1, r_{k-1})
            right = reduce(np.matmul, mats[k + 1 :]) if k < 3 else np.ones((1, 1))  # (r_k, 1)
            grads[k][:, idx[k], :] += dw[idx] * np.outer(left[0], right[:, 0])
    return grads


def make_layer(dispatch: str) -> MoELayer:
    torch.manual_seed(0)
    layer = MoELayer(D, E, 2, router="topk_mask", expert_type="ttlora", expert_hidden=H, tt_rank=R, dispatch=dispatch)
    with torch.no_grad():  # every core non-zero, so the reference checks the whole train (init has a zero core)
        for core in (*layer.experts.cores1, *layer.experts.cores2):
            core.normal_(0, 0.7)
    return layer.double().train()


def inputs(n: int = 9) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(3)
    return torch.randn(n, D, generator=g, dtype=torch.float64), torch.randn(n, D, generator=g, dtype=torch.float64)


def test_balanced_factors_and_core_shapes() -> None:
    assert [balanced_factors(n) for n in (256, 128, 64, 12, 7, 1)] == [(16, 16), (8, 16), (8, 8), (3, 4), (1, 7), (1, 1)]
    bank = TTLoRAExperts(D, H, E, R)
    assert [tuple(c.shape) for c in bank.cores1] == [(E, 1, 2, R), (E, R, 3, R), (E, R, 2, R), (E, R, 2, 1)]
    assert [tuple(c.shape) for c in bank.cores2] == [(E, 1, 2, R), (E, R, 2, R), (E, R, 2, R), (E, R, 3, 1)]


def test_contraction_equals_numpy_entry_by_entry() -> None:
    layer = make_layer("loop")
    cores = layer.experts.cores1
    got = tt_matrix(cores, D, H).detach().numpy()  # (e, d, h)
    for i in range(E):
        np.testing.assert_allclose(got[i], np_train([c[i].detach().numpy() for c in cores]), rtol=1e-12, atol=1e-12)


def test_every_expert_starts_as_the_base_mlp() -> None:
    torch.manual_seed(0)
    bank = TTLoRAExperts(D, H, E, R)
    x = torch.randn(5, D)
    base = bank.base2(torch.relu(bank.base1(x)))
    for run in bank.split():
        torch.testing.assert_close(run(x), base)


@pytest.mark.parametrize("dispatch", ["grouped", "loop"])
def test_output_and_gradients_equal_the_numpy_reference(dispatch: str) -> None:
    layer = make_layer(dispatch)
    x, dy = inputs()
    out = layer(x)
    (out.y * dy).sum().backward()
    bank = layer.experts
    c1 = [[c[i].detach().numpy() for c in bank.cores1] for i in range(E)]
    c2 = [[c[i].detach().numpy() for c in bank.cores2] for i in range(E)]
    W1, b1 = bank.base1.weight.detach().numpy().T, bank.base1.bias.detach().numpy()  # (d, h), (h,)
    W2, b2 = bank.base2.weight.detach().numpy().T, bank.base2.bias.detach().numpy()
    w1 = [W1 + np_train(c) for c in c1]
    w2 = [W2 + np_train(c) for c in c2]
    xn, dyn = x.numpy(), dy.numpy()
    idx, gate = out.routing.expert_idx.numpy(), out.routing.gate.detach().numpy()
    y = np.zeros_like(xn)
    dw1, dw2 = [np.zeros_like(w) for w in w1], [np.zeros_like(w) for w in w2]
    db1, db2 = np.zeros_like(b1), np.zeros_like(b2)
    for t in range(xn.shape[0]):  # token by token, slot by slot
        for j in range(idx.shape[1]):
            i, g = idx[t, j], gate[t, j]
            pre = xn[t] @ w1[i] + b1
            h = np.maximum(pre, 0)
            y[t] += g * (h @ w2[i] + b2)
            dz = g * dyn[t]
            dw2[i] += np.outer(h, dz)
            db2 += dz
            dh = (w2[i] @ dz) * (pre > 0)
            dw1[i] += np.outer(xn[t], dh)
            db1 += dh
    np.testing.assert_allclose(out.y.detach().numpy(), y, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bank.base1.weight.grad.numpy(), sum(dw1).T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bank.base2.weight.grad.numpy(), sum(dw2).T, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bank.base1.bias.grad.numpy(), db1, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(bank.base2.bias.grad.numpy(), db2, rtol=1e-10, atol=1e-12)
    for cores, params, dws in ((c1, bank.cores1, dw1), (c2, bank.cores2, dw2)):
        for i in range(E):
            for k, want in enumerate(np_core_grads(cores[i], dws[i])):
                np.testing.assert_allclose(params[k].grad[i].numpy(), want, rtol=1e-10, atol=1e-12)


def test_both_dispatches_agree_in_float32() -> None:
    x, dy = (t.float() for t in inputs(40))
    results = []
    for dispatch in ("grouped", "loop"):
        layer = make_layer(dispatch).float()
        out = layer(x)
        (out.y * dy).sum().backward()
        results.append((out.y.detach(), [p.grad for p in layer.parameters()]))
    (y_g, g_g), (y_l, g_l) = results
    torch.testing.assert_close(y_g, y_l, atol=1e-5, rtol=1e-5)
    for a, b in zip(g_g, g_l):
        torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def test_train_base_false_freezes_only_the_base() -> None:
    bank = TTLoRAExperts(D, H, E, R, train_base=False)
    assert not any(p.requires_grad for p in (*bank.base1.parameters(), *bank.base2.parameters()))
    assert all(c.requires_grad for c in (*bank.cores1, *bank.cores2))
    with pytest.raises(ValueError, match="tt_rank=0"):
        TTLoRAExperts(D, H, E, 0)


def test_parameters_per_expert_against_lora_rank_8() -> None:
    """At d = 256, h = 128: 16*4 + 4*16*4 + 4*8*4 + 4*16 = 512 for dW1 (16, 16, 8, 16) and
    8*4 + 4*16*4 + 4*16*4 + 4*16 = 608 for dW2 (8, 16, 16, 16): 1,120, against LoRA's
    2 * (256 + 128) * 8 = 6,144."""
    e = 8
    tt = TTLoRAExperts(256, 128, e, tt_rank=4)
    lora = LoRAExperts(256, 128, e, rank=8)
    tt_per_expert = sum(c.numel() for c in (*tt.cores1, *tt.cores2)) // e
    lora_per_expert = sum(p.numel() for p in (lora.a1, lora.b1, lora.a2, lora.b2)) // e
    assert (tt_per_expert, lora_per_expert) == (1120, 6144)
