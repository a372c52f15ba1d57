"""Samplers against closed forms: exact eps for a point mass and for a Gaussian data distribution."""

import functools

import pytest
import torch

from condlora.conditions import NULL_LABEL, Conditions
from condlora.config import SampleConfig
from condlora.diffusion import (
    DDPM,
    Guidance,
    NoiseSchedule,
    PerSampleNoise,
    classifier_free,
    ddim_sample,
    ddpm_sample,
    guided,
)
from condlora.diffusion.generate import generate
from condlora.nets import NanoUNet

SCHEDULE = NoiseSchedule.create("linear", 1000)
PROCESS = DDPM(SCHEDULE)
AB = SCHEDULE.alphas_cumprod


def _gaussian_eps(data_std: float):
    """Exact eps(x_t, t) = E[eps | x_t] when x_0 ~ N(0, data_std^2 I)."""

    def eps(x, t):
        ab = AB[t.long()].to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return (1 - ab).sqrt() * x / (ab * data_std**2 + 1 - ab)

    return eps


def _point_mass_eps(x0_star):
    def eps(x, t):
        ab = AB[t.long()].to(x.dtype).reshape(-1, *[1] * (x.dim() - 1))
        return (x - ab.sqrt() * x0_star) / (1 - ab).sqrt()

    return eps


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_exact_eps_of_a_point_mass_recovers_it(sampler):
    x0_star = torch.linspace(-0.9, 0.9, 16).reshape(1, 1, 4, 4)
    noise = PerSampleNoise([0, 1, 2])
    if sampler == "ddpm":
        out = ddpm_sample(_point_mass_eps(x0_star), SCHEDULE, noise, (1, 4, 4), steps=20, clip_denoised=False)
    else:
        out = ddim_sample(_point_mass_eps(x0_star), SCHEDULE, noise, (1, 4, 4), steps=20, clip_denoised=False)
    assert torch.allclose(out, x0_star.expand(3, -1, -1, -1), atol=1e-4)


@pytest.mark.parametrize(("sampler", "steps"), [("ddpm", 1000), ("ddim", 100)])
def test_exact_eps_of_a_gaussian_gives_its_standard_deviation(sampler, steps):
    std = 0.5
    noise = PerSampleNoise(range(4000))
    fn = ddpm_sample if sampler == "ddpm" else ddim_sample
    out = fn(_gaussian_eps(std), SCHEDULE, noise, (1, 1, 1), steps=steps, clip_denoised=False)
    assert out.mean().item() == pytest.approx(0.0, abs=0.03)
    assert out.std().item() == pytest.approx(std, rel=0.05)


def test_ddpm_equals_ddim_with_eta_one():
    eps = _gaussian_eps(0.7)
    a = ddpm_sample(eps, SCHEDULE, PerSampleNoise([5, 6]), (1, 3, 3), steps=25)
    b = ddim_sample(eps, SCHEDULE, PerSampleNoise([5, 6]), (1, 3, 3), steps=25, eta=1.0)
    assert torch.allclose(a, b, atol=1e-5)


def _tiny_net():
    torch.manual_seed(0)
    net = NanoUNet(in_channels=1, channels=8, channel_mult=(1, 2), attn_levels=(1,), num_heads=2, num_classes=3)
    for p in net.parameters():  # leave the zero init so the output depends on the input
        torch.nn.init.normal_(p, std=0.05)
    return net.eval()


def test_ddim_eta_zero_is_deterministic_and_seed_dependent():
    net = _tiny_net()
    eps = guided(functools.partial(PROCESS.predict, net), classifier_free(Conditions(labels=torch.tensor([0, 1])), 2.0))
    a = ddim_sample(eps, SCHEDULE, PerSampleNoise([1, 2]), (1, 8, 8), steps=10)
    b = ddim_sample(eps, SCHEDULE, PerSampleNoise([1, 2]), (1, 8, 8), steps=10)
    c = ddim_sample(eps, SCHEDULE, PerSampleNoise([3, 4]), (1, 8, 8), steps=10)
    assert torch.equal(a, b)
    assert not torch.allclose(a, c)


@pytest.mark.parametrize("sampler", ["ddpm", "ddim"])
def test_sampling_does_not_depend_on_batch_size(sampler):
    net = _tiny_net()
    cfg = SampleConfig(sampler=sampler, steps=8, eta=0.5, guidance_scale=1.5, count=7, seed=11, batch_size=7)
    whole, labels = generate(net, PROCESS, cfg, (1, 8, 8), num_classes=3, progress=False)
    split, labels2 = generate(
        net, PROCESS, SampleConfig(**{**cfg.__dict__, "batch_size": 3}), (1, 8, 8), 3, progress=False
    )
    assert torch.equal(labels, labels2)
    assert labels.tolist() == [0, 1, 2, 0, 1, 2, 0]
    assert torch.allclose(whole, split, atol=1e-5)


def _label_valued(x, t, cond):
    """A fake prediction whose value is the label (null -> 10) plus 100 * t: each branch is recognisable."""
    value = torch.where(cond.labels == NULL_LABEL, 10, cond.labels).float() + 100 * t.float()
    return value[:, None, None, None].expand_as(x)


def test_classifier_free_guidance_combines_conditional_and_null_predictions():
    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([3, 3])
    labels = torch.tensor([2, 4])
    for w in (0.0, 1.0, 3.0):
        out = guided(_label_valued, classifier_free(Conditions(labels=labels), w))(x, t)
        expected = 300 + 10 + w * (labels.float() - 10)  # eps(null) + w (eps(y) - eps(null))  (Ho & Salimans)
        assert torch.allclose(out[:, 0, 0, 0], expected)


def test_guidance_is_one_batched_call_of_any_number_of_branches():
    calls = []

    def predict(x, t, cond):
        calls.append(x.shape[0])
        return _label_valued(x, t, cond)

    x, t = torch.zeros(2, 1, 2, 2), torch.tensor([1, 1])
    branches = tuple(Conditions(labels=torch.tensor([k, k + 1])) for k in (0, 2, 4, NULL_LABEL + 0))
    weights = (0.5, -1.25, 2.0, 0.75)
    out = guided(predict, Guidance(branches, weights))(x, t)
    assert calls == [8]  # four branches of two samples: one call
    for i in range(2):
        values = [100 + (10 if b.labels[i] == NULL_LABEL else b.labels[i].item()) for b in branches]
        assert out[i, 0, 0, 0].item() == pytest.approx(sum(w * v for w, v in zip(weights, values, strict=True)))


def test_unconditional_or_unit_or_zero_scale_guidance_is_a_single_branch():
    assert len(classifier_free(Conditions(), 3.0).branches) == 1
    zero = classifier_free(Conditions(labels=torch.tensor([1, 2])), 0.0)  # the unconditional model alone
    assert zero.weights == (1.0,) and zero.branches[0].labels.tolist() == [NULL_LABEL, NULL_LABEL]
    one = classifier_free(Conditions(labels=torch.tensor([1]), shared=True), 1.0)
    assert one.weights == (1.0,) and one.branches[0].shared
