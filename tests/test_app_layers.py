"""The Layers page and the layer picker through `streamlit.testing.v1.AppTest`, on a 3-MoE-layer run beside a
one-layer run: the picker offers the recorded layers, and the page's charts and tables carry the numbers of
`moe_lens.analysis` (collapse, routing_paths, layer_transitions, coactivation)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
from streamlit.testing.v1 import AppTest

from moe_lens import analysis, store
from moe_lens.app_pages import page as registered
from moe_lens.synthetic import write_synthetic_run

MAIN = str(Path(__file__).resolve().parents[1] / "app" / "main.py")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("layers")
    write_synthetic_run(d, "a-one", num_tokens=500, seed=1)
    write_synthetic_run(d, "b-deep", num_tokens=800, layers=3, num_experts=4, seed=2, specialization=2.0)
    return d


def app(runs_dir: Path, page: str = "layers", **state) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["runs_dir"] = str(runs_dir)
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    at.switch_page(registered(page).file).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def figure(at: AppTest, key: str) -> dict:
    charts = {c.key: c for c in at.get("plotly_chart")}
    assert key in charts, sorted(k for k in charts if k)
    return json.loads(charts[key].proto.spec)


def z_of(fig: dict) -> np.ndarray:
    import base64

    z = fig["data"][0]["z"]
    if isinstance(z, dict):
        a = np.frombuffer(base64.b64decode(z["bdata"]), dtype=np.dtype(z["dtype"]))
        return a.reshape([int(s) for s in str(z["shape"]).split(",")]) if "shape" in z else a
    return np.asarray(z, dtype=float)


def test_layer_picker_offers_the_recorded_layers(runs_dir: Path) -> None:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["runs_dir"] = str(runs_dir)
    at.run()
    assert list(at.sidebar.selectbox(key="layer").options) == ["0", "1", "2"]
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["runs_dir"] = str(runs_dir)
    at.session_state["layer"] = 7  # a layer no run has (set for another runs directory): the first recorded
    at.run()
    assert not at.exception and at.sidebar.selectbox(key="layer").value == 0


@pytest.mark.parametrize("page", ["load_balance", "collapse", "specialization", "compare", "layers"])
def test_every_page_reads_the_picked_layer(runs_dir: Path, page: str) -> None:
    """Each page renders at layer 2 of the deep run; the collapse chart carries layer 2's numbers."""
    at = app(runs_dir, page, layer=2, runs_balance=["b-deep"], runs_collapse=["b-deep"], spec_run="b-deep",
             runs_compare=["b-deep"])
    if page == "collapse":
        want = analysis.collapse(store.connect(runs_dir), "b-deep", layer=2).sort_values("step")
        y = figure(at, "collapse-effective_experts")["data"][0]["y"]
        got = z_of({"data": [{"z": y}]})
        np.testing.assert_allclose(got, want["effective_experts"])


def test_layers_page_numbers(runs_dir: Path) -> None:
    at = app(runs_dir, layers_a=0, layers_b=2, layers_co_layer=1)
    assert at.selectbox(key="layers_run").value == "b-deep"  # the run with several layers opens first
    con = store.connect(runs_dir)
    paths = analysis.routing_paths(con, "b-deep")
    per = at.dataframe[0].value  # per layer
    for layer in (0, 1, 2):
        want_c = analysis.collapse(con, "b-deep", split="valid", by="epoch", layer=layer).iloc[-1]
        row = per[per["layer"] == layer].iloc[0]
        np.testing.assert_allclose(row["effective_experts"], want_c["effective_experts"])
        np.testing.assert_allclose(row["nmi_pos"], paths[paths["layer"] == layer]["nmi"].iloc[0])
        np.testing.assert_allclose(row["ami_pos"], paths[paths["layer"] == layer]["ami"].iloc[0])
    table = at.dataframe[1].value  # paths
    want = analysis.routing_paths(con, "b-deep", summary=False, top=20)
    assert table["path"].tolist() == want["path"].tolist() and table["n"].tolist() == want["n"].tolist()
    tr = analysis.layer_transitions(con, "b-deep", layer_a=0, layer_b=2)
    z = tr.pivot_table(index="expert_a", columns="expert_b", values="p_b_given_a", fill_value=0.0).to_numpy()
    np.testing.assert_allclose(z_of(figure(at, "layers-transitions")), z)
    co = analysis.coactivation(con, "b-deep", layer=1)
    z = co.pivot_table(index="expert_i", columns="expert_j", values="p_j_given_i", fill_value=0.0).to_numpy()
    np.testing.assert_allclose(z_of(figure(at, "layers-coactivation")), z)


def test_layers_page_on_a_one_layer_run(runs_dir: Path) -> None:
    at = app(runs_dir, layers_run="a-one")
    assert any("one MoE layer" in i.value for i in at.info)
