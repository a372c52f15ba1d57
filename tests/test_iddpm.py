"""IDDPM: the U-Net and the process against outputs recorded from the published code, the likelihood terms
against closed forms, the learned-variance sampler against the exact reverse process of Gaussian data,
importance sampling against the published algorithm, presets and parameter counts."""

import math
import random
from pathlib import Path

import pytest
import torch
from helpers import train_until_killed
from safetensors.torch import load_file

from condlora.conditions import NULL_LABEL, Conditions
from condlora.diffusion import PerSampleNoise, ddpm_sample, process_for
from condlora.diffusion.iddpm import (
    IDDPM,
    Chain,
    LossSecondMomentSampler,
    discretized_gaussian_log_likelihood,
    iddpm_sample,
    normal_kl,
)
from condlora.diffusion.schedules import NoiseSchedule
from condlora.nets import build_network, count_parameters
from condlora.nets.iddpm import IDDPMUNet
from condlora.presets import build_config
from condlora.train import train
from condlora.train.checkpoint import load_latest

FIXTURE = Path(__file__).parent / "fixtures" / "iddpm-unet-tiny"
TINY = dict(  # the published UNetModel's arguments the fixture was recorded with (see fixtures/README.md)
    in_channels=3,
    model_channels=32,
    out_channels=6,
    num_res_blocks=1,
    attention_resolutions=(2,),
    dropout=0.0,
    channel_mult=(1, 1),
    num_classes=10,
    num_heads=2,
)
IO = load_file(str(FIXTURE / "io.safetensors"))


def _fixture_net() -> IDDPMUNet:
    net = IDDPMUNet(**TINY)
    net.load_state_dict(load_file(str(FIXTURE / "weights.safetensors")), strict=True)
    return net.eval()


# the network against the published code --------------------------------------------------------------------------


@torch.no_grad()
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_published_weights_load_strictly_and_give_the_published_outputs(dtype):
    net = _fixture_net().to(dtype)
    out = net(IO["x"].to(dtype), IO["timesteps"].to(dtype), Conditions(labels=IO["labels"]))
    assert out.dtype == dtype
    assert torch.allclose(out, IO["out"].to(dtype), atol=2e-5)  # the reference itself is float32


@torch.no_grad()
def test_null_label_adds_no_class_embedding_and_class_vectors_mix_the_rows():
    net = _fixture_net()
    x, t = IO["x"][:2], IO["timesteps"][:2]
    null = net(x, t, Conditions(labels=torch.tensor([NULL_LABEL, NULL_LABEL])))
    assert torch.allclose(null, net(x, t, Conditions(class_vector=torch.zeros(2, 10))), atol=1e-6)
    assert torch.allclose(null, net(x, t, Conditions()), atol=1e-6)
    one_hot = torch.nn.functional.one_hot(torch.tensor([3, 7]), 10).float()
    by_label = net(x, t, Conditions(labels=torch.tensor([3, 7])))
    assert torch.allclose(by_label, net(x, t, Conditions(class_vector=one_hot)), atol=1e-6)
    assert not torch.allclose(by_label, null, atol=1e-3)


def test_lora_only_removes_every_embedding_and_adaln_keeps_the_time_embedding():
    lora_only = build_network(build_config("mnist-iddpm", {"model": {"conditioning": "lora_only"}}))
    names = [n for n, _ in lora_only.named_parameters()]
    assert not any(n.startswith(("time_embed", "label_emb")) or ".emb_layers." in n for n in names)
    adaln = build_network(
        build_config(
            "mnist-iddpm", {"model": {"conditioning": "adaln_attn"}, "lora": {"time": "none", "classes": "none"}}
        )
    )
    names = [n for n, _ in adaln.named_parameters()]
    assert any(n.startswith("time_embed") for n in names) and not any(".emb_layers." in n for n in names)
    assert sum(n.endswith("ada.weight") for n in names) == 4  # one per attention block


# the process against the published code and closed forms -------------------------------------------------------


def _fixture_process() -> IDDPM:
    return IDDPM(NoiseSchedule.create("cosine", 100), learn_sigma=True)


