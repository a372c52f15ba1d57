"""The nano U-Net: a small residual U-Net with self-attention for 28x28 / 32x32 images (about 0.5M parameters)."""

from __future__ import annotations

import dataclasses
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from condlora.conditions import NULL_LABEL, Conditions
from condlora.lora import LoRASpec, bind_conditions, inject_lora
from condlora.nets.layers import AttentionBlock, Downsample, ResBlock, Upsample, timestep_embedding
from condlora.ops import group_norm

ATTENTION_TARGETS = ("*.qkv", "*.proj")  # the attention projections, LoRA's default targets
ConditioningMode = Literal["baseline", "lora_only", "with_lora", "adaln_attn"]


class NanoUNet(nn.Module):
    """Residual U-Net with skip connections and self-attention, conditioned in one of four modes:

    - baseline: scale-and-shift of the residual blocks from v = MLP(sinusoidal(t)) + E[y]; attention unconditioned.
    - with_lora: baseline plus conditioned LoRA on the attention projections.
    - lora_only: no scale-and-shift (the residual blocks have no `emb_layers`); attention conditioned by LoRA
      alone. The embedding network is kept only when UC-LoRA reads it.
    - adaln_attn: no scale-and-shift in the residual blocks; attention conditioned by adaLN (paper sec. 5.5).

    Contract: `net(x, noise_level, cond) -> eps` with x (B, C, H, W), noise_level (B,) what the diffusion
    family feeds the network (for DDPM the step as a float; never rounded here) and `cond` the call's
    `Conditions`: labels (B,) in [0, num_classes) or NULL_LABEL (missing labels mean the null class), an
    optional class_vector (B, num_classes) replacing them (class interpolation), and the integer step that
    TimeLoRA tables read. The network fills in `cond.embedding` for UC-LoRA and never sees a schedule.

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
        conditioning: one of the four modes above.
        lora: the LoRA recipe (its embedding_dim is filled in here, its targets default to the attention
            projections); conditioned banks need with_lora / lora_only, a plain LoRA fits any mode.
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
        conditioning: ConditioningMode = "baseline",
        lora: LoRASpec | None = None,
    ):
        super().__init__()
        check_mode(conditioning, lora)
        self.channels, self.num_classes, self.conditioning = channels, num_classes, conditioning
        emb_dim = emb_mult * channels
        keep_embedding = conditioning != "lora_only" or (lora is not None and lora.uc_bases > 0)
        self.time_embed = (
            nn.Sequential(nn.Linear(channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
            if keep_embedding
            else None
        )
        self.class_embed = nn.Embedding(num_classes + 1, emb_dim) if num_classes > 0 and keep_embedding else None
        res_emb = emb_dim if conditioning in ("baseline", "with_lora") else None  # scale-and-shift or not
        ada_emb = emb_dim if conditioning == "adaln_attn" else None

        def stage(c_in: int, c_out: int, attn: bool) -> nn.ModuleList:
            blocks: list[nn.Module] = [ResBlock(c_in, c_out, res_emb, dropout)]
            if attn:
                blocks.append(AttentionBlock(c_out, num_heads, ada_emb))
            return nn.ModuleList(blocks)

        self.in_conv = nn.Conv2d(in_channels, channels, 3, padding=1)
        widths = [channels * m for m in channel_mult]
        skip_widths = [channels]
        self.down = nn.ModuleList()
        c = channels
        for level, width in enumerate(widths):
            for _ in range(num_res_blocks):
                self.down.append(stage(c, width, level in attn_levels))
                c = width
                skip_widths.append(c)
            if level < len(widths) - 1:
                self.down.append(Downsample(c))
                skip_widths.append(c)

        self.mid = stage(c, c, True)
        self.mid_res = ResBlock(c, c, res_emb, dropout)

        self.up = nn.ModuleList()
        for level, width in reversed(list(enumerate(widths))):
            for _ in range(num_res_blocks + 1):
                self.up.append(stage(c + skip_widths.pop(), width, level in attn_levels))
                c = width
            if level > 0:
                self.up.append(Upsample(c))

        self.out_norm = group_norm(c)
        self.out_conv = nn.Conv2d(c, in_channels, 3, padding=1)
        nn.init.zeros_(self.out_conv.weight)
        nn.init.zeros_(self.out_conv.bias)
        self.lora_spec = None
        self._lora_layers = []
        if lora is not None and lora.active:
            self.lora_spec = dataclasses.replace(lora.with_targets(ATTENTION_TARGETS), embedding_dim=emb_dim)
            self._lora_layers = inject_lora(self, self.lora_spec)

    def embed(self, noise_level: torch.Tensor, cond: Conditions, dtype: torch.dtype) -> torch.Tensor | None:
        """Shared condition embedding v = MLP(sinusoidal(noise_level)) + E[label] (or class_vector @ E), (B, D)."""
        if self.time_embed is None:
            return None
        emb = self.time_embed(timestep_embedding(noise_level, self.channels).to(dtype))
        if self.class_embed is not None:
            if cond.class_vector is not None:
                emb = emb + cond.class_vector.to(emb.dtype) @ self.class_embed.weight[: self.num_classes]
            elif cond.labels is not None:
                labels = torch.where(cond.labels == NULL_LABEL, self.num_classes, cond.labels)  # null: last row
                emb = emb + self.class_embed(labels)
            else:
                emb = emb + self.class_embed.weight[self.num_classes]  # no labels: the null class
        return emb

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, cond: Conditions | None = None) -> torch.Tensor:
        cond = cond if cond is not None else Conditions()
        emb = self.embed(noise_level, cond, x.dtype)  # (B, D) or None
        with bind_conditions(self._lora_layers, cond.replace(embedding=emb)):
            return self._body(x, emb)

    def _body(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
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


def check_mode(conditioning: str, lora: LoRASpec | None) -> None:
    """Refuse a conditioning mode that contradicts the LoRA recipe (shared by every condlora backbone)."""
    conditioned = lora is not None and lora.conditioned
    if conditioning in ("with_lora", "lora_only") and not conditioned:
        raise ValueError(f"conditioning={conditioning} needs at least one LoRA bank (time, class or UC-LoRA)")
    if conditioning in ("baseline", "adaln_attn") and conditioned:
        raise ValueError(f"conditioning={conditioning} conditions attention without LoRA; turn the LoRA banks off")


def _run_stage(stage: nn.ModuleList, h: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
    for block in stage:  # (iterating, not slicing: a slice of a ModuleList builds a new module on every call)
        h = block(h, emb)
    return h
