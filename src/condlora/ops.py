"""Small helpers shared by the backbones and the LoRA strategies (kept free of package imports)."""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves


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


def recorded() -> bool:
    """Whether a compiler, a tracer or a torch.func transform (grad, vmap) records this call: what it records
    must be computed (not served from a cache) from plain operations, which a compiler fuses itself."""
    return torch.compiler.is_compiling() or torch.jit.is_tracing() or torch._C._are_functorch_transforms_active()


class CountOps(TorchDispatchMode):
    """Counts the ATen operations run inside it that do work (`with CountOps() as ops: ...; ops.count`): on a
    GPU each is one kernel launch or more, what an eager step bound by launching kernels pays for. Views are
    not counted, nor `_unsafe_view` (the view that reshape returns for a fresh tensor).

    `bytes` tallies the memory traffic of the same operations in a first-order model of unfused kernels, what
    an eager step bound by memory bandwidth pays for: each operation reads every tensor it is given and writes
    every tensor it returns, once, with no cache between operations; a broadcast (stride-0) dimension is read
    once, an allocation (`empty`) writes nothing, and a tensor that is only written to (an `out=` argument,
    the destination of `copy_`, `fill_` or `zero_`) is not read.
    """

    def __init__(self):
        super().__init__()
        self.count = 0
        self.bytes = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func is torch.ops.aten._unsafe_view.default:
            return out
        self.count += 1
        name = func.__name__.split(".")[0]
        written = () if name in _ALLOCATIONS else out
        tensors = tree_leaves((_read(func, name, args, kwargs or {}), written))
        self.bytes += sum(_touched_bytes(t) for t in tensors if isinstance(t, torch.Tensor))
        return out


_ALLOCATIONS = {"empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided"}
_OVERWRITES = {"copy_", "fill_", "zero_"}  # in-place operations that do not read their destination


def _read(func, name: str, args: tuple, kwargs: dict) -> list:
    """The arguments an operation reads: all but those it only writes to (`out=`, or an overwrite's self)."""
    written = {
        a.name
        for a in func._schema.arguments
        if a.alias_info is not None and a.alias_info.is_write and (a.kwarg_only or name in _OVERWRITES)
    }
    names = [a.name for a in func._schema.arguments]
    positional = [value for arg, value in zip(names, args, strict=False) if arg not in written]
    return [*positional, *(value for arg, value in kwargs.items() if arg not in written)]


def _touched_bytes(tensor: torch.Tensor) -> int:
    """Bytes of the distinct elements of a tensor: its broadcast (stride-0) dimensions count once."""
    elements = math.prod(size for size, stride in zip(tensor.shape, tensor.stride(), strict=True) if stride != 0)
    return elements * tensor.element_size()
