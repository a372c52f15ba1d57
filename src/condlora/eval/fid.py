"""Sample quality in a feature space: FID (torchmetrics' FrechetInceptionDistance), precision and recall of
k-NN manifolds (Kynkaenniemi et al. 2019), and diversity (1 - mean pairwise cosine similarity within a
class, as in the AutoLoRA paper).

For 28x28 digits the features are the reference digit classifier's last convolutional block (64 channels
on a 7x7 grid) averaged over the 4 quadrants of the grid (256 numbers per image: pooling everything to 64
numbers loses the digit's shape, so that 500 images of one class "recall" most of MNIST). Such an FID ranks
models trained on the same data; it is not comparable with published FID numbers, which use Inception
features of 299x299 RGB images. Features of a reference set are cached under a SHA-256 of its images and
of the feature network's weights.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from condlora.data import scale
from condlora.eval.classifier import DigitClassifier

IN_DOMAIN_FID_NAME = "FID (in-domain: MNIST classifier features; not comparable with published FID)"


class DigitFeatures(nn.Module):
    """(B, 1, 28, 28) images in [-1, 1] -> (B, 256) features: the classifier's 64 conv channels averaged over
    each quadrant of their 7x7 grid."""

    num_features = 256

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.adaptive_avg_pool2d(self.classifier.features(x), 2).flatten(1)


class _Given(nn.Module):
    """The identity on feature vectors, so torchmetrics' FID can take features computed (and cached) here."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return features


@torch.no_grad()
def extract(images: np.ndarray, features: nn.Module, batch_size: int = 0, name: str = "images") -> torch.Tensor:
    """(N, D) float64 features of uint8 images (N, H, W, C), at least 2 of them (`name` says which set in the
    error), `batch_size` at a time (0: the feature network's `batch_size`, else 500)."""
    batch_size = batch_size or getattr(features, "batch_size", 500)
    if images.dtype != np.uint8 or images.ndim != 4 or len(images) < 2:
        raise ValueError(
            f"feature metrics need at least 2 uint8 {name} (N, H, W, C), got {images.dtype} {images.shape}"
        )
    parts = [features(scale(images[i : i + batch_size])) for i in range(0, len(images), batch_size)]
    return torch.cat(parts).double()


def cached_features(images: np.ndarray, features: nn.Module, cache_dir: str | Path | None = None) -> torch.Tensor:
    """`extract`, cached in `<cache_dir>/condlora/features-<sha256>.safetensors`, keyed by the images, the
    feature network's class and width, and its weights."""
    kind = f"{type(features).__module__}.{type(features).__qualname__}:{getattr(features, 'num_features', '')}"
    digest = hashlib.sha256(images.tobytes() + str(images.shape).encode() + kind.encode())
    for name, tensor in sorted(features.state_dict().items()):
        digest.update(name.encode() + tensor.detach().cpu().contiguous().numpy().tobytes())
    root = Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "condlora"
    path = root / f"features-{digest.hexdigest()[:32]}.safetensors"
    if path.is_file():
        return load_file(str(path))["features"]
    values = extract(images, features)
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({"features": values}, str(tmp))
    os.replace(tmp, path)
    return values


def frechet_distance_of_features(samples: torch.Tensor, reference: torch.Tensor) -> float:
    """FID between two feature sets (N, D) and (M, D), by torchmetrics."""
    from torchmetrics.image.fid import FrechetInceptionDistance

    fid = FrechetInceptionDistance(feature=_Given(reference.shape[1]))
    fid.update(reference, real=True)
    fid.update(samples, real=False)
    return float(fid.compute())


def frechet_distance(samples: np.ndarray, reference: np.ndarray, features: nn.Module) -> float:
    """FID between two uint8 image sets (N, H, W, C) in the space of `features` ((B, C, H, W) in [-1, 1] ->
    (B, D))."""
    fake = extract(samples, features, name="samples")
    return frechet_distance_of_features(fake, extract(reference, features, name="reference"))


def precision_recall(samples: torch.Tensor, reference: torch.Tensor, k: int = 3) -> tuple[float, float]:
    """Improved precision and recall (Kynkaenniemi et al. 2019): each set's manifold is the union of balls
    around its points reaching their k-th nearest neighbour in the set. Precision is the fraction of samples
    inside the reference manifold, recall the fraction of reference points inside the samples' manifold.

    Args:
        samples, reference: (N, D) and (M, D) features, each with more than k points.
        k: the neighbour that sets each ball's radius.
    """
    for name, x in (("samples", samples), ("reference", reference)):
        if len(x) <= k:
            raise ValueError(f"precision / recall with k={k} need more than {k} {name}, got {len(x)}")

    def radii(x: torch.Tensor) -> torch.Tensor:
        return torch.cdist(x, x).kthvalue(k + 1, dim=1).values  # the 1st "neighbour" is the point itself

    def inside(points: torch.Tensor, centres: torch.Tensor) -> float:
        return float((torch.cdist(points, centres) <= radii(centres)[None, :]).any(dim=1).double().mean())

    return inside(samples, reference), inside(reference, samples)


def diversity(features: torch.Tensor, labels: np.ndarray) -> float:
    """1 - mean pairwise cosine similarity of the features within each class (pairs of distinct samples),
    averaged over the classes with at least two samples; the whole set is one class when unlabelled."""
    labels = np.asarray(labels)
    values = []
    for c in np.unique(labels):
        group = torch.nn.functional.normalize(features[torch.from_numpy(labels == c)], dim=1)
        n = len(group)
        if n < 2:
            continue
        similarity = group @ group.T
        values.append(1 - float((similarity.sum() - similarity.diagonal().sum()) / (n * (n - 1))))
    if not values:
        raise ValueError("diversity needs at least two samples of one class")
    return float(np.mean(values))
