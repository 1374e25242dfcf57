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


ROOT = Path(__file__).resolve().parents[1]


def _sample_runs_module():
    import importlib.util

    spec = importlib.util.spec_from_file_location("sample_runs_script", ROOT / "trainers" / "sample_runs.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _quick_config(*args: str):
    from moe_lens.cli import build_parser
    from moe_lens.train_cli import config_from_args

    return config_from_args(build_parser().parse_args(["train", "--quick", *args]))


# what --quick keeps on purpose unlike the committed runs: their traces were trimmed to stay small in git
TRIMMED = {"hidden_sample": 5000, "hidden_bf16": False, "record_tokens": None}


@pytest.mark.parametrize("dataset", ["wikitext2", "conll2003", "squad"])
def test_quick_is_the_sample_runs_recipe(real_data_dir: Path, dataset: str) -> None:
    sr = _sample_runs_module()
    for mode in ("load", "naive_topk", "importance"):
        cfg = _quick_config("--dataset", dataset, "--mode", mode, "--data-dir", str(real_data_dir))
        want = sr.sample_config(dataset, mode, str(real_data_dir), "runs").to_dict()
        want.update(TRIMMED, run_name=None)
        assert cfg.to_dict() == want, mode
    committed = json.loads((ROOT / "sample_runs" / f"{dataset}-load" / "config.json").read_text())
    cfg = _quick_config("--dataset", dataset, "--mode", "load", "--data-dir", str(real_data_dir)).to_dict()
    skip = {*TRIMMED, "runs_dir", "run_name", "device", "data_dir", "embeddings"}  # paths: relative to where it ran
    assert {k: v for k, v in cfg.items() if k not in skip} == {k: committed[k] for k in cfg if k not in skip}
    rel = lambda path, root: None if path is None else Path(path).relative_to(root).as_posix()  # noqa: E731
    assert rel(cfg["embeddings"], real_data_dir) == rel(committed["embeddings"], committed["data_dir"])
    # explicit flags win over --quick, --quick over the --mode preset
    cfg = _quick_config("--dataset", dataset, "--mode", "switch", "--d-model", "64", "--data-dir", str(real_data_dir))
    assert cfg.d_model == 64 and cfg.router == "switch" and cfg.record and cfg.hidden_sample == 5000


def test_quick_without_glove_says_so(tmp_path: Path) -> None:
    (tmp_path / "conll2003").mkdir()
    out = run_cli("train", "--quick", "--dataset", "conll2003", "--mode", "load", "--data-dir", str(tmp_path),
                  "--runs-dir", str(tmp_path / "runs"))  # fmt: skip
    assert out.returncode == 2 and "Traceback" not in out.stderr and len(out.stderr.strip().splitlines()) == 1
    assert f"GloVe 50d, not found at {tmp_path / 'glove' / 'glove.6B.50d.subset.txt'}" in out.stderr
    assert "--embeddings FILE" in out.stderr and "--embeddings none" in out.stderr
    assert not (tmp_path / "runs").exists()
    cfg = _quick_config("--dataset", "conll2003", "--data-dir", str(tmp_path), "--embeddings", "none", "--d-embed", "128")
    assert cfg.embeddings is None and cfg.d_embed == 128  # the way out it names works


def _readme_first_command() -> list[str]:
    text = (ROOT / "README.md").read_text()
    block = text.split("```bash\n", 1)[1].split("```", 1)[0]  # the first code block: the first screen
    line = next(ln for ln in block.splitlines() if ln.startswith("moe-lens train"))
    return line.split("#", 1)[0].split()[1:]


def test_readme_first_command_shrunk(real_data_dir: Path, tmp_path: Path) -> None:
    args = _readme_first_command()
    assert "--quick" in args and len(args) <= 6  # one short command
    shrink = ["--epoch-steps", "3", "--record-every", "2", "--max-eval-batches", "2", "--record-tokens", "500", "--hidden-sample", "200", "--runs-dir", str(tmp_path),
              "--run-name", "first", "--no-progress"]  # fmt: skip
    env = {**os.environ, "MOE_LENS_DATA": str(real_data_dir), "MOE_LENS_CACHE": str(tmp_path / "cache")}
    out = subprocess.run([sys.executable, "-m", "moe_lens.cli", *args, *shrink], capture_output=True, text=True,
                         env=env, timeout=600)  # fmt: skip
    assert out.returncode == 0, out.stderr[-2000:]
    run = tmp_path / "first"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    cfg = json.loads((run / "config.json").read_text())
    assert cfg["dataset"] == "conll2003" and cfg["mode"] == "load" and cfg["d_model"] == 128 and cfg["epochs"] == 3
    import pandas as pd

    routing = pd.read_parquet(run / "routing")
    assert set(routing["split"].astype(str)) == {"train", "valid"}
    assert sorted(routing.loc[routing["split"] == "valid", "epoch"].astype(int).unique()) == [0, 1, 2]
    assert len(pd.read_parquet(run / "hidden")) > 0
