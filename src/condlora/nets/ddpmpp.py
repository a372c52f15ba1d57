"""EDM's DDPM++ U-Net (Song et al. 2021's architecture as re-implemented by Karras et al. 2022, `SongUNet`).

Same modules, parameter names and shapes as the published network, so its weights load with `strict=True`
(`tests/fixtures/edm-songunet-tiny` checks outputs against the published code). Conditioned like the nano
U-Net in one of four modes (baseline, with_lora, lora_only, adaln_attn); UC-LoRA reads the shared embedding
v = SiLU(map_layer1(SiLU(map_layer0(pos(c_noise) + map_label(y) + map_augment(a))))), 512 wide for CIFAR-10.
"""

from __future__ import annotations

import dataclasses
import math

import torch
import torch.nn.functional as F
from torch import nn

from condlora.conditions import Conditions
from condlora.lora import LoRASpec, bind_conditions, inject_lora
from condlora.nets.unet import ConditioningMode, check_mode
from condlora.ops import zero_module

DDPMPP_ATTENTION_TARGETS = ("*.qkv", "*.proj")
SKIP_SCALE = math.sqrt(0.5)  # every residual sum is scaled back to unit variance


def _init(module: nn.Module, scale: float = 1.0) -> nn.Module:
    """Xavier-uniform weights times `scale` and zero biases (EDM's init for DDPM++)."""
    weight = module.weight
    fan_in, fan_out = weight.shape[1] * weight[0, 0].numel(), weight.shape[0] * weight[0, 0].numel()
    bound = scale * math.sqrt(6 / (fan_in + fan_out))
    nn.init.uniform_(weight, -bound, bound)
    if getattr(module, "bias", None) is not None:
        nn.init.zeros_(module.bias)
    return module


def _linear(c_in: int, c_out: int, bias: bool = True) -> nn.Linear:
    return _init(nn.Linear(c_in, c_out, bias=bias))


