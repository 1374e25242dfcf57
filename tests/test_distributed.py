"""torchrun data-parallel training on the CPU (2 processes, gloo) over the real CoNLL-2003 and WikiText-2 data.

Independent references: the run's own final weights evaluated by ONE process over the same validation split
(its metrics and its recorded routing), and the union of both ranks' training traces (the logged per-expert
load). A SIGKILLed rank: the other exits in bounded time, every part file stays readable, `--resume` finishes
with no duplicate rows. The process-group details are in moe_lens/distributed.py.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from moe_lens import analysis as A
from moe_lens.cli import main
from moe_lens.config import RunConfig
from moe_lens.distributed import Shard
from moe_lens.errors import MoeLensError
from moe_lens.models import build_model
from moe_lens.record import Recorder
from moe_lens.resume import saved_config
from moe_lens.store import connect
from moe_lens.tasks import get_task
from moe_lens.tasks.batching import DistributedBucketSampler, shard_batches
from moe_lens.tasks.lm import WindowSampler
from moe_lens.train import evaluate, load_data
from run_tables import duplicates

pytestmark = pytest.mark.integration
ROOT = Path(__file__).resolve().parents[1]

TINY = ["--mode", "load", "--d-embed", "16", "--d-model", "16", "--expert-hidden", "16", "--num-experts", "4",
        "--warmup-steps", "2", "--record", "--record-every", "1", "--hidden-sample", "50", "--no-pos-tags",
        "--no-progress"]  # fmt: skip
DATA = {"conll2003": ["--batch-size", "32"], "wikitext2": ["--batch-size", "64", "--bptt", "32", "--vocab-size", "1000"]}


def _env() -> dict[str, str]:
    # one thread per rank; the PyTorch expert kernel in every process (no child compiles the C++ one)
    return {**os.environ, "OMP_NUM_THREADS": "1", "MOE_LENS_CPU_EXT": "0",
            "PYTHONPATH": os.pathsep.join([str(ROOT), *sys.path])}  # fmt: skip


def torchrun(args: list[str], *, script: list[str] | None = None, timeout: float = 240) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           *(script or ["-m", "moe_lens"]), *args]  # fmt: skip
    return subprocess.run(cmd, cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=timeout)


def one_process_eval(run: Path, epoch: int, tmp: Path) -> tuple[dict, Path]:
    """The run's final weights evaluated and recorded by this single process over the whole validation split."""
    cfg = saved_config(run)
    splits = load_data(cfg)
    model = build_model(cfg, len(splits["train"].vocab), num_tags=len(splits["train"].label_names or []))
    model.load_state_dict(torch.load(run / "checkpoints" / f"epoch-{epoch}.pt", weights_only=False)["model"])
    rec_dir = tmp / "single" / "ref"
    rec = Recorder(rec_dir)
    vm = evaluate(get_task(cfg.dataset, cfg), model, splits["valid"], torch.device("cpu"), epoch=epoch, step=0,
                  recorder=rec, keep=None)  # fmt: skip
    rec.close()
    return vm, rec_dir


def test_shards_split_each_batch_without_repeats() -> None:
    batches = [np.arange(5), np.arange(5, 6), np.arange(6, 9)]
    parts = [list(shard_batches(iter(batches), Shard(r, 2), train=False)) for r in (0, 1)]
    assert [p.tolist() for p in parts[0]] == [[0, 1, 2], [5], [6, 7]] and [p.tolist() for p in parts[1]] == [[3, 4], [8]]
    train = [list(shard_batches(iter(batches), Shard(r, 2), train=True)) for r in (0, 1)]
    assert len(train[0]) == len(train[1]) == 2  # the 1-sequence batch is skipped by both ranks in training
    assert [Shard(r, 3).rows(8) for r in range(3)] == [slice(0, 3), slice(3, 6), slice(6, 8)]
    with pytest.raises(MoeLensError, match="--batch-size 2: .* 3 ranks"):
        get_task("wikitext2", RunConfig(dataset="wikitext2", batch_size=2), Shard(0, 3))


