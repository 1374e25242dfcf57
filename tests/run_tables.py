"""Read every table of a run directory as sorted pandas frames, and compare two runs exactly.

Used by the resume tests: a stopped-and-resumed run must equal the uninterrupted one row for row.
List columns (router_probs, hidden) are compared as the bytes of their float32 values (exact).
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pyarrow.parquet as pq

KEYS = {
    "routing": ["dataset", "split", "epoch", "step", "token_idx", "layer", "rank"],
    "probs": ["dataset", "split", "epoch", "step", "token_idx", "layer"],
    "hidden": ["dataset", "split", "epoch", "step", "token_idx", "layer"],
    "tokens": ["dataset", "split", "token_idx"],
}
METRIC_KEYS = ["step", "epoch", "split", "name", "layer", "expert"]
WALL_CLOCK = ("tokens_per_s",)  # depends on the machine's speed, not on the run


def read_table(run_dir: Path, table: str) -> pd.DataFrame:
    """Every part file of `table`, hive columns as strings, list columns as bytes, sorted by its keys."""
    frames = []
    for f in sorted((run_dir / table).rglob("*.parquet")):
        df = pq.ParquetFile(f).read().to_pandas()
        for part in f.relative_to(run_dir / table).parts[:-1]:  # dataset=.../split=.../epoch=...
            k, v = part.split("=", 1)
            df[k] = v
        frames.append(df)
    df = pd.concat(frames, ignore_index=True)
    for col in ("router_probs", "hidden"):
        if col in df:
            df[col] = df[col].map(lambda a: np.asarray(a, dtype=np.float32).tobytes())
    return df.sort_values(KEYS[table]).reset_index(drop=True)


def read_metrics(run_dir: Path) -> pd.DataFrame:
    df = pq.read_table(run_dir / "metrics.parquet").to_pandas()
    df = df[~df["name"].isin(WALL_CLOCK)]
    return df.sort_values(METRIC_KEYS, na_position="first").reset_index(drop=True)


def duplicates(run_dir: Path) -> dict[str, int]:
    """Rows that repeat a key, per table (0 everywhere for a healthy run)."""
    out = {t: int(read_table(run_dir, t).duplicated(k).sum()) for t, k in KEYS.items() if (run_dir / t).is_dir()}
    raw = pq.read_table(run_dir / "metrics.parquet").to_pandas()
    out["metrics"] = int(raw.duplicated(METRIC_KEYS).sum())
    return out


def assert_same_run(a: Path, b: Path, tables=("routing", "probs", "hidden", "tokens")) -> None:
    for t in tables:
        assert any((a / t).rglob("*.parquet")), f"{a} has no {t} table: the comparison would prove nothing"
        pd.testing.assert_frame_equal(read_table(a, t), read_table(b, t), check_exact=True, obj=t)
    pd.testing.assert_frame_equal(read_metrics(a), read_metrics(b), check_exact=True, obj="metrics")
