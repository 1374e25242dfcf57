"""Shared fixtures. `real_data_dir` points at the real datasets (MOE_LENS_DATA).

In CI (CI=true) a missing data directory is a failure, never a skip: the integration tests over
real data must run there. Locally, without MOE_LENS_DATA, they skip with the reason.
"""
from __future__ import annotations

import os
from pathlib import Path

import pytest


def _real_data_dir() -> Path | None:
    env = os.environ.get("MOE_LENS_DATA")
    if env and Path(env).is_dir():
        return Path(env)
    guess = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared/data beside the checkout
    return guess if guess.is_dir() else None


@pytest.fixture(scope="session")
def real_data_dir() -> Path:
    d = _real_data_dir()
    if d is None:
        msg = "real datasets not found: set MOE_LENS_DATA to the data directory"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(msg + " (CI=true: integration tests must run)")
        pytest.skip(msg)
    return d


def pytest_configure(config: pytest.Config) -> None:
    # Tiny test models run faster on one thread than on two (no OpenMP barriers), and the suite's
    # timings stay stable on a shared 2-core machine.
    import torch

    torch.set_num_threads(1)
