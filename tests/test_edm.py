"""EDM: the DDPM++ network against the published code's outputs, preconditioning and sampler against closed
forms, the augmentation's labels against the geometry of what it did, the pickle converter, presets."""

import math
import os
import pickle
import sys
import types
from collections import OrderedDict
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from condlora.conditions import NULL_LABEL, Conditions
from condlora.data.augment import AUGMENT_DIM, AugmentPipe
from condlora.diffusion import EDM, EDMPrecond, PerSampleNoise, heun_sample, karras_sigmas, process_for
from condlora.diffusion.edm import precondition
from condlora.nets import build_network, count_parameters
from condlora.nets.ddpmpp import SongUNet
from condlora.nets.edm_pickle import UnsafePickleError, convert_edm_pickle, read_edm_pickle
from condlora.presets import build_config
from condlora.train.ema import EMA

FIXTURE = Path(__file__).parent / "fixtures" / "edm-songunet-tiny"
TINY = dict(  # the configuration the fixture was recorded with (see fixtures/README.md)
    img_resolution=16,
    in_channels=3,
    label_dim=10,
    augment_dim=9,
    model_channels=16,
    channel_mult=(1, 2, 2),
    num_blocks=1,
    attn_resolutions=(8,),
    dropout=0.0,
)
TINY_PUBLISHED_KWARGS = {  # the same, as the published EDMPrecond records its constructor arguments
    "img_resolution": 16,
    "img_channels": 3,
    "label_dim": 10,
    "model_type": "SongUNet",
    "embedding_type": "positional",
    "encoder_type": "standard",
    "decoder_type": "standard",
    "channel_mult_noise": 1,
    "resample_filter": [1, 1],
    "model_channels": 16,
    "channel_mult": [1, 2, 2],
    "num_blocks": 1,
    "attn_resolutions": [8],
    "dropout": 0.0,
    "augment_dim": 9,
}


def _fixture_net() -> EDMPrecond:
    net = EDMPrecond(SongUNet(**TINY))
    net.load_state_dict(load_file(str(FIXTURE / "weights.safetensors")), strict=True)
    return net.eval()


def _fixture_inputs(dtype=torch.float32):
    io = {k: v.to(dtype) for k, v in load_file(str(FIXTURE / "io.safetensors")).items()}
    cond = Conditions(class_vector=io["class_labels"], augment=io["augment_labels"])
    return io, cond


# the network against the published code -------------------------------------------------------------------------


@torch.no_grad()
def test_published_weights_load_strictly_and_give_the_published_outputs():
    net = _fixture_net()
    io, cond = _fixture_inputs()
    assert torch.allclose(net(io["x"], io["sigma"], cond), io["denoised"], atol=1e-5)
    s = io["sigma"].reshape(-1, 1, 1, 1)
    raw = net.model(io["x"] / (0.25 + s**2).sqrt(), io["sigma"].log() / 4, cond)
    assert torch.allclose(raw, io["raw"], atol=1e-5)


@torch.no_grad()
def test_published_outputs_in_float64():
    net = _fixture_net().double()
    io, cond = _fixture_inputs(torch.float64)
    out = net(io["x"], io["sigma"], cond)
    assert out.dtype == torch.float64
    assert torch.allclose(out, io["denoised"], atol=1e-5)  # the reference itself is float32


@torch.no_grad()
def test_labels_become_one_hot_class_vectors_and_null_the_zero_vector():
    net = _fixture_net().model
    io, _ = _fixture_inputs()
    x, c = io["x"][:2], io["sigma"][:2].log() / 4
    by_label = net(x, c, Conditions(labels=torch.tensor([3, NULL_LABEL])))
    vectors = torch.zeros(2, 10)
    vectors[0, 3] = 1
    assert torch.allclose(by_label, net(x, c, Conditions(class_vector=vectors)), atol=1e-6)


