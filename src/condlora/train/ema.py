"""Exponential moving average of network weights."""

from __future__ import annotations

import copy

import torch
from torch import nn


class EMA:
    """Keeps `shadow = decay_n * shadow + (1 - decay_n) * weights` with decay_n = min(decay, (1+n)/(10+n)).

    The warm-up of decay_n lets short runs (a few thousand steps) still benefit from averaging.

    Args:
        net: the network being trained (its initial weights start the average).
        decay: the asymptotic decay in [0, 1).
    """

    def __init__(self, net: nn.Module, decay: float):
        self.decay = decay
        self.shadow = copy.deepcopy(net).eval().requires_grad_(False)

    def decay_at(self, num_updates: int) -> float:
        """Effective decay for the update numbered `num_updates` (0-based)."""
        return min(self.decay, (1 + num_updates) / (10 + num_updates))

    @torch.no_grad()
    def update(self, net: nn.Module, num_updates: int) -> None:
        """Move the average towards the current weights of `net`; buffers are copied."""
        weight = 1.0 - self.decay_at(num_updates)
        for avg, p in zip(self.shadow.parameters(), net.parameters(), strict=True):
            avg.lerp_(p.detach(), weight)
        for avg, b in zip(self.shadow.buffers(), net.buffers(), strict=True):
            avg.copy_(b)
