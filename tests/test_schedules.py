import math

import pytest
import torch

from condlora.diffusion import NoiseSchedule, cosine_betas, linear_betas, respaced_timesteps


def test_linear_betas_match_ddpm_endpoints_and_spacing():
    betas = linear_betas(1000)
    assert betas[0].item() == pytest.approx(1e-4)
    assert betas[-1].item() == pytest.approx(0.02)
    assert torch.allclose(betas.diff(), torch.full((999,), (0.02 - 1e-4) / 999, dtype=torch.float64))


def test_linear_betas_rescale_with_number_of_steps():
    betas = linear_betas(500)
    assert betas[0].item() == pytest.approx(2e-4)
    assert betas[-1].item() == pytest.approx(0.04)


def test_cosine_alpha_bar_matches_closed_form():
    T, s = 1000, 0.008
    schedule = NoiseSchedule(cosine_betas(T, s=s))
    f = [math.cos((t / T + s) / (1 + s) * math.pi / 2) ** 2 for t in range(T + 1)]
    expected = torch.tensor([f[t + 1] / f[0] for t in range(T)], dtype=torch.float64)
    # clipping at 0.999 only touches the last few steps
    assert torch.allclose(schedule.alphas_cumprod[:-5], expected[:-5], rtol=1e-10, atol=1e-12)
    assert schedule.betas.max().item() <= 0.999


@pytest.mark.parametrize("name", ["linear", "cosine"])
def test_derived_quantities(name):
    sch = NoiseSchedule.create(name, 200)
    ab = torch.cumprod(1 - sch.betas, 0)
    assert torch.allclose(sch.alphas_cumprod, ab)
    assert sch.alphas_cumprod_prev[0].item() == 1.0
    assert torch.allclose(sch.alphas_cumprod_prev[1:], ab[:-1])
    expected_var = sch.betas * (1 - sch.alphas_cumprod_prev) / (1 - ab)
    assert torch.allclose(sch.posterior_variance, expected_var)
    assert sch.posterior_variance[0].item() == 0.0
    assert torch.all(sch.snr()[1:] < sch.snr()[:-1])  # SNR strictly decreases with t


def test_q_sample_has_closed_form_mean_and_variance():
    sch = NoiseSchedule.create("linear", 1000)
    t = torch.full((200_000,), 300)
    x0 = torch.full((200_000, 1), 0.7)
    xt = sch.q_sample(x0, t, torch.randn(200_000, 1, generator=torch.Generator().manual_seed(0)))
    ab = sch.alphas_cumprod[300].item()
    assert xt.mean().item() == pytest.approx(math.sqrt(ab) * 0.7, abs=5e-3)
    assert xt.var().item() == pytest.approx(1 - ab, rel=1e-2)


def test_respaced_timesteps():
    assert respaced_timesteps(1000, 1000) == list(range(999, -1, -1))
    ts = respaced_timesteps(1000, 10)
    assert ts[0] == 999 and ts[-1] == 0 and len(ts) == 10
    assert all(a > b for a, b in zip(ts, ts[1:], strict=False))
    with pytest.raises(ValueError, match="steps must be in"):
        respaced_timesteps(100, 101)


def test_unknown_schedule_is_rejected():
    with pytest.raises(ValueError, match="unknown schedule"):
        NoiseSchedule.create("quadratic", 10)


def test_min_snr_weighting_scales_each_samples_loss_by_min_snr_gamma_over_snr():
    """Min-SNR (Hang et al. 2023): with a network that predicts eps = 0 the simple loss of sample i is
    mean(noise_i^2); weighted, it is that times min(SNR_t, gamma) / SNR_t, SNR from the DDPM betas by hand."""
    from condlora.conditions import Conditions
    from condlora.diffusion import process_for
    from condlora.presets import build_config

    gamma, batch = 5.0, 64
    cfg = build_config("mnist-nano-uncond", {"ddpm": {"min_snr_gamma": gamma}})
    process = process_for(cfg)

    def zero_net(x, level, cond):
        return torch.zeros_like(x)

    x0 = torch.rand(batch, 1, 4, 4) * 2 - 1
    loss = process.loss(zero_net, x0, Conditions(), torch.Generator().manual_seed(3))["loss"]
    g = torch.Generator().manual_seed(3)  # the same draws as the loss: t, then the noise
    t = torch.randint(0, 1000, (batch,), generator=g)
    noise = torch.randn(x0.shape, generator=g)
    betas = [1e-4 + (0.02 - 1e-4) * i / 999 for i in range(1000)]
    alpha_bar, snr = 1.0, []
    for b in betas:
        alpha_bar *= 1 - b
        snr.append(alpha_bar / (1 - alpha_bar))
    weights = torch.tensor([min(snr[i], gamma) / snr[i] for i in t.tolist()])
    assert torch.allclose(loss, noise.pow(2).flatten(1).mean(1) * weights, rtol=1e-5)
    assert (weights < 1).any() and (weights == 1).any()  # the batch holds steps on both sides of SNR = gamma
    with pytest.raises(ValueError, match="min_snr_gamma"):
        build_config("mnist-iddpm", {"ddpm": {"min_snr_gamma": gamma}})
