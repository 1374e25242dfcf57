"""Depth as a dimension: stacked MoE layers in all three models, the per-layer train-time window, and a
recorded 3-MoE-layer language model.

The default model (`num_layers=2`, `moe_layers="1"`) is checked bit for bit against the one-MoE-layer
models as they were (tests/fixtures/old_models.py): same weights from the same seed, same outputs and
routing in training mode (dropout and router noise drawn in the same order), and old checkpoints load.
"""
from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np
import pytest
import torch

from moe_lens.config import RunConfig
from moe_lens.models import LanguageModel, ModelOutput, SpanQA, Tagger

_spec = importlib.util.spec_from_file_location("old_models", Path(__file__).parent / "fixtures" / "old_models.py")
old = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(old)

SMALL = dict(d_embed=8, d_model=8, expert_hidden=8, num_experts=4)
OLD_TO_NEW = {"lstm1.": "lstms.0.", "lstm2.": "lstms.1.", "moe.": "moes.0.", "norm.": "norms.0."}


def _new_name(key: str) -> str:
    head, _, rest = key.partition("enc.") if key.startswith("enc.") else ("", "", key)
    for a, b in OLD_TO_NEW.items():
        if rest.startswith(a):
            rest = b + rest[len(a):]
    return (head + "enc." if key.startswith("enc.") else "") + rest


def _lm_inputs():
    g = torch.Generator().manual_seed(1)
    return torch.randint(0, 30, (3, 5), generator=g), torch.arange(15).reshape(3, 5)


def _tag_inputs():
    g = torch.Generator().manual_seed(2)
    return torch.randint(1, 30, (3, 6), generator=g), torch.arange(18).reshape(3, 6), torch.tensor([6, 2, 4])


def _qa_inputs():
    g = torch.Generator().manual_seed(3)
    c, q = torch.randint(1, 30, (3, 7), generator=g), torch.randint(1, 30, (3, 4), generator=g)
    return c, torch.arange(21).reshape(3, 7), torch.tensor([7, 5, 3]), q, 100 + torch.arange(12).reshape(3, 4), \
        torch.tensor([4, 2, 3])


CASES = {  # dataset -> (old class, new class, constructor args after cfg, inputs)
    "wikitext2": (old.LanguageModel, LanguageModel, (30,), _lm_inputs),
    "conll2003": (old.Tagger, Tagger, (30, 5), _tag_inputs),
    "squad": (old.SpanQA, SpanQA, (30,), _qa_inputs),
}


def _flat(out, dataset: str) -> list[torch.Tensor]:
    """Logits and aux loss of an old tuple return or a ModelOutput, in a fixed order."""
    if isinstance(out, ModelOutput):
        logits = list(out.logits) if isinstance(out.logits, tuple) else [out.logits]
        return logits + [out.aux_loss]
    if dataset == "squad":  # old SpanQA: start, end, aux, traces
        return [out[0], out[1], out[2]]
    return [out[0], out[1]]  # logits, aux, traces[, state]


@pytest.mark.parametrize("dataset", list(CASES))
@pytest.mark.parametrize("mode", ["noisy_topk", "switch", "expert_choice"])
def test_default_depth_is_bit_identical_to_the_one_layer_model(dataset: str, mode: str) -> None:
    old_cls, new_cls, args, inputs = CASES[dataset]
    cfg = RunConfig.for_mode(mode, dataset=dataset, **SMALL)
    torch.manual_seed(0)
    a = old_cls(cfg, *args)
    torch.manual_seed(0)
    b = new_cls(cfg, *args)
    sa, sb = a.state_dict(), b.state_dict()
    assert sorted(_new_name(k) for k in sa) == sorted(sb)
    for k, v in sa.items():
        assert torch.equal(v, sb[_new_name(k)]), k  # the same seed draws the same weights
    x = inputs()
    for train in (True, False):
        a.train(train), b.train(train)
        torch.manual_seed(5)
        out_a = a(*x)
        torch.manual_seed(5)
        out_b = b(*x)
        assert isinstance(out_b, ModelOutput)
        for ta, tb in zip(_flat(out_a, dataset), _flat(out_b, dataset), strict=True):
            assert torch.equal(ta, tb)
        tr_a, tr_b = out_a[3] if dataset == "squad" else out_a[2], out_b.traces
        assert len(tr_b) == 1 and tr_b[0].layer == 0
        assert torch.equal(tr_a[0].token_idx, tr_b[0].token_idx)
        assert torch.equal(tr_a[0].routing.expert_idx, tr_b[0].routing.expert_idx)
        assert torch.equal(tr_a[0].hidden, tr_b[0].hidden)
    # an old checkpoint (one-MoE-layer names) loads into the new model, strictly
    c = new_cls(cfg, *args)
    c.load_state_dict(a.state_dict())
    for k, v in c.state_dict().items():
        assert torch.equal(v, sb[k])


