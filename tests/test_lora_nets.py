"""Conditioning modes of the nano backbone, closed-form parameter counts, and LoRA on a diffusers UNet."""

import os
from pathlib import Path

import pytest
import torch

from condlora.conditions import Conditions
from condlora.lora import ConditionedLoRA, LoRASpec, conditioned_layers
from condlora.nets import build_network, count_parameters
from condlora.presets import build_config
from condlora.train import train

os.environ.setdefault("HF_HUB_OFFLINE", "1")

TINY_NANO = {"channels": 8, "channel_mult": "1,2", "attn_levels": "1", "num_heads": 2}
T = 100
WITH, ONLY = {"conditioning": "with_lora"}, {"conditioning": "lora_only"}


def _sections(mode: str) -> dict:
    model, lora = MODES[mode]
    return {"model": {"image_size": 8, **model}, "nano": TINY_NANO, "lora": lora, "ddpm": {"num_timesteps": T}}


def _config(mode: str = "baseline"):
    return build_config("digits-nano", _sections(mode))


MODES = {  # name: (model section, lora section)
    "baseline": ({}, {}),
    "adaln_attn": ({"conditioning": "adaln_attn"}, {}),
    "time_fixed": (WITH, {"time": "compositional", "time_bases": 5}),
    "time_onehot_train": (WITH, {"time": "compositional", "omega": "train", "omega_init": "onehot"}),
    "time_gaussian": (ONLY, {"time": "compositional", "omega": "train", "omega_init": "gaussian", "classes": "select"}),
    "time_noncomp": (WITH, {"time": "noncompositional"}),
    "class_select": (WITH, {"classes": "select"}),
    "class_comp": (WITH, {"classes": "compositional", "class_bases": 3}),
    "time_and_class_lora_only": (ONLY, {"time": "compositional", "classes": "select"}),
    "uc_lora_only": (ONLY, {"uc_bases": 6, "uc_widths": "16,8", "basis_bias": True}),
}


def _call(net, x, t, labels):
    """net(x, noise_level, cond) the way the DDPM process calls it: the step goes into the conditions."""
    return net(x, t.float(), Conditions(labels=labels, step=t))


@pytest.mark.parametrize("mode", list(MODES))
def test_every_mode_runs_and_is_differentiable(mode):
    net = build_network(_config(mode))
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([0, 50, 99])
    out = _call(net, x, t, torch.tensor([1, -1, 9]))
    assert out.shape == x.shape
    out.square().mean().backward()
    lora = [layer for _, layer in conditioned_layers(net)]
    assert len(lora) == (0 if mode in ("baseline", "adaln_attn") else 8)  # qkv, proj of 4 attention blocks


def _baseline_weights_into(net, baseline):
    """Copy a baseline network's weights into the base layers of a with_lora network of the same shape."""
    sd = {}
    for key, value in baseline.state_dict().items():
        parts = key.rsplit(".", 1)
        lora_key = f"{parts[0]}.base_layer.{parts[1]}"
        sd[lora_key if lora_key in net.state_dict() else key] = value
    missing, _ = net.load_state_dict(sd, strict=False)
    assert all("lora" in k or "strategies" in k or "basis_bias" in k for k in missing)


@pytest.mark.parametrize("mode", ["time_fixed", "time_noncomp", "class_select", "class_comp", "time_onehot_train"])
def test_fresh_lora_leaves_a_trained_network_unchanged(mode):
    torch.manual_seed(0)
    baseline = build_network(_config())
    for p in baseline.parameters():  # a "trained" network: non-zero everywhere
        torch.nn.init.normal_(p, std=0.1)
    net = build_network(_config(mode))
    _baseline_weights_into(net, baseline)
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([0, 3, 70, 99]), torch.tensor([0, 5, -1, 9])
    assert torch.allclose(_call(net, x, t, y), _call(baseline, x, t, y), atol=1e-6)


