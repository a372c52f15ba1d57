"""AutoLoRA on a diffusers Stable Diffusion pipeline with a PEFT LoRA, offline on a tiny random pipeline."""

import pytest
import torch
from helpers import tiny_sd_pipeline

pytest.importorskip("diffusers")
peft = pytest.importorskip("peft")

from condlora.diffusers_pipeline import AutoLoRAStableDiffusionPipeline, peft_lora_scale  # noqa: E402

TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
RUN = {"prompt": ["a cat", "dog"], "num_inference_steps": 3, "output_type": "np", "progress": False}


def _pipelines(tmp_path, text_lora=False):
    pipe = tiny_sd_pipeline(tmp_path)
    pipe.set_progress_bar_config(disable=True)
    torch.manual_seed(1)
    config = peft.LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS, init_lora_weights=False)  # random B
    pipe.unet.add_adapter(config)
    if text_lora:  # through PEFT itself: transformers' own add_adapter demands a PEFT version of its choosing
        peft.inject_adapter_in_model(peft.LoraConfig(r=2, lora_alpha=2, target_modules=["q_proj", "v_proj"],
                                                     init_lora_weights=False), pipe.text_encoder)  # fmt: skip
    return pipe, AutoLoRAStableDiffusionPipeline(**pipe.components)


def _enable(pipe, adapters):
    """PEFT's own switch on every LoRA layer of the UNet and the text encoder."""
    for model in (pipe.unet, pipe.text_encoder):
        for layer in model.modules():
            if isinstance(layer, peft.tuners.tuners_utils.BaseTunerLayer):
                layer.enable_adapters(adapters)


def _plain(pipe, guidance_scale, adapters=True, **kwargs):
    """diffusers' own pipeline: its CFG, with the LoRA on or off."""
    _enable(pipe, adapters)
    run = {k: v for k, v in RUN.items() if k != "progress"} | kwargs
    out = pipe(**run, guidance_scale=guidance_scale, generator=torch.Generator().manual_seed(0)).images
    _enable(pipe, True)
    return out


def _auto(auto, **kwargs):
    return auto(**RUN, generator=torch.Generator().manual_seed(0), **kwargs).images


@pytest.mark.parametrize("text_lora", [False, True])
def test_gamma_0_is_the_base_pipeline_and_gamma_1_the_lora_pipeline(tmp_path, text_lora):
    pipe, auto = _pipelines(tmp_path, text_lora)
    base, lora = _plain(pipe, 4.0, adapters=False), _plain(pipe, 4.0)
    assert abs(base - lora).max() > 1e-3  # the LoRA matters
    assert abs(_auto(auto, gamma=0.0, guidance_scale=2.0, base_guidance_scale=4.0) - base).max() < 1e-5
    assert abs(_auto(auto, gamma=1.0, guidance_scale=4.0) - lora).max() < 1e-5
    one_call = _auto(auto, gamma=1.5, guidance_scale=4.0, base_guidance_scale=2.0)
    two_calls = _auto(auto, gamma=1.5, guidance_scale=4.0, base_guidance_scale=2.0, branches_per_call=2)
    assert abs(one_call - two_calls).max() < 1e-5  # the UNet's branches in two calls: the same images


def test_autolora_mixes_the_two_pipelines_noise_predictions(tmp_path):
    """One step with a scheduler that returns eps: AutoLoRA's output is eq. 7 of the two models' CFG outputs."""
    pipe, auto = _pipelines(tmp_path)
    gamma, w1, w2 = 1.5, 3.0, 5.0
    latents = torch.randn(2, 4, 8, 8)
    embeds = torch.randn(2, 8, 12)
    negative = torch.randn(2, 8, 12)
    seen = []
    auto.scheduler.step = lambda eps, t, latents, **_: (seen.append((eps, t)), latents)
    auto(prompt_embeds=embeds, negative_prompt_embeds=negative, latents=latents, num_inference_steps=1,
         gamma=gamma, guidance_scale=w2, base_guidance_scale=w1, output_type="latent", progress=False)  # fmt: skip
    eps, t = seen[0]

    def cfg(adapters, w):
        pipe.unet.enable_adapters() if adapters else pipe.unet.disable_adapters()
        with torch.no_grad():
            cond = pipe.unet(latents, t, encoder_hidden_states=embeds).sample
            null = pipe.unet(latents, t, encoder_hidden_states=negative).sample
        pipe.unet.enable_adapters()
        return null + w * (cond - null)

    expected = cfg(False, w1) + gamma * (cfg(True, w2) - cfg(False, w1))
    assert torch.allclose(eps, expected, atol=1e-5)


def test_per_sample_scale_0_is_the_base_bit_for_bit_inside_one_batched_call(tmp_path):
    pipe, _ = _pipelines(tmp_path)
    x, t, context = torch.randn(4, 4, 8, 8), torch.tensor([10, 10, 700, 700]), torch.randn(4, 8, 12)
    with torch.no_grad(), peft_lora_scale(pipe.unet, torch.tensor([0.0, 0.7, 0.0, 0.7])):
        mixed = pipe.unet(x, t, encoder_hidden_states=context).sample
    with torch.no_grad():
        pipe.unet.disable_adapters()
        base = pipe.unet(x, t, encoder_hidden_states=context).sample
        pipe.unet.enable_adapters()
        full = pipe.unet(x, t, encoder_hidden_states=context).sample
        layers = [m for m in pipe.unet.modules() if hasattr(m, "scale_layer")]
        for layer in layers:  # PEFT's own scaling of every adapter by 0.7, for all samples
            layer.scale_layer(0.7)
        scaled = pipe.unet(x, t, encoder_hidden_states=context).sample
        for layer in layers:
            layer.unscale_layer()
    assert torch.equal(mixed[[0, 2]], base[[0, 2]])
    assert torch.allclose(mixed[[1, 3]], scaled[[1, 3]], atol=1e-5)
    assert not torch.allclose(scaled, full, atol=1e-4)  # 0.7 of the adapters is not all of them


def test_a_pipeline_without_lora_or_with_a_fused_one_is_refused(tmp_path):
    plain = tiny_sd_pipeline(tmp_path)
    with pytest.raises(ValueError, match="needs a LoRA in the UNet"):
        AutoLoRAStableDiffusionPipeline(**plain.components)(**RUN)
    pipe, auto = _pipelines(tmp_path)
    for layer in [m for m in pipe.unet.modules() if hasattr(m, "merged_adapters")]:
        layer.merge()
    with pytest.raises(ValueError, match="fused into the weights"):
        _auto(auto, gamma=1.5, guidance_scale=2.0)
