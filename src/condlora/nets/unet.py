"""The nano U-Net: a small residual U-Net with self-attention for 28x28 / 32x32 images (about 0.5M parameters)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from condlora.nets.layers import (
    AttentionBlock,
    Downsample,
    ResBlock,
    Upsample,
    group_norm,
    timestep_embedding,
)

NULL_LABEL = -1  # label value meaning "no class": classifier-free guidance's unconditional branch


class NanoUNet(nn.Module):
    """Residual U-Net with skip connections, scale-and-shift conditioning and self-attention.

    Contract: `net(x, noise_level, labels) -> output` with x (B, C, H, W), noise_level (B,) (the integer DDPM
    step as a float, in [0, T)), labels (B,) int64 in [0, num_classes) or NULL_LABEL. The network never sees
    a schedule.

    Args:
        in_channels: image channels (1 for MNIST, 3 for CIFAR-10).
        channels: width of the first level.
        channel_mult: width multiplier per resolution level; one level per entry.
        num_res_blocks: residual blocks per level on the way down (one more on the way up).
        attn_levels: indices of the levels that get an attention block after each residual block.
        num_heads: attention heads.
        num_classes: 0 for an unconditional model; otherwise class embeddings for that many classes plus a
            learned null class.
        dropout: dropout in the residual blocks.
        emb_mult: the condition embedding has `emb_mult * channels` features.
    """

    def __init__(
        self,
        in_channels: int = 1,
        channels: int = 32,
        channel_mult: tuple[int, ...] = (1, 2, 2),
        num_res_blocks: int = 1,
        attn_levels: tuple[int, ...] = (2,),
        num_heads: int = 4,
        num_classes: int = 0,
        dropout: float = 0.0,
        emb_mult: int = 4,
    ):
        super().__init__()
        self.channels = channels
        self.num_classes = num_classes
        emb_dim = emb_mult * channels
        self.time_embed = nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 else None

        self.in_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        skip_widths = [channels]
        self.down = nn.ModuleList()
        c = channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(self._stage(c, width, emb_dim, dropout, level in attn_levels, num_heads))
                c = width
                skip_widths.append(c)
            if level < len(widths) - 1:
                self.down.append(Downsample(c))
                skip_widths.append(c)

        self.mid = self._stage(c, c, emb_dim, dropout, True, num_heads)
        self.mid_res = ResBlock(c, c, emb_dim, dropout)

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(
                    self._stage(c + skip_widths.pop(), width, emb_dim, dropout, level in attn_levels, num_heads)
                )
                c = width
            if level > 0:
                self.up.append(Upsample(c))

        self.out_norm = group_norm(c)
        self.out_conv = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)

    @staticmethod
    def _stage(c_in: int, c_out: int, emb_dim: int, dropout: float, attn: bool, heads: int) -> nn.ModuleList:
        blocks = [ResBlock(c_in, c_out, emb_dim, dropout)]
        if attn:
            blocks.append(AttentionBlock(c_out, heads))
        return nn.ModuleList(blocks)

    def embed(self, noise_level: torch.Tensor, labels: torch.Tensor | None) -> torch.Tensor:
        """Condition embedding v = MLP(sinusoidal(t)) + E[label]; (B,) -> (B, emb_dim)."""
        emb = self.time_embed(timestep_embedding(noise_level, self.channels))
        if self.class_embed is not None:
            if labels is None:
                labels = torch.full_like(noise_level, NULL_LABEL, dtype=torch.long)
            labels = torch.where(labels == NULL_LABEL, self.num_classes, labels)  # null class is the last row
            emb = emb + self.class_embed(labels)
        return emb

    def forward(
        self,
        x: torch.Tensor,
        noise_level: torch.Tensor,
        labels: torch.Tensor | None = None,
    ) -> torch.Tensor:
        emb = self.embed(noise_level, labels)  # (B, D)
        h = self.in_conv(x)
        skips = [h]
        for block in self.down:
            h = block(h) if isinstance(block, Downsample) else _run_stage(block, h, emb)
            skips.append(h)
        h = self.mid_res(_run_stage(self.mid, h, emb), emb)
        for block in self.up:
            if isinstance(block, Upsample):
                h = block(h, skips[-1].shape[-2:])
            else:
                h = _run_stage(block, torch.cat([h, skips.pop()], dim=1), emb)
        return self.out_conv(F.silu(self.out_norm(h)))


def _run_stage(stage: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
    h = stage[0](h, emb)
    for block in stage[1:]:
        h = block(h)
    return h
