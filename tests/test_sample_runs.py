"""The committed sample_runs/: complete, small, joinable, and what trainers/sample_runs.py writes today."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pandas as pd
import pyarrow.parquet as pq
import pytest

from moe_lens.store import connect

REPO = Path(__file__).resolve().parents[1]
SAMPLE = REPO / "sample_runs"


def _sample_runs_module():
    spec = importlib.util.spec_from_file_location("sample_runs", REPO / "trainers" / "sample_runs.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


SR = _sample_runs_module()
# every run trainers/sample_runs.py writes by default: the mode grid (CoNLL with seeds 0-2) and the EXTRA variants
RUNS = [f"{d}-{m}" + (f"-seed{s}" if s else "") for d in SR.DATASETS for m in SR.MODES for s in SR.SEEDS[d]]
RUNS += list(SR.EXTRA)
ABLATED = "conll2003-load-ablate"  # trainers/ablation_sample.py: the one run with a checkpoint and an ablation table


def test_sample_runs_are_committed_complete_and_small() -> None:
    assert sorted(p.name for p in SAMPLE.iterdir() if p.is_dir()) == sorted([*RUNS, ABLATED])
    size = sum(f.stat().st_size for f in SAMPLE.rglob("*") if f.is_file())
    assert size <= 45 * 2**20, f"sample_runs is {size / 2**20:.1f} MB"
    assert [p.relative_to(SAMPLE).as_posix() for p in SAMPLE.glob("*/checkpoints/*")] == [f"{ABLATED}/checkpoints/epoch-2.pt"]
    con = connect(SAMPLE)
    status = dict(con.execute("SELECT run, status FROM runs").fetchall())
    assert status == {r: "finished" for r in [*RUNS, ABLATED]}
    unjoined = con.execute("SELECT count(*) FROM routing r ANTI JOIN tokens t USING (run, dataset, split, token_idx)").fetchall()
    assert unjoined[0][0] == 0
    dupes = con.execute("SELECT count(*) - count(DISTINCT (run, dataset, split, token_idx)) FROM tokens").fetchall()
    assert dupes[0][0] == 0
    probe = con.execute("SELECT DISTINCT dataset FROM routing WHERE run = 'wikitext2-load' ORDER BY 1").fetchall()
    assert [p[0] for p in probe] == ["conll2003", "squad", "wikitext2"]  # the cross-dataset replay
    for table in ("routing", "hidden", "metrics"):
        runs_with = {r[0] for r in con.execute(f"SELECT DISTINCT run FROM {table}").fetchall()}
        assert runs_with == {*RUNS, ABLATED}, table
    unjoined = con.execute("SELECT count(*) FROM ablation a ANTI JOIN tokens t USING (run, dataset, split, token_idx)")
    assert unjoined.fetchone()[0] == 0


def _schema(run_dir: Path) -> dict[str, object]:
    """Column names and Arrow types of every table of a run, and the keys of its JSON files."""
    out: dict[str, object] = {}
    for table in ("tokens", "routing", "hidden"):
        part = sorted((run_dir / table).rglob("part-*.parquet"))[0]
        out[table] = [(f.name, str(f.type)) for f in pq.read_schema(part)]
    out["metrics"] = [(f.name, str(f.type)) for f in pq.read_schema(run_dir / "metrics.parquet")]
    out["metric_names"] = sorted(set(pq.read_table(run_dir / "metrics.parquet").column("name").to_pylist()))
    for name in ("config.json", "run.json"):
        out[name] = sorted(json.loads((run_dir / name).read_text()))
    return out


@pytest.mark.integration
def test_regenerated_run_has_the_committed_schema(real_data_dir: Path, tmp_path: Path) -> None:
    out = tmp_path / "regen"
    cmd = [sys.executable, str(REPO / "trainers" / "sample_runs.py"), "--out", str(out), "--data-dir", str(real_data_dir),
           "--only", "conll2003", "--modes", "naive_topk", "--epochs", "1", "--epoch-steps", "4", "--no-probe", "--no-projections",
           "--jobs", "1", "--seeds", "0"]  # fmt: skip
    subprocess.run(cmd, check=True, cwd=REPO, env={**os.environ, "OMP_NUM_THREADS": "1"}, timeout=600)
    fresh, committed = _schema(out / "conll2003-naive_topk"), _schema(SAMPLE / "conll2003-naive_topk")
    for key in committed:
        assert fresh[key] == committed[key], key
    assert not (out / "conll2003-naive_topk" / "checkpoints").exists()


def test_readme_sql_examples_run_on_sample_runs(capsys: pytest.CaptureFixture) -> None:
    """Every `moe-lens sql --runs-dir sample_runs "..."` line of the README answers on the committed runs."""
    import re
    import shlex

    from moe_lens.cli import main

    lines = [ln for ln in (REPO / "README.md").read_text().splitlines() if ln.startswith("moe-lens sql --runs-dir sample_runs")]
    assert lines
    for line in lines:
        argv = shlex.split(re.sub(r"\s+#.*$", "", line))[1:]
        assert main([*argv[:2], str(SAMPLE), *argv[3:]]) == 0, line
        out = capsys.readouterr().out
        assert "conll2003" in out and "wikitext2" in out, line


def test_readme_findings_numbers() -> None:
    """The numbers the README's "What the sample runs show" quotes, recomputed from the committed traces."""
    import numpy as np

    from moe_lens import analysis as A

    con = connect(SAMPLE)
    last = A.collapse(con, split="valid", by="epoch", layer=0).sort_values("epoch").groupby("run").last()
    eff, dead, never = last["effective_experts"].round(2), last["dead_experts"], last["never_top1"]
    metrics = A.final_metrics(con)
    metric = lambda name: metrics[(metrics["name"] == name) & (metrics["split"] == "valid")].set_index("run")["value"]  # noqa: E731
    f1, ppl, squad_f1 = metric("f1"), metric("ppl"), metric("f1")
    conll = [r for r in RUNS if r.startswith("conll2003")]
    assert (round(f1[conll].min(), 1), round(f1[conll].max(), 1)) == (71.2, 75.8)
    wt = [r for r in RUNS if r.startswith("wikitext2") and r != "wikitext2-load-3layer"]
    assert (round(ppl[wt].min()), round(ppl[wt].max()), round(ppl["wikitext2-load-3layer"])) == (344, 455, 233)
    sq = [r for r in RUNS if r.startswith("squad")]
    assert (round(squad_f1[sq].min(), 1), round(squad_f1[sq].max(), 1)) == (9.2, 10.3)
    # 1. WikiText-2: collapse without a balancing loss (each run on its own dataset's tokens)
    unbalanced = ["wikitext2-naive_topk", "wikitext2-topk_mask", "wikitext2-noisy_topk"]
    assert eff[unbalanced].tolist() == [1.33, 1.38, 1.34]
    assert dead[unbalanced].tolist() == [4, 4, 5] and never[unbalanced].tolist() == [5, 4, 5]
    assert eff[["wikitext2-importance", "wikitext2-load", "wikitext2-switch"]].tolist() == [7.77, 6.53, 7.77]
    curve = A.collapse(con, unbalanced, split="train", layer=0)
    at = curve.pivot_table(index="step", columns="run", values="effective_experts").round(2)
    assert at.loc[50, "wikitext2-naive_topk"] == 1.00 and at.loc[50, "wikitext2-topk_mask"] == 1.11
    assert at.loc[100, "wikitext2-topk_mask"] == 1.00 and at.loc[100, "wikitext2-noisy_topk"] == 1.00
    # 2. CoNLL-2003 over seeds 0-2: mean (min-max) effective experts, dead experts, F1; what exceeds the spread
    seeds = lambda m: [f"conll2003-{m}", f"conll2003-{m}-seed1", f"conll2003-{m}-seed2"]  # noqa: E731
    spread = {m: (round(last.loc[seeds(m), "effective_experts"].mean(), 2), *last.loc[seeds(m), "effective_experts"].agg(["min", "max"]).round(2))
              for m in SR.MODES}  # fmt: skip
    assert spread["naive_topk"] == (2.39, 1.97, 3.03) and spread["topk_mask"] == (2.50, 2.12, 3.00)
    assert spread["noisy_topk"] == (2.24, 1.72, 3.00) and spread["importance"] == (7.27, 6.92, 7.61)
    assert spread["load"] == (6.62, 6.40, 6.81) and spread["switch"] == (7.33, 7.24, 7.50)
    assert spread["hybrid"] == (7.28, 6.62, 7.70)
    span = lambda m: (dead[seeds(m)].min(), dead[seeds(m)].max())  # noqa: E731
    assert [span(m) for m in ("naive_topk", "topk_mask", "noisy_topk")] == [(0, 2), (1, 1), (3, 5)]
    assert all(span(m) == (0, 0) for m in ("importance", "load", "switch", "hybrid"))

    def above(col: pd.Series, a: str, b: str) -> bool:  # a's worst seed beats b's best
        return col[seeds(a)].min() > col[seeds(b)].max()

    eff_all = last["effective_experts"]
    balanced, collapsing = ("importance", "load", "switch", "hybrid"), ("naive_topk", "topk_mask", "noisy_topk")
    assert all(above(eff_all, a, b) for a in balanced for b in collapsing)
    assert above(eff_all, "importance", "load") and above(eff_all, "switch", "load")
    assert not above(eff_all, "hybrid", "load")
    moe = [m for m in SR.MODES if not m.startswith("dense")]
    assert not any(above(f1, a, b) for a in moe for b in moe)  # F1 separates no MoE mode from another
    assert (round(f1[[r for m in moe for r in seeds(m)]].min(), 1), round(f1[[r for m in moe for r in seeds(m)]].max(), 1)) == (71.2, 75.5)
    sep = {(a, b) for a in SR.MODES for b in SR.MODES if above(f1, a, b)}
    assert sep == {("dense_flops", "load"), ("dense_flops", "switch"), ("dense_flops", "hybrid"), ("dense", "hybrid")}
    assert [round(f1[seeds(m)].mean(), 1) for m in ("dense_flops", "load", "switch", "hybrid", "dense")] == \
        [75.1, 73.3, 72.6, 73.0, 74.4]
    # 3. POS experts
    s = A.specialization(con, ["wikitext2-importance", "wikitext2-noisy_topk"], attribute="pos_tag", summary=True, layer=0)
    s = s.set_index("run")
    imp, noisy = s.loc["wikitext2-importance"], s.loc["wikitext2-noisy_topk"]
    assert (round(imp["nmi"], 3), round(imp["ami"], 3), round(imp["mi"], 2)) == (0.287, 0.280, 0.72)
    assert (round(imp["nmi_chance"], 4), round(imp["nmi_shuffled"], 4)) == (0.0091, 0.0097)
    assert round(imp["nmi"] / imp["nmi_chance"]) == 32  # "32x above chance"
    assert (round(noisy["uncertainty_coef"], 3), round(imp["uncertainty_coef"], 3), round(noisy["mi"], 2)) == \
        (0.741, 0.353, 0.23)
    assert (round(noisy["nmi"], 3), round(noisy["ami"], 3)) == (0.142, 0.138)
    pos = A.specialization(con, "wikitext2-importance", attribute="pos_tag", layer=0).set_index(["value", "expert"])
    p = pos["p_expert_given_value"]
    assert (round(p[(",", 5)], 2), round(p[("CC", 7)], 2), p[("TO", 6)], round(p[("IN", 6)], 2)) == (0.97, 0.95, 1.0, 0.63)
    tok = A.specialization(con, "wikitext2-importance", attribute="token", layer=0, include_oov=True)
    tok = tok.set_index(["value", "expert"])["p_expert_given_value"]
    assert (tok[("and", 7)], tok[("the", 7)], tok[("to", 6)], round(tok[("<unk>", 1)], 2)) == (1.0, 1.0, 1.0, 0.99)
    # 4. the cross-dataset replay
    d = A.specialization(con, "wikitext2-load", attribute="dataset", include_oov=True, layer=0).set_index(["value", "expert"])
    assert (round(d.loc[("conll2003", 7), "p_expert_given_value"], 3), round(d.loc[("wikitext2", 7), "p_expert_given_value"], 3)) == \
        (0.472, 0.273)
    assert (round(d.loc[("conll2003", 7), "lift"], 2), round(d.loc[("wikitext2", 7), "lift"], 2)) == (1.31, 0.76)
    assert (round(d["nmi"].iloc[0], 3), round(d["nmi_chance"].iloc[0], 4)) == (0.014, 0.0002)
    known = A.specialization(con, "wikitext2-load", attribute="dataset", layer=0).set_index(["value", "expert"])
    assert (round(known.loc[("conll2003", 7), "p_expert_given_value"], 3), round(known.loc[("wikitext2", 7), "p_expert_given_value"], 3)) == \
        (0.254, 0.172)
    assert (round(known.loc[("conll2003", 7), "lift"], 2), round(known.loc[("wikitext2", 7), "lift"], 2)) == (1.23, 0.83)
    assert (round(known["nmi"].iloc[0], 4), round(known["nmi_chance"].iloc[0], 5)) == (0.0066, 0.00024)
    assert round(known["nmi"].iloc[0] / known["nmi_chance"].iloc[0]) == 27
    q = con.execute("SELECT r.dataset, avg((NOT t.in_vocab)::INT), avg((r.expert = 7)::INT) FILTER (NOT t.in_vocab) "
                    "FROM routing r JOIN tokens t USING (run, dataset, split, token_idx) WHERE r.run = 'wikitext2-load' "
                    "AND r.split = 'valid' AND r.epoch = 1 AND r.rank = 0 GROUP BY ALL ORDER BY ALL").fetchall()  # fmt: skip
    assert [(ds, round(oov, 2)) for ds, oov, _ in q] == [("conll2003", 0.29), ("squad", 0.16), ("wikitext2", 0.13)]
    assert min(x for *_, x in q) >= 0.97
    # 5. depth: wikitext2-load-3layer
    run = "wikitext2-load-3layer"
    spec = A.specialization(con, run, summary=True).set_index("layer")
    assert spec["nmi"].round(3).tolist() == [0.237, 0.239, 0.387] and spec["ami"].round(3).tolist() == [0.230, 0.232, 0.382]
    col = A.collapse(con, run, split="valid", by="epoch").sort_values("epoch").groupby("layer").last()
    assert col["effective_experts"].round(2).tolist() == [7.81, 7.37, 6.45]
    st = A.stability(con, run).dropna(subset=["changed"]).set_index("layer")
    assert st["changed"].round(3).tolist() == [0.295, 0.436, 0.276]
    paths = A.routing_paths(con, run)
    path = paths[paths["layer"].isna()].iloc[0]
    assert (int(path["distinct"]), round(path["entropy"], 2), round(path["nmi"], 3), round(path["ami"], 3)) == (393, 4.98, 0.464, 0.385)
    assert round(paths[paths["layer"] == 2]["ami"].iloc[0], 3) == 0.382
    trans = [A.layer_transitions(con, run, layer_a=a, layer_b=b, summary=True)["ami"].iloc[0] for a, b in ((0, 1), (1, 2))]
    assert np.round(trans, 3).tolist() == [0.094, 0.232]


