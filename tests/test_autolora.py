"""AutoLoRA guidance (Kasymov et al. 2025, eq. 6-7): its special cases, the one batched four-branch call, a
LoRA scale of 0 as the base model bit for bit, every sampler and adapter kind, the CLI."""

import copy

import pytest
import torch

from condlora.conditions import NULL_LABEL, Conditions
from condlora.config import SampleConfig
from condlora.diffusion import autolora, classifier_free, guided, process_for, with_lora_scale
from condlora.diffusion.generate import generate
from condlora.lora import conditioned_layers
from condlora.nets import build_network
from condlora.presets import build_config


def _fake_predict(x, t, cond):
    """A prediction whose value encodes its branch: the label (null -> 10) + 1000 * the LoRA scale."""
    scale = torch.ones(x.shape[0]) if cond.lora_scale is None else cond.lora_scale
    value = torch.where(cond.labels == NULL_LABEL, 10, cond.labels).float() + 1000 * scale
    return value[:, None, None, None].expand_as(x)


@pytest.mark.parametrize(
    ("gamma", "alpha", "w1", "w2"),
    [(1.5, 0.8, 3.0, 2.0), (0.0, 0.8, 3.0, 2.0), (1.0, 1.3, 2.5, 2.5), (2.0, 0.4, 1.0, 1.0), (-0.5, 1.0, 0.0, 4.0)],
)
def test_autolora_is_eq7_by_hand(gamma, alpha, w1, w2):
    calls = []

    def predict(x, t, cond):
        calls.append(x.shape[0])
        return _fake_predict(x, t, cond)

    labels = torch.tensor([2, 7, 4])
    out = guided(predict, autolora(Conditions(labels=labels), gamma, alpha, w2, w1))(
        torch.zeros(3, 1, 2, 2), torch.zeros(3)
    )
    y = labels.float()
    base = w1 * y + (1 - w1) * 10  # eps^{w1}: base model (LoRA scale 0) guided with w1
    lora = w2 * (y + 1000 * alpha) + (1 - w2) * (10 + 1000 * alpha)  # eps_LoRA^{w2}
    assert torch.allclose(out[:, 0, 0, 0], base + gamma * (lora - base), atol=1e-3)
    assert len(calls) == 1  # every branch in one batched call


def test_autolora_leaves_out_what_weighs_nothing():
    cond = Conditions(labels=torch.tensor([1, 2]))
    assert len(autolora(cond, 1.5, 0.8, 3.0, 2.0).branches) == 4
    cfg_of_base = autolora(cond, 0.0, 0.8, 3.0, 2.0)  # gamma 0: classifier-free guidance of the base
    assert cfg_of_base.weights == (2.0, -1.0) and all(
        torch.equal(b.lora_scale, torch.zeros(2)) for b in cfg_of_base.branches
    )
    cfg_of_lora = autolora(cond, 1.0, 0.8, 3.0)  # gamma 1, w1 = w2: classifier-free guidance of the LoRA model
    assert cfg_of_lora.weights == (3.0, -2.0) and all(
        torch.equal(b.lora_scale, torch.full((2,), 0.8)) for b in cfg_of_lora.branches
    )
    no_cfg = autolora(cond, 1.5, 1.0, 1.0)  # w1 = w2 = 1 (eq. 6): base and LoRA model, conditional only
    assert no_cfg.weights == (-0.5, 1.5) and all(torch.equal(b.labels, cond.labels) for b in no_cfg.branches)
    assert no_cfg.branches[1].lora_scale is None  # alpha 1: the adapters as trained, no tensor
    unconditional = autolora(Conditions(), 1.5, 0.5, 3.0, batch_size=2, device="cpu")
    assert [b.lora_scale.tolist() for b in unconditional.branches] == [[0.0, 0.0], [0.5, 0.5]]
    with pytest.raises(ValueError, match="batch size"):
        autolora(Conditions(), 1.5, 0.5)


# real networks -------------------------------------------------------------------------------------------------

NETWORKS = {
    "nano-plain": ("digits-nano", {"lora": {"plain": True}}),
    "nano-uncond": ("digits-nano", {"model": {"num_classes": 0}, "lora": {"plain": True}}),
    "nano-time-class": ("digits-nano", {"model": {"conditioning": "with_lora"},
                                        "lora": {"time": "compositional", "classes": "compositional"}}),
    "nano-tsm": ("digits-nano", {"model": {"conditioning": "with_lora"},
                                 "lora": {"tsm_scales": (1, 2), "tsm_stage": "assemble"}}),
    "iddpm": ("mnist-iddpm", {"model": {"image_size": 16}, "data": {"image_size": 16},
                              "iddpm": {"attention_resolutions": (4,)}, "sample": {"steps": 4}}),
    "edm-uc": ("mnist-edm", {"model": {"image_size": 16}, "data": {"image_size": 16},
                             "ddpmpp": {"attn_resolutions": (4,)}, "sample": {"steps": 3}}),
}  # fmt: skip