def test_bucket_sampler_partitions_each_epoch_the_same_on_every_rank_and_resumes() -> None:
    """DistributedBucketSampler against the single-process batches (bucket_batches, the reference): the ranks'
    parts of each global batch concatenate to it (nothing repeated, nothing lost but the documented too-short
    training batch), set_epoch reorders deterministically and identically on every rank, start=k resumes."""
    lengths = np.random.default_rng(0).integers(1, 40, size=97)  # the last batch: 1 sequence
    for world, shuffle in ((2, True), (3, True), (3, False), (4, True)):
        make = lambda r: DistributedBucketSampler(lengths, 8, Shard(r, world), shuffle=shuffle, seed=7000)  # noqa: E731
        orders = []
        for epoch in (0, 1, 1, 2):
            ranks = [make(r) for r in range(world)]
            for s in ranks:
                s.set_epoch(epoch)
            glob = ranks[0].global_batches()
            assert all(len(g) == len(h) and all((a == b).all() for a, b in zip(g, h, strict=True))
                       for g, h in ((glob, s.global_batches()) for s in ranks[1:]))  # fmt: skip
            parts = [list(s) for s in ranks]
            assert [len(p) for p in parts] == [len(s) for s in ranks]
            kept = [g for g in glob if len(g) >= world or not shuffle]
            assert len(glob) - len(kept) == (1 if shuffle else 0)  # fewer sequences than ranks
            it = [iter(p) for p in parts]
            for g in kept:  # each global batch is the concatenation of the ranks' contiguous parts
                mine = [next(it[r]) for r in range(world) if len(np.array_split(g, world)[r])]
                assert (np.concatenate(mine) == g).all()
            assert all(next(i, None) is None for i in it)
            seen = np.concatenate([np.concatenate(p) for p in parts])
            assert len(seen) == len(set(seen.tolist())) == sum(map(len, kept))  # no index twice
            if not shuffle:
                assert len(seen) == len(lengths)  # evaluation: every sequence
            orders.append([g.tolist() for g in glob])
            for r, s in enumerate(ranks):  # resume after k of the epoch's batches: the same remaining order
                for k in (0, 3, len(parts[r])):
                    s.set_epoch(epoch, start=k)
                    assert [x.tolist() for x in s] == [x.tolist() for x in parts[r][k:]]
        assert orders[1] == orders[2]  # the same epoch, the same order
        assert (orders[0] != orders[1] and orders[1] != orders[3]) == shuffle  # another epoch, another order
        one = DistributedBucketSampler(lengths, 8, shuffle=shuffle, seed=7000)  # a single process: nothing dropped
        one.set_epoch(1)
        assert [g.tolist() for g in one] == orders[1] and len(one) == len(orders[1])
    lm = WindowSampler(10, epoch_steps=4)
    lm.set_epoch(2)
    assert list(lm) == [8, 9, 0, 1, 2, 3, 4, 5, 6, 7]
    lm.set_epoch(2, start=7)
    assert list(lm) == [5, 6, 7]