@torch.no_grad()
@pytest.mark.parametrize("scale", [0.0, 1.0, 2.5])
def test_classifier_free_guidance_mixes_the_published_conditional_and_unconditional_denoisers(scale):
    from condlora.diffusion.guidance import classifier_free, guided

    net = _fixture_net()
    io, _ = _fixture_inputs()
    labels = torch.tensor([3, 0, 9, 3])
    augment = torch.zeros(4, AUGMENT_DIM)
    process = EDM(build_config("mnist-edm").edm)
    cond = Conditions(labels=labels, augment=augment)
    denoise = guided(lambda x, s, c: process.predict(net.model, x, s, c), classifier_free(cond, scale))
    # the published network's own reading: one-hot class vectors, the all-zero vector unconditional
    one_hot = torch.nn.functional.one_hot(labels, 10).float()
    d_cond = net(io["x"], io["sigma"], Conditions(class_vector=one_hot, augment=augment))
    d_null = net(io["x"], io["sigma"], Conditions(class_vector=torch.zeros(4, 10), augment=augment))
    expected = scale * d_cond + (1 - scale) * d_null
    assert torch.allclose(denoise(io["x"], io["sigma"]), expected, atol=1e-5)
    if scale != 1.0:  # the classes do change the denoiser, so the mix is not a no-op
        assert not torch.allclose(d_cond, d_null, atol=1e-4)


# preconditioning, sampler, loss: closed forms ------------------------------------------------------------------


class _Probe(nn.Module):
    """Records what it is fed and returns a constant."""

    def __init__(self, value: float):
        super().__init__()
        self.value, self.seen = value, []
        self.weight = nn.Parameter(torch.zeros(()))

    def forward(self, x, noise_level, cond):
        self.seen.append((x, noise_level))
        return torch.full_like(x, self.value)


def test_preconditioning_matches_edm_table_1():
    sd = 0.5
    sigma = torch.tensor([0.002, 0.5, 2.0, 80.0], dtype=torch.float64)
    x = torch.randn(4, 1, 2, 2, dtype=torch.float64)
    probe = _Probe(0.7).double()
    out = precondition(probe, x, sigma, Conditions(), sd)
    fed_x, fed_noise = probe.seen[0]
    for i, s in enumerate(sigma.tolist()):
        c_skip = sd**2 / (s**2 + sd**2)
        c_out = s * sd / math.sqrt(s**2 + sd**2)
        c_in = 1 / math.sqrt(s**2 + sd**2)
        assert torch.allclose(fed_x[i], c_in * x[i])
        assert fed_noise[i].item() == pytest.approx(math.log(s) / 4)
        assert torch.allclose(out[i], c_skip * x[i] + c_out * 0.7)


def test_karras_sigmas():
    sigmas = karras_sigmas(18, 0.002, 80.0, 7.0)
    assert sigmas.shape == (19,)
    assert sigmas[0].item() == pytest.approx(80.0) and sigmas[17].item() == pytest.approx(0.002) and sigmas[18] == 0
    assert (sigmas[1:] < sigmas[:-1]).all()
    # rho = 1 spaces the levels linearly
    assert torch.allclose(
        karras_sigmas(5, 1.0, 5.0, 1.0)[:-1], torch.tensor([5.0, 4.0, 3.0, 2.0, 1.0], dtype=torch.float64)
    )


def _gaussian_denoiser(mu: float, std: float):
    """The exact D(x; sigma) = E[y | y + sigma n = x] for y ~ N(mu, std^2) per pixel."""

    def denoise(x, sigma):
        s2 = sigma.reshape(-1, *[1] * (x.dim() - 1)) ** 2
        return mu + std**2 / (std**2 + s2) * (x - mu)

    return denoise


@pytest.mark.parametrize("churn", [0.0, 40.0])
def test_heun_with_the_exact_denoiser_of_a_gaussian_reaches_it(churn):
    mu, std = 0.3, 0.5
    calls = []
    exact = _gaussian_denoiser(mu, std)

    def denoise(x, sigma):
        calls.append(1)
        return exact(x, sigma)

    noise = PerSampleNoise(range(4000))
    heun_sample(denoise, karras_sigmas(18), PerSampleNoise([0]), (1, 1, 1), churn=churn, churn_min=0.05, churn_max=50)
    assert len(calls) == 35  # 18 steps = 35 evaluations
    # 18 steps are tuned for images; on this one-scale Gaussian they over-shoot the std by ~6%, so converge finer
    out = heun_sample(denoise, karras_sigmas(100), noise, (1, 1, 1), churn=churn, churn_min=0.05, churn_max=50)
    assert out.mean().item() == pytest.approx(mu, abs=0.03)
    assert out.std().item() == pytest.approx(std, rel=0.03)


