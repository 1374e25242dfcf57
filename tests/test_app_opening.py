"""The app's opening screens on the committed sample runs tell the README's story: which runs, split and colour
mode each page opens on, checked with AppTest against pandas reading the runs' Parquet files directly."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pandas as pd
import plotly.express as px
import pytest

from streamlit.testing.v1 import AppTest  # noqa: E402

from moe_lens.app_pages import page as registered

ROOT = Path(__file__).resolve().parents[1]
SAMPLE = ROOT / "sample_runs"
STORY = ["wikitext2-naive_topk", "wikitext2-importance"]


def opened(page: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> AppTest:
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.session_state["runs_dir"] = str(SAMPLE)
    at.run()
    if not registered(page).default:
        at.switch_page(registered(page).file).run()
    assert not at.exception and not at.error, ([e.value for e in at.exception], [e.value for e in at.error])
    return at


def widget(at: AppTest, key: str):
    return next(w for kind in ("multiselect", "selectbox", "radio") for w in at.get(kind) if w.key == key)


def fig(at: AppTest, key: str) -> dict:
    return json.loads(next(c for c in at.get("plotly_chart") if c.key == key).proto.spec)


def routing(run: str, split: str) -> pd.DataFrame:
    r = pd.read_parquet(SAMPLE / run / "routing")
    r = r.astype({"split": str, "epoch": int})
    return r[(r["split"] == split) & (r["rank"] == 0)]


def exp_entropy(experts: pd.Series) -> float:
    p = experts.value_counts(normalize=True).to_numpy()
    return float(np.exp(-(p * np.log(p)).sum()))


def test_load_balance_opens_on_a_collapse_beside_a_balance(tmp_path, monkeypatch) -> None:
    at = opened("load_balance", tmp_path, monkeypatch)
    assert widget(at, "runs_balance").value == STORY and widget(at, "balance_split").value == "train"
    names = {t["name"] for t in fig(at, "balance-cv2")["data"]}
    assert names == set(STORY)


def test_collapse_opens_on_train_and_shows_the_collapse(tmp_path, monkeypatch) -> None:
    at = opened("collapse", tmp_path, monkeypatch)
    assert widget(at, "runs_collapse").value == STORY and widget(at, "collapse_split").value == "train"
    traces = {t["name"]: t for t in fig(at, "collapse-effective_experts")["data"]}
    for run in STORY:
        r = routing(run, "train")
        want = r.groupby("step")["expert"].apply(exp_entropy).sort_index()
        got = _decode(traces[run]["y"])
        assert np.allclose(got, want.to_numpy(), atol=1e-6), run
        assert traces[run]["mode"] == "lines+markers"  # a few recorded steps: markers make them visible
    last = {run: _decode(traces[run]["y"])[-1] for run in STORY}
    assert last["wikitext2-naive_topk"] < 2 < last["wikitext2-importance"]  # the story: one collapses, one does not


def test_compare_shares_y_per_metric(tmp_path, monkeypatch) -> None:
    at = opened("compare", tmp_path, monkeypatch)
    assert widget(at, "runs_compare").value == STORY
    ranges = [tuple(fig(at, f"compare-{i}")["layout"]["yaxis"]["range"]) for i in range(len(STORY))]
    assert len(set(ranges)) == 1
    ys = np.concatenate([_decode(fig(at, f"compare-{i}")["data"][0]["y"]) for i in range(len(STORY))])
    assert ranges[0][0] <= ys.min() and ys.max() <= ranges[0][1]


def test_specialization_opens_in_log2_lift_with_mi_beside(tmp_path, monkeypatch) -> None:
    at = opened("specialization", tmp_path, monkeypatch)
    assert widget(at, "spec_run").value == "wikitext2-importance" and widget(at, "spec_value").value == "log2 lift"
    assert widget(at, "spec_split").value == "valid"
    heat = fig(at, "spec-heatmap")["data"][0]
    r = routing("wikitext2-importance", "valid")
    r = r[r["epoch"] == r["epoch"].max()]  # the trained router: the last recorded epoch
    t = pd.read_parquet(SAMPLE / "wikitext2-importance" / "tokens").astype({"split": str})
    t = t[t["split"] == "valid"]
    unk = t.loc[t["token"] == "<unk>", "token_id"].iloc[0]  # OOV left out by default (docs/sql.md, in_vocab rule)
    oov = ~t["in_vocab"].astype("boolean").fillna(t["token_id"] != unk) if "in_vocab" in t else t["token_id"] == unk
    t = t[~oov.to_numpy(bool)][["token_idx", "pos_tag"]]
    m = r.merge(t, on="token_idx").dropna(subset=["pos_tag"])
    p_e = m["expert"].value_counts(normalize=True)
    p_e_v = pd.crosstab(m["expert"], m["pos_tag"], normalize="columns")
    lift = p_e_v.div(p_e, axis=0)
    want = np.log2(lift.clip(lower=2.0**-4))[list(heat["x"])]
    assert np.allclose(_decode(heat["z"]), want.loc[sorted(want.index)].to_numpy(), atol=1e-6)
    mi = fig(at, "spec-mi")["data"][0]
    joint = pd.crosstab(m["expert"], m["pos_tag"], normalize=True).to_numpy()
    outer = joint.sum(1, keepdims=True) @ joint.sum(0, keepdims=True)
    nz = joint > 0
    want_mi = float((joint[nz] * np.log(joint[nz] / outer[nz])).sum())
    got = dict(zip(mi["x"], _decode(mi["y"])))
    assert got["wikitext2-importance"] == pytest.approx(want_mi, rel=1e-6)


def test_runs_table_shows_task_metrics_first(tmp_path, monkeypatch) -> None:
    at = opened("runs", tmp_path, monkeypatch)
    cols = list(at.dataframe[0].value.columns)
    assert cols[:3] == ["run", "dataset", "mode"] and cols[3].startswith("valid ")
    assert cols.index("valid ppl") < cols.index("num_experts") and cols.index("valid f1") < cols.index("num_experts")
    probe = [i for i, c in enumerate(cols) if c.startswith("probe:")]
    assert probe and probe == list(range(len(cols) - len(probe), len(cols)))  # probe columns last


@pytest.mark.parametrize("colour", ["expert", "pos_tag", "dataset"])
def test_clusters_draws_every_point_with_webgl(tmp_path, monkeypatch, colour) -> None:
    monkeypatch.setenv("MOE_LENS_CACHE", str(tmp_path / "cache"))
    at = AppTest.from_file(str(ROOT / "app" / "main.py"), default_timeout=120)
    at.session_state["runs_dir"] = str(SAMPLE)
    at.session_state["clusters_method"] = "PCA"
    at.session_state["clusters_colour"] = colour
    at.run()
    at.switch_page(registered("clusters").file).run()
    assert not at.exception and not at.error
    run = widget(at, "clusters_run").value
    assert run == "wikitext2-importance"
    data = fig(at, "clusters-scatter")["data"]
    h = pd.read_parquet(SAMPLE / run / "hidden").astype({"split": str, "epoch": int})
    h = h[(h["split"] == "valid") & (h["epoch"] == h.loc[h["split"] == "valid", "epoch"].max())]
    assert sum(len(_decode(t["x"])) for t in data) == len(h)  # every recorded point
    assert {t["type"] for t in data} == {"scattergl"}
    assert {t["marker"]["color"] for t in data} <= set(px.colors.qualitative.Dark24)
    assert {t["legendgroup"] for t in data} == {str(v) for v in _labels(run, h, colour)}


def _labels(run: str, h: pd.DataFrame, colour: str) -> set:
    if colour == "dataset":
        return set(h["dataset"].astype(str))
    if colour == "pos_tag":
        t = pd.read_parquet(SAMPLE / run / "tokens").astype({"split": str})
        t = t[t["split"] == "valid"]
        return set(t.set_index("token_idx").loc[h["token_idx"], "pos_tag"].dropna())
    r = routing(run, "valid")
    r = r[r["epoch"] == h["epoch"].iloc[0]]
    return set(r.set_index("token_idx").loc[h["token_idx"], "expert"].astype(str))


def _decode(v):
    import base64

    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(s) for s in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v)