@pytest.mark.integration
def test_readme_ablation_finding() -> None:
    """README finding 6 (conll2003-load-ablate): ablation, its rank correlations and the POS probe, with intervals."""
    from moe_lens import analysis as A

    con = connect(SAMPLE)
    b = A.bootstrap(A.ablation, con, ABLATED).set_index("expert")
    assert len(b) == 8 and (b["tokens"] == 8000).all() and (b["units"] == 35).all()
    assert round(b["mean_delta"].abs().max(), 5) == 0.00076 and b["mean_delta"].abs().idxmax() == 5
    assert b.loc[5, ["mean_delta_lo", "mean_delta_hi"]].round(5).tolist() == [-0.00161, 0.00304]
    excludes_zero = b[(b["mean_delta_lo"] > 0) | (b["mean_delta_hi"] < 0)].index.tolist()
    assert excludes_zero == [0] and b.loc[0, ["mean_delta_lo", "mean_delta_hi"]].round(5).tolist() == [0.00002, 0.00029]
    assert b.loc[4, ["mean_delta_lo", "mean_delta_hi"]].round(5).tolist() == [-0.00069, 0.00004]
    per = A.ablation_importance(con, ABLATED, summary=False).set_index("expert")
    assert per["load"].idxmin() == 0 and round(per.loc[0, "load"], 3) == 0.025 and round(per.loc[4, "load"], 3) == 0.234
    rho = A.ablation_importance(con, ABLATED).set_index("measure")[["rho", "rho_lo", "rho_hi"]].round(2)
    assert rho.loc["load"].tolist() == [0.05, -0.62, 0.50] and rho.loc["importance"].tolist() == [0.05, -0.62, 0.50]
    assert rho.loc["specialization"].tolist() == [0.60, -0.29, 0.79]
    pct = lambda df, m: (df.loc[m, ["accuracy", "accuracy_lo", "accuracy_hi"]] * 100).round(1).tolist()  # noqa: E731
    sent = A.pos_probe(con, ABLATED, by="sentence").set_index("method")
    assert pct(sent, "probe") == [36.0, 32.9, 39.4] and pct(sent, "majority_class") == [23.0, 20.1, 25.8]
    assert pct(sent, "majority_word") == [76.6, 74.4, 78.4]
    doc = A.pos_probe(con, ABLATED).set_index("method")
    assert doc["test_units"].iloc[0] == 10 and pct(doc, "probe") == [38.8, 26.1, 46.6]
    assert pct(doc, "majority_class") == [32.9, 21.3, 39.7] and pct(doc, "majority_word") == [76.0, 70.7, 79.6]
    metrics = A.final_metrics(con, ABLATED)
    valid = metrics[metrics["split"] == "valid"].set_index("name")["value"]
    assert (round(valid["loss"], 3), round(valid["f1"], 1)) == (0.239, 67.0)
