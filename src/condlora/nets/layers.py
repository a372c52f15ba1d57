"""Building blocks shared by the U-Net backbones: embeddings, residual blocks, attention."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from condlora.ops import group_norm, zero_module


def timestep_embedding(noise_level: torch.Tensor, dim: int, max_period: float = 10_000.0) -> torch.Tensor:
    """Sinusoidal embedding of a (possibly fractional) timestep.

    Args:
        noise_level: (B,) timesteps or noise levels, any float range.
        dim: embedding width (even).
        max_period: longest wavelength, in the units of `noise_level`.
    Returns:
        (B, dim) float32 tensor `[cos(t * f_k), sin(t * f_k)]` with f_k = max_period^(-k / (dim/2)), computed
        in float32 whatever the network's dtype (bf16 cannot hold the step 999); cast it to the network's.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, device=noise_level.device) / half)
    angles = noise_level.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([torch.cos(angles), torch.sin(angles)], dim=1)


class ResBlock(nn.Module):
    """Residual block conditioned by scale-and-shift: out = x + conv(SiLU(GN(h) * (1 + scale) + shift)).

    Args:
        in_channels: C_in of the input feature map.
        out_channels: C_out of the output.
        emb_dim: width of the conditioning embedding; None builds an unconditioned block (no `emb_layers`).
        dropout: dropout probability before the second convolution.
    """

    def __init__(self, in_channels: int, out_channels: int, emb_dim: int | None, dropout: float = 0.0):
        super().__init__()
        self.norm1 = group_norm(in_channels)
        self.conv1 = nn.Conv2d(in_channels, out_channels, 3, padding=1)
        self.emb_layers = (
            nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * out_channels)) if emb_dim is not None else None
        )
        self.norm2 = group_norm(out_channels)
        self.dropout = nn.Dropout(dropout)
        self.conv2 = zero_module(nn.Conv2d(out_channels, out_channels, 3, padding=1))
        self.skip = nn.Identity() if in_channels == out_channels else nn.Conv2d(in_channels, out_channels, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))  # (B, C_out, H, W)
        h = self.norm2(h)
        if self.emb_layers is not None:
            scale, shift = self.emb_layers(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C_out, 1, 1) each
            h = h * (1 + scale) + shift
        h = self.conv2(self.dropout(F.silu(h)))
        return self.skip(x) + h


class AttentionBlock(nn.Module):
    """Multi-head self-attention over the pixels of a feature map, with a residual connection.

    `qkv` (C -> 3C) and `proj` (C -> C) are plain `nn.Linear` layers on (B, HW, C) tokens, so LoRA can wrap
    them. Channel order of `qkv` output is [q | k | v], each split head-major into `num_heads` heads.

    Args:
        channels: C.
        num_heads: number of heads; must divide C.
        ada_dim: width of a condition embedding for adaLN conditioning of the block
            (GN(x) * (1 + scale) + shift before qkv, zero-initialised); None leaves the block unconditioned.
    """

    def __init__(self, channels: int, num_heads: int, ada_dim: int | None = None):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: num_heads={num_heads} must divide channels={channels}")
        self.num_heads = num_heads
        self.norm = group_norm(channels)
        self.ada = zero_module(nn.Linear(ada_dim, 2 * channels)) if ada_dim is not None else None
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = zero_module(nn.Linear(channels, channels))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, h, w = x.shape
        tokens = self.norm(x).flatten(2).transpose(1, 2)  # (B, HW, C)
        if self.ada is not None:
            scale, shift = self.ada(F.silu(emb))[:, None, :].chunk(2, dim=2)  # (B, 1, C) each
            tokens = tokens * (1 + scale) + shift
        q, k, v = self.qkv(tokens).chunk(3, dim=2)  # (B, HW, C) each
        heads = [t.reshape(b, h * w, self.num_heads, c // self.num_heads).transpose(1, 2) for t in (q, k, v)]
        out = F.scaled_dot_product_attention(*heads)  # (B, heads, HW, C/heads)
        out = self.proj(out.transpose(1, 2).reshape(b, h * w, c))  # (B, HW, C)
        return x + out.transpose(1, 2).reshape(b, c, h, w)


class Downsample(nn.Module):
    """Halve the resolution with a stride-2 3x3 convolution (odd sizes round up: 7 -> 4)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(x)


class Upsample(nn.Module):
    """Resize to `size` by nearest-neighbour interpolation, then a 3x3 convolution."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
        return self.conv(F.interpolate(x, size=size, mode="nearest"))