def _network(kind):
    preset, overrides = NETWORKS[kind]
    cfg = build_config(preset, {"ddpm": {"num_timesteps": 100}, "sample": {"steps": 4}} | overrides)
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    with torch.no_grad():  # trained-looking: nothing at its zero initialisation (output layers, adapters, routers)
        for p in net.parameters():
            if not p.any():
                p.normal_(0, 0.05)
        for _, layer in conditioned_layers(net):
            for name, p in layer.named_parameters():
                if not name.startswith("base_layer"):
                    p.normal_(0, 0.1)
    return net, cfg


def _with_adapters_times(net, factor):
    """An independent copy of the network whose adapters' output is multiplied by `factor` (0: the base)."""
    other = copy.deepcopy(net)
    with torch.no_grad():
        for _, layer in conditioned_layers(other):
            layer.lora_up.mul_(factor)
            if layer.basis_bias is not None:
                layer.basis_bias.mul_(factor)
    return other


def _sample_cfg(cfg, **fields):
    fields = {"count": 4, "batch_size": 4, "seed": 3, "guidance_scale": 2.0} | fields
    return SampleConfig(**{**cfg.sample.__dict__, **fields})


def _draw(net, cfg, sample):
    m = cfg.model
    images, _ = generate(net, process_for(cfg), sample, (m.in_channels, m.image_size, m.image_size), m.num_classes,
                         progress=False)  # fmt: skip
    return images


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_gamma_0_is_classifier_free_guidance_of_the_base_bit_for_bit(kind):
    net, cfg = _network(kind)
    auto = _draw(net, cfg, _sample_cfg(cfg, guidance="autolora", autolora_gamma=0.0, lora_scale=0.9))
    base = _draw(_with_adapters_times(net, 0.0), cfg, _sample_cfg(cfg))
    assert torch.equal(auto, base)
    assert not torch.equal(base, _draw(net, cfg, _sample_cfg(cfg)))  # the adapters do change the samples


@pytest.mark.parametrize("kind", list(NETWORKS))
def test_gamma_1_is_the_lora_model_at_scale_alpha(kind):
    net, cfg = _network(kind)
    auto = _draw(net, cfg, _sample_cfg(cfg, guidance="autolora", autolora_gamma=1.0, lora_scale=0.6))
    assert torch.allclose(auto, _draw(_with_adapters_times(net, 0.6), cfg, _sample_cfg(cfg)), atol=1e-3)  # rounding


@pytest.mark.parametrize("kind", ["nano-plain", "nano-tsm", "edm-uc"])
def test_autolora_combines_separate_models_as_eq7_says(kind):
    """One network, four branches in one call, equals base and LoRA copies evaluated one by one."""
    net, cfg = _network(kind)
    m, process = cfg.model, process_for(cfg)
    base, lora = _with_adapters_times(net, 0.0), _with_adapters_times(net, 0.7)
    gamma, w1, w2 = 1.5, 3.0, 2.0
    x = torch.randn(3, m.in_channels, m.image_size, m.image_size)
    t = torch.tensor([0.5, 2.0, 10.0]) if cfg.diffusion.family == "edm" else torch.tensor([5, 50, 99])
    cond, null = Conditions(labels=torch.tensor([1, 4, 7])), Conditions(labels=torch.full((3,), NULL_LABEL))
    with torch.no_grad():
        got = guided(lambda x, t, c: process.predict(net, x, t, c), autolora(cond, gamma, 0.7, w2, w1))(x, t)
        base_w1 = w1 * process.predict(base, x, t, cond) + (1 - w1) * process.predict(base, x, t, null)
        lora_w2 = w2 * process.predict(lora, x, t, cond) + (1 - w2) * process.predict(lora, x, t, null)
    assert torch.allclose(got, base_w1 + gamma * (lora_w2 - base_w1), atol=1e-4)


@pytest.mark.parametrize("per_call, calls", [(1, 4), (2, 2), (3, 2), (4, 1)])
def test_branches_per_call_splits_the_branches_and_keeps_the_result(per_call, calls):
    """Fewer branches per network call (less peak memory) give the same guided prediction as one call."""
    net, cfg = _network("nano-plain")
    process, m = process_for(cfg), cfg.model
    x, t = torch.randn(3, m.in_channels, m.image_size, m.image_size), torch.tensor([5, 50, 99])
    guidance = autolora(Conditions(labels=torch.tensor([1, 4, 7])), 1.5, 0.7, 2.0, 3.0)
    sizes = []

    def predict(x, t, c):
        sizes.append(x.shape[0])
        return process.predict(net, x, t, c)

    with torch.no_grad():
        one_call = guided(predict, guidance)(x, t)
        assert sizes == [12]
        sizes.clear()
        split = guided(predict, guidance, branches_per_call=per_call)(x, t)
    assert len(sizes) == calls and sum(sizes) == 12 and max(sizes) == 3 * per_call
    assert torch.allclose(split, one_call, atol=1e-5)
    with pytest.raises(ValueError, match="branches_per_call"):
        guided(predict, guidance, branches_per_call=-1)