def test_edm_samples_with_heun_only():
    cfg = build_config("mnist-edm")
    sample = cfg.sample.__class__(**{**cfg.sample.__dict__, "sampler": "ddim"})
    with pytest.raises(ValueError, match="the edm family samples with heun, not 'ddim'"):
        EDM(cfg.edm).sample(_gaussian_denoiser(0.0, 1.0), PerSampleNoise([0]), (1, 1, 1), sample)


def test_edm_loss_is_the_weighted_denoising_error():
    cfg = build_config("mnist-edm").edm
    process = EDM(cfg)
    probe = _Probe(0.0)  # F = 0, so D = c_skip (y + sigma n)
    y = torch.rand(6, 1, 4, 4) * 2 - 1
    terms = process.loss(probe, y, Conditions(), torch.Generator().manual_seed(3))
    g = torch.Generator().manual_seed(3)  # the same draws, in the loss's order: sigma, then n
    sigma = (torch.randn(6, generator=g) * cfg.P_std + cfg.P_mean).exp()
    n = torch.randn(y.shape, generator=g)
    s = sigma.reshape(-1, 1, 1, 1)
    denoised = 0.25 / (s**2 + 0.25) * (y + s * n)
    weight = (sigma**2 + 0.25) / (sigma * 0.5) ** 2
    expected = weight * (denoised - y).pow(2).mean(dim=(1, 2, 3))
    assert torch.allclose(terms["loss"], expected, rtol=1e-5)


def test_ema_by_half_life_with_ramp_up():
    net = nn.Linear(2, 2)
    ema = EMA(net, decay=0.999, halflife_images=500_000, rampup_ratio=0.05, batch_size=512)
    assert ema.decay_at(0) == 0.0  # the first update copies the weights
    n = 10  # ramping: half-life 0.05 * n * batch images
    assert ema.decay_at(n) == pytest.approx(0.5 ** (512 / (0.05 * n * 512)))
    assert ema.decay_at(10**6) == pytest.approx(0.5 ** (512 / 500_000))
    assert EMA(net, 0.9, halflife_images=1000, batch_size=10).decay_at(0) == pytest.approx(0.5 ** (10 / 1000))


# augmentation --------------------------------------------------------------------------------------------------


def test_augmentation_at_p_zero_leaves_images_untouched_with_zero_labels():
    images = torch.randn(16, 3, 8, 8)
    out, labels = AugmentPipe(0.0)(images, torch.Generator().manual_seed(0))
    assert torch.equal(out, images)
    assert labels.shape == (16, AUGMENT_DIM) and not labels.any()


def test_augmented_labels_are_zero_exactly_for_untransformed_images_which_stay_untouched():
    images = torch.randn(256, 1, 8, 8)
    out, labels = AugmentPipe(0.3)(images, torch.Generator().manual_seed(1))
    untouched = ~labels.bool().any(dim=1)
    assert 0 < untouched.sum() < 256
    assert torch.equal(out[untouched], images[untouched])


def test_flip_labels_say_which_images_were_flipped():
    images = torch.randn(64, 1, 6, 6)
    out, labels = AugmentPipe(1.0, transforms=("xflip", "yflip"))(images, torch.Generator().manual_seed(2))
    for img, aug, (xf, yf) in zip(images, out, labels[:, :2].tolist(), strict=True):
        expected = img.flip(2) if xf else img
        expected = expected.flip(1) if yf else expected
        assert torch.equal(aug, expected)
    assert labels[:, 2:].abs().sum() == 0


def _blob(size: int, center: tuple[float, float], n: int) -> torch.Tensor:
    ys, xs = torch.meshgrid(
        torch.arange(size, dtype=torch.float32), torch.arange(size, dtype=torch.float32), indexing="ij"
    )
    blob = torch.exp(-((xs - center[0]) ** 2 + (ys - center[1]) ** 2) / (2 * 1.5**2))
    return blob.expand(n, 1, size, size).clone()


def _centroids(images: torch.Tensor) -> torch.Tensor:
    size = images.shape[-1]
    grid = torch.arange(size, dtype=torch.float32)
    mass = images[:, 0].sum(dim=(1, 2))
    cx = (images[:, 0] * grid[None, None, :]).sum(dim=(1, 2)) / mass
    cy = (images[:, 0] * grid[None, :, None]).sum(dim=(1, 2)) / mass
    return torch.stack([cx, cy], dim=1) - (size - 1) / 2  # centred pixel coordinates


