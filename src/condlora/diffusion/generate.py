"""Draw a set of images from a network with a configured sampler, batch by batch."""

from __future__ import annotations

import time

import torch
from torch import nn
from tqdm.auto import tqdm

from condlora.conditions import NULL_LABEL, Conditions
from condlora.config import SampleConfig
from condlora.diffusion.guidance import Guidance, autolora, classifier_free, guided, with_lora_scale
from condlora.diffusion.process import Network, Process
from condlora.diffusion.samplers import PerSampleNoise
from condlora.lora import keep_stacks


def sample_labels(cfg: SampleConfig, num_classes: int) -> torch.Tensor:
    """(count,) labels: all `cfg.class_label`, or 0, 1, ..., K-1, 0, 1, ... ; NULL_LABEL when unconditional."""
    if num_classes == 0:
        return torch.full((cfg.count,), NULL_LABEL, dtype=torch.long)
    if cfg.class_label >= num_classes:
        raise ValueError(f"class_label {cfg.class_label} out of range: the model has {num_classes} classes")
    if cfg.class_label >= 0:
        return torch.full((cfg.count,), cfg.class_label, dtype=torch.long)
    return torch.arange(cfg.count) % num_classes


def batch_conditions(labels: torch.Tensor, num_classes: int, device: torch.device | str) -> Conditions:
    """The conditions of one sampling batch; `shared` when every sample has the same label (read from the
    host copy of the labels, so no device is synchronised)."""
    shared = bool((labels == labels[0]).all())
    if num_classes == 0:
        return Conditions(shared=True)
    Conditions(labels=labels).check(num_classes=num_classes)  # the boundary: checked once, on the host copy
    return Conditions(labels=labels.to(device), shared=shared)


def sample_guidance(cfg: SampleConfig, cond: Conditions, batch_size: int, device: torch.device | str) -> Guidance:
    """The guidance `cfg` asks for on one batch: classifier-free guidance of the network with its adapters at
    `cfg.lora_scale`, or AutoLoRA (the LoRA model guided by the base, see `autolora`)."""
    if cfg.guidance == "autolora":
        w1 = None if cfg.base_guidance_scale < 0 else cfg.base_guidance_scale
        return autolora(cond, cfg.autolora_gamma, cfg.lora_scale, cfg.guidance_scale, w1, batch_size, device)
    return classifier_free(with_lora_scale(cond, cfg.lora_scale, batch_size, device), cfg.guidance_scale)


def check_adapters(net: nn.Module, cfg: SampleConfig) -> None:
    """The boundary check of a LoRA scale or AutoLoRA: they need a network with LoRA adapters."""
    from condlora.lora import conditioned_layers

    wants = "guidance autolora" if cfg.guidance == "autolora" else f"lora_scale {cfg.lora_scale}"
    if (cfg.guidance == "autolora" or cfg.lora_scale != 1.0) and next(conditioned_layers(net), None) is None:
        raise ValueError(f"sample: {wants} needs a network with LoRA adapters, and this one has none")


@torch.no_grad()
def generate(
    net: Network,
    process: Process,
    cfg: SampleConfig,
    image_shape: tuple[int, int, int],
    num_classes: int,
    device: torch.device | str = "cpu",
    progress: bool = True,
    stats: dict[str, float] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Sample `cfg.count` images; sample i uses seed `cfg.seed + i` whatever the batch size.

    Args:
        net: `net(x, noise_level, cond)`, in eval mode.
        process: the diffusion process it was trained with.
        cfg: sampler, steps, eta, guidance (classifier-free or AutoLoRA, LoRA scale), count, class, seed and
            batch size.
        image_shape: (C, H, W).
        num_classes: classes of the model (0 when unconditional).
        device: where the network runs.
        progress: show a progress bar over batches.
        stats: if given, filled with `network_calls` (calls of the network, each evaluating every guidance
            branch of its batch), `batches` and `seconds` (wall time).
    Returns:
        images (count, C, H, W) in [-1, 1] on the CPU and labels (count,) int64 (NULL_LABEL if unconditional).
    """
    labels = sample_labels(cfg, num_classes)
    check_adapters(net, cfg)
    calls = [0]

    def predict(x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
        calls[0] += 1
        return process.predict(net, x, t, cond)

    began = time.perf_counter()
    chunks = []
    starts = range(0, cfg.count, cfg.batch_size)
    with keep_stacks(net):  # the network stays as it is: its LoRA layers stack their parameters once
        for start in tqdm(starts, disable=not progress, desc="sampling", unit="batch"):
            batch_labels = labels[start : start + cfg.batch_size]
            noise = PerSampleNoise([cfg.seed + start + i for i in range(len(batch_labels))], device)
            cond = batch_conditions(batch_labels, num_classes, device)
            guidance = sample_guidance(cfg, cond, len(batch_labels), device)
            x = process.sample(guided(predict, guidance, cfg.branches_per_call), noise, image_shape, cfg)
            chunks.append(x.clamp(-1, 1).cpu())
    if stats is not None:
        stats.update(network_calls=calls[0], batches=len(starts), seconds=time.perf_counter() - began)
    return torch.cat(chunks), labels
