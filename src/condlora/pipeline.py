"""High-level jobs shared by the CLI and notebooks: load a trained model, sample it to files."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condlora.config import RunConfig, SampleConfig
from condlora.data import unscale
from condlora.diffusion import NoiseSchedule
from condlora.diffusion.generate import generate
from condlora.eval.images import save_grid, save_samples_npz
from condlora.nets import build_network
from condlora.train.checkpoint import Checkpoint, resolve_checkpoint


def schedule_for(cfg: RunConfig) -> NoiseSchedule:
    """The noise schedule a run trains and samples with."""
    d = cfg.diffusion
    return NoiseSchedule.create(d.schedule, d.num_timesteps, d.beta_start, d.beta_end)


def load_model(
    checkpoint: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, Checkpoint]:
    """Rebuild the network of a checkpoint (a run directory or one checkpoint directory) in eval mode."""
    ckpt = resolve_checkpoint(checkpoint)
    cfg = RunConfig.from_dict(ckpt.state["config"])
    net = build_network(cfg.model, cfg.diffusion.num_timesteps)
    net.load_state_dict(ckpt.tensors["ema" if use_ema else "model"])
    return net.to(device).eval(), cfg, ckpt


def sample_to_files(
    net: nn.Module,
    cfg: RunConfig,
    sample: SampleConfig,
    out_prefix: Path,
    device: str | torch.device = "cpu",
    progress: bool = True,
) -> tuple[Path, Path]:
    """Sample as `sample` says and write `<prefix>.png` (a grid, one row per class cycle) and `<prefix>.npz`."""
    m = cfg.model
    images, labels = generate(
        net,
        schedule_for(cfg),
        sample,
        (m.in_channels, m.image_size, m.image_size),
        m.num_classes,
        device,
        progress,
    )
    u8 = unscale(images)
    nrow = m.num_classes if (m.num_classes and sample.class_label < 0 and sample.count >= m.num_classes) else None
    png = save_grid(u8, out_prefix.with_suffix(".png"), nrow=nrow)
    npz = save_samples_npz(u8, labels.numpy(), out_prefix.with_suffix(".npz"))
    return png, npz


def with_sample_overrides(cfg: RunConfig, **overrides) -> SampleConfig:
    """The run's sample section with the given non-None fields replaced (validated)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    sample = dataclasses.replace(cfg.sample, **given)
    RunConfig(cfg.data, cfg.model, cfg.diffusion, cfg.train, sample)  # cross-section checks
    return sample


def digit_class_accuracy(
    samples_npz: str | Path, cache_dir: str | Path | None = None, progress: bool = True
) -> tuple[float, dict[int, float]]:
    """Accuracy of the reference MNIST classifier on a samples `.npz` (28x28 grayscale, class labels)."""
    from condlora.eval.classifier import cached_digit_classifier, per_class_accuracy

    path = Path(samples_npz)
    if not path.is_file():
        raise FileNotFoundError(f"samples file does not exist: {path}")
    try:
        data = np.load(path)
        images, labels = data["images"], data["labels"]
    except (OSError, ValueError, KeyError) as err:
        raise ValueError(f"{path} is not a samples archive with 'images' and 'labels': {err}") from None
    if images.shape[1:] != (28, 28, 1):
        raise ValueError(f"{path}: class accuracy needs 28x28 grayscale digits, got images of shape {images.shape}")
    if (labels < 0).any() or (labels > 9).any():
        raise ValueError(f"{path}: labels must be digit classes 0-9 (unconditional samples have label -1)")
    net = cached_digit_classifier(cache_dir, progress)
    per_class = per_class_accuracy(net, images, labels)
    overall = float(np.mean([per_class[int(c)] for c in labels]))
    return overall, per_class