@pytest.mark.parametrize("dataset", list(CASES))
def test_stacked_moe_layers_know_their_index(dataset: str) -> None:
    _, new_cls, args, inputs = CASES[dataset]
    cfg = RunConfig.for_mode("load", dataset=dataset, num_layers=3, moe_layers="all", **SMALL)
    torch.manual_seed(0)
    model = new_cls(cfg, *args)
    moes = model.moes if dataset == "wikitext2" else model.enc.moes
    assert [m.layer for m in moes] == [0, 1, 2]
    out = model(*inputs())
    assert [t.layer for t in out.traces] == [0, 1, 2]
    # the model's aux loss is the sum of the layers' weighted aux losses
    torch.testing.assert_close(out.aux_loss.detach(), sum(t.aux_loss for t in out.traces))
    assert all(t.aux_loss > 0 for t in out.traces)  # w_load = 0.1: each layer contributes
    n = out.traces[0].token_idx.shape[0]
    assert all(torch.equal(t.token_idx, out.traces[0].token_idx) for t in out.traces)
    assert all(t.routing.expert_idx.shape == (n, 2) for t in out.traces)
    if dataset == "wikitext2":
        assert len(out.state) == 3


def test_moe_layers_are_validated() -> None:
    assert RunConfig(num_layers=3, moe_layers="3,1").moe_after() == [1, 3]
    assert RunConfig(num_layers=3, moe_layers="all").moe_after() == [1, 2, 3]
    assert RunConfig().moe_after() == [1]
    for bad in ("4", "0", "x", ""):
        with pytest.raises(ValueError, match="moe_layers"):
            RunConfig(num_layers=3, moe_layers=bad)
    with pytest.raises(ValueError, match="num_layers"):
        RunConfig(num_layers=0)


class _Rows:
    """A stand-in for rundir.Metrics that keeps the rows."""

    def __init__(self) -> None:
        self.rows: list[dict] = []

    def add(self, step, epoch, split, name, value, *, layer=None, expert=None) -> None:
        self.rows.append(dict(step=step, epoch=epoch, split=split, name=name, layer=layer, expert=expert, value=value))

    def add_many(self, step, epoch, split, values) -> None:
        for k, v in values.items():
            self.add(step, epoch, split, k, v)


def test_window_keeps_each_layers_statistics_apart() -> None:
    """Two MoE layers, 3 steps: each layer's load and importance shares, aux terms and dropped count are its
    own rows (numpy over the routing), and the layer-NULL totals sum them. The old `train._Window` added
    every trace into one vector labelled layer 0."""
    from types import SimpleNamespace

    from moe_lens.models import MoETrace
    from moe_lens.moe import MoELayer
    from moe_lens.stats_window import StatsWindow

    torch.manual_seed(0)
    layers = [MoELayer(6, 4, 2, router="noisy_topk", w_load=0.1),
              MoELayer(6, 3, 1, router="switch", capacity_factor=1.0, w_switch=0.01, layer=1)]
    window = StatsWindow(torch.device("cpu"))
    want_load = [np.zeros(4), np.zeros(3)]
    want_imp = [np.zeros(4), np.zeros(3)]
    want_dropped, want_aux, want_parts = [0.0, 0.0], [0.0, 0.0], [{}, {}]
    for step in range(3):
        x = torch.randn(20, 6)
        traces, total = [], 0.0
        for j, m in enumerate(layers):
            y, aux, r, st = m(x)
            traces.append(MoETrace(j, torch.arange(20), r, st, x, aux.detach()))
            e, g = r.expert_idx.numpy().ravel(), r.gate.detach().numpy().ravel()
            kept = np.ones_like(g) if r.dropped is None else ~r.dropped.numpy().ravel()
            want_load[j] += np.bincount(e, weights=kept, minlength=len(want_load[j]))
            want_imp[j] += np.bincount(e, weights=g, minlength=len(want_imp[j]))
            want_dropped[j] += float((~kept.astype(bool)).sum())
            want_aux[j] += float(aux.detach()) / 3
            for k, v in st.aux.items():
                want_parts[j][k] = want_parts[j].get(k, 0.0) + float(v) / 3
            total += float(aux.detach())
        window.update(SimpleNamespace(loss=torch.tensor(1.0 + step), aux=torch.tensor(total), traces=traces))
    assert want_dropped[1] > 0  # capacity 1.0 with top-1 drops some assignments of layer 1
    rows = _Rows()
    window.log(rows, step=3, epoch=0, tok_s=1.0, lr=1e-3)
    got = {(r["name"], r["layer"], r["expert"]): r["value"] for r in rows.rows}
    for j in (0, 1):
        for name, want in (("load", want_load[j]), ("importance", want_imp[j])):
            share = [got[(name, j, i)] for i in range(len(want))]
            np.testing.assert_allclose(share, want / want.sum(), rtol=1e-6)
        assert ("load", j, len(want_load[j])) not in got  # no expert beyond the layer's own
        assert got[("dropped", j, None)] == want_dropped[j]
        np.testing.assert_allclose(got[("aux_loss", j, None)], want_aux[j], rtol=1e-5)
        for k, v in want_parts[j].items():
            np.testing.assert_allclose(got[(f"aux_{k}", j, None)], v, rtol=1e-5)
    np.testing.assert_allclose(got[("loss", None, None)], 2.0)
    np.testing.assert_allclose(got[("aux_loss", None, None)], sum(want_aux), rtol=1e-5)
    assert got[("dropped", None, None)] == sum(want_dropped)
    np.testing.assert_allclose(got[("aux_switch", None, None)], want_parts[0]["switch"] + want_parts[1]["switch"],
                               rtol=1e-5)
    assert window.n == 0 and not window.layers  # reset after the log


