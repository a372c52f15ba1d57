"""The FID Inception-v3 port: its loader (weights-only, the published key layout) and, when the published
weights file is on this machine, the standard FID's basic properties."""

import os
import pickle
from pathlib import Path

import numpy as np
import pytest
import torch

from condlora.eval.inception import INCEPTION_WEIGHTS_FILE, InceptionFeatures, inception_fid, load_inception


def _weights_file() -> Path | None:
    given = os.environ.get("CONDLORA_INCEPTION_WEIGHTS")
    default = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache")) / "condlora" / INCEPTION_WEIGHTS_FILE
    path = Path(given) if given else default
    return path if path.is_file() else None


def test_features_are_2048_per_image_whatever_the_batch_and_channels():
    torch.manual_seed(0)
    net = InceptionFeatures()
    for m in net.modules():  # running statistics away from the identity, so batch norm matters
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_var.uniform_(0.5, 2.0)
            m.running_mean.normal_(0, 0.1)
    gray = torch.rand(3, 1, 28, 28) * 2 - 1
    rgb = gray.expand(-1, 3, -1, -1)
    together = net(gray)
    assert together.shape == (3, 2048) and torch.isfinite(together).all()
    torch.testing.assert_close(net(gray[1:2]), together[1:2], rtol=1e-4, atol=1e-5)  # no batch coupling
    torch.testing.assert_close(net(rgb), together)  # grayscale is repeated over the 3 channels
    assert (together >= 0).all()  # mean of ReLU outputs


def test_loader_reads_a_state_dict_in_the_published_layout(tmp_path):
    torch.manual_seed(1)
    source = InceptionFeatures()
    state = {k: v for k, v in source.state_dict().items() if not k.endswith("num_batches_tracked")}
    path = tmp_path / INCEPTION_WEIGHTS_FILE
    torch.save(state, path)  # as the published file: a plain state_dict without batch counters
    loaded = load_inception(path)
    x = torch.rand(2, 3, 32, 32) * 2 - 1
    torch.testing.assert_close(loaded(x), source(x), rtol=0, atol=0)


def test_loader_refuses_other_files_and_code(tmp_path):
    with pytest.raises(FileNotFoundError, match=INCEPTION_WEIGHTS_FILE):
        load_inception(tmp_path / "missing.pth")
    wrong = tmp_path / "wrong.pth"
    torch.save({"conv.weight": torch.zeros(1)}, wrong)
    with pytest.raises(ValueError, match="is not the FID Inception-v3"):
        load_inception(wrong)

    class Exploit:
        def __reduce__(self):
            return (os.system, (f"touch {tmp_path / 'pwned'}",))

    evil = tmp_path / "evil.pth"
    evil.write_bytes(pickle.dumps({"x": Exploit()}))
    with pytest.raises(ValueError, match="not a weights-only PyTorch state_dict"):
        load_inception(evil)
    assert not (tmp_path / "pwned").exists()


@pytest.mark.skipif(_weights_file() is None, reason=f"{INCEPTION_WEIGHTS_FILE} is not on this machine")
def test_standard_fid_is_zero_on_itself_and_grows_with_a_shift(tmp_path):
    from condlora.data import load_mnist5k

    images = load_mnist5k().images[:200]
    same = inception_fid(images, images, _weights_file(), tmp_path)
    darker = inception_fid((images * 0.5).astype(np.uint8), images, _weights_file(), tmp_path)
    assert abs(same) < 1e-3 and darker > 1.0
