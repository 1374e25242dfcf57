"""moe-lens: expert-routing analysis and visualization for mixture-of-experts LSTMs.

The pipeline: `moe_lens.moe` (the MoE layer and every router), `moe_lens.data` (annotated
token streams), `moe_lens.train` (one training loop that records routing), `moe_lens.store`
(DuckDB views over recorded runs) and `moe_lens.analysis` (one function per question).
"""
from __future__ import annotations

__version__ = "0.1.0"
