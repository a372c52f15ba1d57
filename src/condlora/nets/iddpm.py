"""The U-Net of IDDPM (Nichol & Dhariwal 2021, openai/improved-diffusion `UNetModel`).

Same modules, parameter names and shapes as the published network, so a published checkpoint loads with
`strict=True` (`tests/fixtures/iddpm-unet-tiny` checks outputs against the published code). Its residual and
attention blocks keep their own classes because the published parameter names (`in_layers.2`,
`emb_layers.1`, `proj_out`, ...) and the head-major qkv layout differ from condlora's shared blocks.
Conditioned like the nano U-Net in one of four modes; TimeLoRA / ClassLoRA / UC-LoRA go on every attention
block's `qkv` and `proj_out` (1x1 `nn.Conv1d` on (B, C, HW) tensors).
"""

from __future__ import annotations

import dataclasses

import torch
import torch.nn.functional as F
from torch import nn

from condlora.conditions import NULL_LABEL, Conditions
from condlora.lora import LoRASpec, bind_conditions, inject_lora
from condlora.nets.layers import timestep_embedding
from condlora.nets.unet import ConditioningMode, check_mode
from condlora.ops import zero_module

IDDPM_ATTENTION_TARGETS = ("*.qkv", "*.proj_out")


class GroupNorm32(nn.GroupNorm):
    """IDDPM's normalisation: 32 groups (fewer only for networks too narrow for 32), computed in float32
    whatever the input's dtype."""

    def __init__(self, channels: int, groups: int = 32):
        super().__init__(groups, channels)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        dtype = torch.promote_types(x.dtype, torch.float32)  # float32, or float64 in a float64 network
        if x.dtype == self.weight.dtype == dtype:  # nothing to cast (each no-op cast costs host time)
            return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)
        weight, bias = self.weight.to(dtype), self.bias.to(dtype)
        return F.group_norm(x.to(dtype), self.num_groups, weight, bias, self.eps).to(x.dtype)


class ResBlock(nn.Module):
    """h = in_layers(x) = conv(SiLU(GN(x))); h = GN(h) (1 + scale) + shift with (scale, shift) = emb_layers(v);
    out = skip(x) + conv(dropout(SiLU(h))) (`use_scale_shift_norm`). Without `emb_dim` the block is
    unconditioned (no `emb_layers`)."""

    def __init__(self, c_in: int, c_out: int, emb_dim: int | None, dropout: float, groups: int = 32):
        super().__init__()
        self.in_layers = nn.Sequential(GroupNorm32(c_in, groups), nn.SiLU(), nn.Conv2d(c_in, c_out, 3, padding=1))
        self.emb_layers = nn.Sequential(nn.SiLU(), nn.Linear(emb_dim, 2 * c_out)) if emb_dim else None
        self.out_layers = nn.Sequential(
            GroupNorm32(c_out, groups),
            nn.SiLU(),
            nn.Dropout(dropout),
            zero_module(nn.Conv2d(c_out, c_out, 3, padding=1)),
        )
        self.skip_connection = nn.Identity() if c_in == c_out else nn.Conv2d(c_in, c_out, 1)

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None) -> torch.Tensor:
        h = self.in_layers(x)
        norm, *rest = self.out_layers  # (a slice would build a new Sequential on every call: host time)
        h = norm(h)
        if self.emb_layers is not None:
            scale, shift = self.emb_layers(emb).to(h.dtype)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
            h = h * (1 + scale) + shift
        for layer in rest:
            h = layer(h)
        return self.skip_connection(x) + h