def _expected_position(transform: str, labels: torch.Tensor, p: torch.Tensor, size: int) -> torch.Tensor:
    """Where a point p (centred pixel coordinates, x right, y down) goes, from the labels alone."""
    if transform == "scale":
        return p * 2 ** (0.2 * labels[2])
    if transform == "rotate":  # the published pipeline rotates content by -angle in these coordinates
        angle = math.atan2(labels[4], labels[3] + 1)
        c, s = math.cos(-angle), math.sin(-angle)
        return torch.stack([c * p[0] - s * p[1], s * p[0] + c * p[1]])
    if transform == "aniso":  # r = 0: stretch x by 2^(0.2 w), y by its inverse
        a = 2 ** (0.2 * labels[5])
        return torch.stack([p[0] * a, p[1] / a])
    return p + labels[7:9] * size * 0.125  # translate


@pytest.mark.parametrize("transform", ["scale", "rotate", "aniso", "translate"])
def test_geometric_labels_match_where_the_content_moved(transform):
    size, n = 48, 64
    start = torch.tensor([6.0, -4.0])
    images = _blob(size, tuple((start + (size - 1) / 2).tolist()), n)
    out, labels = AugmentPipe(1.0, transforms=(transform,))(images, torch.Generator().manual_seed(4))
    moved = _centroids(out)
    checked = 0
    for i in range(n):
        if transform == "aniso" and labels[i, 6] != 0:
            continue  # a rotated stretch axis: labels (w cos r, w sin r) checked through r = 0 samples
        expected = _expected_position(transform, labels[i], start, size)
        if expected.abs().max() > size / 2 - 8:
            continue  # the blob would reach the border and be reflected
        assert torch.allclose(moved[i], expected, atol=0.35), (i, labels[i])
        checked += 1
    assert checked >= 10
    others = [
        j
        for j in range(AUGMENT_DIM)
        if j not in {"scale": [2], "rotate": [3, 4], "aniso": [5, 6], "translate": [7, 8]}[transform]
    ]
    assert not labels[:, others].any()


# pickles -------------------------------------------------------------------------------------------------------


class _PersistentStandIn:
    """Pickles the way the published code's persistent objects do: a call of
    torch_utils.persistence._reconstruct_persistent_obj(meta) with the class's module source in meta."""

    def __init__(self, rebuild, class_name: str, state: dict, module_src: str):
        self.rebuild, self.class_name, self.state, self.module_src = rebuild, class_name, state, module_src

    def __reduce__(self):
        meta = {"type": "class", "version": 6, "module_src": self.module_src, "class_name": self.class_name}
        return self.rebuild, ({**meta, "state": self.state},)


def _published_layout(module: nn.Module, rebuild, module_src: str, init_kwargs=None):
    """`module` as the published code would pickle it: persistent objects for its own classes, torch's
    ModuleDict for dicts of blocks, tensors as tensors."""
    children = OrderedDict()
    for name, child in module.named_children():
        children[name] = _published_layout(child, rebuild, module_src)
    state = {
        "training": False,
        "_parameters": OrderedDict(module._parameters),
        "_buffers": OrderedDict((k, v) for k, v in module._buffers.items()),
        "_non_persistent_buffers_set": set(module._non_persistent_buffers_set),
        "_modules": children,
        "skip_scale": math.sqrt(0.5),
    }
    if isinstance(module, nn.ModuleDict):
        holder = nn.ModuleDict()
        holder.__dict__.update(state)  # a real torch ModuleDict whose children are persistent objects
        return holder
    if init_kwargs is not None:
        state["_init_kwargs"] = init_kwargs
    name = {"SongUNet": "SongUNet", "EDMPrecond": "EDMPrecond"}.get(type(module).__name__, type(module).__name__)
    return _PersistentStandIn(rebuild, name, state, module_src)


@pytest.fixture
def published_pickle(tmp_path, monkeypatch):
    """Write a pickle in the published layout (the fixture network as `ema`); `module_src` is what the
    published loader would execute."""

    def write(module_src: str = "") -> Path:
        persistence = types.ModuleType("torch_utils.persistence")

        def _reconstruct_persistent_obj(meta):  # what the published loader calls; never called by condlora
            raise AssertionError("the published reconstruction function must not run")

        _reconstruct_persistent_obj.__module__ = "torch_utils.persistence"
        _reconstruct_persistent_obj.__qualname__ = "_reconstruct_persistent_obj"
        persistence._reconstruct_persistent_obj = _reconstruct_persistent_obj
        monkeypatch.setitem(sys.modules, "torch_utils", types.ModuleType("torch_utils"))
        monkeypatch.setitem(sys.modules, "torch_utils.persistence", persistence)
        ema = _published_layout(_fixture_net(), _reconstruct_persistent_obj, module_src, TINY_PUBLISHED_KWARGS)
        path = tmp_path / "network-snapshot.pkl"
        with open(path, "wb") as f:
            pickle.dump({"ema": ema, "loss_fn": None, "dataset_kwargs": {"xflip": False}}, f)
        return path

    return write


