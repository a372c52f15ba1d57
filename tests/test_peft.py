"""Plain LoRA on diffusers models exported as a PEFT adapter that peft and diffusers load."""

import pytest
import torch
from helpers import tiny_unet as _tiny_unet

from condlora.conditions import Conditions
from condlora.lora import LoRASpec, conditioned_layers, export_peft, save_lora
from condlora.nets.diffusers_unet import DiffusersUNet

peft = pytest.importorskip("peft")


def _tuned(kind: str, alpha: float = 0.0) -> DiffusersUNet:
    net = DiffusersUNet(_tiny_unet(kind), LoRASpec(plain=True, rank=3, alpha=alpha))
    for _, layer in conditioned_layers(net):
        torch.nn.init.normal_(layer.lora_up, std=0.1)  # a trained adapter
    return net.eval()


def _inputs(kind: str):
    g = torch.Generator().manual_seed(0)
    x, t = torch.randn(2, 1, 8, 8, generator=g), torch.tensor([10.0, 700.0])
    context = torch.randn(2, 4, 12, generator=g) if kind == "UNet2DConditionModel" else None
    return x, t, context


@pytest.mark.parametrize("kind", ["UNet2DModel", "UNet2DConditionModel"])
@pytest.mark.parametrize("alpha", [0.0, 6.0])
@torch.no_grad()
def test_peft_loads_the_export_and_gives_the_same_outputs(kind, alpha, tmp_path):
    net = _tuned(kind, alpha)
    x, t, context = _inputs(kind)
    ours = net(x, t, Conditions(context=context))
    export_peft(net, tmp_path / "adapter")
    fresh = _tiny_unet(kind)  # the same seeded base weights, no adapters
    kwargs = {"encoder_hidden_states": context} if context is not None else {}
    base = fresh(x, t, **kwargs).sample
    assert not torch.allclose(ours, base, atol=1e-4)  # the adapter changes the output
    model = peft.PeftModel.from_pretrained(fresh, tmp_path / "adapter").eval()
    assert torch.allclose(model(x, t, **kwargs).sample, ours, atol=1e-5)


@torch.no_grad()
def test_diffusers_loads_the_export(tmp_path):
    net = _tuned("UNet2DConditionModel")
    x, t, context = _inputs("UNet2DConditionModel")
    ours = net(x, t, Conditions(context=context))
    export_peft(net, tmp_path / "adapter")
    unet = _tiny_unet("UNet2DConditionModel")
    unet.load_lora_adapter(tmp_path / "adapter", prefix=None, weight_name="pytorch_lora_weights.safetensors")
    assert torch.allclose(unet(x, t, encoder_hidden_states=context).sample, ours, atol=1e-5)


def test_conditioned_lora_does_not_export_to_peft(tmp_path):
    spec = LoRASpec(time="compositional", time_bases=3, num_timesteps=100)
    net = DiffusersUNet(_tiny_unet("UNet2DModel"), spec)
    with pytest.raises(
        ValueError, match=r"only plain, unconditioned LoRA exports to PEFT; this layer has banks \['time'\]"
    ):
        export_peft(net, tmp_path / "adapter")
    save_lora(net, tmp_path / "ours")  # condlora's own format holds any bank
    assert (tmp_path / "ours" / "condlora_adapter.safetensors").is_file()
