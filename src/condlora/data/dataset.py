"""Torch datasets, deterministic splits, scaling to [-1, 1] and reproducible augmentation."""

from __future__ import annotations

import dataclasses

import numpy as np
import torch
from PIL import Image
from torch.utils.data import Dataset

from condlora.data.sources import DataError, ImageSource, load_source


def _to_unit_range(u8: torch.Tensor) -> torch.Tensor:
    # 0 -> -1 and 255 -> 1 exactly in float32 (127.5 is representable), so scaling is lossless.
    return u8.to(torch.float32) / 127.5 - 1.0


def scale(u8: np.ndarray) -> torch.Tensor:
    """Convert uint8 images to float in [-1, 1]; the inverse of :func:`unscale`.

    Args:
        u8: uint8 array (B, H, W, C).
    Returns:
        float32 tensor (B, C, H, W).
    """
    if u8.dtype != np.uint8 or u8.ndim != 4:
        raise ValueError(f"scale expects uint8 (B, H, W, C), got {u8.dtype} {u8.shape}")
    return _to_unit_range(torch.from_numpy(np.ascontiguousarray(u8)).permute(0, 3, 1, 2))


def unscale(x: torch.Tensor) -> np.ndarray:
    """Convert float images in [-1, 1] to uint8 for saving (values outside are clipped).

    Args:
        x: float tensor (B, C, H, W), any device.
    Returns:
        uint8 array (B, H, W, C).
    """
    if x.ndim != 4:
        raise ValueError(f"unscale expects (B, C, H, W), got shape {tuple(x.shape)}")
    u8 = ((x.detach().float().clamp(-1.0, 1.0) + 1.0) * 127.5).round().to(torch.uint8)
    return u8.permute(0, 2, 3, 1).cpu().numpy()