def test_converted_published_pickle_gives_the_published_outputs(published_pickle, tmp_path):
    marker = tmp_path / "source-was-executed"
    path = published_pickle(f"import pathlib\npathlib.Path({str(marker)!r}).touch()\n")
    ckpt = convert_edm_pickle(path, tmp_path / "converted")
    assert not marker.exists()  # the embedded module source never ran
    from condlora.pipeline import load_model

    net, cfg, _ = load_model(ckpt.parent.parent)
    assert cfg.model.backbone == "ddpmpp" and cfg.diffusion.family == "edm" and cfg.edm.augment > 0
    io, cond = _fixture_inputs()
    with torch.no_grad():
        out = process_for(cfg).predict(net, io["x"], io["sigma"], cond)
    assert torch.allclose(out, io["denoised"], atol=1e-5)


def test_a_pickle_that_would_run_a_command_is_refused(tmp_path):
    marker = tmp_path / "pwned"

    class Exploit:
        def __reduce__(self):
            return os.system, (f"touch {marker}",)

    path = tmp_path / "evil.pkl"
    path.write_bytes(pickle.dumps({"ema": Exploit()}))
    with pytest.raises(UnsafePickleError, match=r"refusing to load .*system"):
        read_edm_pickle(path)
    assert not marker.exists()


def test_converter_refuses_other_architectures(published_pickle, tmp_path, monkeypatch):
    monkeypatch.setitem(TINY_PUBLISHED_KWARGS, "embedding_type", "fourier")
    with pytest.raises(ValueError, match="embedding_type='fourier'.*DDPM\\+\\+"):
        convert_edm_pickle(published_pickle(), tmp_path / "out")


def test_init_from_a_converted_network_trains_adapters_on_a_frozen_published_base(published_pickle, tmp_path):
    from condlora.train import train

    converted = tmp_path / "converted"
    convert_edm_pickle(published_pickle(), converted)
    cfg = build_config(
        "edm-cifar10-cond-uc-lora",
        {
            "data": {"dataset": _rgb_digits(tmp_path), "image_size": 16},
            "model": {"image_size": 16},
            "ddpmpp": {k: TINY[k] for k in ("model_channels", "channel_mult", "num_blocks", "attn_resolutions")},
            "lora": {"uc_bases": 3, "uc_widths": (8,)},
            "train": _quick_train(tmp_path / "run", trainable=("lora",), init_from=str(converted)),
        },
    )
    result = train(cfg, tmp_path / "run")
    base = load_file(str(FIXTURE / "weights.safetensors"))
    state = result.net.state_dict()
    assert torch.equal(state["enc.16x16_conv.weight"], base["model.enc.16x16_conv.weight"])
    assert torch.equal(state["enc.8x8_block0.qkv.base_layer.weight"], base["model.enc.8x8_block0.qkv.weight"])


def _quick_train(out_dir: Path, **extra):
    return {
        "steps": 2,
        "batch_size": 4,
        "warmup_steps": 1,
        "log_every": 1,
        "sample_every": 0,
        "checkpoint_every": 2,
        "progress": False,
        "device": "cpu",
        "out_dir": str(out_dir),
        **extra,
    }


def _rgb_digits(tmp_path: Path) -> str:
    """sklearn's digits as a 3-channel 16x16 .npz dataset."""
    import numpy as np
    from sklearn.datasets import load_digits

    digits = load_digits()
    gray = (digits.images / 16 * 255).astype(np.uint8)  # (N, 8, 8)
    big = gray.repeat(2, axis=1).repeat(2, axis=2)
    path = tmp_path / "rgb-digits.npz"
    np.savez(path, images=np.stack([big] * 3, axis=-1), labels=digits.target)
    return str(path)


# presets, parameter counts -------------------------------------------------------------------------------------


