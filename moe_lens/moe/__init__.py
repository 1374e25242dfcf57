"""The mixture-of-experts layer, its routers, expert banks and auxiliary losses."""
from __future__ import annotations

from moe_lens.moe.banks import build_experts
from moe_lens.moe.layer import MoELayer, MoEOutput
from moe_lens.moe.routers import Routing, build_router

__all__ = ["MoELayer", "MoEOutput", "Routing", "build_router", "build_experts"]