def check_against_one_process(runs: Path, name: str, epoch: int, tmp: Path) -> None:
    """The run's logged validation metrics and the union of its ranks' validation routing equal ONE process's
    evaluation of its final weights (epoch-`epoch`.pt); the train-time load covers both ranks; analyses run."""
    run = runs / name
    vm, ref = one_process_eval(run, epoch, tmp)
    con = connect(runs)
    logged = dict(con.execute("SELECT name, value FROM metrics WHERE split = 'valid' AND epoch = ?", [epoch]).fetchall())
    assert logged.keys() == vm.keys()
    for k, v in vm.items():
        assert logged[k] == pytest.approx(v, rel=1e-6, abs=1e-6), k

    # every validation token the single process routes, routed by exactly one rank, to the same experts
    union = con.execute("""SELECT token_idx, layer, rank, expert, gate, ddp_rank FROM routing
                           WHERE split = 'valid' AND epoch = ? ORDER BY token_idx, layer, rank""", [epoch]).df()
    single = connect(ref.parent).execute("""SELECT token_idx, layer, rank, expert, gate FROM routing
                                            ORDER BY token_idx, layer, rank""").df()  # fmt: skip
    assert not union.duplicated(["token_idx", "layer", "rank"]).any()
    assert union.groupby("token_idx")["ddp_rank"].nunique().max() == 1  # one rank per token
    assert set(union["ddp_rank"]) == {0, 1}
    assert len(union) == len(single) > 0
    assert (union["token_idx"].to_numpy() == single["token_idx"].to_numpy()).all()
    assert (union["expert"].to_numpy() == single["expert"].to_numpy()).all()
    np.testing.assert_allclose(union["gate"], single["gate"], rtol=1e-5, atol=1e-6)
    tokens = con.execute("SELECT split, count(*), count(DISTINCT token_idx), count(DISTINCT ddp_rank) FROM tokens "
                         "GROUP BY split").fetchall()  # fmt: skip
    assert len(tokens) == 2 and all(n == distinct and ranks == 2 for _, n, distinct, ranks in tokens)

    # the logged train-time load of the last window covers both ranks: the kept assignments of their train rows
    last = con.execute("SELECT max(step) FROM metrics WHERE split = 'train'").fetchone()[0]
    first = con.execute("SELECT coalesce(max(step), 0) FROM metrics WHERE split = 'train' AND step < ?", [last]).fetchone()[0]
    load = con.execute("SELECT value FROM metrics WHERE split = 'train' AND name = 'load' AND layer = 0 AND step = ? "
                       "ORDER BY expert", [last]).df()["value"]  # fmt: skip
    kept = con.execute("""SELECT expert, count(*) AS n, count(DISTINCT ddp_rank) AS ranks FROM routing
                          WHERE split = 'train' AND NOT dropped AND layer = 0 AND step >= ? AND step < ?
                          GROUP BY expert ORDER BY expert""", [first, last]).df()  # fmt: skip
    assert (kept["ranks"] == 2).all()
    share = kept.set_index("expert")["n"].reindex(range(4), fill_value=0) / kept["n"].sum()
    np.testing.assert_allclose(load.to_numpy(), share.to_numpy(), atol=1e-6)

    # the analyses run on the run directory
    assert not A.collapse(con, name, split="valid", by="epoch").empty
    assert not A.specialization(con, name, attribute="freq_band", split="valid").empty
    balance = A.load_balance(con, name, split="valid", per_expert=True, epoch=epoch)
    assert balance["assignments"].sum() == len(union)  # both ranks' rows, none twice


def test_two_ranks_on_conll_record_each_token_once_and_match_one_process(real_data_dir: Path,
                                                                         tmp_path: Path) -> None:
    runs = tmp_path / "runs"
    done = torchrun(["train", "--dataset", "conll2003", *TINY, *DATA["conll2003"], "--epochs", "1", "--max-steps", "6",
                     "--data-dir", str(real_data_dir), "--runs-dir", str(runs), "--run-name", "d"])  # fmt: skip
    assert done.returncode == 0, done.stderr[-3000:]
    run = runs / "d"
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert json.loads((run / "config.json").read_text())["world_size"] == 2
    assert sorted(p.name for p in run.glob("routing/*/split=valid/epoch=0/*")) == ["ddp_rank=0", "ddp_rank=1"]
    check_against_one_process(runs, "d", 0, tmp_path)


CHILD = """
import os, signal, sys, time
from pathlib import Path
from moe_lens import train
from moe_lens.cli import main
stop, marker = int(sys.argv[1]), Path(sys.argv[2])
real = train._Loop._advance_bar
def advance(self):
    real(self)
    if self.step == stop and os.environ["RANK"] == "1":
        marker.write_text(str(time.time()))
        os.kill(os.getpid(), signal.SIGKILL)
train._Loop._advance_bar = advance
sys.exit(main(sys.argv[3:]))
"""


