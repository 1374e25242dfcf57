"""Updates that run after each optimizer step, outside the gradient.

A module that needs one defines `after_step(self) -> None` (e.g. the `sigmoid_bias` router's bias
update, moe/sigmoid_bias.py). The training loop collects them once with `step_hooks(model)` and
calls each after `opt.step()`, so a new router with such an update needs no change to the loop.
"""
from __future__ import annotations

from collections.abc import Callable

from torch import nn


def step_hooks(model: nn.Module) -> list[Callable[[], None]]:
    """The bound `after_step` methods of `model`'s modules, in `modules()` order."""
    return [m.after_step for m in model.modules() if callable(getattr(m, "after_step", None))]
