"""A small CNN digit classifier trained on real MNIST, used to check that samples show the requested class."""

from __future__ import annotations

import os
import warnings
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from tqdm.auto import tqdm

from condlora.data import ImageSource, load_mnist5k, scale, split_indices


class DigitClassifier(nn.Module):
    """Two conv blocks and a linear head for 28x28 grayscale digits: (B, 1, 28, 28) in [-1, 1] -> (B, 10) logits."""

    def __init__(self, num_classes: int = 10):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(1, 32, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 14x14
            nn.Conv2d(32, 64, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),  # 7x7
        )  # fmt: skip
        self.head = nn.Sequential(nn.Flatten(), nn.Dropout(0.3), nn.Linear(64 * 7 * 7, num_classes))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(x))


def train_digit_classifier(
    source: ImageSource | None = None,
    steps: int = 1500,
    batch_size: int = 128,
    seed: int = 0,
    holdout_fraction: float = 0.1,
    progress: bool = True,
) -> tuple[DigitClassifier, float]:
    """Train the classifier on the training split of MNIST-5k with small random shifts.

    Returns:
        the classifier (eval mode) and its accuracy on the held-out split (the same split the diffusion
        model never trains on with the default data settings).
    """
    source = source or load_mnist5k()
    train_idx, hold_idx = split_indices(len(source.labels), holdout_fraction, seed=0)
    x = scale(source.images[train_idx])
    y = torch.from_numpy(source.labels[train_idx])
    gen = torch.Generator().manual_seed(seed)
    torch.manual_seed(seed)
    net = DigitClassifier(source.num_classes)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-4)
    for step in tqdm(range(steps), disable=not progress, desc="classifier", unit="step"):
        idx = torch.randint(0, len(y), (batch_size,), generator=gen)
        shift = torch.randint(-2, 3, (2,), generator=gen).tolist()
        batch = torch.roll(x[idx], shifts=shift, dims=(2, 3))  # digits sit on a black border: roll is a shift
        for group in opt.param_groups:
            group["lr"] = 2e-3 * (1 - step / steps)
        loss = F.cross_entropy(net(batch), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    net.eval()
    accuracy = class_accuracy(net, source.images[hold_idx], source.labels[hold_idx])
    return net, accuracy


@torch.no_grad()
def predict(net: DigitClassifier, images: np.ndarray, batch_size: int = 500) -> np.ndarray:
    """Predicted class per image; images uint8 (N, 28, 28, 1)."""
    if images.dtype != np.uint8 or images.shape[1:] != (28, 28, 1):
        raise ValueError(f"the digit classifier needs uint8 images of shape (N, 28, 28, 1), got {images.shape}")
    out = [net(scale(images[i : i + batch_size])).argmax(1) for i in range(0, len(images), batch_size)]
    return torch.cat(out).numpy()


def class_accuracy(net: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> float:
    """Fraction of images the classifier assigns to their label."""
    return float((predict(net, images) == labels).mean())


def per_class_accuracy(net: DigitClassifier, images: np.ndarray, labels: np.ndarray) -> dict[int, float]:
    """Accuracy for each label present."""
    hits = predict(net, images) == labels
    return {int(c): float(hits[labels == c].mean()) for c in np.unique(labels)}


def cached_digit_classifier(cache_dir: str | Path | None = None, progress: bool = True) -> DigitClassifier:
    """The reference classifier, trained once (about a minute on a CPU) and then loaded from
    `<cache_dir>/digit-classifier-v1.safetensors` (default: $XDG_CACHE_HOME/condlora or ~/.cache/condlora)."""
    root = Path(cache_dir or os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "condlora"
    path = root / "digit-classifier-v1.safetensors"
    net = DigitClassifier()
    if path.is_file():
        try:
            net.load_state_dict(load_file(str(path)))
            return net.eval()
        except (SafetensorError, RuntimeError) as err:
            warnings.warn(f"ignoring unreadable classifier cache {path} ({err}); retraining", stacklevel=2)
    net, accuracy = train_digit_classifier(progress=progress)
    if progress:
        print(f"reference classifier: {accuracy:.1%} accuracy on held-out real MNIST")
    root.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    save_file({k: v.contiguous() for k, v in net.state_dict().items()}, str(tmp))
    os.replace(tmp, path)
    return net
