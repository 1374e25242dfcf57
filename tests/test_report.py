"""`moe-lens report`: the text summary and the standalone HTML report."""
from __future__ import annotations

from pathlib import Path

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
