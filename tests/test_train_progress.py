"""The training bar: one bar over every step of the run (its ETA is the whole run's), a rate measured
from the end of the first step and never reset after; Ctrl-C prints the exact resume command."""
from __future__ import annotations

import os
import signal
from pathlib import Path

import pytest

from moe_lens import train as train_mod
from moe_lens.cli import main
from moe_lens.resume import RunInterrupted
from moe_lens.tasks.ner import NERTask

FLAGS = ["--dataset", "conll2003", "--mode", "load", "--d-embed", "16", "--d-model", "16", "--expert-hidden", "16",
         "--num-experts", "4", "--batch-size", "16", "--epochs", "2", "--epoch-steps", "3", "--max-eval-batches", "1",
         "--no-pos-tags"]  # fmt: skip


class FakeBar:
    """Records what the loop does with its bar (tqdm's attributes that the loop touches)."""

    made: list["FakeBar"] = []

    def __init__(self, *, total: int, initial: int = 0, disable: bool = False, **kw) -> None:
        self.total, self.n, self.initial, self.disable, self.kw = total, initial, initial, disable, kw
        self.start = initial  # the loop moves `initial` when it starts the rate
        self.updates, self.rate_starts, self.closed = 0, 0, False
        FakeBar.made.append(self)

    def __setattr__(self, name: str, value) -> None:
        if name == "start_t":
            self.rate_starts += 1
        object.__setattr__(self, name, value)

    def _time(self) -> float:
        return 0.0

    def update(self, n: int = 1) -> None:
        self.n += n
        self.updates += n

    def set_postfix(self, **kw) -> None:
        pass

    def close(self) -> None:
        self.closed = True

    @staticmethod
    def write(s: str) -> None:
        pass


def interrupt_at(monkeypatch: pytest.MonkeyPatch, step: int, sig: int = signal.SIGINT) -> None:
    real, seen = NERTask.forward, {"n": 0}

    def forward(self, model, batch, state):
        if model.training:
            seen["n"] += 1
            if seen["n"] == step:
                os.kill(os.getpid(), sig)
        return real(self, model, batch, state)

    monkeypatch.setattr(NERTask, "forward", forward)


def test_one_bar_over_every_step_of_the_run(real_data_dir: Path, tmp_path: Path,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(train_mod, "tqdm", FakeBar)
    FakeBar.made = []
    where = ["--data-dir", str(real_data_dir), "--runs-dir", str(tmp_path), "--run-name", "p"]
    with monkeypatch.context() as m:
        interrupt_at(m, 2)
        assert main(["train", *FLAGS, *where]) == 130
    assert main(["train", "--resume", "--run-name", "p", "--runs-dir", str(tmp_path)]) == 0
    first, second = FakeBar.made  # one bar per process, none per epoch
    assert (first.total, first.start, first.updates) == (6, 0, 2)  # 2 epochs x 3 steps; stopped after 2
    assert (second.total, second.start, second.updates) == (6, 2, 4)  # the resumed run counts on from 2
    assert (first.initial, second.initial) == (1, 3)  # the rate counts from the end of each first step
    assert first.rate_starts == second.rate_starts == 1  # once, after the first step: never reset per step
    assert first.closed and second.closed


def test_ctrl_c_prints_the_resume_command(real_data_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture) -> None:
    runs = tmp_path / "my runs"
    interrupt_at(monkeypatch, 2)
    rc = main(["train", *FLAGS, "--no-progress", "--data-dir", str(real_data_dir), "--runs-dir", str(runs),
               "--run-name", "c"])  # fmt: skip
    err = capsys.readouterr().err.strip()
    assert rc == 130
    assert err == (f"moe-lens train: stopped by SIGINT at step 2, checkpoint saved; resume with: "
                   f"moe-lens train --resume --run-name c --runs-dir '{runs}'")  # fmt: skip
    assert (runs / "c" / "checkpoints" / "epoch-0-step-2.pt").is_file()
    assert RunInterrupted(signal.SIGTERM, 5, runs / "c").exit_code == 143
