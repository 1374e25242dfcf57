"""Scoped forward hooks on the routers of a Hugging Face MoE model (TransformerLens `hooks()` style).

`with routing_hooks(model, adapter) as cap: model(ids); layers = cap.take()` registers one forward hook per
sparse layer's router (and Qwen2-MoE's shared-expert gate), and ALWAYS removes every handle on exit, also when
the forward raises: hooks are global state of the module. A hook only keeps a reference to the router's own
output tuple (no copy, no sync); `take()` reads them into `Routed` tensors on the model's device after the
forward, in the order the layers ran.
"""
from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any, NamedTuple

import torch
from torch import nn

from moe_lens.capture.adapters import Adapter, Routed, sparse_layers


class LayerRouting(NamedTuple):
    layer: int  # the model's real decoder (Switch: encoder) layer index
    routed: Routed
    shared_gate: torch.Tensor | None  # (n,) float32 sigmoid gate of the shared expert (Qwen2-MoE), else None


class Captured:
    def __init__(self, adapter: Adapter, layers: list[int]) -> None:
        self.adapter = adapter
        self.layers = layers
        self._out: dict[int, Any] = {}
        self._shared: dict[int, torch.Tensor] = {}

    def take(self) -> list[LayerRouting]:
        """The routing of the last forward, one entry per sparse layer; clears the buffers."""
        missing = [i for i in self.layers if i not in self._out]
        assert not missing, f"routers of layers {missing} did not run"
        out = []
        for i in self.layers:
            shared = self._shared.get(i)
            if shared is not None:
                shared = torch.sigmoid(shared.float().reshape(-1))  # (n,) as Qwen2MoeSparseMoeBlock applies it
            out.append(LayerRouting(i, self.adapter.read(self._out[i]), shared))
        self._out.clear()
        self._shared.clear()
        return out


@contextmanager
def routing_hooks(model: nn.Module, adapter: Adapter) -> Iterator[Captured]:
    found = sparse_layers(model, adapter)
    cap = Captured(adapter, [i for i, _ in found])
    handles = []
    try:
        for i, router in found:
            handles.append(router.register_forward_hook(_keep(cap._out, i)))
        if adapter.shared_gate is not None:
            layers = adapter.layers(model)
            for i, _ in found:
                handles.append(adapter.shared_gate(layers[i]).register_forward_hook(_keep(cap._shared, i)))
        yield cap
    finally:
        for h in handles:
            h.remove()


def _keep(store: dict[int, Any], i: int):
    def hook(module: nn.Module, args: Any, output: Any) -> None:
        store[i] = output  # the router module's own return value, untouched

    return hook
