"""Wall-clock time, UTC with an offset, from one place: every timestamp in run.json (`started_at`,
`updated_at`, `finished_at`) and the stamp in a default run name come from here, so two timestamps of a run
always compare (a naive local time beside a UTC one cannot be subtracted, and is hours off elsewhere).

Durations inside a run use `time.monotonic` instead (train.py), which no clock change can move.
"""
from __future__ import annotations

import datetime as dt


def utc_now() -> dt.datetime:
    """The current time, timezone-aware, in UTC."""
    return dt.datetime.now(dt.timezone.utc)


def now() -> str:
    """ISO 8601 to the second with its offset, e.g. '2026-01-01T12:00:00+00:00' (`datetime.fromisoformat` reads it)."""
    return utc_now().isoformat(timespec="seconds")


def stamp() -> str:
    """'YYYYmmdd-HHMMSS' in UTC, for default run names (`<dataset>-<mode>-<stamp>`)."""
    return utc_now().strftime("%Y%m%d-%H%M%S")
