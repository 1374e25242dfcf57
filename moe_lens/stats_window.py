"""The train-time statistics window: sums over the steps since the last log, per MoE layer, on the device.

`StatsWindow.update(fwd)` runs every step and only adds device tensors (no host sync): the task loss,
the total weighted aux loss, and for each MoE layer (keyed by `MoETrace.layer`) its per-expert load
(assignments kept) and importance (gate mass), dropped assignments, weighted aux loss and each unweighted
aux term. `log()` reads them once every LOG_EVERY steps and writes `metrics.parquet` rows:

- layer NULL, expert NULL: `loss`, `aux_loss` (summed over layers), `dropped` and `aux_<name>` (summed over
  layers), `tokens_per_s`, `lr`, means over the window's steps (dropped: a count);
- layer set, expert NULL: the same aux terms and `dropped` of that layer alone;
- layer and expert set: `load` and `importance`, each layer's shares (summing to 1 over its experts).

Under torchrun (moe_lens/distributed.py) `log()` first sums the window over the ranks, so the logged
load, importance and dropped counts cover every rank's tokens, and the loss and aux terms are the global
batch's (token-weighted loss, aux losses of the summed importance/load), as one process over the same
batches would log them.

Layers never merge: a second MoE layer's loads are its own rows (the window before this one added every
trace into one vector labelled layer 0). `state_dict()`/`load_state_dict()` carry a window across a resume.
"""
from __future__ import annotations

import math
from typing import Any

import torch
from torch import Tensor

from moe_lens.distributed import SINGLE, Shard, all_reduce_sum
from moe_lens.errors import MoeLensError


class _LayerSums:
    """Sums of one MoE layer's statistics over the window (device tensors)."""

    def __init__(self, e: int, device: torch.device) -> None:
        z = lambda *s: torch.zeros(*s, device=device)  # noqa: E731
        self.load, self.importance, self.dropped, self.aux = z(e), z(e), z(()), z(())  # (e,), (e,), (), ()
        self.parts: dict[str, Tensor] = {}  # aux term name -> () sum

    def add(self, trace: Any) -> None:
        s = trace.stats
        self.load += s.load.detach()
        self.importance += s.importance.detach()
        self.dropped += s.num_dropped
        if trace.aux_loss is not None:
            self.aux += trace.aux_loss.detach()
        for k, v in s.aux.items():
            self.parts[k] = self.parts.get(k, 0) + v.detach()

    def tensors(self) -> dict[str, Tensor]:
        return {"load": self.load, "importance": self.importance, "dropped": self.dropped, "aux": self.aux,
                **{f"aux_{k}": v for k, v in self.parts.items()}}


