"""The mixture-of-experts layer, its routers, expert banks and auxiliary losses."""
from __future__ import annotations

from moe_lens.moe.layer import MoELayer, MoEOutput, RoutingStats
from moe_lens.moe.registry import build_experts, build_router
from moe_lens.moe.routers import Routing

__all__ = ["MoELayer", "MoEOutput", "Routing", "RoutingStats", "build_router", "build_experts"]