class ImageDataset(Dataset):
    """Labelled images served as float tensors in [-1, 1].

    Data stays a uint8 tensor (4x smaller than float) and is scaled per item; the object is
    plain tensors, so it pickles cleanly into DataLoader worker processes.

    Args:
        images: uint8 array (N, H, W, C), C in {1, 3}.
        labels: integer array (N,) in [0, num_classes).
        num_classes: number of classes K.
    """

    def __init__(self, images: np.ndarray, labels: np.ndarray, num_classes: int) -> None:
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[-1] not in (1, 3):
            raise DataError(f"images must be uint8 (N, H, W, C) with C in {{1, 3}}, got {images.dtype} {images.shape}")
        if labels.shape != (images.shape[0],):
            raise DataError(f"{images.shape[0]} images but labels have shape {labels.shape}")
        self.images = torch.from_numpy(np.ascontiguousarray(images.transpose(0, 3, 1, 2)))
        self.labels = torch.from_numpy(labels.astype(np.int64))
        self._num_classes = int(num_classes)

    def __len__(self) -> int:
        return int(self.images.shape[0])

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        """Return image ``i`` as float32 (C, H, W) in [-1, 1] and its label as an int."""
        return _to_unit_range(self.images[i]), int(self.labels[i])

    def to(self, device: torch.device | str) -> ImageDataset:
        """The same dataset with its (uint8) tensors on `device`, for serving whole batches there."""
        moved = ImageDataset.__new__(ImageDataset)
        moved.images, moved.labels, moved._num_classes = (
            self.images.to(device),
            self.labels.to(device),
            self._num_classes,
        )
        return moved

    def batch(self, indices: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Images `indices` as float32 (B, C, H, W) in [-1, 1] and their labels (B,), where the data lives:
        the same values as stacking `dataset[i]`, in one indexing operation."""
        return _to_unit_range(self.images[indices]), self.labels[indices]

    @property
    def image_size(self) -> tuple[int, int]:
        """Image (H, W)."""
        return int(self.images.shape[2]), int(self.images.shape[3])

    @property
    def channels(self) -> int:
        """Number of channels C."""
        return int(self.images.shape[1])

    @property
    def num_classes(self) -> int:
        """Number of classes K."""
        return self._num_classes


def split_indices(n: int, holdout_fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Deterministically split ``range(n)`` into sorted train and hold-out index arrays.

    Args:
        n: number of samples.
        holdout_fraction: share held out, in [0, 1); hold-out size is round(n * fraction).
        seed: seed for ``np.random.default_rng``; same arguments give the same split.
    Returns:
        (train_idx, holdout_idx), int64 arrays, disjoint, together covering range(n).
    """
    if not 0.0 <= holdout_fraction < 1.0:
        raise DataError(f"holdout_fraction must be in [0, 1), got {holdout_fraction}")
    n_hold = round(n * holdout_fraction)
    if n > 0 and n_hold >= n:
        raise DataError(f"holdout_fraction {holdout_fraction} of {n} samples leaves no training data")
    perm = np.random.default_rng(seed).permutation(n)
    return np.sort(perm[n_hold:]), np.sort(perm[:n_hold])


def resize_images(images: np.ndarray, size: int) -> np.ndarray:
    """Resize uint8 images to size x size with Pillow's bilinear filter.

    Args:
        images: uint8 array (N, H, W, C), C in {1, 3}.
        size: target height and width.
    Returns:
        uint8 array (N, size, size, C).
    """
    out = np.empty((images.shape[0], size, size, images.shape[3]), dtype=np.uint8)
    for i, img in enumerate(images):
        # Pillow wants 2-D arrays for single-channel images.
        pil = Image.fromarray(img[..., 0] if img.shape[2] == 1 else img)
        out[i] = np.asarray(pil.resize((size, size), Image.Resampling.BILINEAR)).reshape(size, size, -1)
    return out


def build_datasets(
    spec: str,
    holdout_fraction: float = 0.1,
    split_seed: int = 0,
    image_size: int | None = None,
    max_per_class: int = 0,
) -> tuple[ImageDataset, ImageDataset, ImageSource]:
    """Load a dataset, optionally resize it, and split it into train and hold-out sets.

    If ``image_size`` is given and differs from the source's (H, W), every image is resized to
    image_size x image_size (bilinear) and the returned source holds the resized images.

    Args:
        spec: dataset spec accepted by :func:`condlora.data.sources.load_source`.
        holdout_fraction: share of samples held out, in [0, 1).
        split_seed: seed of the deterministic split.
        image_size: optional square output size in pixels.
        max_per_class: if > 0, train on only the first `max_per_class` training images of each class (a
            few-shot set; which ones depends only on the split); the hold-out set is unchanged.
    Returns:
        (train set, hold-out set, source).
    """
    source = load_source(spec)
    if image_size is not None:
        if image_size < 1:
            raise DataError(f"image_size must be a positive int, got {image_size}")
        if source.image_size != (image_size, image_size):
            source = dataclasses.replace(source, images=resize_images(source.images, image_size))
    train_idx, hold_idx = split_indices(len(source.labels), holdout_fraction, split_seed)
    if max_per_class > 0:
        labels = source.labels[train_idx]
        keep = np.zeros(len(train_idx), dtype=bool)
        for c in np.unique(labels):
            keep[np.flatnonzero(labels == c)[:max_per_class]] = True
        train_idx = train_idx[keep]
    k = source.num_classes
    train = ImageDataset(source.images[train_idx], source.labels[train_idx], k)
    hold = ImageDataset(source.images[hold_idx], source.labels[hold_idx], k)
    return train, hold, source


def random_hflip(x: torch.Tensor, generator: torch.Generator, p: float = 0.5) -> torch.Tensor:
    """Flip each image of a batch left-right with probability ``p``, reproducibly.

    Args:
        x: tensor (B, C, H, W).
        generator: torch generator on x's device; one uniform draw per sample decides its flip.
        p: flip probability.
    Returns:
        tensor (B, C, H, W); sample i is flipped iff its draw is < p.
    """
    flip = torch.rand(x.shape[0], generator=generator, device=x.device) < p
    return torch.where(flip[:, None, None, None], x.flip(-1), x)
