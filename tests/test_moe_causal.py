"""Issue 18 item 3: the language model never looks ahead, in any mode.

Expert choice picked each expert's tokens over all b*t positions of a batch, and Switch capacity
counted a queue over them, so a token's routing depended on later tokens. Now each time step is a
group (`MoELayer(..., group=t)`). Checked on the whole model (past logits unchanged when future
tokens change) and on the layer (selection and capacity against numpy loops over each group).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from moe_lens.config import MODES, RunConfig
from moe_lens.models import LanguageModel
from moe_lens.moe import MoELayer

V, B, T, CUT = 50, 6, 10, 5


def lm(mode: str) -> LanguageModel:
    """A small LM; capacity factors small enough that capacity binds in every batch."""
    over = dict(d_embed=16, d_model=16, expert_hidden=12, num_experts=4, dropout=0.2)
    if MODES[mode].get("capacity_factor") is not None:
        over["capacity_factor"] = 0.5 if MODES[mode]["router"] == "switch" else 1.0
    cfg = RunConfig.for_mode(mode, top_k=min(MODES[mode].get("top_k", 2), 4), **over)
    torch.manual_seed(0)
    return LanguageModel(cfg, V)


def logits(model: LanguageModel, ids: torch.Tensor) -> torch.Tensor:
    torch.manual_seed(123)  # the same dropout masks and router noise for both forwards
    out, _, traces, _ = model(ids, torch.arange(ids.numel()).reshape(ids.shape))
    return out.detach(), traces[0].routing


@pytest.mark.parametrize("training", [False, True], ids=["eval", "train"])
@pytest.mark.parametrize("mode", sorted(MODES))
def test_future_tokens_change_no_past_logit(mode: str, training: bool) -> None:
    model = lm(mode).train(training)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, V, (B, T), generator=g)
    other = ids.clone()
    other[:, CUT:] = torch.randint(0, V, (B, T - CUT), generator=g)  # only the future differs
    a, ra = logits(model, ids)
    b, rb = logits(model, other)
    assert not torch.equal(a[:, CUT:], b[:, CUT:])  # the change is seen where it may be
    assert (a[:, :CUT] - b[:, :CUT]).abs().max().item() < 1e-6
    if training and ra.dropped is not None:
        assert ra.dropped.any()  # the capacity did bind


def test_expert_choice_chooses_within_each_group() -> None:
    e, c, m, groups, d = 4, 1.0, 6, 5, 8
    layer = MoELayer(d, e, 2, router="expert_choice", capacity_factor=c)
    x = torch.randn(m * groups, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r = layer(x, group=groups).routing
    probs = r.router_probs.numpy()  # (n, e)
    cap = min(m, math.ceil(c * m / e))
    want = np.zeros((m * groups, e), bool)
    for j in range(groups):  # rows j, j + G, j + 2G, ...: group j
        rows = np.arange(j, m * groups, groups)
        for i in range(e):
            top = rows[np.argsort(-probs[rows, i], kind="stable")[:cap]]
            want[top, i] = True
    got = np.zeros_like(want)
    token, expert, gate = (t.numpy() for t in r.assign)
    got[token, expert] = True
    assert len(token) == e * groups * cap
    np.testing.assert_array_equal(got, want)
    np.testing.assert_allclose(gate, probs[token, expert], rtol=1e-6)
    whole = layer(x).routing  # one group: the old batch-wide choice differs
    assert len(whole.assign[0]) == e * math.ceil(c * m * groups / e)


def test_switch_capacity_is_counted_within_each_group() -> None:
    e, cf, m, groups, d = 4, 0.5, 8, 3, 8
    layer = MoELayer(d, e, 1, router="switch", capacity_factor=cf).train()
    x = torch.randn(m * groups, d, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        r = layer(x, group=groups).routing
    expert = r.expert_idx[:, 0].numpy()
    cap = math.ceil(cf * m / e)
    want = np.zeros(m * groups, bool)
    seen: dict[tuple[int, int], int] = {}
    for row in range(m * groups):  # in row order, each (group, expert) queue keeps its first `cap`
        key = (row % groups, int(expert[row]))
        want[row] = seen.get(key, 0) >= cap
        seen[key] = seen.get(key, 0) + 1
    np.testing.assert_array_equal(r.dropped[:, 0].numpy(), want)
    assert want.any() and not want.all()
    assert (r.gate[:, 0][r.dropped[:, 0]] == 0).all()


def test_group_must_divide_the_rows_and_excludes_a_mask() -> None:
    layer = MoELayer(8, 4, 1, router="switch", capacity_factor=1.0).train()
    with pytest.raises(ValueError, match="groups=3"):
        layer(torch.randn(10, 8), group=3)
    with pytest.raises(ValueError, match="not both"):
        layer(torch.randn(2, 5, 8), mask=torch.ones(2, 5, dtype=torch.bool), group=5)
