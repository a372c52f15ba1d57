"""Backbones and the registry that builds them from a `ModelConfig`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from condlora.config import ModelConfig
from condlora.lora import ConditionedLoRA, LoRASpec
from condlora.nets.unet import NULL_LABEL, NanoUNet


def lora_spec(cfg: ModelConfig, num_timesteps: int) -> LoRASpec | None:
    """The LoRA recipe a model config asks for, or None."""
    spec = LoRASpec(
        targets=cfg.lora_targets,
        rank=cfg.lora_rank,
        time=cfg.time_lora,
        num_timesteps=num_timesteps,
        time_bases=cfg.time_bases,
        omega_trainable=cfg.omega == "train",
        omega_init=cfg.omega_init,
        classes=cfg.class_lora,
        num_classes=cfg.num_classes,
        class_bases=cfg.class_bases,
        uc_bases=cfg.uc_bases,
        uc_widths=cfg.uc_widths,
        basis_bias=cfg.lora_bias,
    )
    return spec if spec.active else None


def _nano(cfg: ModelConfig, num_timesteps: int) -> nn.Module:
    return NanoUNet(
        in_channels=cfg.in_channels,
        channels=cfg.channels,
        channel_mult=cfg.channel_mult,
        num_res_blocks=cfg.num_res_blocks,
        attn_levels=cfg.attn_levels,
        num_heads=cfg.num_heads,
        num_classes=cfg.num_classes,
        dropout=cfg.dropout,
        conditioning=cfg.conditioning,
        lora=lora_spec(cfg, num_timesteps),
    )


BACKBONES: dict[str, Callable[[ModelConfig, int], nn.Module]] = {"nano": _nano}


def build_network(cfg: ModelConfig, num_timesteps: int = 1000) -> nn.Module:
    """Instantiate the backbone named by `cfg.backbone`; `num_timesteps` sizes TimeLoRA's omega tables."""
    return BACKBONES[cfg.backbone](cfg, num_timesteps)


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
    lora = [m for m in net.modules() if isinstance(m, ConditionedLoRA)]
    lines.append(f"conditioning: {cfg.conditioning}  attention blocks: {len(attn)}  LoRA layers: {len(lora)}")
    if lora:
        n_lora = sum(p.numel() for m in lora for n, p in m.named_parameters() if not n.startswith("base_layer."))
        lines.append(f"LoRA and conditioning parameters: {n_lora}")
    lines.append(f"parameters: {count_parameters(net)}")
    return "\n".join(lines)


__all__ = ["BACKBONES", "NULL_LABEL", "NanoUNet", "build_network", "count_parameters", "summarize"]
