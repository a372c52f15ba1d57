"""Backbones and the registry that builds them from a `RunConfig`."""

from __future__ import annotations

from collections.abc import Callable

from torch import nn

from condlora.conditions import NULL_LABEL
from condlora.config import RunConfig
from condlora.lora import ConditionedLoRA, LoRASpec
from condlora.nets.unet import NanoUNet


def lora_spec(cfg: RunConfig) -> LoRASpec | None:
    """The LoRA recipe a run asks for, bound to its sizes (the backbone fills in its embedding width), or None."""
    if not cfg.lora.active:
        return None
    return LoRASpec.from_config(cfg.lora, num_timesteps=cfg.ddpm.num_timesteps, num_classes=cfg.model.num_classes)


def _nano(cfg: RunConfig) -> nn.Module:
    arch = cfg.nano
    return NanoUNet(
        in_channels=cfg.model.in_channels,
        channels=arch.channels,
        channel_mult=arch.channel_mult,
        num_res_blocks=arch.num_res_blocks,
        attn_levels=arch.attn_levels,
        num_heads=arch.num_heads,
        num_classes=cfg.model.num_classes,
        dropout=arch.dropout,
        conditioning=cfg.model.conditioning,
        lora=lora_spec(cfg),
    )


def _ddpmpp(cfg: RunConfig) -> nn.Module:
    from condlora.data.augment import AUGMENT_DIM
    from condlora.nets.ddpmpp import SongUNet

    arch, augmented = cfg.ddpmpp, cfg.diffusion.family == "edm" and cfg.edm.augment > 0
    return SongUNet(
        img_resolution=cfg.model.image_size,
        in_channels=cfg.model.in_channels,
        label_dim=cfg.model.num_classes,
        augment_dim=AUGMENT_DIM if augmented else 0,
        model_channels=arch.model_channels,
        channel_mult=arch.channel_mult,
        channel_mult_emb=arch.channel_mult_emb,
        num_blocks=arch.num_blocks,
        attn_resolutions=arch.attn_resolutions,
        dropout=arch.dropout,
        conditioning=cfg.model.conditioning,
        lora=lora_spec(cfg),
    )


def _iddpm(cfg: RunConfig) -> nn.Module:
    from condlora.nets.iddpm import IDDPMUNet

    arch, size = cfg.iddpm, cfg.model.image_size
    learned = cfg.diffusion.family == "iddpm" and cfg.ddpm.learn_sigma
    return IDDPMUNet(
        in_channels=cfg.model.in_channels,
        model_channels=arch.model_channels,
        out_channels=cfg.model.in_channels * (2 if learned else 1),
        num_res_blocks=arch.num_res_blocks,
        attention_resolutions=tuple(size // r for r in arch.attention_resolutions),  # as downsampling factors
        dropout=arch.dropout,
        channel_mult=arch.channel_mult,
        num_classes=cfg.model.num_classes,
        num_heads=arch.num_heads,
        norm_groups=arch.norm_groups,
        conditioning=cfg.model.conditioning,
        lora=lora_spec(cfg),
    )


def _diffusers(cfg: RunConfig) -> nn.Module:
    from condlora.nets.diffusers_unet import DiffusersUNet, load_diffusers_unet

    unet = load_diffusers_unet(cfg.train.init_from)
    return DiffusersUNet(unet, lora_spec(cfg), num_classes=cfg.model.num_classes)


BACKBONES: dict[str, Callable[[RunConfig], nn.Module]] = {
    "nano": _nano,
    "iddpm": _iddpm,
    "ddpmpp": _ddpmpp,
    "diffusers": _diffusers,
}


def build_network(cfg: RunConfig) -> nn.Module:
    """Instantiate the backbone named by `cfg.model.backbone`, with the LoRA of `cfg.lora`.

    The diffusers backbone is read, weights included, from the local folder `cfg.train.init_from`.
    """
    return BACKBONES[cfg.model.backbone](cfg)


def _is_attention(module: nn.Module) -> bool:
    return type(module).__name__ == "AttentionBlock" or bool(getattr(module, "attention", False))


def count_parameters(net: nn.Module, trainable_only: bool = False) -> int:
    """Number of parameters (only those that train, with `trainable_only`)."""
    return sum(p.numel() for p in net.parameters() if p.requires_grad or not trainable_only)


def summarize(net: nn.Module, cfg: RunConfig) -> str:
    """Human-readable architecture summary: parameters per top-level module, ending with `parameters: N`."""
    m = cfg.model
    lines = [
        f"backbone: {m.backbone}  image: {m.in_channels}x{m.image_size}x{m.image_size}  "
        f"classes: {m.num_classes or 'unconditional'}",
    ]
    for name, child in net.named_children():
        n = sum(p.numel() for p in child.parameters())
        lines.append(f"  {name:<14} {type(child).__name__:<12} {n:>12,}")
    attn = [name for name, module in net.named_modules() if _is_attention(module)]
    lora = [module for module in net.modules() if isinstance(module, ConditionedLoRA)]
    lines.append(f"conditioning: {m.conditioning}  attention blocks: {len(attn)}  LoRA layers: {len(lora)}")
    if lora:
        n_lora = sum(p.numel() for layer in lora for n, p in layer.named_parameters() if not n.startswith("base_"))
        lines.append(f"LoRA and conditioning parameters: {n_lora}")
    lines.append(f"parameters: {count_parameters(net)}")
    return "\n".join(lines)


__all__ = ["BACKBONES", "NULL_LABEL", "NanoUNet", "build_network", "count_parameters", "lora_spec", "summarize"]
