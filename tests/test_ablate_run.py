"""`moe-lens ablate` on a tiny CoNLL-2003 run trained here (CPU, seconds): the per-token delta-loss table.

- an expert that receives no token (its sigmoid_bias bias pushed to -100 in the checkpoint, so it is never
  selected, while the gates, which never read the bias, are unchanged) has delta_loss exactly 0.0 everywhere;
- the table joins `tokens` (every row) and holds one row per evaluated token and ablated expert;
- delta_loss = loss - base_loss, recomputed with numpy from the file;
- the CLI writes the same table and refuses bad arguments in one line.
"""
from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from moe_lens.ablate import ablate_run
from moe_lens.config import RunConfig
from moe_lens.rundir import latest_checkpoint
from moe_lens.store import connect
from moe_lens.train import train

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def tiny_run(real_data_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    runs = tmp_path_factory.mktemp("runs")
    cfg = RunConfig.for_mode("sigmoid_bias", dataset="conll2003", data_dir=str(real_data_dir), runs_dir=str(runs),
                             run_name="tiny", d_embed=16, d_model=16, expert_hidden=16, num_experts=4, batch_size=32,
                             warmup_steps=2, max_steps=4, epochs=1, max_eval_batches=4, record=True, pos_tags=False,
                             hidden_sample=0)  # fmt: skip
    run_dir = train(cfg, progress=False)
    ckpt = latest_checkpoint(run_dir, epoch_end=True)
    payload = torch.load(ckpt, weights_only=False)
    payload["model"]["enc.moes.0.router.bias"][3] = -100.0  # expert 3 is never selected; gates do not see b
    torch.save(payload, ckpt)
    return run_dir


def test_unused_expert_changes_no_loss_and_table_joins_tokens(tiny_run: Path) -> None:
    paths = ablate_run(tiny_run, max_tokens=2500, log=lambda s: None)
    assert len(paths) == 4
    t = pq.read_table(tiny_run / "ablation").to_pandas()
    unused = t[t["expert"] == 3]
    assert not unused["chose"].any()
    assert (unused["delta_loss"] == 0.0).all()  # exactly
    used = t[t["expert"] == 0]
    assert used["chose"].any() and (used["delta_loss"] != 0.0).any()
    np.testing.assert_array_equal(t["delta_loss"].to_numpy(), (t["loss"] - t["base_loss"]).to_numpy(np.float32))
    con = connect(tiny_run.parent, warn=False)
    n, per_expert, unjoined = con.execute(
        """SELECT count(*), count(*) / count(DISTINCT expert),
                  count(*) FILTER (WHERE t.token_idx IS NULL)
           FROM ablation a LEFT JOIN tokens t USING (run, dataset, split, token_idx)""").fetchone()  # fmt: skip
    assert unjoined == 0 and n == 4 * per_expert
    assert 1500 <= per_expert <= 2500  # whole batches, evenly spaced over the length-sorted eval order
    base = con.execute("SELECT count(DISTINCT base_loss) FROM ablation WHERE expert = 0").fetchone()[0]
    assert base > 1


def test_cli_layer_and_experts(tiny_run: Path) -> None:
    def cli(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "moe_lens.cli", "ablate", str(tiny_run), *args], cwd=ROOT,
                              capture_output=True, text=True, check=False, env={**os.environ, "PYTHONPATH": str(ROOT)})

    ok = cli("--layer", "0", "--experts", "1,2", "--max-tokens", "500")
    assert ok.returncode == 0, ok.stderr
    assert (tiny_run / "ablation/dataset=conll2003/split=valid/part-L0-E2.parquet").is_file()
    bad = cli("--experts", "7")
    assert bad.returncode == 2 and "--experts '7'" in bad.stderr and "Traceback" not in bad.stderr
    bad = cli("--layer", "3")
    assert bad.returncode == 2 and "--layer 3" in bad.stderr
