"""High-level jobs shared by the CLI and notebooks: load a trained model, sample it to files."""

from __future__ import annotations

import dataclasses
import functools
from pathlib import Path

import numpy as np
import torch
from torch import nn

from condlora.conditions import NULL_LABEL, Conditions
from condlora.config import RunConfig, SampleConfig
from condlora.data import read_npz, unscale
from condlora.diffusion import process_for
from condlora.diffusion.generate import generate
from condlora.eval.images import save_grid, save_samples_npz
from condlora.train.checkpoint import Checkpoint, resolve_checkpoint
from condlora.train.weights import restore_network


def load_model(
    checkpoint: str | Path, use_ema: bool = True, device: str | torch.device = "cpu"
) -> tuple[nn.Module, RunConfig, Checkpoint]:
    """Rebuild the network of a checkpoint (a run directory or one checkpoint directory) in eval mode."""
    ckpt = resolve_checkpoint(checkpoint)
    net, cfg = restore_network(ckpt, use_ema)
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
    stats: dict[str, float] = {}
    images, labels = generate(
        net,
        process_for(cfg),
        sample,
        (m.in_channels, m.image_size, m.image_size),
        m.num_classes,
        device,
        progress,
        stats,
    )
    u8 = unscale(images)
    nrow = m.num_classes if (m.num_classes and sample.class_label < 0 and sample.count >= m.num_classes) else None
    png = save_grid(u8, out_prefix.with_name(f"{out_prefix.name}.png"), nrow=nrow)  # a dot in the prefix stays
    cost = {"network_calls_per_sample": stats["network_calls"] / stats["batches"], "sampling_seconds": stats["seconds"]}
    npz = save_samples_npz(u8, labels.numpy(), out_prefix.with_name(f"{out_prefix.name}.npz"), **cost)
    return png, npz


def with_sample_overrides(cfg: RunConfig, **overrides) -> SampleConfig:
    """The run's sample section with the given non-None fields replaced (validated)."""
    given = {k: v for k, v in overrides.items() if v is not None}
    sample = dataclasses.replace(cfg.sample, **given)
    dataclasses.replace(cfg, sample=sample)  # cross-section checks
    return sample


def digit_feature_metrics(
    samples_npz: str | Path, cache_dir: str | Path | None = None, progress: bool = True, **options
) -> dict[str, float]:
    """In-domain FID, precision, recall (k = 3) and diversity of the 28x28 digit samples of an `.npz` (see
    `digit_metrics`)."""
    data = read_npz(Path(samples_npz))
    images = data["images"]
    if images.shape[1:] != (28, 28, 1):
        raise ValueError(f"{samples_npz}: the digit metrics need 28x28 grayscale images, got {images.shape}")
    return digit_metrics(images, data.get("labels"), cache_dir, progress, **options)


def reference_digits(reference: str = "mnist5k") -> np.ndarray:
    """The training split (the one condlora's runs train on) of the dataset `reference`, which must hold
    28x28 grey digits: the reference set of the sample-quality metrics."""
    from condlora.data import load_source, split_indices

    source = load_source(reference)
    if source.images.shape[1:] != (28, 28, 1):
        raise ValueError(f"the digit metrics need a 28x28 grey reference set, {reference} has {source.images.shape}")
    train_idx, _ = split_indices(len(source.labels), 0.1, seed=0)
    return source.images[train_idx]


def digit_metrics(
    images: np.ndarray,
    labels: np.ndarray | None = None,
    cache_dir: str | Path | None = None,
    progress: bool = True,
    accuracy: bool = False,
    dino: str | Path | None = None,
    reference: str = "mnist5k",
) -> dict[str, float]:
    """In-domain FID, precision, recall (k = 3) and diversity of uint8 28x28 digits (N, 28, 28, 1) against
    the training split of MNIST-5k, in the reference classifier's feature space (see `condlora.eval.fid`;
    the FID is not comparable with published FID); with `accuracy`, also the share of samples the
    classifier labels as their class `labels` (class adherence) and the AutoLoRA paper's product of
    diversity and adherence, `div_x`; with `dino` (a local DINOv2 model folder), also the diversity of
    DINOv2 features, `diversity_dino`, which `div_x` then uses, as the paper does. `reference` names the
    dataset whose training split FID, precision and recall compare against (e.g. "mnist5k-bold" for a model
    fine-tuned to that domain); it must hold 28x28 grey digits."""
    from condlora.eval.classifier import cached_digit_classifier, class_accuracy
    from condlora.eval.fid import (
        DigitFeatures,
        cached_features,
        diversity,
        extract,
        frechet_distance_of_features,
        precision_recall,
    )

    if images.shape[1:] != (28, 28, 1):
        raise ValueError(f"the digit metrics need 28x28 grayscale images, got {images.shape}")
    labels = np.zeros(len(images), dtype=np.int64) if labels is None else labels
    real_images = reference_digits(reference)
    classifier = cached_digit_classifier(cache_dir, progress)
    features = DigitFeatures(classifier)
    real = cached_features(real_images, features, cache_dir)
    fake = extract(images, features, name="samples")
    precision, recall = precision_recall(fake, real)
    out = {
        "fid_in_domain": frechet_distance_of_features(fake, real),
        "precision": precision,
        "recall": recall,
        "diversity": diversity(fake, labels),
        "count": len(images),
    }
    if dino is not None:
        from condlora.eval.dino import DinoFeatures

        out["diversity_dino"] = diversity(extract(images, DinoFeatures(dino), name="samples"), labels)
    if accuracy:
        out["accuracy"] = class_accuracy(classifier, images, labels)
        out["div_x"] = out.get("diversity_dino", out["diversity"]) * out["accuracy"]
    return out