class AttentionBlock(nn.Module):
    """x + proj_out(attention(qkv(GN(x)))) over the HW positions, with `num_heads` heads.

    The qkv channels are head-major, as published: head i owns channels [3 i d, 3 (i + 1) d) of the output,
    [q | k | v] inside (d = C / heads). With `ada_dim`, adaLN conditions the block: GN(x) (1 + scale) + shift
    from SiLU(v) before qkv (zero-initialised; the papers' adaln_attn).
    """

    def __init__(self, channels: int, num_heads: int, ada_dim: int | None = None, groups: int = 32):
        super().__init__()
        if channels % num_heads:
            raise ValueError(f"attention: num_heads={num_heads} must divide channels={channels}")
        self.num_heads = num_heads
        self.norm = GroupNorm32(channels, groups)
        self.ada = zero_module(nn.Linear(ada_dim, 2 * channels)) if ada_dim is not None else None
        self.qkv = nn.Conv1d(channels, 3 * channels, 1)
        self.proj_out = zero_module(nn.Conv1d(channels, channels, 1))

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        b, c, *spatial = x.shape
        x = x.reshape(b, c, -1)  # (B, C, T)
        h = self.norm(x)
        if self.ada is not None:
            scale, shift = self.ada(F.silu(emb))[:, :, None].chunk(2, dim=1)  # (B, C, 1) each
            h = h * (1 + scale) + shift
        qkv = self.qkv(h).reshape(b, self.num_heads, 3, c // self.num_heads, -1)  # (B, heads, 3, d, T)
        q, k, v = (t.transpose(-1, -2) for t in qkv.unbind(2))  # (B, heads, T, d) each
        out = F.scaled_dot_product_attention(q, k, v).transpose(-1, -2).reshape(b, c, -1)  # (B, C, T)
        return (x + self.proj_out(out)).reshape(b, c, *spatial)


class Downsample(nn.Module):
    """A stride-2 3x3 convolution (`op`, IDDPM's conv_resample)."""

    def __init__(self, channels: int):
        super().__init__()
        self.op = nn.Conv2d(channels, channels, 3, stride=2, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.op(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x, then a 3x3 convolution (`conv`)."""

    def __init__(self, channels: int):
        super().__init__()
        self.conv = nn.Conv2d(channels, channels, 3, padding=1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.interpolate(x, scale_factor=2, mode="nearest"))


class EmbedSequential(nn.Sequential):
    """IDDPM's TimestepEmbedSequential: blocks that take the embedding get it."""

    def forward(self, x: torch.Tensor, emb: torch.Tensor | None = None) -> torch.Tensor:
        for layer in self:
            x = layer(x, emb) if isinstance(layer, (ResBlock, AttentionBlock)) else layer(x)
        return x


class IDDPMUNet(nn.Module):
    """IDDPM's U-Net: `net(x, noise_level, cond) -> output` with output (B, out_channels, H, W): eps, and with
    a learned variance (out_channels = 2 C) also the interpolation v in [-1, 1] between log beta~_t and
    log beta_t (see `condlora.diffusion.iddpm`).

    noise_level is what the IDDPM process feeds: the step rescaled to t * 1000 / T. `cond.labels` in
    [0, num_classes) add `label_emb[y]` to the embedding; NULL_LABEL (or no labels) adds nothing, the
    unconditional input of classifier-free guidance (the published network has no null row);
    `cond.class_vector` (B, num_classes) adds class_vector @ label_emb. TimeLoRA reads `cond.step`.

    Args:
        in_channels: image channels.
        model_channels: width of the first level (128 for the papers' CIFAR-10 and ImageNet-64 runs).
        out_channels: output channels (2 * in_channels with a learned variance).
        num_res_blocks: residual blocks per level (decoder: one more).
        attention_resolutions: downsampling factors with attention (CIFAR-10 at 32x32: 2, 4 for 16x16, 8x8).
        dropout: dropout in the residual blocks.
        channel_mult: width multiplier per level ((1, 2, 2, 2) at 32x32, (1, 2, 3, 4) at 64x64).
        num_classes: 0 for an unconditional network.
        num_heads: attention heads (4 in the papers).
        norm_groups: GroupNorm groups (32, as published; fewer lets a narrow network keep several channels
            per group).
        conditioning: baseline, with_lora, lora_only (no time_embed, emb_layers or label_emb, unless UC-LoRA
            reads the embedding) or adaln_attn.
        lora: the LoRA recipe; targets default to every attention block's qkv and proj_out.
    """

    def __init__(
        self,
        in_channels: int = 3,
        model_channels: int = 128,
        out_channels: int = 6,
        num_res_blocks: int = 3,
        attention_resolutions: tuple[int, ...] = (2, 4),
        dropout: float = 0.0,
        channel_mult: tuple[int, ...] = (1, 2, 2, 2),
        num_classes: int = 0,
        num_heads: int = 4,
        norm_groups: int = 32,
        conditioning: ConditioningMode = "baseline",
        lora: LoRASpec | None = None,
    ):
        super().__init__()
        check_mode(conditioning, lora)
        self.model_channels, self.num_classes = model_channels, num_classes
        self.levels = len(channel_mult)
        emb_dim = 4 * model_channels
        keep_embedding = conditioning != "lora_only" or (lora is not None and lora.uc_bases > 0)
        self.time_embed = None
        if keep_embedding:
            self.time_embed = nn.Sequential(nn.Linear(model_channels, emb_dim), nn.SiLU(), nn.Linear(emb_dim, emb_dim))
        self.label_emb = nn.Embedding(num_classes, emb_dim) if num_classes and keep_embedding else None
        res_emb = emb_dim if conditioning in ("baseline", "with_lora") else None
        ada_emb = emb_dim if conditioning == "adaln_attn" else None

        def res(c_in: int, c_out: int) -> ResBlock:
            return ResBlock(c_in, c_out, res_emb, dropout, norm_groups)

        def attn(c: int) -> AttentionBlock:
            return AttentionBlock(c, num_heads, ada_emb, norm_groups)

        self.input_blocks = nn.ModuleList([EmbedSequential(nn.Conv2d(in_channels, model_channels, 3, padding=1))])
        skips, ch, ds = [model_channels], model_channels, 1
        for level, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                layers: list[nn.Module] = [res(ch, mult * model_channels)]
                ch = mult * model_channels
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                self.input_blocks.append(EmbedSequential(*layers))
                skips.append(ch)
            if level != len(channel_mult) - 1:
                self.input_blocks.append(EmbedSequential(Downsample(ch)))
                skips.append(ch)
                ds *= 2
        self.middle_block = EmbedSequential(res(ch, ch), attn(ch), res(ch, ch))
        self.output_blocks = nn.ModuleList()
        for level, mult in reversed(list(enumerate(channel_mult))):
            for i in range(num_res_blocks + 1):
                layers = [res(ch + skips.pop(), model_channels * mult)]
                ch = model_channels * mult
                if ds in attention_resolutions:
                    layers.append(attn(ch))
                if level and i == num_res_blocks:
                    layers.append(Upsample(ch))
                    ds //= 2
                self.output_blocks.append(EmbedSequential(*layers))
        self.out = nn.Sequential(
            GroupNorm32(ch, norm_groups), nn.SiLU(), zero_module(nn.Conv2d(model_channels, out_channels, 3, padding=1))
        )
        self.lora_spec, self._lora_layers = None, []
        if lora is not None and lora.active:
            self.lora_spec = dataclasses.replace(lora.with_targets(IDDPM_ATTENTION_TARGETS), embedding_dim=emb_dim)
            self._lora_layers = inject_lora(self, self.lora_spec)

    def embed(self, noise_level: torch.Tensor, cond: Conditions, dtype: torch.dtype) -> torch.Tensor | None:
        """v = time_embed(sinusoidal(noise_level)) + label_emb[y] (B, 4 model_channels), or None in lora_only."""
        if self.time_embed is None:
            return None
        emb = self.time_embed(timestep_embedding(noise_level, self.model_channels).to(dtype))
        if self.label_emb is None:
            return emb
        if cond.class_vector is not None:
            return emb + cond.class_vector.to(emb.dtype) @ self.label_emb.weight
        if cond.labels is None:
            return emb
        known = cond.labels != NULL_LABEL
        rows = self.label_emb(torch.where(known, cond.labels, 0))
        return emb + rows * known[:, None].to(rows.dtype)  # the null class adds nothing

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, cond: Conditions | None = None) -> torch.Tensor:
        if x.shape[-1] % (1 << (self.levels - 1)) or x.shape[-2] % (1 << (self.levels - 1)):
            raise ValueError(f"input size {tuple(x.shape[-2:])} must halve {self.levels - 1} times exactly")
        cond = cond if cond is not None else Conditions()
        emb = self.embed(noise_level, cond, x.dtype)  # (B, D) or None
        with bind_conditions(self._lora_layers, cond.replace(embedding=emb)):
            skips, h = [], x
            for block in self.input_blocks:
                h = block(h, emb)
                skips.append(h)
            h = self.middle_block(h, emb)
            for block in self.output_blocks:
                h = block(torch.cat([h, skips.pop()], dim=1), emb)
            return self.out(h)
