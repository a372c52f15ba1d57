import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from condlora.presets import build_config  # noqa: E402


@pytest.fixture(autouse=True)
def _single_thread_determinism():
    torch.manual_seed(0)
    yield


@pytest.fixture
def tiny_config(tmp_path):
    """A seconds-scale run on scikit-learn's 8x8 digits."""

    def make(**sections):
        overrides = {
            "nano": {"channels": 8, "channel_mult": (1, 2), "attn_levels": (1,), "num_heads": 2},
            "ddpm": {"num_timesteps": 100},
            "train": {
                "steps": 12,
                "batch_size": 16,
                "warmup_steps": 2,
                "log_every": 2,
                "sample_every": 0,
                "checkpoint_every": 4,
                "keep_checkpoints": 3,
                "progress": False,
                "device": "cpu",  # CPU properties (bit-exact resume) are what these tests assert
                "out_dir": str(tmp_path / "run"),
            },
            "sample": {"steps": 10, "count": 20, "batch_size": 20},
        }
        for section, values in sections.items():
            overrides.setdefault(section, {}).update(values)
        return build_config("digits-nano", overrides)

    return make


@pytest.fixture
def small_classifier(monkeypatch, tmp_path):
    """An untrained digit classifier in place of the reference one (trained once, a minute): the metrics'
    values do not matter where this is used, only that the runners compute and keep them."""
    from condlora.eval.classifier import DigitClassifier

    torch.manual_seed(0)
    net = DigitClassifier().eval()
    monkeypatch.setattr("condlora.eval.classifier.cached_digit_classifier", lambda *a, **k: net)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
