"""Frechet distance of sample sets (torchmetrics' FrechetInceptionDistance) in an in-domain feature space.

For 28x28 digits the features are the reference digit classifier's last convolutional block, averaged over
positions (64 numbers per image). Such an FID ranks models trained on the same data; it is not comparable
with published FID numbers, which use Inception features of 299x299 RGB images.
"""

from __future__ import annotations

import numpy as np
import torch
from torch import nn

from condlora.data import scale
from condlora.eval.classifier import DigitClassifier

IN_DOMAIN_FID_NAME = "FID (in-domain: MNIST classifier features; not comparable with published FID)"


class DigitFeatures(nn.Module):
    """(B, 1, 28, 28) images in [-1, 1] -> (B, 64) features: the classifier's conv features averaged over
    the 7x7 positions."""

    num_features = 64

    def __init__(self, classifier: DigitClassifier):
        super().__init__()
        self.classifier = classifier.eval()

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.classifier.features(x).mean(dim=(2, 3))


def frechet_distance(
    samples: np.ndarray,
    reference: np.ndarray,
    features: nn.Module,
    batch_size: int = 500,
) -> float:
    """FID between two image sets in the space of `features`.

    Args:
        samples, reference: uint8 images (N, H, W, C) as written to samples archives; at least 2 of each.
        features: maps (B, C, H, W) images in [-1, 1] to (B, D); must have an int `num_features` = D.
        batch_size: images per feature call.
    """
    from torchmetrics.image.fid import FrechetInceptionDistance

    for name, images in (("samples", samples), ("reference", reference)):
        if images.dtype != np.uint8 or images.ndim != 4 or len(images) < 2:
            shape = f"{images.dtype} {images.shape}"
            raise ValueError(f"FID needs at least 2 uint8 {name} images (N, H, W, C), got {shape}")
    fid = FrechetInceptionDistance(feature=features)
    for images, real in ((reference, True), (samples, False)):
        for start in range(0, len(images), batch_size):
            fid.update(scale(images[start : start + batch_size]), real=real)
    return float(fid.compute())
