"""Tests for condlora.data: loaders, error messages, splits, scaling, augmentation, DataLoader use."""

from __future__ import annotations

import pickle
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image
from torch.utils.data import DataLoader

from condlora.config import ConfigError
from condlora.data import (
    DataError,
    ImageDataset,
    build_datasets,
    load_cifar10,
    load_image_folder,
    load_mnist5k,
    load_npz,
    load_sklearn_digits,
    load_source,
    random_hflip,
    scale,
    split_indices,
    unscale,
)
from condlora.presets import build_config


def _save_png(path: Path, arr: np.ndarray) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(arr).save(path)


def _fake_cifar(root: Path, n_per_batch: int = 20, batches: int = 2) -> np.ndarray:
    """Write tiny CIFAR-10 batches; return the channel-first data of data_batch_1."""
    root.mkdir()
    rng = np.random.default_rng(0)
    first = None
    for b in range(1, batches + 1):
        data = rng.integers(0, 256, size=(n_per_batch, 3072), dtype=np.uint8)
        labels = [int(v) for v in rng.integers(0, 10, size=n_per_batch)]
        with open(root / f"data_batch_{b}", "wb") as f:
            pickle.dump({b"data": data, b"labels": labels}, f)
        first = data if first is None else first
    names = [n.encode() for n in ("a", "b", "c", "d", "e", "f", "g", "h", "i", "j")]
    with open(root / "batches.meta", "wb") as f:
        pickle.dump({b"label_names": names}, f)
    return first


def test_mnist5k_shape_labels_and_range() -> None:
    src = load_mnist5k()
    assert src.images.shape == (5000, 28, 28, 1) and src.images.dtype == np.uint8
    assert src.labels.dtype == np.int64
    assert np.bincount(src.labels).tolist() == [500] * 10
    assert src.num_classes == 10 and len(src.class_names) == 10
    assert src.images.min() == 0 and src.images.max() == 255
    # Real digits: borders are blank, the centre has ink.
    assert src.images[:, 0, :, 0].max() == 0 and src.images[:, 10:18, 10:18].mean() > 50


def test_sklearn_digits_shape_and_rescale() -> None:
    src = load_sklearn_digits()
    assert src.images.shape == (1797, 8, 8, 1) and src.images.dtype == np.uint8
    assert src.images.max() == 255 and src.num_classes == 10
    assert set(np.unique(src.labels)) == set(range(10))


def test_split_deterministic_disjoint_covering() -> None:
    tr, ho = split_indices(103, 0.2, seed=7)
    tr2, ho2 = split_indices(103, 0.2, seed=7)
    assert np.array_equal(tr, tr2) and np.array_equal(ho, ho2)
    assert len(ho) == round(103 * 0.2) and len(tr) + len(ho) == 103
    assert not set(tr) & set(ho)
    assert np.array_equal(np.sort(np.concatenate([tr, ho])), np.arange(103))
    assert np.all(np.diff(tr) > 0) and np.all(np.diff(ho) > 0)
    assert not np.array_equal(ho, split_indices(103, 0.2, seed=8)[1])
    assert len(split_indices(10, 0.0, 0)[1]) == 0
    with pytest.raises(DataError, match="holdout_fraction"):
        split_indices(10, 1.0, 0)


def test_image_folder_class_subfolders(tmp_path: Path) -> None:
    for name, value in (("zebra", 200), ("ant", 10), ("cat", 100)):
        for j in range(3):
            _save_png(tmp_path / name / f"{j}.png", np.full((6, 5), value + j, dtype=np.uint8))
    src = load_image_folder(tmp_path)
    assert src.class_names == ("ant", "cat", "zebra")
    assert src.images.shape == (9, 6, 5, 1)
    assert src.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2]
    # Labels must follow the pixels that were written for each class.
    assert src.images[src.labels == 2].min() >= 200 and src.images[src.labels == 0].max() <= 12


def test_image_folder_flat_and_mixed_modes(tmp_path: Path) -> None:
    _save_png(tmp_path / "a.png", np.full((4, 4), 50, dtype=np.uint8))
    _save_png(tmp_path / "b.png", np.zeros((4, 4, 3), dtype=np.uint8) + np.array([255, 0, 0], np.uint8))
    src = load_image_folder(tmp_path)
    assert src.images.shape == (2, 4, 4, 3) and src.num_classes == 1
    assert src.labels.tolist() == [0, 0]
    assert src.images[0, 0, 0].tolist() == [50, 50, 50] and src.images[1, 0, 0].tolist() == [255, 0, 0]