def test_window_state_round_trips() -> None:
    """A window saved between two logs and loaded into a fresh one logs the same rows."""
    from types import SimpleNamespace

    from moe_lens.models import MoETrace
    from moe_lens.moe import MoELayer
    from moe_lens.stats_window import StatsWindow

    torch.manual_seed(1)
    m = [MoELayer(4, 3, 2, layer=0), MoELayer(4, 5, 1, router="switch", layer=1)]
    a = StatsWindow(torch.device("cpu"))
    for _ in range(2):
        x = torch.randn(7, 4)
        outs = [layer(x) for layer in m]
        a.update(SimpleNamespace(loss=torch.tensor(0.5), aux=sum(o.aux_loss for o in outs).detach(),
                                 traces=[MoETrace(j, torch.arange(7), o.routing, o.stats, x, o.aux_loss.detach())
                                         for j, o in enumerate(outs)]))
    b = StatsWindow(torch.device("cpu"))
    b.load_state_dict(a.state_dict())
    ra, rb = _Rows(), _Rows()
    a.log(ra, 2, 0, 1.0, 1e-3)
    b.log(rb, 2, 0, 1.0, 1e-3)
    assert ra.rows == rb.rows


@pytest.mark.integration
def test_three_moe_layer_lm_is_recorded_end_to_end(real_data_dir: Path, tmp_path: Path) -> None:
    """A tiny WikiText-2 LM with an MoE layer after each of 3 LSTM layers: routing, hidden states and per-layer
    metrics for every layer, and the cross-layer analyses over the recorded run."""
    import pyarrow.parquet as pq

    from moe_lens import analysis as A
    from moe_lens.store import connect
    from moe_lens.train import train

    cfg = RunConfig.for_mode("load", dataset="wikitext2", data_dir=str(real_data_dir), runs_dir=str(tmp_path),
                             run_name="lm3", num_layers=3, moe_layers="all", d_embed=16, d_model=16,
                             expert_hidden=16, num_experts=4, batch_size=8, bptt=12, vocab_size=500, warmup_steps=2,
                             record=True, record_every=2, pos_tags=False, hidden_sample=10**6, max_steps=4,
                             max_eval_batches=2, epochs=1)  # fmt: skip
    run_dir = train(cfg, progress=False)
    con = connect(tmp_path)
    per = con.execute("""SELECT split, step, layer, count(*) AS rows, count(DISTINCT token_idx) AS toks
                         FROM routing WHERE run = 'lm3' GROUP BY ALL ORDER BY ALL""").df()
    assert set(per["layer"]) == {0, 1, 2} and set(per["split"]) == {"train", "valid"}
    assert (per.groupby(["split", "step"])["layer"].nunique() == 3).all()  # every recorded batch at every layer
    assert (per["rows"] == per["toks"] * 2).all()
    assert (per.groupby(["split", "step"])["toks"].nunique() == 1).all()  # the same tokens at each layer
    hidden = con.execute("SELECT DISTINCT layer FROM hidden WHERE run = 'lm3' ORDER BY 1").fetchall()
    assert [h[0] for h in hidden] == [0, 1, 2]
    m = pq.read_table(run_dir / "metrics.parquet").to_pandas()
    load = m[(m["name"] == "load") & (m["split"] == "train")]
    assert sorted(load["layer"].unique()) == [0, 1, 2]
    assert np.allclose(load.groupby(["step", "layer"])["value"].sum(), 1.0)
    assert (load.groupby(["step", "layer"]).size() == 4).all()
    aux = m[(m["name"] == "aux_load") & (m["split"] == "train")]
    total = aux[aux["layer"].isna()].set_index("step")["value"]
    by_layer = aux[aux["layer"].notna()].groupby("step")["value"].sum()
    np.testing.assert_allclose(total.sort_index(), by_layer.sort_index(), rtol=1e-6)
    paths = A.routing_paths(con, "lm3", split="valid", attribute="freq_band")
    whole = paths[paths["layer"].isna()].iloc[0]
    assert whole["num_layers"] == 3 and whole["tokens"] == per[per["split"] == "valid"]["toks"].iloc[0]
    assert 1 <= whole["distinct"] <= 4 ** 3
    tr = A.layer_transitions(con, "lm3", layer_a=0, layer_b=2)
    assert np.allclose(tr.groupby("expert_a")["p_b_given_a"].sum(), 1.0)
    co = A.coactivation(con, "lm3", split="train")
    assert set(co["layer"]) == {0, 1, 2}
    ckpt = torch.load(sorted((run_dir / "checkpoints").glob("*.pt"))[-1], weights_only=False)
    assert any(k.startswith("moes.2.") for k in ckpt["model"])
