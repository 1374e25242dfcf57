"""The Streamlit app through `streamlit.testing.v1.AppTest`: every page on a generated runs directory (and on
sample_runs/ when present) renders without an exception or error, and its charts carry the numbers that
`moe_lens.analysis` returns for the same runs."""
from __future__ import annotations

import base64
import json
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from streamlit.testing.v1 import AppTest  # noqa: E402  (installed by the README's ".[all]")

from moe_lens import analysis, projection, store  # noqa: E402
from moe_lens.app_pages import NAMES as PAGES, page as registered  # noqa: E402
from moe_lens.synthetic import write_synthetic_run  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
MAIN = str(ROOT / "app" / "main.py")


@pytest.fixture(scope="module")
def runs_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two complete runs with hidden states, a run with no traces and a half-written one."""
    d = tmp_path_factory.mktemp("runs")
    write_synthetic_run(d, "a-noisy", num_tokens=3000, with_hidden=True, skew=0.5)
    write_synthetic_run(d, "b-switch", num_tokens=3000, with_hidden=True, seed=1, top_k=1, mode="switch",
                        collapse_step=12)
    (d / "c-empty").mkdir()
    (d / "c-empty" / "config.json").write_text(json.dumps({"mode": "load", "dataset": "wikitext2"}))
    write_synthetic_run(d, "d-half", num_tokens=500, seed=2, status="running")
    (d / "d-half" / "run.json").write_text('{"status": "runn')  # cut mid-write
    return d


def app(runs_dir: Path, page: str, **state) -> AppTest:
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.session_state["runs_dir"] = str(runs_dir)
    at.session_state["clusters_method"] = "PCA"  # UMAP only in the slow test
    for k, v in state.items():
        at.session_state[k] = v
    at.run()
    if not registered(page).default:
        at.switch_page(registered(page).file).run()
    assert not at.exception, [e.value for e in at.exception]
    assert not at.error, [e.value for e in at.error]
    return at


def _decode(v):
    """Plotly JSON typed arrays ({'dtype', 'bdata', 'shape'}) back to numpy."""
    if isinstance(v, dict) and "bdata" in v:
        a = np.frombuffer(base64.b64decode(v["bdata"]), dtype=np.dtype(v["dtype"]))
        return a.reshape([int(s) for s in str(v["shape"]).split(",")]) if "shape" in v else a
    return np.asarray(v)


def figure(at: AppTest, key: str) -> dict:
    charts = {c.key: c for c in at.get("plotly_chart")}
    assert key in charts, sorted(k for k in charts if k)
    return json.loads(charts[key].proto.spec)


def traces(fig: dict) -> dict[str, dict]:
    return {t.get("name", ""): {k: _decode(v) for k, v in t.items() if k in ("x", "y", "z")} for t in fig["data"]}


def first(fig: dict) -> dict:
    return next(iter(traces(fig).values()))


def con(runs_dir: Path):
    return store.connect(runs_dir)


@pytest.mark.parametrize("page", PAGES)
def test_every_page_renders(runs_dir: Path, page: str) -> None:
    at = app(runs_dir, page)
    assert at.title[0].value


@pytest.mark.parametrize("page", PAGES)
def test_sample_runs_every_page(page: str) -> None:
    """The committed sample_runs/ is what the app opens by default: every page renders on it."""
    at = app(ROOT / "sample_runs", page)
    assert at.title[0].value


def test_sample_runs_charts_carry_the_sql_numbers() -> None:
    sample = ROOT / "sample_runs"
    runs = ["conll2003-naive_topk", "conll2003-load"]
    at = app(sample, "collapse", runs_collapse=runs)
    want = analysis.collapse(con(sample), runs)
    got = traces(figure(at, "collapse-effective_experts"))
    for run in runs:
        assert np.allclose(got[run]["y"], want[want["run"] == run].sort_values("step")["effective_experts"])
    at = app(sample, "specialization", spec_run="wikitext2-importance", spec_value="share")  # the default is log2 lift
    spec = analysis.specialization(con(sample), "wikitext2-importance", attribute="pos_tag", shuffled=False)
    heat = first(figure(at, "spec-heatmap"))
    want = spec.pivot_table(index="expert", columns="value", values="p_expert_given_value").fillna(0.0)
    assert np.allclose(heat["z"], want[list(heat["x"])].to_numpy())
    assert not at.checkbox(key="spec_ci").value  # 46 runs: the intervals are one click away, not computed by default


@pytest.mark.parametrize("state", ["missing", "empty"])
def test_missing_or_empty_runs_dir_is_an_error_not_a_traceback(tmp_path: Path, state: str) -> None:
    d = tmp_path / "nothing" if state == "missing" else tmp_path
    at = AppTest.from_file(MAIN, default_timeout=30)
    at.session_state["runs_dir"] = str(d)
    at.run()
    assert not at.exception
    assert len(at.error) == 1 and str(d) in at.error[0].value
    assert "moe-lens train" in at.markdown[0].value


def test_runs_page_numbers(runs_dir: Path) -> None:
    at = app(runs_dir, "runs")
    table = at.dataframe[0].value.set_index("run")
    fm = analysis.final_metrics(con(runs_dir))
    ppl = fm[(fm["split"] == "valid") & (fm["name"] == "ppl")].set_index("run")["value"]
    assert np.allclose(table.loc[ppl.index, "valid ppl"], ppl)
    assert table.loc["d-half", "status"] == "unknown" and table.loc["c-empty", "status"] == "unknown"
    assert any("d-half" in w.value for w in at.warning)
    loss = traces(figure(at, "curve-train-loss"))["a-noisy"]
    m = pd.read_parquet(runs_dir / "a-noisy" / "metrics.parquet")
    m = m[(m["split"] == "train") & (m["name"] == "loss")].sort_values("step")
    assert np.allclose(loss["x"], m["step"]) and np.allclose(loss["y"], m["value"])


def test_load_balance_numbers(runs_dir: Path) -> None:
    at = app(runs_dir, "load_balance", runs_balance=["a-noisy", "b-switch"])
    per = analysis.load_balance(con(runs_dir), "a-noisy", split="train", by="step", per_expert=True)
    want = per.pivot_table(index="expert", columns="step", values="share").fillna(0.0)
    heat = first(figure(at, "balance-heat-a-noisy"))
    assert np.allclose(heat["z"], want.to_numpy()) and np.allclose(heat["x"], want.columns)
    assert np.allclose(heat["z"].sum(axis=0), 1.0)  # shares sum to 1 at every step
    cv2 = analysis.load_balance(con(runs_dir), ["a-noisy", "b-switch"], split="train", by="step")
    got = traces(figure(at, "balance-cv2"))
    for run in ("a-noisy", "b-switch"):
        assert np.allclose(got[run]["y"], cv2[cv2["run"] == run].sort_values("step")["cv2_load"])


def test_collapse_numbers(runs_dir: Path) -> None:
    at = app(runs_dir, "collapse", runs_collapse=["a-noisy", "b-switch"])
    want = analysis.collapse(con(runs_dir), ["a-noisy", "b-switch"])
    fig = figure(at, "collapse-effective_experts")
    got = traces(fig)
    for run in ("a-noisy", "b-switch"):
        assert np.allclose(got[run]["y"], want[want["run"] == run].sort_values("step")["effective_experts"])
    steps = at.dataframe[0].value.set_index("run")["collapse_step"]
    assert steps["b-switch"] == want[want["run"] == "b-switch"]["collapse_step"].iloc[0]
    assert any(s.get("x0") == steps["b-switch"] for s in fig["layout"]["shapes"])  # the marked step
    # the checkbox is on for two runs: exp(H) with its bootstrap interval over documents (n=200, seed 0)
    ci = analysis.bootstrap(analysis.collapse, con(runs_dir), ["a-noisy", "b-switch"], n=200, fn_options={"by": "step"})
    for t in fig["data"]:
        want = ci[ci["run"] == t["name"]].sort_values("step")
        assert np.allclose(_decode(t["error_y"]["array"]), want["effective_experts_hi"] - want["effective_experts"])
        assert np.allclose(_decode(t["error_y"]["arrayminus"]), want["effective_experts"] - want["effective_experts_lo"])
    assert "95% bootstrap intervals" in fig["layout"]["title"]["text"]
    off = figure(app(runs_dir, "collapse", runs_collapse=["a-noisy", "b-switch"], collapse_ci=False),
                 "collapse-effective_experts")
    assert all("error_y" not in t or not t["error_y"].get("array") for t in off["data"])
    assert np.allclose(_decode(off["data"][0]["y"]), _decode(fig["data"][0]["y"]))


def test_specialization_numbers(runs_dir: Path) -> None:
    at = app(runs_dir, "specialization", spec_run="a-noisy", spec_top=True, spec_shuffled=True, spec_value="share")
    c = con(runs_dir)
    spec = analysis.specialization(c, "a-noisy", attribute="pos_tag")
    heat = first(figure(at, "spec-heatmap"))
    want = spec.pivot_table(index="expert", columns="value", values="p_expert_given_value").fillna(0.0)
    want = want[list(heat["x"])]
    assert np.allclose(heat["z"], want.to_numpy())
    nmi = analysis.specialization(c, ["a-noisy", "b-switch"], attribute="pos_tag", summary=True)
    bars = traces(figure(at, "spec-nmi"))
    assert np.allclose(bars["nmi"]["y"][:2], nmi.set_index("run").loc[list(bars["nmi"]["x"][:2]), "nmi"], equal_nan=True)
    assert np.allclose(bars["ami"]["y"][:2], nmi.set_index("run").loc[list(bars["ami"]["x"][:2]), "ami"], equal_nan=True)
    top = at.dataframe[0].value  # the chosen expert's top tokens; one context per occurrence, token marked
    assert len(top) and all("<mark>" in m.value for m in at.markdown if "…" in m.value)
    assert any("<mark>" in m.value for m in at.markdown)
    bare = app(runs_dir, "specialization", spec_run="a-noisy")  # the defaults: exact expected chance, no top tokens
    assert set(traces(figure(bare, "spec-nmi"))) == {"nmi", "ami", "nmi_chance"} and not bare.dataframe
    # four runs: the intervals checkbox is on; MI, NMI, AMI error bars are analysis.bootstrap's (n=200, documents)
    ci = analysis.bootstrap(analysis.specialization, c, ["a-noisy", "b-switch", "c-empty", "d-half"],
                            attribute="pos_tag", summary=True, shuffled=False, n=200).set_index("run")
    for key, measures in (("spec-nmi", ("nmi", "ami")), ("spec-mi", ("mi",))):
        bars = {t["name"]: t for t in figure(bare, key)["data"]}
        for m in measures:
            x = list(_decode(bars[m]["x"]))
            assert np.allclose(_decode(bars[m]["error_y"]["array"]), ci.loc[x, f"{m}_hi"] - ci.loc[x, m], equal_nan=True)
            assert np.allclose(_decode(bars[m]["error_y"]["arrayminus"]), ci.loc[x, m] - ci.loc[x, f"{m}_lo"],
                               equal_nan=True)  # fmt: skip
        assert "error_y" not in bars.get("nmi_chance", {}) or bars["nmi_chance"]["error_y"] is None
    off = app(runs_dir, "specialization", spec_run="a-noisy", spec_ci=False)
    assert all(not t.get("error_y") for t in figure(off, "spec-nmi")["data"])


def test_clusters_pca_numbers_and_cache(runs_dir: Path) -> None:
    at = app(runs_dir, "clusters", clusters_run="a-noisy")
    c = con(runs_dir)
    keys = projection.hidden_keys(c, "a-noisy")
    key = keys[keys["split"] == "valid"].sort_values("epoch").iloc[-1]  # the page opens on the last valid epoch
    key = dict(dataset=key["dataset"], split="valid", epoch=int(key["epoch"]), layer=0)
    x, labels = projection.hidden_sample(c, "a-noisy", **key)
    xc = x - x.mean(0)
    pts = pd.concat([pd.DataFrame({k: v for k, v in t.items() if k in "xy"}) for t in traces(figure(at, "clusters-scatter")).values()])
    assert len(pts) == len(x) == len(labels)
    # the two coordinates are the top-2 principal components: their variances are the top squared singular values
    s = np.linalg.svd(xc, compute_uv=False)
    assert np.allclose(np.sort(pts.var(ddof=0).to_numpy())[::-1], s[:2] ** 2 / len(x), rtol=1e-3)
    path = projection.cache_path(runs_dir / "a-noisy", **key, method="pca")
    assert path.exists()
    mtime = path.stat().st_mtime_ns
    app(runs_dir, "clusters", clusters_run="a-noisy", clusters_colour="gate")
    assert path.stat().st_mtime_ns == mtime  # the reload read the cache


def test_clusters_without_hidden_states(runs_dir: Path) -> None:
    at = app(runs_dir, "clusters", clusters_run="d-half")
    assert any("no recorded hidden states" in i.value for i in at.info)


def test_compare_numbers(runs_dir: Path) -> None:
    at = app(runs_dir, "compare", runs_compare=["a-noisy", "b-switch"], compare_table=True)
    want = analysis.collapse(con(runs_dir), ["a-noisy", "b-switch"], split="train", by="step")
    for i, run in enumerate(["a-noisy", "b-switch"]):
        line = first(figure(at, f"compare-{i}"))
        assert np.allclose(line["y"], want[want["run"] == run].sort_values("step")["effective_experts"])
    summary = at.dataframe[0].value.set_index("run")
    ref = analysis.compare(con(runs_dir), ["a-noisy", "b-switch"]).set_index("run")
    assert np.allclose(summary["cv2_load"], ref["cv2_load"])


def test_sql_console_reads_and_cannot_write(runs_dir: Path, tmp_path: Path) -> None:
    at = app(runs_dir, "sql")
    at.text_area(key="sql_query").input("SELECT run, count(*) AS n FROM routing GROUP BY run ORDER BY run")
    at.button(key="sql_run").click().run()
    assert not at.exception and not at.error
    got = at.dataframe[0].value
    want = con(runs_dir).execute("SELECT run, count(*) AS n FROM routing GROUP BY run ORDER BY run").df()
    pd.testing.assert_frame_equal(got.reset_index(drop=True), want, check_dtype=False)
    target = tmp_path / "leak.csv"
    at.text_area(key="sql_query").input(f"COPY (SELECT 1) TO '{target}'")
    at.button(key="sql_run").click().run()
    assert not at.exception and len(at.error) == 1 and not target.exists()


def test_app_command_binds_localhost(tmp_path: Path) -> None:
    from moe_lens import app_cli
    from moe_lens.cli import build_parser

    cmd = app_cli.streamlit_command(str(tmp_path), port=9999)
    assert cmd[cmd.index("--server.address") + 1] == "127.0.0.1"
    assert cmd[-2:] == ["--runs-dir", str(tmp_path.resolve())] and Path(cmd[4]).name == "main.py"
    args = build_parser().parse_args(["app", "--runs-dir", str(tmp_path)])
    assert args.func is app_cli._app_command and args.address == "127.0.0.1"


@pytest.mark.parametrize("case", ["runs-holds-runs", "runs-empty", "env"])
def test_one_default_runs_dir_rule_for_both_launchers(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                      capsys: pytest.CaptureFixture, case: str) -> None:
    """`moe-lens app`, `streamlit run app/main.py` and `moe-lens sql` open the same directory: $MOE_LENS_RUNS_DIR,
    else runs/ when it holds runs, else sample_runs/; the sidebar says which."""
    from moe_lens import app_cli
    from moe_lens.cli import build_parser, main

    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("MOE_LENS_RUNS_DIR", raising=False)
    write_synthetic_run(tmp_path / "sample_runs", "a-sample", num_tokens=50)
    (tmp_path / "runs").mkdir()
    if case == "runs-holds-runs":
        write_synthetic_run(tmp_path / "runs", "b-mine", num_tokens=50)
    if case == "env":
        write_synthetic_run(tmp_path / "elsewhere", "c-env", num_tokens=50)
        monkeypatch.setenv("MOE_LENS_RUNS_DIR", str(tmp_path / "elsewhere"))
    want, run = {"runs-holds-runs": ("runs", "b-mine"), "runs-empty": ("sample_runs", "a-sample"),
                 "env": ("elsewhere", "c-env")}[case]
    want = (tmp_path / want).resolve()
    # moe-lens app
    calls = []
    monkeypatch.setattr(app_cli.subprocess, "call", lambda cmd: calls.append(cmd) or 0)
    assert app_cli._app_command(build_parser().parse_args(["app"])) == 0
    assert calls[0][-2:] == ["--runs-dir", str(want)]
    # streamlit run app/main.py (no --runs-dir on its line)
    at = AppTest.from_file(MAIN, default_timeout=60)
    at.run()
    assert not at.exception and not at.error
    assert Path(at.session_state["runs_dir"]).resolve() == want
    assert any(str(want) in c.value for c in at.sidebar.caption)
    assert list(at.dataframe[0].value["run"]) == [run]
    # every other command
    capsys.readouterr()
    assert main(["sql", "SELECT run FROM runs"]) == 0
    assert capsys.readouterr().out.split() == ["run", run]


def test_literature_numbers_and_intervals(runs_dir: Path) -> None:
    """The Literature page draws consecutive/vocabulary shares with their bootstrap intervals and chance levels."""
    runs = ["a-noisy", "b-switch"]
    at = app(runs_dir, "literature", runs_literature=runs, literature_n=40)
    c = con(runs_dir)
    want = analysis.bootstrap(analysis.consecutive, c, runs, n=40, split="valid", layer=0)
    fig = figure(at, "literature-consecutive")
    bars = {t["name"]: t for t in fig["data"]}
    assert np.allclose(_decode(bars["same top-1"]["y"]), want["same_top1"])
    assert np.allclose(_decode(bars["chance sum p_i^2"]["y"]), want["same_top1_chance"])
    assert np.allclose(_decode(bars["same top-1"]["error_y"]["array"]), want["same_top1_hi"] - want["same_top1"])
    voc = analysis.vocabulary(c, runs, min_count=20)
    assert np.allclose(first(figure(at, "literature-vocabulary"))["y"], voc["mean_share"])
    for key in ("literature-saturation", "literature-fluctuation", "literature-coactivation",
                "literature-collapse", "literature-specialization"):
        figure(at, key)


def test_ablation_and_probe_sections_on_the_ablated_sample_run() -> None:
    """The toggled sections (off by default): the Load balance page's ablation charts and the Specialization page's
    POS probe on sample_runs/conll2003-load-ablate carry the analyses' numbers."""
    sample, run = ROOT / "sample_runs", "conll2003-load-ablate"
    at = app(sample, "load_balance", runs_balance=[run], balance_split="valid", balance_ablation=True,
             balance_ablation_ci=False)  # the intervals: test_load_balance_ablation_intervals
    bars = figure(at, "balance-ablation")
    want = analysis.ablation(con(sample), run)
    np.testing.assert_allclose(np.concatenate([_decode(t["y"]) for t in bars["data"]]), want["mean_delta"], rtol=1e-6)
    assert all(not t.get("error_y") for t in bars["data"]) and "bootstrap" not in bars["layout"]["title"]["text"]
    figure(at, "balance-ablation-load")
    assert "customdata" not in figure(at, "balance-ablation-pos")["data"][0]
    assert not any("mean_delta_lo" in d.value for d in at.dataframe)
    at = app(sample, "specialization", spec_run=run, spec_probe=True)
    probe = figure(at, "spec-probe")
    want = analysis.pos_probe(con(sample), run)
    np.testing.assert_allclose(_decode(probe["data"][0]["y"]), want["accuracy"], rtol=1e-9)