def test_parameter_counts_match_closed_forms():
    base = count_parameters(build_network(_config()))
    r, c = 4, 16  # attention width of level 1 (8 * 2); four attention blocks, each with qkv (c -> 3c), proj (c -> c)
    io = 4 * ((c + 3 * c) + (c + c))  # sum over layers of C_in + C_out
    layers = 8

    def lora(mode):
        return count_parameters(build_network(_config(mode))) - base

    # TimeLoRA, fixed table of m + 1 = 5 bases: r (m + 1) (C_in + C_out) per layer, the table is a buffer
    assert lora("time_fixed") == r * 5 * io
    # trainable table adds T (m + 1) per layer
    assert lora("time_onehot_train") == r * 11 * io + layers * T * 11
    # non-compositional TimeLoRA: T adapters, no trainable omega
    assert lora("time_noncomp") == r * T * io
    # ClassLoRA: one adapter per class (C = 10); compositional: 3 bases + a (10 x 3) table per layer
    assert lora("class_select") == r * 10 * io
    assert lora("class_comp") == r * 3 * io + layers * 10 * 3
    # UC-LoRA with bias, MLP D -> 16 -> 8 -> m (each hidden layer: Linear + GroupNorm affine), D = 4 * 8 = 32
    m, d = 6, 32
    mlp = (d * 16 + 16) + 2 * 16 + (16 * 8 + 8) + 2 * 8 + (8 * m + m)
    out_widths = 4 * (3 * c + c)  # sum of C_out, for the per-basis bias (r m x C_out)
    uc_with_lora = r * m * io + layers * mlp + r * m * out_widths
    emb_layers = sum(p.numel() for n, p in build_network(_config()).named_parameters() if "emb_layers" in n)
    # lora_only drops every residual block's scale-and-shift (emb_layers) but keeps the embedding for UC-LoRA
    assert lora("uc_lora_only") == uc_with_lora - emb_layers


def test_lora_only_without_uc_drops_the_embedding_network():
    net = build_network(_config("time_and_class_lora_only"))
    names = [n for n, _ in net.named_parameters()]
    assert not any(n.startswith(("time_embed", "class_embed")) or "emb_layers" in n for n in names)


@pytest.mark.parametrize("mode", ["time_fixed", "time_and_class_lora_only", "uc_lora_only", "adaln_attn"])
def test_training_runs_in_every_mode(tmp_path, mode):
    overrides = {
        **_sections(mode),
        "train": {"steps": 30, "batch_size": 32, "lr": 3e-3, "warmup_steps": 2, "log_every": 10, "sample_every": 0,
                  "checkpoint_every": 0, "progress": False, "device": "cpu"},
    }  # fmt: skip
    cfg = build_config("digits-nano", overrides)
    result = train(cfg, tmp_path / mode)
    assert result.steps == 30 and result.final_loss < 1.0
    if mode != "adaln_attn":
        ups = [layer.lora_up for _, layer in conditioned_layers(result.net)]
        assert all(u.abs().sum() > 0 for u in ups)  # B moved away from its zero init


def test_conditioned_lora_on_a_diffusers_unet():
    diffusers = pytest.importorskip("diffusers")
    from condlora.nets.diffusers_unet import DIFFUSERS_ATTENTION_TARGETS, DiffusersUNet

    torch.manual_seed(0)
    unet = diffusers.UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, layers_per_block=1, block_out_channels=(16, 32),
        down_block_types=("DownBlock2D", "AttnDownBlock2D"), up_block_types=("AttnUpBlock2D", "UpBlock2D"),
        norm_num_groups=8, attention_head_dim=8,
    )  # fmt: skip
    x, t, y = torch.randn(4, 1, 8, 8), torch.tensor([1, 10, 50, 99]), torch.tensor([0, 1, 2, -1])
    with torch.no_grad():
        before = unet(x, t.float()).sample
    spec = LoRASpec(targets=DIFFUSERS_ATTENTION_TARGETS, time="compositional", num_timesteps=T, time_bases=5,
                    classes="select", num_classes=3)  # fmt: skip
    net = DiffusersUNet(unet, spec, num_classes=3)
    wrapped = [name for name, _ in conditioned_layers(net)]
    assert len(wrapped) == 4 * 4 and all(isinstance(net.get_submodule(n), ConditionedLoRA) for n in wrapped)
    with torch.no_grad():
        assert torch.allclose(_call(net, x, t, y), before, atol=1e-6)  # B = 0: nothing changes at init

    # train only the LoRA parameters to fit a fixed target: the loss must drop
    for name, p in net.named_parameters():
        p.requires_grad_("lora_" in name)
    opt = torch.optim.Adam([p for p in net.parameters() if p.requires_grad], lr=1e-2)
    target = torch.randn_like(x)
    losses = []
    for _ in range(25):
        loss = (_call(net, x, t, y) - target).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.8 * losses[0]
    assert Path(diffusers.__file__).exists()