def test_hybrid_loss_terms_match_the_published_training_losses():
    process = _fixture_process()
    x0, noise, t, out = IO["loss_x0"], IO["loss_noise"], IO["loss_t"], IO["loss_model_out"]
    x_t = process.schedule.q_sample(x0, t, noise)
    terms = process.terms(out, x0, x_t, t, noise)
    assert torch.allclose(terms["mse"], IO["loss_mse"], rtol=1e-6)
    published_vb = IO["loss_vb"] / (process.num_timesteps / 1000)  # the published term is already rescaled
    assert torch.allclose(terms["vb"][1:], published_vb[1:], rtol=1e-5)  # KL terms
    # t = 0: the decoder NLL, with the exact normal CDF where the published code approximates it
    assert terms["vb"][0].item() == pytest.approx(published_vb[0].item(), rel=1e-2)
    expected = terms["mse"] + 0.001 * process.num_timesteps * terms["vb"]
    assert torch.allclose(terms["loss"], expected)
    assert torch.allclose(terms["loss"][1:], IO["loss_total"][1:], rtol=1e-5)
    assert torch.equal(process.noise_level(t).double(), IO["loss_scaled_t"])  # t * 1000 / T


@pytest.mark.parametrize("respaced", [False, True])
def test_reverse_step_matches_the_published_p_mean_variance(respaced):
    process = _fixture_process()
    out, x_t = IO["loss_model_out"], IO["step_xt"]
    if respaced:
        chain, index, key = Chain.of(process.schedule, IO["respaced_steps"].tolist()), IO["respaced_t"], "respaced"
    else:
        chain, index, key = process.chain, IO["loss_t"], "step"
    mean, log_var, _ = chain.model_step(out, x_t, index, learn_sigma=True, clip_denoised=True)
    assert torch.allclose(mean, IO[f"{key}_mean"], atol=1e-6)  # the published code gathers in float32
    assert torch.allclose(log_var, IO[f"{key}_log_variance"], atol=1e-6)
    if respaced:  # the network sees the original step, rescaled
        steps = torch.tensor(chain.steps)[index]
        assert torch.equal(process.noise_level(steps).double(), IO["respaced_scaled_t"])


def test_normal_kl_is_the_closed_form():
    g = torch.Generator().manual_seed(0)
    m1, m2, lv1, lv2 = (torch.randn(50, generator=g, dtype=torch.float64) for _ in range(4))
    reference = torch.distributions.kl_divergence(
        torch.distributions.Normal(m1, (0.5 * lv1).exp()), torch.distributions.Normal(m2, (0.5 * lv2).exp())
    )
    assert torch.allclose(normal_kl(m1, lv1, m2, lv2), reference)


def test_decoder_likelihood_is_the_gaussian_mass_of_each_pixel_bin():
    x0 = torch.tensor([-1.0, -0.5, 0.0, 127 / 127.5 - 1, 1.0], dtype=torch.float64)
    mean = torch.tensor([-0.9, -0.45, 0.02, 0.1, 0.95], dtype=torch.float64)
    std = torch.tensor([0.05, 0.1, 0.01, 0.3, 0.02], dtype=torch.float64)
    normal = torch.distributions.Normal(mean, std)
    lo, hi = normal.cdf(x0 - 1 / 255), normal.cdf(x0 + 1 / 255)
    mass = torch.where(x0 <= -1, hi, torch.where(x0 >= 1, 1 - lo, hi - lo))  # outer bins reach +-infinity
    log_p = discretized_gaussian_log_likelihood(x0, mean, std.log())
    assert torch.allclose(log_p, mass.log(), rtol=1e-9)
    # the 256 bins of a pixel partition the real line: their masses sum to one
    grid = torch.arange(256, dtype=torch.float64) / 127.5 - 1
    total = discretized_gaussian_log_likelihood(grid, torch.full_like(grid, 0.3), torch.full_like(grid, math.log(0.2)))
    assert total.exp().sum().item() == pytest.approx(1.0, abs=1e-9)


# sampling ----------------------------------------------------------------------------------------------------------


def test_the_chain_of_every_step_is_the_training_process():
    schedule = NoiseSchedule.create("cosine", 50)
    chain = Chain.of(schedule, range(50))
    assert torch.allclose(chain.betas, schedule.betas, rtol=1e-9)
    assert torch.allclose(chain.posterior_variance[1:], schedule.posterior_variance[1:], rtol=1e-9)
    assert chain.posterior_log_variance[0] == chain.posterior_log_variance[1]  # clipped at step 0


@pytest.mark.parametrize("v", [-1.0, None])
def test_sampling_with_all_steps_reproduces_ddpm_ancestral_sampling(v):
    """v = -1 selects the posterior variance; a network without learned variance uses it too."""
    schedule = NoiseSchedule.create("cosine", 40)
    ab = schedule.alphas_cumprod

    def eps(x, t):  # some smooth eps: the two samplers must agree on any
        return torch.tanh(x) * (1 - ab[t]).sqrt().to(x.dtype).reshape(-1, 1, 1, 1)

    def output(x, t):
        return eps(x, t) if v is None else torch.cat([eps(x, t), torch.full_like(x, v)], dim=1)

    chain = Chain.of(schedule, range(40))
    ours = iddpm_sample(output, chain, PerSampleNoise([1, 2, 3]), (2, 4, 4), learn_sigma=v is not None)
    reference = ddpm_sample(eps, schedule, PerSampleNoise([1, 2, 3]), (2, 4, 4))
    assert torch.allclose(ours, reference, atol=1e-5)


