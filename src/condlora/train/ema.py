"""Exponential moving average of the trainable weights."""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from torch import nn


class EMA:
    """Keeps `avg = decay_n * avg + (1 - decay_n) * w` for every trainable parameter w of a network.

    By default decay_n = min(decay, (1+n)/(10+n)): the warm-up lets short runs (a few thousand steps) still
    benefit. With a half-life (EDM), decay_n = 0.5^(batch / h_n) where h_n = min(halflife, rampup * n * batch)
    counts images (n * batch images seen before update n), so the average forgets half its weight every
    `halflife` images, and early on every `rampup` fraction of what was seen.

    Only trainable parameters are averaged and stored (a frozen base is its own average), so the EMA costs
    the adapters' size when only adapters train.

    Args:
        net: the network being trained (its initial weights start the average).
        decay: the asymptotic decay in [0, 1) (used without a half-life).
        halflife_images: EMA half-life in images; 0 uses `decay`.
        rampup_ratio: half-life ramp-up as a fraction of the images seen (0: none).
        batch_size: images per update (global batch).
    """

    def __init__(
        self,
        net: nn.Module,
        decay: float,
        halflife_images: float = 0.0,
        rampup_ratio: float = 0.0,
        batch_size: int = 1,
    ):
        self.decay, self.halflife, self.rampup, self.batch = decay, halflife_images, rampup_ratio, batch_size
        self.names = [name for name, p in net.named_parameters() if p.requires_grad]
        self.shadow = {name: p.detach().clone() for name, p in net.named_parameters() if p.requires_grad}

    def decay_at(self, num_updates: int) -> float:
        """Effective decay for the update numbered `num_updates` (0-based)."""
        if self.halflife <= 0:
            return min(self.decay, (1 + num_updates) / (10 + num_updates))
        halflife = self.halflife
        if self.rampup > 0:
            halflife = min(halflife, num_updates * self.batch * self.rampup)
        return 0.5 ** (self.batch / max(halflife, 1e-8))

    @torch.no_grad()
    def update(self, net: nn.Module, num_updates: int) -> None:
        """Move the average towards the current weights of `net`."""
        weight = 1.0 - self.decay_at(num_updates)
        params = dict(net.named_parameters())
        shadows = [self.shadow[name] for name in self.names]
        torch._foreach_lerp_(shadows, [params[name].detach() for name in self.names], weight)  # one fused kernel

    def state_dict(self) -> dict[str, torch.Tensor]:
        """The averaged tensors by parameter name."""
        return dict(self.shadow)

    @torch.no_grad()
    def load_state_dict(self, tensors: dict[str, torch.Tensor]) -> None:
        """Restore the averages; extra entries (0.1 checkpoints also hold buffers) are ignored."""
        missing = [name for name in self.names if name not in tensors]
        if missing:
            raise KeyError(f"EMA tensors missing for {missing[:5]}")
        for name in self.names:
            self.shadow[name].copy_(tensors[name])

    @contextmanager
    def applied(self, net: nn.Module) -> Iterator[nn.Module]:
        """`net` with the averaged weights for the enclosed block, its own weights restored exactly afterwards."""
        params = dict(net.named_parameters())
        saved = {name: params[name].detach().clone() for name in self.names}
        with torch.no_grad():
            for name in self.names:
                params[name].copy_(self.shadow[name])
        try:
            yield net
        finally:
            with torch.no_grad():
                for name in self.names:
                    params[name].copy_(saved[name])
