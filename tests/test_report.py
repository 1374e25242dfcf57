"""`moe-lens report`: the text summary and the standalone HTML report."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from moe_lens.cli import main
from moe_lens.synthetic import write_synthetic_run


def test_report_text_and_html(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_synthetic_run(tmp_path, "a", num_tokens=500, collapse_step=12, epochs=2, steps_per_epoch=10)
    write_synthetic_run(tmp_path, "b", num_tokens=300, num_experts=1, top_k=1, dataset="conll2003")
    html = tmp_path / "r.html"
    assert main(["report", "a", "b", "--runs-dir", str(tmp_path), "--html", str(html)]) == 0
    out = capsys.readouterr().out
    assert "== a  [finished]" in out and "collapse step=12" in out and "CV^2" in out and "expert  0:" in out
    assert "== b" in out and "margin=n/a" in out and "valid_ppl=" in out
    text = html.read_text()
    assert text.count("<pre>") == 2 and "plotly" in text.lower() and "<script src=\"https" not in text


def test_report_errors(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    write_synthetic_run(tmp_path, "a", num_tokens=20)
    (tmp_path / "half").mkdir()
    (tmp_path / "half" / "run.json").write_text("{")
    assert main(["report", "zzz", "--runs-dir", str(tmp_path)]) == 2
    assert "unknown run 'zzz'; available: a, half" in capsys.readouterr().err
    assert main(["report", "half", "--runs-dir", str(tmp_path)]) == 0
    assert "[unknown]" in capsys.readouterr().out and True


def test_report_collapse_line_is_on_the_split_it_names(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    """Train collapses, valid is rewritten to a balanced routing: the line under --split valid must show valid's."""
    write_synthetic_run(tmp_path, "a", num_tokens=500, collapse_step=12, epochs=2, steps_per_epoch=10)
    for f in (tmp_path / "a" / "routing").rglob("*.parquet"):
        if "split=valid" in str(f):
            t = pd.read_parquet(f)
            t["expert"] = (t["token_idx"] + t["rank"]) % 8  # every expert used evenly
            t.to_parquet(f, index=False)
    r = pd.read_parquet(tmp_path / "a" / "routing")
    r = r.astype({"split": str, "epoch": int})  # hive partition columns come back categorical
    v = r[(r["split"] == "valid") & (r["rank"] == 0)]
    v = v[v["epoch"] == v["epoch"].max()]
    p = v["expert"].value_counts(normalize=True).to_numpy()
    valid_eff = float(np.exp(-(p * np.log(p)).sum()))  # exp(H) of top-1 shares, by hand
    t = r[(r["split"] == "train") & (r["rank"] == 0) & (r["step"] == r.loc[r["split"] == "train", "step"].max())]
    q = t["expert"].value_counts(normalize=True).to_numpy()
    assert abs(float(np.exp(-(q * np.log(q)).sum())) - valid_eff) > 1  # the two splits really differ
    assert main(["report", "a", "--runs-dir", str(tmp_path), "--split", "valid"]) == 0
    line = next(ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("collapse:"))
    assert line.startswith(f"collapse: valid epoch {int(v['epoch'].max())} ")
    assert f"effective experts={valid_eff:.2f}" in line and "dead=0" in line and "(train) collapse step=12" in line