@pytest.mark.parametrize("steps", [8, 25])
def test_exact_mean_and_learned_variance_of_gaussian_data_reach_it_with_few_steps(steps):
    """For x0 ~ N(0, s^2) the reverse kernel of a respaced chain is exactly Gaussian: mean = posterior mean at
    E[x0 | x_t], variance = beta~ + c^2 Var(x0 | x_t). Feeding that variance through v must give samples of
    std s; the fixed posterior variance (v = -1) falls short with so few steps."""
    s, T = 0.5, 1000
    schedule = NoiseSchedule.create("cosine", T)
    chain = Chain.of(schedule, torch.linspace(0, T - 1, steps).round().long().tolist())
    ab_all = schedule.alphas_cumprod
    position = {step: i for i, step in enumerate(chain.steps)}

    def denoiser(exact_variance: bool):
        def output(x, t):
            i = position[int(t[0])]
            ab = ab_all[chain.steps[i]].item()
            ab_prev = ab_all[chain.steps[i - 1]].item() if i > 0 else 1.0
            beta = 1 - ab / ab_prev
            eps = (1 - ab) ** 0.5 * x / (ab * s**2 + 1 - ab)  # E[eps | x_t]
            if not exact_variance or i == 0:
                return torch.cat([eps, torch.full_like(x, -1.0)], dim=1)
            var_x0 = s**2 * (1 - ab) / (ab * s**2 + 1 - ab)
            coef = ab_prev**0.5 * beta / (1 - ab)
            small = beta * (1 - ab_prev) / (1 - ab)
            v = 2 * (math.log(small + coef**2 * var_x0) - math.log(small)) / (math.log(beta) - math.log(small)) - 1
            return torch.cat([eps, torch.full_like(x, v)], dim=1)

        return output

    noise = PerSampleNoise(range(3000))
    exact = iddpm_sample(denoiser(True), chain, noise, (1, 1, 1), learn_sigma=True, clip_denoised=False)
    assert exact.std().item() == pytest.approx(s, rel=0.05)
    assert exact.mean().item() == pytest.approx(0.0, abs=0.03)
    if steps == 8:
        fixed = iddpm_sample(denoiser(False), chain, PerSampleNoise(range(3000)), (1, 1, 1), True, False)
        assert fixed.std().item() < 0.9 * s


# importance sampling ----------------------------------------------------------------------------------------------


def _published_probabilities(history_of: list[list[float]], T: int, H: int, uniform: float) -> torch.Tensor:
    """IDDPM's LossSecondMomentResampler.weights, written out: uniform until every step has H losses."""
    if any(len(h) < H for h in history_of):
        return torch.full((T,), 1 / T, dtype=torch.float64)
    rms = torch.tensor([math.sqrt(sum(v * v for v in h) / H) for h in history_of], dtype=torch.float64)
    return rms / rms.sum() * (1 - uniform) + uniform / T


def test_importance_sampler_follows_the_published_algorithm_with_repeated_steps():
    T, H, uniform = 5, 3, 0.01
    sampler = LossSecondMomentSampler(T, history=H, uniform=uniform)
    history: list[list[float]] = [[] for _ in range(T)]
    rng = random.Random(0)
    for _ in range(12):
        t = [rng.randrange(T) for _ in range(8)]  # many repeats, sometimes more than H of one step
        losses = [rng.uniform(0.1, 3.0) for _ in t]
        for step, loss in zip(t, losses, strict=True):
            history[step] = (history[step] + [loss])[-H:]  # the published per-step queue of the last H
        sampler.update(torch.tensor(t), torch.tensor(losses))
        assert torch.allclose(sampler.probabilities(), _published_probabilities(history, T, H, uniform), rtol=1e-12)
    assert all(len(h) == H for h in history)  # the test reached the importance-sampling phase
    t, weights = sampler.sample(20_000, torch.Generator().manual_seed(0))
    p = sampler.probabilities()
    assert torch.allclose(weights.double(), 1 / (T * p[t]), rtol=1e-6)
    frequencies = torch.bincount(t, minlength=T).double() / len(t)
    assert torch.allclose(frequencies, p, atol=0.015)
    restored = LossSecondMomentSampler(T, history=H, uniform=uniform)
    restored.load_state_dict(sampler.state_dict())
    assert torch.equal(restored.probabilities(), p)


