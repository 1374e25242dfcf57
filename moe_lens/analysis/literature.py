"""The routing analyses of the MoE literature (filled in below)."""
from __future__ import annotations

from moe_lens.analysis._query import sql_text  # noqa: F401  (each analysis module holds its own name: tests spy on it)

RESAMPLERS: dict = {}
