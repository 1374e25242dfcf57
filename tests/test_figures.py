"""`moe-lens figure`: each figure plots exactly the numbers the analysis layer returns."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest

from moe_lens import analysis as A
from moe_lens import figures
from moe_lens.cli import main
from moe_lens.errors import MoeLensError
from moe_lens.store import connect
from moe_lens.synthetic import write_synthetic_run


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory) -> Path:
    root = tmp_path_factory.mktemp("runs")
    write_synthetic_run(root, "a-collapsed", dataset="conll2003", mode="naive_topk", num_tokens=2000, skew=3.0)
    write_synthetic_run(root, "b-balanced", dataset="conll2003", mode="load", num_tokens=2000)
    write_synthetic_run(root, "c-dense", dataset="conll2003", mode="dense", num_experts=1, top_k=1, num_tokens=500)
    return root


def test_collapse_bars_plot_the_analysis_numbers(runs: Path) -> None:
    con = connect(runs)
    fig, table = figures.build(con, "collapse", None)
    assert sorted(table["run"]) == ["a-collapsed", "b-balanced"]  # one-expert runs have nothing to collapse
    ref = A.collapse(con, ["a-collapsed", "b-balanced"], split="valid", by="epoch")
    ref = ref[ref["epoch"] == ref["epoch"].max()].set_index("run")["effective_experts"]
    plotted = {bar.name: float(bar.y[0]) for bar in fig.data}
    assert plotted == pytest.approx({"naive_topk": ref["a-collapsed"], "load": ref["b-balanced"]})
    assert plotted["naive_topk"] < plotted["load"]


def test_collapse_bars_average_only_seed_replicates() -> None:
    """On the sample runs: a bar is the mean of one run's seeds (their number under the dataset, min-max bars), and
    conll2003-load-ablate (a smaller model, no seed of conll2003-load) is a bar of its own, not averaged in."""
    con = connect(Path(__file__).resolve().parents[1] / "sample_runs")
    runs = ["conll2003-load", "conll2003-load-seed1", "conll2003-load-seed2", "conll2003-load-ablate",
            "conll2003-switch", "wikitext2-load"]
    fig, table = figures.build(con, "collapse", runs)
    ref = A.collapse(con, runs, split="valid", by="epoch", layer=0)
    ref = ref.sort_values("epoch").groupby("run")["effective_experts"].last()
    bars = {(bar.name, x): (y, e, h) for bar in fig.data for x, y, e, h in zip(bar.x, bar.y, bar.error_y.array,
                                                                               bar.customdata)}
    seeds = ref[["conll2003-load", "conll2003-load-seed1", "conll2003-load-seed2"]]
    y, err, hover = bars[("load", "conll2003")]
    assert y == pytest.approx(seeds.mean(), abs=1e-9) and err == pytest.approx(seeds.max() - seeds.mean(), abs=1e-9)
    assert hover[0] == 3 and hover[4] == "conll2003-load, conll2003-load-seed1, conll2003-load-seed2"
    y, _, hover = bars[("load: conll2003-load-ablate", "conll2003")]
    assert y == pytest.approx(ref["conll2003-load-ablate"], abs=1e-9) and hover[0] == 1
    assert bars[("load", "wikitext2")][0] == pytest.approx(ref["wikitext2-load"], abs=1e-9)
    ticks = dict(zip(fig.layout.xaxis.tickvals, fig.layout.xaxis.ticktext))
    assert ticks == {"conll2003": "conll2003<br>1 or 3 seeds a bar", "wikitext2": "wikitext2"}  # switch: one seed here
    assert table.set_index("run")["runs_in_bar"].to_dict() == {
        "conll2003-load": 3, "conll2003-load-seed1": 3, "conll2003-load-seed2": 3, "conll2003-load-ablate": 1,
        "conll2003-switch": 1, "wikitext2-load": 1}
    assert "the mean over one run's seeds" in fig.layout.title.text


def test_specialization_heatmap_is_log2_lift(runs: Path) -> None:
    con = connect(runs)
    fig, table = figures.build(con, "specialization", ["b-balanced"], attribute="pos_tag")
    ref = A.specialization(con, "b-balanced", attribute="pos_tag", shuffled=False)
    top = ref.groupby("value")["n_value"].first().sort_values(ascending=False).index[0]
    lift = ref[(ref["value"] == top) & (ref["expert"] == 0)]["lift"].iloc[0]
    assert fig.data[0].z[0][0] == pytest.approx(np.log2(max(lift, 1 / 8)))
    assert set(table["run"]) == {"b-balanced"}


def test_nmi_and_curve_and_errors(runs: Path, tmp_path: Path) -> None:
    con = connect(runs)
    fig, table = figures.build(con, "nmi", None)
    assert list(fig.data[0].y) == pytest.approx(table["nmi"].tolist())
    fig, table = figures.build(con, "collapse-curve", ["a-collapsed"])
    assert len(fig.data) == 1 and list(fig.data[0].y) == pytest.approx(table.sort_values("step")["effective_experts"].tolist())
    with pytest.raises(MoeLensError, match="exactly one run"):
        figures.build(con, "specialization", None)
    with pytest.raises(MoeLensError, match="unknown run"):
        figures.build(con, "collapse", ["nope"])
    with pytest.raises(MoeLensError, match="allowed: .png, .html"):
        figures.save(fig, tmp_path / "x.svg")


def test_cli_writes_html_and_png(runs: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    assert main(["figure", "collapse", "--runs-dir", str(runs), "--out", str(tmp_path / "c.html")]) == 0
    assert "effective_experts" in capsys.readouterr().out and (tmp_path / "c.html").stat().st_size > 100_000
    assert main(["figure", "nmi", "--runs-dir", str(runs), "--out", str(tmp_path / "n.png")]) == 0  # kaleido + chromium
    assert (tmp_path / "n.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_png_without_chromium_says_how_to_install_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import sys

    fig = go.Figure(go.Bar(x=[1, 2], y=[3, 4]))
    monkeypatch.setenv("BROWSER_PATH", str(tmp_path / "no-chrome"))  # kaleido looks only there: no browser
    with pytest.raises(MoeLensError) as e:
        figures.save(fig, tmp_path / "x.png")
    msg = str(e.value)
    assert "Chromium" in msg and "apt-get install -y chromium" in msg and "plotly_get_chrome" in msg
    assert "\n" not in msg and not (tmp_path / "x.png").exists()
    monkeypatch.setitem(sys.modules, "kaleido", None)  # kaleido not installed
    with pytest.raises(MoeLensError, match="needs the kaleido package, which is not installed: pip install kaleido"):
        figures.save(fig, tmp_path / "x.png")