def test_importance_sampler_skips_a_batch_with_a_non_finite_loss():
    T, H = 4, 2
    sampler = LossSecondMomentSampler(T, history=H)
    for losses in ([1.0, 2.0, 3.0, 4.0], [2.0, 1.0, 0.5, 3.0]):
        sampler.update(torch.arange(T), torch.tensor(losses))
    p, counts = sampler.probabilities(), sampler.counts.clone()
    assert not torch.equal(p, torch.full((T,), 1 / T, dtype=torch.float64))  # importance sampling is on
    for bad in (float("nan"), float("inf")):
        sampler.update(torch.tensor([0, 2, 2]), torch.tensor([5.0, bad, 1.0]))
        assert torch.equal(sampler.probabilities(), p) and torch.equal(sampler.counts, counts)
    sampler.update(torch.tensor([1, 1]), torch.tensor([7.0, 9.0]))  # a finite batch is recorded again
    history = [[1.0, 2.0], [7.0, 9.0], [3.0, 0.5], [4.0, 3.0]]
    assert torch.allclose(sampler.probabilities(), _published_probabilities(history, T, H, 0.001), rtol=1e-12)


def test_importance_sampled_run_resumes_exactly(tiny_config, tmp_path, monkeypatch):
    """The sampler's loss histories are in the checkpoint (T = 10: importance sampling starts at step 7)."""
    sections = {
        "diffusion": {"family": "iddpm"},
        "ddpm": {"num_timesteps": 10, "schedule": "cosine", "timestep_sampler": "loss-second-moment"},
    }
    full = tiny_config(train={"out_dir": str(tmp_path / "full")}, **sections)
    train(full, tmp_path / "full")
    part = tiny_config(train={"out_dir": str(tmp_path / "part")}, **sections)
    train_until_killed(part, tmp_path / "part", monkeypatch)
    train(part, tmp_path / "part", resume=True)
    a, b = load_latest(tmp_path / "full" / "checkpoints"), load_latest(tmp_path / "part" / "checkpoints")
    assert a.step == b.step == 12
    assert (a.tensors["process"]["counts"] >= 10).all()  # warmed up: the last steps were importance-sampled
    for group in ("model", "optimizer", "process"):
        for key, value in a.tensors[group].items():
            assert torch.equal(value, b.tensors[group][key]), (group, key)


# presets, parameter counts, training --------------------------------------------------------------------------

LORA_ONLY = {"model": {"conditioning": "lora_only"}}
PARAMETER_ROWS = [  # (preset, overrides, count printed in the papers)
    ("iddpm-cifar10-uncond", {}, 52_546_438),
    ("iddpm-cifar10-uncond", {"ddpm": {"learn_sigma": False}}, 52_542_979),
    ("iddpm-cifar10-cond", {}, 52_551_558),
    ("iddpm-imagenet64", {}, 121_063_942),
    ("iddpm-cifar10-uncond-lora", {**LORA_ONLY, "lora": {"omega": "fixed"}}, 46_271_110),
    ("iddpm-cifar10-uncond-lora", LORA_ONLY, 47_591_440),
    ("iddpm-cifar10-uncond-lora", {}, 54_880_528),
    ("iddpm-cifar10-uncond-lora", {"lora": {"omega": "fixed"}}, 53_560_198),
    ("iddpm-cifar10-cond-lora", {**LORA_ONLY, "lora": {"omega": "fixed"}}, 47_192_710),
    ("iddpm-cifar10-cond-lora", LORA_ONLY, 48_513_040),
    ("iddpm-cifar10-cond-lora", {}, 55_807_248),
    ("iddpm-cifar10-cond-lora", {"lora": {"omega": "fixed"}}, 54_486_918),
    ("iddpm-cifar10-uncond-lora", {**LORA_ONLY, "lora": {"rank": 8}}, 48_605_200),
    ("iddpm-cifar10-uncond-lora", {**LORA_ONLY, "lora": {"time_bases": 41}}, 53_957_140),
    (
        "iddpm-cifar10-uncond-lora",
        {**LORA_ONLY, "lora": {"time": "noncompositional"}, "ddpm": {"num_timesteps": 1000}, "sample": {"steps": 1000}},
        137_417_350,
    ),
    ("iddpm-imagenet64-lora", LORA_ONLY, 113_602_960),
]


@pytest.mark.parametrize(("preset", "overrides", "expected"), PARAMETER_ROWS)
def test_parameter_counts_match_the_papers(preset, overrides, expected):
    with torch.device("meta"):
        net = build_network(build_config(preset, overrides))
    assert count_parameters(net) == expected


