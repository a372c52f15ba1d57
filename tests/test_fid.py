"""FID: against the closed form for Gaussians, ~0 for a set against itself, growing with a shift."""

import numpy as np
import pytest
import torch
from torch import nn

from condlora.eval.fid import frechet_distance


class _Pixels(nn.Module):
    """Features = the first `num_features` pixel values (the identity on tiny images)."""

    def __init__(self, num_features: int):
        super().__init__()
        self.num_features = num_features

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.flatten(1)[:, : self.num_features]


def _as_images(values: np.ndarray) -> np.ndarray:
    """(N, D) values in [-1, 1] -> uint8 (N, D, 1, 1) images (H = D) whose scaled pixels are those values."""
    u8 = np.clip(np.round((values + 1) * 127.5), 0, 255).astype(np.uint8)
    return u8.reshape(len(values), values.shape[1], 1, 1)


def test_fid_of_two_gaussians_is_the_closed_form():
    rng = np.random.default_rng(0)
    n, d = 20_000, 3
    mu1, mu2 = np.array([0.0, 0.1, -0.1]), np.array([0.2, -0.1, 0.0])
    s1, s2 = np.array([0.2, 0.1, 0.15]), np.array([0.1, 0.2, 0.15])
    a = rng.normal(mu1, s1, size=(n, d))
    b = rng.normal(mu2, s2, size=(n, d))
    # diagonal covariances: FID = |mu1 - mu2|^2 + sum (s1 - s2)^2
    expected = np.sum((mu1 - mu2) ** 2) + np.sum((s1 - s2) ** 2)
    got = frechet_distance(_as_images(a), _as_images(b), _Pixels(d))
    assert got == pytest.approx(expected, abs=2e-3)  # sampling error and the 1/255 quantisation


def test_fid_of_a_set_against_itself_is_zero_and_grows_with_a_shift():
    rng = np.random.default_rng(1)
    values = rng.normal(0.0, 0.2, size=(2000, 4))
    base = _as_images(values)
    assert frechet_distance(base, base, _Pixels(4)) == pytest.approx(0.0, abs=1e-6)
    distances = [frechet_distance(_as_images(values + shift), base, _Pixels(4)) for shift in (0.05, 0.1, 0.2)]
    assert distances[0] < distances[1] < distances[2]
    assert distances[2] == pytest.approx(4 * 0.2**2, rel=0.05)  # a pure shift: |delta mu|^2


def test_fid_refuses_what_it_cannot_measure():
    one = np.zeros((1, 2, 1, 1), dtype=np.uint8)
    with pytest.raises(ValueError, match="at least 2 uint8 samples"):
        frechet_distance(one, np.zeros((5, 2, 1, 1), dtype=np.uint8), _Pixels(2))
    with pytest.raises(ValueError, match="uint8 reference"):
        frechet_distance(np.zeros((5, 2, 1, 1), dtype=np.uint8), np.zeros((5, 2, 1, 1)), _Pixels(2))