# Every EDM count printed in the attention-conditioning paper (Tables 1 and 2) and in DESIGN.md.
PARAMETER_ROWS = [
    ("edm-cifar10-uncond", {}, 55_733_891),
    ("edm-cifar10-cond", {}, 55_735_299),
    ("edm-ffhq64", {}, 61_805_571),
    ("edm-cifar10-uncond", {"edm": {"augment": 0}}, 55_732_739),
    ("edm-cifar10-uncond-uc-lora", {}, 57_745_499),
    ("edm-cifar10-cond-uc-lora", {}, 57_746_907),
    ("edm-cifar10-uncond-uc-lora", {"model": {"conditioning": "lora_only"}}, 53_411_675),
    ("edm-cifar10-cond-uc-lora", {"model": {"conditioning": "lora_only"}}, 53_413_083),
    ("edm-cifar10-uncond-uc-lora", {"lora": {"uc_bases": 9}}, 57_185_519),
    ("edm-cifar10-uncond-uc-lora", {"lora": {"uc_bases": 36}}, 58_865_459),
    ("edm-cifar10-uncond-uc-lora", {"lora": {"rank": 2}}, 57_192_539),
    ("edm-cifar10-uncond-uc-lora", {"lora": {"rank": 8}}, 58_851_419),
]


@pytest.mark.parametrize(("preset", "overrides", "expected"), PARAMETER_ROWS)
def test_parameter_counts_match_the_papers(preset, overrides, expected):
    assert count_parameters(build_network(build_config(preset, overrides))) == expected


@pytest.mark.parametrize(
    "preset", ["edm-cifar10-uncond", "edm-cifar10-cond", "edm-cifar10-uncond-uc-lora", "edm-cifar10-cond-uc-lora"]
)
def test_cifar10_presets_take_a_training_step_at_batch_2(preset):
    cfg = build_config(preset)
    net = build_network(cfg)
    process = process_for(cfg)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-3)
    labels = torch.tensor([2, NULL_LABEL]) if cfg.model.num_classes else None
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    terms = process.loss(net, x0, Conditions(labels=labels), torch.Generator().manual_seed(0))
    terms["loss"].mean().backward()
    before = net.enc["32x32_conv"].weight.detach().clone()
    opt.step()
    assert terms["loss"].shape == (2,) and terms["loss"].isfinite().all()
    assert not torch.equal(before, net.enc["32x32_conv"].weight)


def test_adaln_attn_conditions_attention_and_drops_every_shift():
    net = SongUNet(**{**TINY, "augment_dim": 0}, conditioning="adaln_attn")
    blocks = [m for m in net.modules() if type(m).__name__ == "UNetBlock"]
    assert all(b.affine is None for b in blocks)
    assert all(b.ada is not None for b in blocks if b.attention)


def test_mnist_preset_trains_and_samples(tmp_path):
    from condlora.pipeline import load_model, sample_to_files
    from condlora.train import train

    cfg = build_config("mnist-edm", {"train": _quick_train(tmp_path / "run", precision="bf16")})
    result = train(cfg, tmp_path / "run")
    assert math.isfinite(result.final_loss)
    net, cfg, _ = load_model(result.checkpoint)
    sample = cfg.sample.__class__(**{**vars(cfg.sample), "count": 4, "steps": 3, "batch_size": 4})
    png, npz = sample_to_files(net, cfg, sample, tmp_path / "samples", progress=False)
    assert png.is_file() and npz.is_file()
    from condlora.data import read_npz

    assert read_npz(npz)["network_calls_per_sample"] == 5  # Heun: 2 x 3 noise levels - 1


def test_edm_config_errors_name_the_field():
    from condlora.config import ConfigError

    with pytest.raises(ConfigError, match="sample.sampler.*heun"):
        build_config("mnist-edm", {"sample": {"sampler": "ddim"}})
    with pytest.raises(ConfigError, match="lora.time.*continuous"):
        build_config("mnist-edm", {"lora": {"time": "compositional"}})
    with pytest.raises(ConfigError, match="edm.augment.*nano"):
        build_config(
            "mnist-edm",
            {
                "model": {"backbone": "nano", "conditioning": "baseline"},
                "lora": {"uc_bases": 0},
                "edm": {"augment": 0.1},
            },
        )
    with pytest.raises(ConfigError, match="model.image_size.*divisible"):
        build_config("mnist-edm", {"model": {"image_size": 30}, "data": {"image_size": 30}})
