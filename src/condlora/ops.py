"""Small helpers shared by the backbones and the LoRA strategies (kept free of package imports)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode


def group_norm(channels: int) -> nn.GroupNorm:
    """GroupNorm with up to 32 groups of at least 4 channels (32 groups for C >= 128, as in DDPM / IDDPM).

    Narrow networks must not fall back to one channel per group: that is instance norm, which erases
    each channel's mean, the global brightness the denoiser has to predict.
    """
    groups = math.gcd(32, max(channels // 4, 1), channels)  # the last term: widths such as 50 that 4 does not divide
    return nn.GroupNorm(groups, channels)


def zero_module(module: nn.Module) -> nn.Module:
    """Zero every parameter of `module` so a residual branch starts as the identity."""
    for p in module.parameters():
        nn.init.zeros_(p)
    return module


class CountOps(TorchDispatchMode):
    """Counts the ATen operations run inside it that do work (`with CountOps() as ops: ...; ops.count`): on a
    GPU each is one kernel launch or more, what an eager step bound by launching kernels pays for. Views are
    not counted, nor `_unsafe_view` (the view that reshape returns for a fresh tensor)."""

    def __init__(self):
        super().__init__()
        self.count = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.count += 0 if func.is_view or func is torch.ops.aten._unsafe_view.default else 1
        return func(*args, **(kwargs or {}))
