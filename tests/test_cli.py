"""Bad input on the command line: one line naming the problem and the fix, exit code 2, no traceback."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from moe_lens.cli import main


def run_cli(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "moe_lens.cli", *args], capture_output=True, text=True,
                          env={**os.environ, **(env or {})}, timeout=120)  # fmt: skip


@pytest.mark.parametrize(
    "args,needle",
    [
        (["train", "--mode", "bogus"], "invalid choice: 'bogus'"),
        (["train", "--dataset", "imagenet"], "invalid choice: 'imagenet'"),
        (["train", "--no-such-flag"], "unrecognized arguments: --no-such-flag"),
        (["train", "--top-k", "9", "--num-experts", "8"], "top_k=9 > num_experts=8; allowed: 1..8"),
        (["train", "--rank", "0"], "rank=0; allowed: an integer >= 1"),
        (["train", "--capacity-factor", "-1"], "capacity_factor=-1.0"),
        (["train", "--expert-type", "conv"], "unknown expert_type 'conv'"),
    ],
)
def test_bad_arguments_are_one_line_errors(args: list[str], needle: str) -> None:
    out = run_cli(*args)
    assert out.returncode == 2
    assert needle in out.stderr
    assert "Traceback" not in out.stderr


def test_missing_dataset_names_the_download_command(tmp_path: Path) -> None:
    out = run_cli("train", "--dataset", "wikitext2", "--data-dir", str(tmp_path / "nothing"),
                  "--runs-dir", str(tmp_path / "runs"))  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr
    assert "moe-lens data download wikitext2" in out.stderr
    assert len(out.stderr.strip().splitlines()) == 1


def test_unwritable_runs_dir(real_data_dir: Path) -> None:
    # /proc refuses new directories even to root (CI runs as root, so a chmod test could not fail)
    out = run_cli("train", "--dataset", "conll2003", "--data-dir", str(real_data_dir), "--runs-dir", "/proc/moe-lens-runs")
    assert out.returncode == 2 and "runs directory /proc/moe-lens-runs is not writable" in out.stderr
    assert "Traceback" not in out.stderr


def test_runs_dir_that_is_a_file_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    f = tmp_path / "file"
    f.write_text("x")
    code = main(["train", "--dataset", "conll2003", "--runs-dir", str(f), "--data-dir", str(tmp_path)])
    err = capsys.readouterr().err
    assert code == 2 and err.count("\n") == 1 and "error:" in err


def test_existing_run_name_is_refused_without_resume(tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "config.json").write_text(json.dumps({}))
    code = main(["train", "--dataset", "conll2003", "--runs-dir", str(tmp_path), "--run-name", "r"])
    assert code == 2 and "already exists" in capsys.readouterr().err


def test_capacity_factor_none_from_the_command_line() -> None:
    from moe_lens.cli import build_parser
    from moe_lens.train_cli import config_from_args

    cfg = config_from_args(build_parser().parse_args(["train", "--mode", "switch", "--capacity-factor", "none"]))
    assert cfg.capacity_factor is None and cfg.router == "switch"