def digit_class_accuracy(
    samples_npz: str | Path, cache_dir: str | Path | None = None, progress: bool = True
) -> tuple[float, dict[int, float]]:
    """Accuracy of the reference MNIST classifier on a samples `.npz` (28x28 grayscale, class labels)."""
    from condlora.eval.classifier import cached_digit_classifier, per_class_accuracy

    path = Path(samples_npz)
    if not path.is_file():
        raise FileNotFoundError(f"samples file does not exist: {path}")
    data = read_npz(path)
    if "images" not in data or "labels" not in data:
        raise ValueError(f"{path} is not a samples archive: it lacks 'images' or 'labels' (has {sorted(data)})")
    images, labels = data["images"], data["labels"]
    if images.shape[1:] != (28, 28, 1):
        raise ValueError(f"{path}: class accuracy needs 28x28 grayscale digits, got images of shape {images.shape}")
    if (labels < 0).any() or (labels > 9).any():
        raise ValueError(f"{path}: labels must be digit classes 0-9 (unconditional samples have label -1)")
    net = cached_digit_classifier(cache_dir, progress)
    per_class = per_class_accuracy(net, images, labels)
    overall = float(np.mean([per_class[int(c)] for c in labels]))
    return overall, per_class


def sample_class_vectors(
    net: nn.Module, cfg: RunConfig, vectors: torch.Tensor, seeds: list[int], device: str | torch.device = "cpu"
) -> np.ndarray:
    """uint8 images (N, H, W, C), image i drawn with the class vector `vectors[i]` (N, num_classes) in place of
    a label (interpolated, scaled or negated classes) and seed `seeds[i]`, with the run's sampler and
    guidance; the batches hold `cfg.sample.batch_size` images."""
    from condlora.diffusion import PerSampleNoise, guided
    from condlora.diffusion.generate import check_adapters, sample_guidance

    m, s = cfg.model, cfg.sample
    if vectors.shape != (len(seeds), m.num_classes):
        raise ValueError(f"class vectors must be ({len(seeds)}, {m.num_classes}), got {tuple(vectors.shape)}")
    check_adapters(net, s)
    process = process_for(cfg)
    predict = functools.partial(process.predict, net)
    images = []
    for start in range(0, len(seeds), s.batch_size):
        part = vectors[start : start + s.batch_size].to(device)
        labels = torch.full((len(part),), NULL_LABEL, device=device)
        guidance = sample_guidance(s, Conditions(labels=labels, class_vector=part), len(part), device)
        denoise = guided(predict, guidance, s.branches_per_call)
        noise = PerSampleNoise(seeds[start : start + s.batch_size], device)
        x = process.sample(denoise, noise, (m.in_channels, m.image_size, m.image_size), s)
        images.append(unscale(x.clamp(-1, 1)))
    return np.concatenate(images)


def class_path_grids(
    net: nn.Module,
    cfg: RunConfig,
    first: int,
    second: int,
    out_dir: Path,
    columns: int = 9,
    rows: int = 4,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """Interpolation (alpha c_first + (1 - alpha) c_second) and extrapolation (beta c_first, beta in [-1, 1])
    grids: each row keeps one seed across its columns, so only the class input changes along a row."""
    from condlora.eval.plots import class_path_vectors

    m, s = cfg.model, cfg.sample
    for name, c in (("first", first), ("second", second)):
        if not 0 <= c < m.num_classes:
            raise ValueError(f"class {name}={c} out of range: the model has {m.num_classes} classes")
    paths = []
    for kind, vectors in class_path_vectors(m.num_classes, first, second, columns).items():
        seeds = [s.seed + row for row in range(rows) for _ in range(columns)]
        grid = sample_class_vectors(net, cfg, vectors.repeat(rows, 1), seeds, device)
        paths.append(save_grid(grid, out_dir / f"class-{kind}-{first}-{second}.png", nrow=columns))
    return paths


def lora_figures(
    net: nn.Module,
    cfg: RunConfig,
    out_dir: Path,
    classes: tuple[int, int] | None = (1, 7),
    reference_t: int | None = None,
    device: str | torch.device = "cpu",
) -> list[Path]:
    """All figures that apply to a model: omega heat maps and cosine similarities for every layer with a
    time-dependent bank, their similarity to omega(reference_t), and class interpolation / extrapolation grids."""
    from condlora.eval.plots import (
        omega_over_time,
        plot_omega_cosine,
        plot_omega_table,
        plot_similarity_to_reference,
        time_layers,
    )

    T = cfg.ddpm.num_timesteps
    if reference_t is not None and not 0 <= reference_t < T:
        raise ValueError(f"reference_t must be in [0, {T - 1}], got {reference_t}")
    paths, per_layer = [], {}
    for name, layer in time_layers(net):
        omegas = omega_over_time(net.cpu(), layer, T)
        per_layer[name] = omegas
        if "time" in layer.strategies:
            paths.append(plot_omega_table(omegas, out_dir / f"omega-{name}.png", title=name))
        paths.append(plot_omega_cosine(omegas, out_dir / f"omega-cosine-{name}.png", title=name))
    if per_layer:
        ref = T // 2 if reference_t is None else reference_t
        paths.append(plot_similarity_to_reference(per_layer, ref, out_dir / f"omega-similarity-t{ref}.png"))
    if classes is not None and cfg.model.num_classes > 1:
        paths += class_path_grids(net.to(device), cfg, classes[0], classes[1], out_dir, device=device)
    return paths
