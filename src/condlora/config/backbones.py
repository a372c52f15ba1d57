"""Architecture sections of the backbones: one section per network family, read only by its builder."""

from __future__ import annotations

from dataclasses import dataclass

from condlora.config.fields import check, check_fields, setting


@dataclass
class NanoConfig:
    """Architecture of the nano U-Net (model.backbone = nano)."""

    channels: int = setting(16, "width of the first resolution level")
    channel_mult: tuple[int, ...] = setting((1, 2, 3), "width multiplier per resolution level, e.g. 1,2,3")
    num_res_blocks: int = setting(1, "residual blocks per level on the way down (one more on the way up)")
    attn_levels: tuple[int, ...] = setting((2,), "indices of the levels with self-attention, e.g. 2 or 1,2")
    num_heads: int = setting(4, "attention heads; must divide the width of every attention level")
    dropout: float = setting(0.0, "dropout probability in the residual blocks, in [0, 1)")

    def __post_init__(self) -> None:
        check_fields(self, "nano")
        check(self.channels >= 4, "nano", "channels", "must be >= 4", self.channels)
        check(
            len(self.channel_mult) > 0 and min(self.channel_mult) >= 1,
            "nano",
            "channel_mult",
            "must be a non-empty list of integers >= 1",
            self.channel_mult,
        )
        check(self.num_res_blocks >= 1, "nano", "num_res_blocks", "must be >= 1", self.num_res_blocks)
        levels = len(self.channel_mult)
        check(
            all(0 <= a < levels for a in self.attn_levels),
            "nano",
            "attn_levels",
            f"each level must be in [0, {levels - 1}]",
            self.attn_levels,
        )
        widths = {self.channels * self.channel_mult[a] for a in self.attn_levels} | {
            self.channels * self.channel_mult[-1]
        }
        check(
            self.num_heads >= 1 and all(w % self.num_heads == 0 for w in widths),
            "nano",
            "num_heads",
            f"must divide the attention widths {sorted(widths)}",
            self.num_heads,
        )
        check(0 <= self.dropout < 1, "nano", "dropout", "must be in [0, 1)", self.dropout)


@dataclass
class DdpmppConfig:
    """Architecture of EDM's DDPM++ U-Net (model.backbone = ddpmpp); defaults are EDM's CIFAR-10 network."""

    model_channels: int = setting(128, "width multiplier of every level")
    channel_mult: tuple[int, ...] = setting(
        (2, 2, 2), "width per resolution level: 2,2,2 (CIFAR-10), 1,2,2,2 (FFHQ-64)"
    )
    channel_mult_emb: int = setting(4, "the condition embedding is channel_mult_emb * model_channels wide")
    num_blocks: int = setting(4, "residual blocks per level (the decoder has one more)")
    attn_resolutions: tuple[int, ...] = setting((16,), "resolutions with self-attention, e.g. 16")
    dropout: float = setting(0.13, "dropout probability in the residual blocks, in [0, 1)")

    def __post_init__(self) -> None:
        check_fields(self, "ddpmpp")
        check(self.model_channels >= 4, "ddpmpp", "model_channels", "must be >= 4", self.model_channels)
        check(
            len(self.channel_mult) > 0 and min(self.channel_mult) >= 1,
            "ddpmpp",
            "channel_mult",
            "must be a non-empty list of integers >= 1",
            self.channel_mult,
        )
        check(self.channel_mult_emb >= 1, "ddpmpp", "channel_mult_emb", "must be >= 1", self.channel_mult_emb)
        check(self.num_blocks >= 1, "ddpmpp", "num_blocks", "must be >= 1", self.num_blocks)
        check(0 <= self.dropout < 1, "ddpmpp", "dropout", "must be in [0, 1)", self.dropout)


@dataclass
class IddpmConfig:
    """Architecture of IDDPM's U-Net (model.backbone = iddpm); defaults are the papers' CIFAR-10 network."""

    model_channels: int = setting(128, "width of the first level (a multiple of norm_groups)")
    channel_mult: tuple[int, ...] = setting((1, 2, 2, 2), "width per level: 1,2,2,2 at 32x32, 1,2,3,4 at 64x64")
    num_res_blocks: int = setting(3, "residual blocks per level (the decoder has one more)")
    attention_resolutions: tuple[int, ...] = setting((16, 8), "resolutions with self-attention, e.g. 16,8")
    num_heads: int = setting(4, "attention heads; must divide the width of every attention level")
    dropout: float = setting(0.0, "dropout probability in the residual blocks, in [0, 1) (0.3 for CIFAR-10)")
    norm_groups: int = setting(32, "GroupNorm groups: 32 as published; fewer keeps narrow networks group-normed")

    def __post_init__(self) -> None:
        check_fields(self, "iddpm")
        check(self.norm_groups >= 1, "iddpm", "norm_groups", "must be >= 1", self.norm_groups)
        check(
            len(self.channel_mult) > 0 and min(self.channel_mult) >= 1,
            "iddpm",
            "channel_mult",
            "must be a non-empty list of integers >= 1",
            self.channel_mult,
        )
        check(
            self.model_channels >= 1 and self.model_channels % self.norm_groups == 0,
            "iddpm",
            "model_channels",
            f"must be a positive multiple of norm_groups = {self.norm_groups}",
            self.model_channels,
        )
        check(self.num_res_blocks >= 1, "iddpm", "num_res_blocks", "must be >= 1", self.num_res_blocks)
        widths = {self.model_channels * m for m in self.channel_mult}
        check(
            self.num_heads >= 1 and all(w % self.num_heads == 0 for w in widths),
            "iddpm",
            "num_heads",
            f"must divide the level widths {sorted(widths)}",
            self.num_heads,
        )
        check(0 <= self.dropout < 1, "iddpm", "dropout", "must be in [0, 1)", self.dropout)
