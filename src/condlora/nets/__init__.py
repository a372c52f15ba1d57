"""Backbones and the registry that builds them from a `ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from condlora.config import ModelConfig
from condlora.nets.unet import NULL_LABEL, NanoUNet


def _nano(cfg: ModelConfig) -> nn.Module:
    return NanoUNet(
        in_channels=cfg.in_channels,
        channels=cfg.channels,
        channel_mult=cfg.channel_mult,
        num_res_blocks=cfg.num_res_blocks,
        attn_levels=cfg.attn_levels,
        num_heads=cfg.num_heads,
        num_classes=cfg.num_classes,
        dropout=cfg.dropout,
    )


BACKBONES: dict[str, Callable[[ModelConfig], nn.Module]] = {"nano": _nano}


def build_network(cfg: ModelConfig) -> nn.Module:
    """Instantiate the backbone named by `cfg.backbone`."""
    return BACKBONES[cfg.backbone](cfg)


def count_parameters(net: nn.Module) -> int:
    """Number of trainable parameters."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def summarize(net: nn.Module, cfg: ModelConfig) -> str:
    """Human-readable architecture summary: parameters per top-level module, ending with `parameters: N`."""
    lines = [
        f"backbone: {cfg.backbone}  image: {cfg.in_channels}x{cfg.image_size}x{cfg.image_size}  "
        f"classes: {cfg.num_classes or 'unconditional'}",
    ]
    for name, child in net.named_children():
        n = sum(p.numel() for p in child.parameters())
        lines.append(f"  {name:<14} {type(child).__name__:<12} {n:>12,}")
    attn = [name for name, m in net.named_modules() if type(m).__name__ == "AttentionBlock"]
    lines.append(f"attention blocks: {len(attn)}")
    lines.append(f"parameters: {count_parameters(net)}")
    return "\n".join(lines)


__all__ = ["BACKBONES", "NULL_LABEL", "NanoUNet", "build_network", "count_parameters", "summarize"]