def _conv(c_in: int, c_out: int, kernel: int, scale: float = 1.0) -> nn.Conv2d:
    return _init(nn.Conv2d(c_in, c_out, kernel, padding=kernel // 2), scale)


def _norm(channels: int) -> nn.GroupNorm:
    """EDM's GroupNorm: min(32, C / 4) groups, eps 1e-6 in the U-Net."""
    return nn.GroupNorm(min(32, channels // 4), channels, eps=1e-6)


def positional_embedding(noise_level: torch.Tensor, channels: int, max_positions: float = 10_000.0) -> torch.Tensor:
    """DDPM++'s embedding of the noise level: [sin(c f_k), cos(c f_k)], f_k = max_positions^(-k / (channels/2 - 1))
    for k = 0 .. channels/2 - 1 (the endpoint variant: the last frequency is exactly 1 / max_positions).

    Computed in float32 whatever the network's dtype, (B,) -> (B, channels).
    """
    half = channels // 2
    freqs = max_positions ** (-torch.arange(half, dtype=torch.float32, device=noise_level.device) / (half - 1))
    angles = noise_level.float()[:, None] * freqs[None, :]  # (B, half)
    return torch.cat([angles.sin(), angles.cos()], dim=1)


class ResampleConv2d(nn.Module):
    """A convolution after 2x down- or upsampling by a separable FIR filter (DDPM++'s [1, 1]: box pooling on the
    way down, nearest-neighbour on the way up). Parameter and buffer names follow EDM's `Conv2d`."""

    def __init__(self, c_in: int, c_out: int, kernel: int, up: bool, down: bool, filter_taps=(1, 1)):
        super().__init__()
        if up == down:
            raise ValueError("ResampleConv2d resamples: give exactly one of up / down")
        self.up, self.c_in = up, c_in
        self.weight = nn.Parameter(torch.empty(c_out, c_in, kernel, kernel))
        self.bias = nn.Parameter(torch.empty(c_out))
        taps = torch.as_tensor(filter_taps, dtype=torch.float32)
        self.register_buffer("resample_filter", (taps.outer(taps) / taps.sum().square())[None, None])  # (1,1,k,k)
        _init(self)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        f = self.resample_filter.to(x.dtype)
        pad = (f.shape[-1] - 1) // 2
        if self.up:  # zero-stuffing transposed convolution; gain 4 keeps the mean
            x = F.conv_transpose2d(x, (f * 4).tile(self.c_in, 1, 1, 1), groups=self.c_in, stride=2, padding=pad)
        else:
            x = F.conv2d(x, f.tile(self.c_in, 1, 1, 1), groups=self.c_in, stride=2, padding=pad)
        return F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)


class UNetBlock(nn.Module):
    """DDPM++ residual block, optionally resampling and optionally followed by single-head self-attention:

        h = conv1(dropout(SiLU(GN(conv0(SiLU(GN(x))) + affine(v)))));  x = (skip(x) + h) / sqrt(2)
        x = (x + proj(attention(qkv(GN(x))))) / sqrt(2)

    `affine` (a shift per channel from the embedding v) exists in the baseline and with_lora modes. With
    `ada_dim`, attention is conditioned by adaLN instead: GN(x) * (1 + scale) + shift before `qkv`.
    `qkv` and `proj` are 1x1 nn.Conv2d so LoRA can wrap them; the qkv channels are interleaved per
    channel (q, k, v of channel c are outputs 3c, 3c + 1, 3c + 2), as in the published network. It keeps
    its own attention code for that layout (condlora.nets.layers.AttentionBlock is [q | k | v] on tokens).
    """

    def __init__(
        self,
        c_in: int,
        c_out: int,
        emb_dim: int,
        shift: bool,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        dropout: float = 0.0,
        ada_dim: int | None = None,
        num_heads: int = 1,
    ):
        super().__init__()
        self.in_channels, self.out_channels, self.num_heads, self.dropout = c_in, c_out, num_heads, dropout
        self.norm0 = _norm(c_in)
        self.conv0 = ResampleConv2d(c_in, c_out, 3, up, down) if up or down else _conv(c_in, c_out, 3)
        self.affine = _linear(emb_dim, c_out) if shift else None
        self.norm1 = _norm(c_out)
        self.conv1 = _conv(c_out, c_out, 3, scale=1e-5)
        self.skip = None
        if c_in != c_out or up or down:
            self.skip = ResampleConv2d(c_in, c_out, 1, up, down) if up or down else _conv(c_in, c_out, 1)
        self.attention = attention
        if attention:
            self.norm2 = _norm(c_out)
            self.ada = zero_module(nn.Linear(ada_dim, 2 * c_out)) if ada_dim is not None else None
            self.qkv = _conv(c_out, 3 * c_out, 1, scale=math.sqrt(0.2))
            self.proj = _conv(c_out, c_out, 1, scale=1e-5)

    def forward(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        h = self.conv0(F.silu(self.norm0(x)))
        if self.affine is not None:
            h = h + self.affine(emb)[:, :, None, None].to(h.dtype)
        h = self.conv1(F.dropout(F.silu(self.norm1(h)), p=self.dropout, training=self.training))
        x = (h + (self.skip(x) if self.skip is not None else x)) * SKIP_SCALE
        if not self.attention:
            return x
        b, c, height, width = x.shape
        h = self.norm2(x)
        if self.ada is not None:
            scale, shift = self.ada(emb)[:, :, None, None].chunk(2, dim=1)  # (B, C, 1, 1) each
            h = h * (1 + scale) + shift
        q, k, v = self.qkv(h).reshape(b, self.num_heads, c // self.num_heads, 3, height * width).unbind(3)
        out = F.scaled_dot_product_attention(q.transpose(2, 3), k.transpose(2, 3), v.transpose(2, 3))  # (B, h, HW, C/h)
        out = out.transpose(2, 3).reshape(b, c, height, width)
        return (self.proj(out) + x) * SKIP_SCALE


class SongUNet(nn.Module):
    """The DDPM++ U-Net of EDM (config `--arch=ddpmpp`): `net(x, noise_level, cond) -> F`, the raw output that
    EDM's preconditioning (`condlora.diffusion.edm`) turns into a denoiser.

    noise_level is what the family feeds the network (EDM: c_noise = ln(sigma) / 4). `cond.labels` become
    one-hot class vectors (NULL_LABEL: the zero vector, EDM's unconditional input), or `cond.class_vector` is
    used directly; `cond.augment` (B, augment_dim) are the augmentation labels (zeros when absent).

    Args:
        img_resolution: input size (square); must halve exactly len(channel_mult) - 1 times.
        in_channels: image channels (the output has as many).
        label_dim: classes; 0 for an unconditional network.
        augment_dim: augmentation label dimension (9 for EDM's pipeline); 0 for none.
        model_channels: width multiplier (128 for CIFAR-10).
        channel_mult: width per resolution level ((2, 2, 2) for CIFAR-10, (1, 2, 2, 2) for FFHQ-64).
        channel_mult_emb: the embedding is channel_mult_emb * model_channels wide.
        num_blocks: residual blocks per level (decoder: one more).
        attn_resolutions: resolutions whose blocks get self-attention (plus the first decoder block).
        dropout: dropout in the residual blocks.
        conditioning: baseline, with_lora, lora_only or adaln_attn (see `NanoUNet`).
        lora: the LoRA recipe; targets default to every attention block's qkv and proj.
    """

    def __init__(
        self,
        img_resolution: int = 32,
        in_channels: int = 3,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 128,
        channel_mult: tuple[int, ...] = (2, 2, 2),
        channel_mult_emb: int = 4,
        num_blocks: int = 4,
        attn_resolutions: tuple[int, ...] = (16,),
        dropout: float = 0.10,
        conditioning: ConditioningMode = "baseline",
        lora: LoRASpec | None = None,
    ):
        super().__init__()
        check_mode(conditioning, lora)
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise ValueError(f"img_resolution {img_resolution} must halve {len(channel_mult) - 1} times exactly")
        self.label_dim, self.augment_dim, self.noise_channels = label_dim, augment_dim, model_channels
        emb_dim = model_channels * channel_mult_emb
        self.map_label = _linear(label_dim, model_channels) if label_dim else None
        self.map_augment = _linear(augment_dim, model_channels, bias=False) if augment_dim else None
        self.map_layer0 = _linear(model_channels, emb_dim)
        self.map_layer1 = _linear(emb_dim, emb_dim)
        block = dict(
            emb_dim=emb_dim,
            shift=conditioning in ("baseline", "with_lora"),
            dropout=dropout,
            ada_dim=emb_dim if conditioning == "adaln_attn" else None,
        )
        self.enc = nn.ModuleDict()
        c_out = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                c_out = model_channels
                self.enc[f"{res}x{res}_conv"] = _conv(in_channels, c_out, 3)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(c_out, c_out, down=True, **block)
            for idx in range(num_blocks):
                c_in, c_out = c_out, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(c_in, c_out, attention=res in attn_resolutions, **block)
        skips = [b.out_channels for b in self.enc.values()]
        self.dec = nn.ModuleDict()
        self._takes_skip: set[str] = set()  # decoder blocks that first concatenate an encoder output
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(c_out, c_out, attention=True, **block)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(c_out, c_out, **block)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(c_out, c_out, up=True, **block)
            for idx in range(num_blocks + 1):
                name = f"{res}x{res}_block{idx}"
                c_in, c_out = c_out + skips.pop(), model_channels * mult
                attention = idx == num_blocks and res in attn_resolutions
                self.dec[name] = UNetBlock(c_in, c_out, attention=attention, **block)
                self._takes_skip.add(name)
        self.dec[f"{img_resolution}x{img_resolution}_aux_norm"] = _norm(c_out)
        self.dec[f"{img_resolution}x{img_resolution}_aux_conv"] = _conv(c_out, in_channels, 3, scale=1e-5)
        self.lora_spec, self._lora_layers = None, []
        if lora is not None and lora.active:
            self.lora_spec = dataclasses.replace(lora.with_targets(DDPMPP_ATTENTION_TARGETS), embedding_dim=emb_dim)
            self._lora_layers = inject_lora(self, self.lora_spec)

    def class_input(self, cond: Conditions, batch: int, device: torch.device) -> torch.Tensor:
        """(B, label_dim) class vector: cond.class_vector, else one-hot labels (NULL_LABEL or none: zeros)."""
        if cond.class_vector is not None:
            return cond.class_vector.float()
        if cond.labels is None:
            return torch.zeros(batch, self.label_dim, device=device)
        classes = torch.arange(self.label_dim, device=device)
        return (cond.labels[:, None] == classes).float()  # NULL_LABEL matches no class

    def embed(self, noise_level: torch.Tensor, cond: Conditions, dtype: torch.dtype) -> torch.Tensor:
        """The shared embedding v (B, emb_dim)."""
        emb = positional_embedding(noise_level, self.noise_channels).to(dtype)
        if self.map_label is not None:
            y = self.class_input(cond, noise_level.shape[0], noise_level.device)
            emb = emb + self.map_label(y.to(dtype) * math.sqrt(self.label_dim))
        if self.map_augment is not None and cond.augment is not None:
            emb = emb + self.map_augment(cond.augment.to(dtype))
        return F.silu(self.map_layer1(F.silu(self.map_layer0(emb))))

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, cond: Conditions | None = None) -> torch.Tensor:
        cond = cond if cond is not None else Conditions()
        emb = self.embed(noise_level, cond, x.dtype)  # (B, D)
        with bind_conditions(self._lora_layers, cond.replace(embedding=emb)):
            return self._body(x, emb)

    def _body(self, x: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)
        out = None
        for name, block in self.dec.items():
            if name.endswith("aux_norm"):
                out = block(x)
            elif name.endswith("aux_conv"):
                out = block(F.silu(out))
            else:
                if name in self._takes_skip:
                    x = torch.cat([x, skips.pop()], dim=1)
                x = block(x, emb)
        return out