def test_wikitext_a_killed_rank_stops_the_other_and_the_resumed_run_matches_one_process(
        real_data_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture) -> None:
    runs, marker, child = tmp_path / "runs", tmp_path / "killed-at", tmp_path / "child.py"
    child.write_text(CHILD)
    where = ["--runs-dir", str(runs), "--run-name", "k"]
    done = torchrun(["9", str(marker), "train", "--dataset", "wikitext2", *TINY, *DATA["wikitext2"], "--epochs", "2",
                     "--epoch-steps", "6", "--checkpoint-every", "2", "--record-flush-rows", "500",
                     "--data-dir", str(real_data_dir), *where], script=[str(child)])  # fmt: skip
    ended = time.time()
    assert marker.is_file(), done.stderr[-3000:]
    assert done.returncode != 0
    assert ended - float(marker.read_text()) < 60  # rank 0 did not wait for the dead rank
    run = runs / "k"
    for f in run.rglob("*.parquet"):
        pq.read_table(f)  # every part file already written is readable
    assert any(run.glob("routing/*/split=train/epoch=1/ddp_rank=1/*.parquet"))  # the kill came mid-epoch 1

    assert main(["train", "--resume", *where, "--no-progress"]) == 2  # one process: the world size differs
    assert "trained by 2 process(es), this launch has 1" in capsys.readouterr().err

    resumed = subprocess.run([sys.executable, "-m", "moe_lens", "train", "--nproc", "2", "--resume", "--no-progress",
                              *where], cwd=ROOT, env=_env(), capture_output=True, text=True, timeout=240)  # fmt: skip
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert json.loads((run / "run.json").read_text())["status"] == "finished"
    assert set(duplicates(run).values()) == {0}
    steps = connect(runs).execute("SELECT DISTINCT step FROM routing WHERE split = 'train' ORDER BY step").fetchall()
    assert [s for (s,) in steps] == list(range(12))  # every training step recorded once, across the kill
    check_against_one_process(runs, "k", 1, tmp_path)


EVERY_STEP = """
import sys
from moe_lens import train
from moe_lens.cli import main
train.LOG_EVERY = 1  # a train metrics row per step
sys.exit(main(sys.argv[1:]))
"""
# deterministic routing (no router noise, no dropout, no capacity), the importance, switch and z losses weighted
# (so their gradients take part; the smooth load loss needs the noisy router, whose noise differs per rank; its
# value, CV^2 of the kept loads, is still logged and compared)
# 1 validation batch (the eval equality is the test above)
EXACT = ["--mode", "importance", "--w-switch", "0.01", "--w-z", "0.001", "--dropout", "0",
         "--d-embed", "16", "--d-model", "16", "--expert-hidden", "16", "--num-experts", "4", "--warmup-steps", "2",
         "--no-pos-tags", "--no-progress", "--max-eval-batches", "1"]  # fmt: skip


def test_global_aux_of_one_rank_equals_the_layer_aux() -> None:
    """The aux losses from the packed batch sums (what the ranks all-reduce) equal the layer's own, values and
    gradients, when the 'all-reduce' is the identity (one rank)."""
    from moe_lens.moe.layer import MoELayer

    torch.manual_seed(0)
    for router, extra in (("noisy_topk", {}), ("topk_mask", {}), ("switch", {"capacity_factor": 1.25})):
        layer = MoELayer(8, num_experts=4, top_k=1 if router == "switch" else 2, router=router, expert_hidden=8,
                         w_importance=0.1, w_load=0.1, w_switch=0.01, w_z=0.001, dispatch="loop", **extra)  # fmt: skip
        x = torch.randn(37, 8)
        grads = []
        for reduce in (None, lambda t: t):
            layer.reduce_stats = reduce
            torch.manual_seed(1)  # the same router noise
            out = layer(x)
            layer.zero_grad()
            out.aux_loss.backward()
            grads.append((out.stats.aux, [p.grad.clone() for p in layer.router.parameters() if p.grad is not None]))
        (a, ga), (b, gb) = grads
        for k in a:
            assert float(b[k].detach()) == pytest.approx(float(a[k].detach()), rel=1e-5, abs=1e-7), (router, k)
        for u, v in zip(ga, gb, strict=True):
            torch.testing.assert_close(v, u, rtol=1e-5, atol=1e-7)