@pytest.mark.parametrize("preset", ["iddpm-cifar10-uncond-lora", "iddpm-cifar10-cond-lora"])
def test_cifar10_presets_take_a_training_step_at_batch_2(preset):
    cfg = build_config(preset)
    torch.manual_seed(0)
    net = build_network(cfg)
    process = process_for(cfg)
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    x0 = torch.rand(2, 3, 32, 32) * 2 - 1
    labels = torch.tensor([1, NULL_LABEL]) if cfg.model.num_classes else None
    for _ in range(2):  # the output convolution starts at zero: the second step reaches the adapters
        terms = process.loss(net, x0, Conditions(labels=labels), torch.Generator().manual_seed(0))
        assert set(terms) == {"loss", "mse", "vb"} and all(v.shape == (2,) for v in terms.values())
        opt.zero_grad()
        terms["loss"].mean().backward()
        opt.step()
    params = dict(net.named_parameters())
    omega = [p for n, p in params.items() if n.endswith("strategies.time.table")]
    assert len(omega) == 30 and all(p.requires_grad for p in omega)  # trained tables on 15 qkv + 15 proj_out
    up = [p for n, p in params.items() if n.endswith("proj_out.lora_up")]
    assert len(up) == 15 and all(p.grad.abs().sum() > 0 for p in up)


def test_time_lora_reads_the_integer_step_while_the_network_gets_the_rescaled_one():
    cfg = build_config("mnist-iddpm")
    process = process_for(cfg)
    seen = {}

    def probe(x, noise_level, cond):
        seen.update(noise_level=noise_level, step=cond.step)
        return torch.zeros(x.shape[0], 2 * x.shape[1], *x.shape[2:])

    t = torch.tensor([0, 1, 999])
    process.predict(probe, torch.zeros(3, 1, 28, 28), t, Conditions())
    assert torch.equal(seen["step"], t)
    assert torch.allclose(seen["noise_level"], torch.tensor([0.0, 1.0, 999.0]))  # T = 1000: 1000 / T = 1
    t4000 = torch.tensor([0, 1, 3999])
    process_for(build_config("iddpm-cifar10-uncond")).predict(probe, torch.zeros(3, 3, 32, 32), t4000, Conditions())
    assert torch.allclose(seen["noise_level"], torch.tensor([0.0, 0.25, 999.75]))


def test_mnist_preset_trains_and_samples(tmp_path):
    from condlora.pipeline import load_model, sample_to_files

    train_cfg = {"steps": 3, "batch_size": 8, "progress": False, "sample_every": 0, "device": "cpu"}
    cfg = build_config("mnist-iddpm", {"train": {**train_cfg, "precision": "bf16"}})
    result = train(cfg, tmp_path / "run")
    assert math.isfinite(result.final_loss)
    rows = (tmp_path / "run" / "metrics.csv").read_text().splitlines()
    assert rows[0].startswith("step,loss,mse,vb,")  # both terms of the hybrid loss are logged
    net, cfg, _ = load_model(result.checkpoint)
    sample = cfg.sample.__class__(**{**vars(cfg.sample), "count": 4, "steps": 5, "batch_size": 4})
    import time

    from condlora.data import read_npz

    began = time.perf_counter()
    png, npz = sample_to_files(net, cfg, sample, tmp_path / "samples", progress=False)
    elapsed = time.perf_counter() - began
    assert png.is_file() and npz.is_file()
    cost = read_npz(npz)
    assert cost["network_calls_per_sample"] == 5  # 5 steps, both guidance branches in one call
    assert 0 < cost["sampling_seconds"] <= elapsed


def test_iddpm_config_errors_name_the_field():
    from condlora.config import ConfigError

    with pytest.raises(ConfigError, match="ddpm.learn_sigma.*iddpm"):
        build_config("mnist-nano", {"ddpm": {"learn_sigma": True}})
    with pytest.raises(ConfigError, match="ddpm.learn_sigma.*backbone iddpm"):
        build_config("mnist-nano", {"diffusion": {"family": "iddpm"}, "ddpm": {"learn_sigma": True}})
    with pytest.raises(ConfigError, match="iddpm.attention_resolutions.*resolutions"):
        build_config("mnist-iddpm", {"iddpm": {"attention_resolutions": (5,)}})
    with pytest.raises(ConfigError, match="iddpm.model_channels.*norm_groups"):
        build_config("mnist-iddpm", {"iddpm": {"model_channels": 20}})
    with pytest.raises(ConfigError, match="sample.sampler"):
        build_config("mnist-iddpm", {"sample": {"sampler": "heun"}})
