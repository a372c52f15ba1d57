"""Saving samples: PNG grids and `.npz` archives of uint8 images with their labels."""

from __future__ import annotations

import math
import os
from pathlib import Path

import numpy as np
from PIL import Image


def make_grid(images: np.ndarray, nrow: int | None = None, pad: int = 2, zoom: int = 1) -> np.ndarray:
    """Tile uint8 images (N, H, W, C) into one (rows*(H+pad)+pad, ...) image, row-major, on black.

    Args:
        images: uint8 (N, H, W, C) with C in {1, 3}.
        nrow: images per row (default: ceil(sqrt(N))).
        pad: pixels between tiles.
        zoom: integer nearest-neighbour enlargement of each tile (small digits are hard to see).
    """
    if images.dtype != np.uint8 or images.ndim != 4:
        raise ValueError(f"make_grid expects uint8 (N, H, W, C), got {images.dtype} {images.shape}")
    n, h, w, c = images.shape
    if zoom > 1:
        images = images.repeat(zoom, axis=1).repeat(zoom, axis=2)
        h, w = h * zoom, w * zoom
    ncol = nrow or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncol)
    grid = np.zeros((nrows * (h + pad) + pad, ncol * (w + pad) + pad, c), dtype=np.uint8)
    for i in range(n):
        r, col = divmod(i, ncol)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[top : top + h, left : left + w] = images[i]
    return grid


def save_grid(images: np.ndarray, path: str | Path, nrow: int | None = None, zoom: int = 2) -> Path:
    """Write a PNG grid of uint8 images (N, H, W, C) atomically; returns the path."""
    grid = make_grid(images, nrow=nrow, zoom=zoom)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    Image.fromarray(grid[..., 0] if grid.shape[-1] == 1 else grid).save(tmp, format="PNG")
    os.replace(tmp, path)
    return path


def save_samples_npz(images: np.ndarray, labels: np.ndarray, path: str | Path, **extra: float) -> Path:
    """Write `images` (uint8 (N, H, W, C)), `labels` (int64 (N,), -1 = unconditional) and any scalar `extra`
    (e.g. the sampling cost) atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.npz")
    scalars = {name: np.asarray(value, dtype=np.float64) for name, value in extra.items()}
    np.savez_compressed(tmp, images=images.astype(np.uint8), labels=np.asarray(labels, dtype=np.int64), **scalars)
    os.replace(tmp, path)
    return path