class StatsWindow:
    """Per-layer sums since the last log, kept on `device`."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.reset()

    def reset(self) -> None:
        self.loss, self.aux = torch.zeros((), device=self.device), torch.zeros((), device=self.device)
        self.n = 0
        self.layers: dict[int, _LayerSums] = {}

    def update(self, fwd: Any, scale: Tensor | None = None) -> None:
        """Add one step's `Forward` (loss, aux, traces); device-side only. `scale`: under torchrun the rank's
        loss weight world * count / global count (`distributed.loss_scale`), so the ranks' scaled losses
        sum to world x the step's global token-weighted mean loss."""
        self.loss += fwd.loss.detach() if scale is None else fwd.loss.detach() * scale
        self.aux += fwd.aux.detach()
        for tr in fwd.traces:
            if tr.layer not in self.layers:
                self.layers[tr.layer] = _LayerSums(tr.stats.load.shape[0], self.device)
            self.layers[tr.layer].add(tr)
        self.n += 1

    def values(self, shard: Shard = SINGLE) -> dict[tuple[str, int | None, int | None], float]:
        """{(name, layer, expert): value} of the window, the metrics rows `log` writes. One host sync.

        Under torchrun the window's sums are first summed over the ranks (one all-reduce, at log time only):
        load, importance and dropped then count every rank's tokens. Each rank's loss was weighted by its
        token share (`update`'s scale) and its aux terms are already the global batch's (every rank holds the
        same value, MoELayer.reduce_stats), so dividing the rank sums by world x steps gives the mean over
        the window's steps of the global batch's loss and aux terms, as one process logs them."""
        sums = {"loss": self.loss, "aux": self.aux}
        for layer, s in self.layers.items():
            sums |= {f"{layer}/{k}": v.float().reshape(v.shape) for k, v in s.tensors().items()}
        sums = all_reduce_sum(sums, shard)
        steps = max(self.n, 1) * shard.world  # per-rank step means, averaged over the ranks
        out: dict[tuple[str, int | None, int | None], float] = {("loss", None, None): float(sums["loss"]) / steps,
                                                               ("aux_loss", None, None): float(sums["aux"]) / steps}
        dropped, parts = 0.0, {}
        for layer in sorted(self.layers):
            t = {k: sums[f"{layer}/{k}"] for k in self.layers[layer].tensors()}
            d = float(t["dropped"])
            dropped += d
            out[("dropped", layer, None)] = d
            out[("aux_loss", layer, None)] = float(t["aux"]) / steps
            for k in sorted(t):
                if k.startswith("aux_"):
                    v = float(t[k]) / steps
                    out[(k, layer, None)] = v
                    parts[k] = parts.get(k, 0.0) + v
            for name in ("load", "importance"):
                arr = t[name]
                for i, v in enumerate((arr / arr.sum().clamp_min(1e-12)).tolist()):
                    out[(name, layer, i)] = v
        out[("dropped", None, None)] = dropped
        out.update({(k, None, None): v for k, v in parts.items()})
        return out

    def log(self, metrics: Any, step: int, epoch: int, tok_s: float, lr: float, bar: Any = None,
            shard: Shard = SINGLE) -> None:
        """Write the window to `metrics` (split 'train'), raise on a non-finite loss, then reset.
        Under torchrun `tok_s` is this rank's; the logged `tokens_per_s` is the sum over the ranks."""
        vals = self.values(shard)
        loss = vals[("loss", None, None)]
        if not math.isfinite(loss):
            raise MoeLensError(f"non-finite training loss ({loss}) at step {step}; stopped. Traces, metrics and "
                               f"checkpoints so far are kept. Try a lower --lr or --clip.")  # fmt: skip
        if shard.enabled:
            tok_s = float(all_reduce_sum({"t": torch.tensor([tok_s], dtype=torch.float64, device=self.device)}, shard)["t"])
        vals[("tokens_per_s", None, None)], vals[("lr", None, None)] = tok_s, lr
        for (name, layer, expert), v in vals.items():
            metrics.add(step, epoch, "train", name, v, layer=layer, expert=expert)
        if bar is not None:
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tok_s:,.0f}")
        self.reset()

    def state_dict(self) -> dict[str, Any]:
        """The window's sums (CPU tensors), for a checkpoint taken between two logs."""
        return {"loss": self.loss.cpu(), "aux": self.aux.cpu(), "n": self.n,
                "layers": {k: {n: v.cpu() for n, v in s.tensors().items()} for k, s in self.layers.items()}}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        self.reset()
        self.loss, self.aux, self.n = state["loss"].to(self.device), state["aux"].to(self.device), state["n"]
        for layer, t in state["layers"].items():
            s = _LayerSums(t["load"].shape[0], self.device)
            s.load, s.importance = t["load"].to(self.device), t["importance"].to(self.device)
            s.dropped, s.aux = t["dropped"].to(self.device), t["aux"].to(self.device)
            s.parts = {k[4:]: v.to(self.device) for k, v in t.items() if k.startswith("aux_")}
            self.layers[int(layer)] = s


__all__ = ["StatsWindow"]