def test_image_folder_errors(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="dataset path does not exist"):
        load_image_folder(tmp_path / "nope")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(DataError, match="no images found"):
        load_image_folder(empty)

    mixed = tmp_path / "mixed"
    _save_png(mixed / "a.png", np.zeros((8, 8), dtype=np.uint8))
    _save_png(mixed / "b.png", np.zeros((9, 8), dtype=np.uint8))
    with pytest.raises(DataError) as err:
        load_image_folder(mixed)
    assert "b.png" in str(err.value) and "8x9" in str(err.value) and "8x8" in str(err.value)

    corrupt = tmp_path / "corrupt"
    _save_png(corrupt / "ok.png", np.zeros((8, 8), dtype=np.uint8))
    (corrupt / "bad.png").write_bytes(b"\x89PNG\r\n\x1a\n not really a png")
    with pytest.raises(DataError, match="bad.png"):
        load_image_folder(corrupt)


@pytest.mark.parametrize("channel_first", [False, True])
def test_npz_round_trip(tmp_path: Path, channel_first: bool) -> None:
    rng = np.random.default_rng(1)
    images = rng.integers(0, 256, size=(6, 5, 4, 3), dtype=np.uint8)
    labels = np.array([0, 1, 2, 0, 1, 2])
    stored = images.transpose(0, 3, 1, 2) if channel_first else images
    np.savez(tmp_path / "d.npz", images=stored, labels=labels)
    src = load_npz(tmp_path / "d.npz")
    assert np.array_equal(src.images, images)
    assert src.labels.tolist() == labels.tolist() and src.num_classes == 3


def test_npz_grayscale_without_labels(tmp_path: Path) -> None:
    np.savez(tmp_path / "g.npz", images=np.zeros((3, 7, 7), dtype=np.uint8))
    src = load_source(str(tmp_path / "g.npz"))
    assert src.images.shape == (3, 7, 7, 1) and src.num_classes == 1 and src.labels.tolist() == [0, 0, 0]


def test_npz_errors(tmp_path: Path) -> None:
    imgs = np.zeros((4, 5, 5), dtype=np.uint8)
    np.savez(tmp_path / "neg.npz", images=imgs, labels=np.array([0, 1, -1, 0]))
    with pytest.raises(DataError, match=r"neg\.npz.*label -1"):
        load_npz(tmp_path / "neg.npz")
    np.savez(tmp_path / "big.npz", images=imgs, labels=np.array([0, 1, 5, 0]), num_classes=3)
    with pytest.raises(DataError, match=r"label 5 .*\[0, 3\)"):
        load_npz(tmp_path / "big.npz")
    np.savez(tmp_path / "shape.npz", images=np.zeros((4, 5, 5, 7), dtype=np.uint8))
    with pytest.raises(DataError, match=r"shape\.npz.*\(4, 5, 5, 7\)"):
        load_npz(tmp_path / "shape.npz")
    np.savez(tmp_path / "dtype.npz", images=np.zeros((4, 5, 5), dtype=np.float32))
    with pytest.raises(DataError, match="float32"):
        load_npz(tmp_path / "dtype.npz")
    np.savez(tmp_path / "count.npz", images=imgs, labels=np.array([0, 1]))
    with pytest.raises(DataError, match="4 images but 2 labels"):
        load_npz(tmp_path / "count.npz")


def test_cifar10_batches(tmp_path: Path) -> None:
    first = _fake_cifar(tmp_path / "cifar")
    src = load_source(str(tmp_path / "cifar"))
    assert src.images.shape == (40, 32, 32, 3) and src.name == "cifar10"
    assert src.class_names[:2] == ("a", "b") and src.num_classes == 10
    # Channel-first row layout: red plane, then green, then blue; pixel (y=2, x=5) of image 3.
    r, g, b = (first[3, c * 1024 + 2 * 32 + 5] for c in range(3))
    assert src.images[3, 2, 5].tolist() == [r, g, b]


def test_cifar10_truncated_batch(tmp_path: Path) -> None:
    root = tmp_path / "cifar"
    _fake_cifar(root)
    blob = (root / "data_batch_2").read_bytes()
    (root / "data_batch_2").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match="data_batch_2"):
        load_cifar10(root)


def test_load_source_rejects_unknown(tmp_path: Path) -> None:
    with pytest.raises(DataError, match="does not exist"):
        load_source(str(tmp_path / "missing"))
    (tmp_path / "x.txt").write_text("hi")
    with pytest.raises(DataError, match="mnist5k"):
        load_source(str(tmp_path / "x.txt"))


def test_scale_exact_and_round_trip() -> None:
    u8 = np.arange(256, dtype=np.uint8).reshape(1, 16, 16, 1)
    x = scale(u8)
    assert x.shape == (1, 1, 16, 16) and x.dtype == torch.float32
    assert x.min().item() == -1.0 and x.max().item() == 1.0
    assert np.array_equal(unscale(x), u8)
    assert unscale(torch.full((1, 3, 2, 2), 5.0)).max() == 255  # clipped, not wrapped