def test_load_balance_ablation_intervals() -> None:
    """With the intervals checkbox on (its default for one run), the Load balance page's ablation bars carry
    analysis.bootstrap's 95% interval over documents (n=200, seed 0) as error bars, and the POS x expert heatmap its
    per-cell interval (hover) beside the table of the cells whose interval excludes 0."""
    sample, run = ROOT / "sample_runs", "conll2003-load-ablate"
    at = app(sample, "load_balance", runs_balance=[run], balance_split="valid", balance_ablation=True)
    assert at.checkbox(key="balance_ablation_ci").value
    c = con(sample)
    want = analysis.bootstrap(analysis.ablation, c, run, split="valid", n=200, seed=0)
    bars = figure(at, "balance-ablation")
    assert len(bars["data"]) == 1 and "95% bootstrap intervals" in bars["layout"]["title"]["text"]
    t = bars["data"][0]
    assert list(_decode(t["x"])) == [str(e) for e in want["expert"]]
    np.testing.assert_allclose(_decode(t["y"]), want["mean_delta"], rtol=1e-9)
    np.testing.assert_allclose(_decode(t["error_y"]["array"]), want["mean_delta_hi"] - want["mean_delta"], rtol=1e-9)
    np.testing.assert_allclose(_decode(t["error_y"]["arrayminus"]), want["mean_delta"] - want["mean_delta_lo"],
                               rtol=1e-9)  # fmt: skip
    pos = analysis.bootstrap(analysis.ablation_by, c, run, split="valid", attribute="pos_tag", n=200, seed=0)
    heat = figure(at, "balance-ablation-pos")["data"][0]
    cells = pos.set_index(["value", "expert"])
    got = _decode(heat["customdata"])  # (values, experts, [lo, hi])
    assert got.shape == (len(_decode(heat["y"])), len(_decode(heat["x"])), 2)
    for i, value in enumerate(_decode(heat["y"])):
        for j, expert in enumerate(_decode(heat["x"])):
            if (value, expert) in cells.index:
                cell = cells.loc[(value, expert)]
                np.testing.assert_allclose(got[i, j], cell[["mean_delta_lo", "mean_delta_hi"]].to_numpy(np.float64))
            else:  # left out by min_tokens: no value, no interval
                assert np.isnan(got[i, j]).all()
    sure = next(d.value for d in at.dataframe if "mean_delta_lo" in d.value)
    excludes = pos[(pos["mean_delta_lo"] > 0) | (pos["mean_delta_hi"] < 0)]
    assert 0 < len(sure) == len(excludes) < len(pos)
    assert set(zip(sure["value"], sure["expert"])) == set(zip(excludes["value"], excludes["expert"]))
    assert np.all(np.diff(sure["mean_delta"].abs().to_numpy()) <= 0)  # the largest effects first