def global_batch_equality(dataset: str, flags: list[str], data_dir: Path, tmp_path: Path,
                          monkeypatch: pytest.MonkeyPatch) -> Path:
    """2 ranks vs 1 process, 4 steps of `dataset`: the per-step train metrics to 1e-6, the weights to 1e-5."""
    from moe_lens import train as train_mod

    runs, child = tmp_path / "runs", tmp_path / "every_step.py"
    child.write_text(EVERY_STEP)
    args = ["train", "--dataset", dataset, *EXACT, *flags, "--epochs", "1", "--max-steps", "4",
            "--data-dir", str(data_dir), "--runs-dir", str(runs)]  # fmt: skip
    done = torchrun([*args, "--run-name", "ddp"], script=[str(child)])
    assert done.returncode == 0, done.stderr[-3000:]
    monkeypatch.setattr(train_mod, "LOG_EVERY", 1)
    monkeypatch.setenv("MOE_LENS_CPU_EXT", "0")  # the ranks' expert kernel
    assert main([*args, "--run-name", "one"]) == 0
    con = connect(runs)
    q = """SELECT step, name, coalesce(layer, -1) AS layer, coalesce(expert, -1) AS expert, value FROM metrics
           WHERE run = ? AND split = 'train' AND name NOT IN ('tokens_per_s', 'lr') ORDER BY ALL"""
    ddp, one = (con.execute(q, [r]).df() for r in ("ddp", "one"))
    assert len(ddp) == len(one) > 0 and ddp["step"].nunique() == 4
    assert {"loss", "aux_loss", "aux_importance", "aux_load", "aux_switch", "aux_z"} <= set(ddp["name"])
    assert (ddp[["step", "name", "layer", "expert"]].to_numpy() == one[["step", "name", "layer", "expert"]].to_numpy()).all()
    np.testing.assert_allclose(ddp["value"], one["value"], rtol=1e-6, atol=1e-6)
    a, b = (torch.load(runs / r / "checkpoints" / "epoch-0.pt", weights_only=False)["model"] for r in ("ddp", "one"))
    assert a.keys() == b.keys()
    for k in a:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-5, msg=k)
    return runs


def test_two_ranks_log_the_global_batch_loss_and_aux_and_reach_the_one_process_weights(
        real_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """CoNLL, whose ranks hold different token counts: every step's logged train loss (token-weighted over both
    ranks), aux loss and aux terms (from the summed importance/load) equal a 1-process run over the same global
    batches (this pytest process), and so do the weights after the steps (the scaled-loss gradients)."""
    runs = global_batch_equality("conll2003", ["--batch-size", "32"], real_data_dir, tmp_path, monkeypatch)
    # the ranks' token counts differ in these steps (else a mean of the ranks' means would be exact too)
    shares = [list(get_task("conll2003", saved_config(runs / "one"), Shard(r, 2)).batches(
        load_data(saved_config(runs / "one"))["train"], train=True, seed=saved_config(runs / "one").seed * 1000))[:4]
        for r in (0, 1)]  # fmt: skip
    assert any(x["ntokens"] != y["ntokens"] for x, y in zip(*shares, strict=True))


@pytest.mark.parametrize("sandbox", [False, True])
def test_views_read_single_process_and_torchrun_layouts_together(tmp_path: Path, sandbox: bool) -> None:
    """A committed single-process run beside the same run moved into torchrun's ddp_rank=R/ layout."""
    import shutil

    src = ROOT / "sample_runs" / "conll2003-load"
    shutil.copytree(src, tmp_path / "single")
    ddp = tmp_path / "ddp"
    shutil.copytree(src, ddp)
    for i, f in enumerate(sorted(p for t in ("tokens", "routing", "hidden", "probs") for p in (ddp / t).rglob("*.parquet"))):
        target = f.parent / f"ddp_rank={i % 2}" / f.name
        target.parent.mkdir(exist_ok=True)
        f.rename(target)
    con = connect(tmp_path, read_only_sandbox=sandbox)
    for view in ("routing", "tokens", "hidden"):
        rows = dict(con.execute(f"SELECT run, count(*) FROM {view} GROUP BY run").fetchall())
        assert rows["single"] == rows["ddp"] > 0, view
        ranks = con.execute(f"SELECT DISTINCT run, ddp_rank FROM {view} ORDER BY ALL").fetchall()
        assert ("single", None) in ranks and {r for run, r in ranks if run == "ddp"} <= {0, 1}, view
    assert "ddp_rank" in con.execute("SELECT * FROM probs LIMIT 0").df().columns
    a, b = (A.load_balance(con, r, split="valid", per_expert=True)["assignments"].tolist() for r in ("single", "ddp"))
    assert a == b