def test_image_dataset_items_and_build(tmp_path: Path) -> None:
    images = np.array([0, 255], dtype=np.uint8).reshape(2, 1, 1, 1).repeat(4, 1).repeat(3, 2)
    ds = ImageDataset(images, np.array([1, 0]), num_classes=2)
    x, y = ds[0]
    assert x.shape == (1, 4, 3) and x.dtype == torch.float32 and torch.all(x == -1.0) and y == 1
    assert torch.all(ds[1][0] == 1.0) and ds.image_size == (4, 3) and ds.channels == 1
    np.savez(tmp_path / "d.npz", images=np.zeros((20, 8, 8), dtype=np.uint8), labels=np.arange(20) % 4)
    train, hold, src = build_datasets(str(tmp_path / "d.npz"), holdout_fraction=0.25, image_size=16)
    assert (len(train), len(hold)) == (15, 5) and train.image_size == (16, 16) and hold.num_classes == 4
    assert src.images.shape == (20, 16, 16, 1)


def test_random_hflip_reproducible_and_exact() -> None:
    # Distinct values everywhere so a flipped sample cannot equal the original.
    x = torch.arange(16 * 2 * 3 * 5, dtype=torch.float32).reshape(16, 2, 3, 5)
    out1 = random_hflip(x, torch.Generator().manual_seed(3))
    out2 = random_hflip(x, torch.Generator().manual_seed(3))
    assert torch.equal(out1, out2)
    flipped = [i for i in range(16) if not torch.equal(out1[i], x[i])]
    assert 0 < len(flipped) < 16
    expected_mask = torch.rand(16, generator=torch.Generator().manual_seed(3)) < 0.5
    assert flipped == expected_mask.nonzero().flatten().tolist()
    for i in range(16):
        assert torch.equal(out1[i], torch.flip(x[i], dims=[-1]) if i in flipped else x[i])
    assert torch.equal(random_hflip(x, torch.Generator(), p=0.0), x)
    assert torch.equal(random_hflip(x, torch.Generator(), p=1.0), x.flip(-1))


def test_dataloader_with_workers() -> None:
    rng = np.random.default_rng(0)
    ds = ImageDataset(rng.integers(0, 256, (24, 4, 4, 3), dtype=np.uint8), np.arange(24) % 3, 3)
    loader = DataLoader(ds, batch_size=5, num_workers=2, shuffle=False)
    xs, ys = zip(*loader, strict=True)
    x, y = torch.cat(xs), torch.cat(ys)
    assert x.shape == (24, 3, 4, 4) and y.dtype == torch.int64
    assert torch.equal(y, torch.arange(24) % 3)
    assert torch.equal(x, torch.stack([ds[i][0] for i in range(24)]))


def test_thicken_is_a_grey_dilation_by_a_square():
    from condlora.data import thicken

    image = np.zeros((1, 7, 7, 1), np.uint8)
    image[0, 3, 3, 0], image[0, 0, 6, 0] = 200, 90  # a centre dot and a corner dot
    out = thicken(image)[0, :, :, 0]
    expected = np.zeros((7, 7), np.uint8)
    expected[0:2, 5:7] = 90  # the corner's 3x3 neighbourhood, clipped by the border
    expected[2:5, 2:5] = 200
    assert np.array_equal(out, expected)
    assert np.array_equal(thicken(image, radius=0), image)


def test_bold_mnist_has_the_same_digits_with_more_ink():
    from condlora.data import load_mnist5k, load_source

    plain, bold = load_mnist5k(), load_source("mnist5k-bold")
    assert np.array_equal(plain.labels, bold.labels) and bold.name == "mnist5k-bold"
    assert (bold.images >= plain.images).all()  # dilation only adds ink
    ink = (bold.images > 127).sum() / (plain.images > 127).sum()
    assert 1.5 < ink < 3.5  # a 3x3 dilation of ~2-pixel strokes roughly doubles the ink


def test_max_per_class_keeps_a_few_shot_training_set():
    full, hold, _ = build_datasets("mnist5k", 0.1, 0)
    few, few_hold, _ = build_datasets("mnist5k", 0.1, 0, max_per_class=10)
    assert np.bincount(few.labels.numpy(), minlength=10).tolist() == [10] * 10
    assert len(few_hold) == len(hold)  # the hold-out set is unchanged
    again, _, _ = build_datasets("mnist5k", 0.1, 0, max_per_class=10)
    assert torch.equal(again.images, few.images)  # the same ten per class every time
    with pytest.raises(ConfigError, match="max_per_class"):
        build_config("mnist-nano", {"data": {"max_per_class": -1}})
