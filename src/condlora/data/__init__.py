"""Data layer: dataset loaders, torch datasets, splits, scaling and augmentation."""

from condlora.data.dataset import (
    ImageDataset,
    build_datasets,
    random_hflip,
    resize_images,
    scale,
    split_indices,
    unscale,
)
from condlora.data.sources import (
    DataError,
    ImageSource,
    load_cifar10,
    load_image_folder,
    load_mnist5k,
    load_mnist5k_bold,
    load_npz,
    load_sklearn_digits,
    load_source,
    read_npz,
    thicken,
)

__all__ = [
    "DataError",
    "ImageDataset",
    "ImageSource",
    "build_datasets",
    "load_cifar10",
    "load_image_folder",
    "load_mnist5k",
    "load_mnist5k_bold",
    "load_npz",
    "load_sklearn_digits",
    "load_source",
    "random_hflip",
    "read_npz",
    "resize_images",
    "scale",
    "split_indices",
    "thicken",
    "unscale",
]