@pytest.mark.parametrize("alpha", [1.0, 0.7])
def test_autolora_of_an_unconditional_model_is_eq6(alpha):
    """No labels: two branches (base, LoRA), the LoRA one at alpha; at alpha 1 it carries no scale of its own,
    and the joined batch still gives every sample its scale."""
    net, cfg = _network("nano-uncond")
    m, process, gamma = cfg.model, process_for(cfg), 1.5
    x, t = torch.randn(3, m.in_channels, m.image_size, m.image_size), torch.tensor([5, 50, 99])
    guidance = autolora(Conditions(), gamma, alpha, batch_size=3, device="cpu")
    with torch.no_grad():
        got = guided(lambda x, t, c: process.predict(net, x, t, c), guidance)(x, t)
        base = process.predict(_with_adapters_times(net, 0.0), x, t, Conditions())
        lora = process.predict(_with_adapters_times(net, alpha), x, t, Conditions())
    assert torch.allclose(got, base + gamma * (lora - base), atol=1e-4)
    assert not torch.allclose(base, lora, atol=1e-3)  # the adapters do change the prediction


@pytest.mark.parametrize("kind", ["nano-time-class", "nano-tsm", "iddpm", "edm-uc"])
def test_lora_scale_0_is_the_base_network_bit_for_bit_inside_a_batched_call(kind):
    net, cfg = _network(kind)
    m, process = cfg.model, process_for(cfg)
    x = torch.randn(2, m.in_channels, m.image_size, m.image_size).repeat(2, 1, 1, 1)
    t = torch.tensor([0.5, 9.0] * 2) if cfg.diffusion.family == "edm" else torch.tensor([5, 80] * 2)
    labels = torch.tensor([3, 6] * 2)
    mixed = Conditions(labels=labels, lora_scale=torch.tensor([0.0, 0.0, 1.2, 1.2]))
    with torch.no_grad():
        out = process.predict(net, x, t, mixed)
        reference = process.predict(_with_adapters_times(net, 0.0), x, t, Conditions(labels=labels))
        scaled = process.predict(_with_adapters_times(net, 1.2), x, t, Conditions(labels=labels))
    assert torch.equal(out[:2], reference[:2])
    assert torch.allclose(out[2:], scaled[2:], atol=1e-4)


def test_with_lora_scale_1_keeps_the_fast_paths():
    cond = Conditions(labels=torch.tensor([1, 1]), shared=True)
    assert with_lora_scale(cond, 1.0).lora_scale is None
    assert torch.equal(with_lora_scale(cond, 0.5).lora_scale, torch.tensor([0.5, 0.5]))
    assert classifier_free(with_lora_scale(cond, 0.5), 2.0).branches[1].lora_scale.tolist() == [0.5, 0.5]


def test_a_network_without_adapters_is_refused():
    cfg = build_config("digits-nano")
    net = build_network(cfg).eval()
    with pytest.raises(ValueError, match="guidance autolora needs a network with LoRA adapters"):
        _draw(net, cfg, _sample_cfg(cfg, guidance="autolora"))
    with pytest.raises(ValueError, match="lora_scale 0.5 needs a network with LoRA adapters"):
        _draw(net, cfg, _sample_cfg(cfg, lora_scale=0.5))
    from condlora.pipeline import sample_class_vectors

    cfg.sample = _sample_cfg(cfg, guidance="autolora")
    with pytest.raises(ValueError, match="guidance autolora needs a network with LoRA adapters"):
        sample_class_vectors(net, cfg, torch.eye(10)[:2], [0, 1])  # class grids check it too


def test_cli_samples_with_autolora(tiny_config, tmp_path, capsys):
    import numpy as np

    from condlora.cli import main
    from condlora.train import train

    train(tiny_config(lora={"plain": True}, train={"steps": 4}), tmp_path / "run")
    out = str(tmp_path / "auto-gamma1.5")
    main(["sample", str(tmp_path / "run"), "--guidance", "autolora", "--gamma", "1.5", "--lora-scale", "0.8",
          "--base-guidance-scale", "3", "--count", "4", "--steps", "3", "--out", out])  # fmt: skip
    assert np.load(tmp_path / "auto-gamma1.5.npz")["images"].shape == (4, 8, 8, 1)  # the dot stays in the name
    assert (tmp_path / "auto-gamma1.5.png").is_file()
    main(["sample", str(tmp_path / "run"), "--guidance", "autolora", "--gamma", "1.5", "--lora-scale", "0.8",
          "--base-guidance-scale", "3", "--count", "4", "--steps", "3", "--out", out + "-split",
          "--branches-per-call", "2"])  # fmt: skip
    split = np.load(tmp_path / "auto-gamma1.5-split.npz")["images"].astype(int)
    assert abs(split - np.load(tmp_path / "auto-gamma1.5.npz")["images"].astype(int)).max() <= 1  # uint8 rounding
    with pytest.raises(SystemExit):
        main(["sample", str(tmp_path / "run"), "--guidance", "guess"])
    assert "invalid choice: 'guess'" in capsys.readouterr().err
