"""Time is UTC with an offset, from one helper (moe_lens/clock.py): run.json's started_at, updated_at and
finished_at of a real (tiny) training run are all timezone-aware UTC, and so is a default run name's stamp,
even on a machine whose local zone is not UTC."""
from __future__ import annotations

import datetime as dt
import json
import time
from pathlib import Path

import pytest

from moe_lens import clock
from moe_lens.cli import main
from moe_lens.rundir import plan_run_dir

UTC = dt.timedelta(0)


@pytest.fixture
def kolkata(monkeypatch: pytest.MonkeyPatch):
    """The process's local zone at UTC+05:30, so a naive local time would be 5.5 hours off."""
    monkeypatch.setenv("TZ", "Asia/Kolkata")
    time.tzset()
    yield
    monkeypatch.undo()
    time.tzset()


def test_now_is_iso_8601_utc_with_offset(kolkata) -> None:
    s = clock.now()
    t = dt.datetime.fromisoformat(s)
    assert s.endswith("+00:00") and t.utcoffset() == UTC
    assert abs((dt.datetime.now(dt.timezone.utc) - t).total_seconds()) < 5


def test_default_run_name_stamp_is_utc(kolkata, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    fixed = dt.datetime(2026, 1, 2, 23, 59, 30, tzinfo=dt.timezone.utc)  # 05:29:30 the next day in Kolkata
    monkeypatch.setattr(clock, "utc_now", lambda: fixed)
    assert plan_run_dir(str(tmp_path), None, "wikitext2", "load", resume=False).name == "wikitext2-load-20260102-235930"


def test_run_json_timestamps_are_utc_aware(kolkata, real_data_dir: Path, tmp_path: Path) -> None:
    args = ["train", "--dataset", "conll2003", "--mode", "load", "--data-dir", str(real_data_dir),
            "--runs-dir", str(tmp_path), "--run-name", "r", "--d-embed", "16", "--d-model", "16",
            "--expert-hidden", "16", "--num-experts", "4", "--batch-size", "16", "--no-pos-tags",
            "--epochs", "1", "--max-steps", "2", "--max-eval-batches", "1", "--no-progress"]  # fmt: skip
    before = dt.datetime.now(dt.timezone.utc).replace(microsecond=0)
    assert main(args) == 0
    state = json.loads((tmp_path / "r" / "run.json").read_text())
    times = {k: dt.datetime.fromisoformat(state[k]) for k in ("started_at", "updated_at", "finished_at")}
    for k, t in times.items():
        assert t.tzinfo is not None and t.utcoffset() == UTC, (k, state[k])
    assert before <= times["started_at"] <= times["finished_at"] <= dt.datetime.now(dt.timezone.utc)
    assert (times["finished_at"] - times["started_at"]).total_seconds() < 600  # a naive local time: 5.5 h off
