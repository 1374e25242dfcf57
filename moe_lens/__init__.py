"""moe-lens: expert-routing analysis and visualization for mixture-of-experts LSTMs.

The pipeline: `moe_lens.moe` (the MoE layer and every router), `moe_lens.data` (annotated
token streams), `moe_lens.train` (one training loop that records routing), `moe_lens.store`
(DuckDB views over recorded runs) and `moe_lens.analysis` (one function per question).
"""
from __future__ import annotations

__version__ = "0.1.0"


def connect(runs_dir: str, **kwargs):  # noqa: ANN201 - re-export without importing duckdb at package import
    """DuckDB connection with views over a runs directory (see `moe_lens.store.connect`)."""
    from moe_lens.store import connect as _connect

    return _connect(runs_dir, **kwargs)
