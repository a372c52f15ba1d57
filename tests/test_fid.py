"""FID: against the closed form for Gaussians, ~0 for a set against itself, growing with a shift."""

import numpy as np
import pytest
import torch
from torch import nn

from condlora.eval.fid import cached_features, diversity, frechet_distance, precision_recall


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


def _cluster(centre: float, n: int, d: int = 2, seed: int = 0) -> torch.Tensor:
    return torch.randn(n, d, generator=torch.Generator().manual_seed(seed), dtype=torch.float64) * 0.1 + centre


def test_precision_and_recall_on_toy_manifolds():
    reference = torch.cat([_cluster(-5.0, 300), _cluster(5.0, 300, seed=1)])  # two modes
    assert precision_recall(reference, reference) == (1.0, 1.0)
    one_mode = _cluster(5.0, 300, seed=2)  # mode dropping: all samples real-looking, half the data missed
    precision, recall = precision_recall(one_mode, reference)
    assert precision > 0.95 and recall == pytest.approx(0.5, abs=0.03)
    assert precision_recall(_cluster(50.0, 300, seed=3), reference) == (0.0, 0.0)  # far from the data
    with pytest.raises(ValueError, match="more than 3 samples"):
        precision_recall(reference[:3], reference)


def test_diversity_is_one_minus_the_mean_cosine_within_each_class():
    same = torch.ones(4, 3, dtype=torch.float64)
    orthogonal = torch.eye(3, dtype=torch.float64)
    assert diversity(same, np.zeros(4)) == pytest.approx(0.0, abs=1e-12)
    assert diversity(orthogonal, np.zeros(3)) == pytest.approx(1.0)
    both = torch.cat([same, orthogonal])  # class 0 identical, class 1 orthogonal: the mean over classes
    assert diversity(both, np.array([0] * 4 + [1] * 3)) == pytest.approx(0.5)
    with pytest.raises(ValueError, match="two samples of one class"):
        diversity(orthogonal, np.arange(3))


def test_reference_features_are_cached_under_the_images_and_the_weights(tmp_path):
    images = np.random.default_rng(0).integers(0, 256, (6, 3, 1, 1), dtype=np.uint8)
    net = nn.Linear(1, 1)  # features of (B, 1, 3, 1) images: (B, 3)
    features = _Flat(net)
    first = cached_features(images, features, tmp_path)
    assert len(list((tmp_path / "condlora").glob("features-*.safetensors"))) == 1
    assert torch.equal(cached_features(images, features, tmp_path), first)  # read back
    with torch.no_grad():
        net.weight.add_(1.0)
    changed = cached_features(images, features, tmp_path)  # other weights: another entry, new values
    assert len(list((tmp_path / "condlora").glob("features-*.safetensors"))) == 2
    assert not torch.equal(changed, first)


class _Flat(nn.Module):
    def __init__(self, net: nn.Module):
        super().__init__()
        self.net = net

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.net(x.flatten(1)[:, :, None]).flatten(1)


def test_real_digits_score_as_real_in_the_classifier_feature_space(monkeypatch, tmp_path):
    from condlora.data import load_mnist5k, split_indices
    from condlora.eval.classifier import train_digit_classifier
    from condlora.eval.images import save_samples_npz
    from condlora.pipeline import digit_feature_metrics

    net, _ = train_digit_classifier(steps=200, progress=False)
    monkeypatch.setattr("condlora.eval.classifier.cached_digit_classifier", lambda *a, **k: net)
    source = load_mnist5k()
    _, hold = split_indices(len(source.labels), 0.1, seed=0)
    real = save_samples_npz(source.images[hold], source.labels[hold], tmp_path / "real.npz")
    ones = save_samples_npz(source.images[source.labels == 1][:500], np.ones(500, np.int64), tmp_path / "ones.npz")
    good = digit_feature_metrics(real, tmp_path, accuracy=True, dino=_tiny_dino(tmp_path / "dino"))
    bad = digit_feature_metrics(ones, tmp_path, accuracy=True)
    assert good["fid_in_domain"] < bad["fid_in_domain"] / 10  # unseen real digits vs a single class
    assert good["accuracy"] > 0.8 and 0 < good["diversity_dino"] <= 1
    assert good["div_x"] == pytest.approx(good["diversity_dino"] * good["accuracy"])  # the paper's product
    assert bad["div_x"] == pytest.approx(bad["diversity"] * bad["accuracy"])  # in-domain features without DINOv2
    other_domain = digit_feature_metrics(real, tmp_path, reference="mnist5k-bold")  # plain digits vs bold ones
    assert other_domain["fid_in_domain"] > 2 * good["fid_in_domain"]
    with pytest.raises(ValueError, match="28x28 grey reference set, digits has"):
        digit_feature_metrics(real, tmp_path, reference="digits")
    assert good["precision"] > 0.8 and good["recall"] > 0.8
    assert bad["recall"] < good["recall"] - 0.25  # one class of digits misses much of the data


def _tiny_dino(folder):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    config = transformers.Dinov2Config(hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                       intermediate_size=32, image_size=28, patch_size=7)  # fmt: skip
    transformers.Dinov2Model(config).save_pretrained(folder)
    return folder


def test_dino_features_from_a_local_folder(tmp_path):
    from condlora.eval.dino import DinoFeatures
    from condlora.eval.fid import diversity, extract

    features = DinoFeatures(_tiny_dino(tmp_path / "dino"))
    grey = np.random.default_rng(0).integers(0, 256, (6, 28, 28, 1), dtype=np.uint8)
    assert torch.allclose(extract(grey, features), extract(grey.repeat(3, axis=3), features), atol=1e-6)
    same = np.repeat(grey[:1], 4, axis=0)
    assert diversity(extract(same, features), np.zeros(4)) == pytest.approx(0.0, abs=1e-6)  # one image, 4 times
    assert diversity(extract(grey, features), np.zeros(6)) > 1e-3
    with pytest.raises(FileNotFoundError, match="not a model folder"):
        DinoFeatures(tmp_path)


def test_eval_dino_without_fid_is_refused(tmp_path, capsys):
    from condlora.cli import main

    assert main(["eval", str(tmp_path / "samples.npz"), "--dino", str(tmp_path)]) == 2
    assert "eval --dino needs --fid" in capsys.readouterr().err
