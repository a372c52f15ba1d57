"""The reference digit classifier and the class-accuracy evaluation of sample archives."""

import numpy as np
import pytest

from condlora.data import load_mnist5k, split_indices
from condlora.eval.classifier import class_accuracy, per_class_accuracy, train_digit_classifier
from condlora.eval.images import make_grid, save_samples_npz
from condlora.pipeline import digit_class_accuracy


@pytest.fixture(scope="module")
def classifier():
    net, holdout_accuracy = train_digit_classifier(steps=200, progress=False)
    return net, holdout_accuracy


def test_classifier_learns_real_digits(classifier):
    net, holdout_accuracy = classifier
    assert holdout_accuracy > 0.85
    source = load_mnist5k()
    _, hold = split_indices(len(source.labels), 0.1, seed=0)
    images, labels = source.images[hold], source.labels[hold]
    # wrong labels are scored as wrong: accuracy against shifted labels is near zero
    assert class_accuracy(net, images, (labels + 1) % 10) < 0.1
    per_class = per_class_accuracy(net, images, labels)
    assert set(per_class) == set(range(10))
    assert np.mean([per_class[c] for c in labels]) == pytest.approx(class_accuracy(net, images, labels))


def test_sample_archive_accuracy_uses_the_cached_classifier(classifier, tmp_path, monkeypatch):
    net, _ = classifier
    monkeypatch.setattr("condlora.eval.classifier.cached_digit_classifier", lambda *a, **k: net)
    source = load_mnist5k()
    path = save_samples_npz(source.images[::50], source.labels[::50], tmp_path / "real.npz")
    overall, per_class = digit_class_accuracy(path)
    assert overall > 0.85 and len(per_class) == 10


def test_bad_sample_archives_are_named(tmp_path):
    with pytest.raises(FileNotFoundError, match="samples file does not exist"):
        digit_class_accuracy(tmp_path / "none.npz")
    small = save_samples_npz(np.zeros((4, 8, 8, 1), np.uint8), np.zeros(4), tmp_path / "small.npz")
    with pytest.raises(ValueError, match="needs 28x28 grayscale digits"):
        digit_class_accuracy(small)
    uncond = save_samples_npz(np.zeros((4, 28, 28, 1), np.uint8), -np.ones(4), tmp_path / "uncond.npz")
    with pytest.raises(ValueError, match="labels must be digit classes"):
        digit_class_accuracy(uncond)
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="is not an .npz archive"):
        digit_class_accuracy(tmp_path / "junk.npz")
    np.savez(tmp_path / "unlabelled.npz", images=np.zeros((4, 28, 28, 1), np.uint8))
    with pytest.raises(
        ValueError, match=r"is not a samples archive: it lacks 'images' or 'labels' \(has \['images'\]\)"
    ):
        digit_class_accuracy(tmp_path / "unlabelled.npz")


def test_make_grid_places_tiles_row_major():
    images = np.stack([np.full((2, 3, 1), i * 10, np.uint8) for i in range(5)])
    grid = make_grid(images, nrow=3, pad=1)
    assert grid.shape == (2 * 3 + 1, 3 * 4 + 1, 1)
    assert grid[1, 1, 0] == 0 and grid[1, 5, 0] == 10 and grid[4, 1, 0] == 30 and grid[4, 5, 0] == 40
    assert grid[0].max() == 0  # padding stays black
