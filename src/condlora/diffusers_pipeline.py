"""AutoLoRA for diffusers: Stable Diffusion pipelines with a PEFT LoRA loaded, sampled with AutoLoRA guidance.

`AutoLoRAStableDiffusionPipeline` is a `StableDiffusionPipeline` (build it from any such pipeline's
components: `AutoLoRAStableDiffusionPipeline(**pipe.components)`) whose call mixes the base model and the
LoRA model as AutoLoRA does (Kasymov et al. 2025, eq. 7), each with its own classifier-free guidance:

    eps = eps_base^{w1} + gamma * (eps_LoRA^{w2} - eps_base^{w1})

The two models are one UNet: `peft_lora_scale` multiplies every active PEFT LoRA adapter's output by a
per-sample factor (0 in the base branches, alpha in the LoRA branches) through forward hooks on the
adapters' up projections, so the four predictions of a step are one batched UNet call and no second copy
of the weights exists. A LoRA in the text encoder is handled the same way: the prompts are encoded once
with it off and once at alpha.
"""

from __future__ import annotations

from collections.abc import Iterator
from contextlib import contextmanager

import torch
from diffusers import StableDiffusionPipeline
from diffusers.pipelines.stable_diffusion import StableDiffusionPipelineOutput
from torch import nn
from tqdm.auto import tqdm

from condlora.conditions import Conditions
from condlora.diffusion.guidance import Guidance, classifier_free, guided, mix


def peft_lora_layers(module: nn.Module | None) -> list[nn.Module]:
    """The PEFT LoRA layers of `module` (none when it is None or has no PEFT adapters)."""
    if module is None:
        return []
    from peft.tuners.lora import LoraLayer

    return [m for m in module.modules() if isinstance(m, LoraLayer)]


@contextmanager
def peft_lora_scale(module: nn.Module | None, scale: torch.Tensor | float | None) -> Iterator[None]:
    """Multiply the output of every active PEFT LoRA adapter in `module` by `scale` for the enclosed calls:
    a float for the whole batch, or a (B,) tensor, one factor per sample. None (or 1.0) changes nothing.

    PEFT adds `lora_B(lora_A(dropout(x))) * scaling` to the base layer's output, so scaling `lora_B`'s output
    scales the adapter's contribution, and a factor of 0 leaves exactly the base layer's output. Adapters
    fused into the weights (`fuse_lora`) and variants that are not additive (DoRA) cannot be scaled apart from
    the base weight: they are refused.
    """
    if scale is None or (isinstance(scale, float) and scale == 1.0):
        yield
        return
    handles = []

    def hook(_, __, out: torch.Tensor) -> torch.Tensor:
        if isinstance(scale, float):
            return out * scale
        return out * scale.to(out.dtype).reshape(-1, *([1] * (out.dim() - 1)))

    try:
        for layer in peft_lora_layers(module):
            if layer.merged_adapters:
                raise ValueError(
                    f"AutoLoRA: the LoRA adapters {layer.merged_adapters} are fused into the weights; call "
                    "unfuse_lora() first, so the base model can be evaluated beside the LoRA model"
                )
            if layer.disable_adapters:
                continue
            for name in layer.active_adapters:
                if name not in layer.lora_B:
                    continue
                if layer.lora_variant.get(name) is not None:
                    raise ValueError(f"AutoLoRA: adapter {name!r} is a LoRA variant (e.g. DoRA) that is not additive")
                handles.append(layer.lora_B[name].register_forward_hook(hook))
        yield
    finally:
        for handle in handles:
            handle.remove()


class AutoLoRAStableDiffusionPipeline(StableDiffusionPipeline):
    """Stable Diffusion with AutoLoRA guidance over a loaded PEFT LoRA (`pipe.load_lora_weights(...)` or
    `pipe.unet.add_adapter(...)`); everything else is `StableDiffusionPipeline`'s."""

    @torch.no_grad()
    def __call__(
        self,
        prompt: str | list[str] | None = None,
        height: int | None = None,
        width: int | None = None,
        num_inference_steps: int = 50,
        guidance_scale: float = 7.5,
        base_guidance_scale: float | None = None,
        lora_scale: float = 1.0,
        gamma: float = 1.5,
        negative_prompt: str | list[str] | None = None,
        num_images_per_prompt: int = 1,
        eta: float = 0.0,
        generator: torch.Generator | list[torch.Generator] | None = None,
        latents: torch.Tensor | None = None,
        prompt_embeds: torch.Tensor | None = None,
        negative_prompt_embeds: torch.Tensor | None = None,
        output_type: str = "pil",
        return_dict: bool = True,
        progress: bool = True,
        branches_per_call: int = 0,
    ):
        """Sample with eps = eps_base^{w1} + gamma * (eps_LoRA^{w2} - eps_base^{w1}).

        Args:
            prompt, negative_prompt, prompt_embeds, negative_prompt_embeds, height, width,
            num_inference_steps, num_images_per_prompt, eta, generator, latents, output_type, return_dict:
                as in `StableDiffusionPipeline.__call__`.
            guidance_scale: w2, the classifier-free guidance of the LoRA model.
            base_guidance_scale: w1, that of the base model (None: w2).
            lora_scale: alpha, the factor on the LoRA adapters in the LoRA branches (on top of PEFT's own
                lora_alpha / r and any adapter weights set with `set_adapters`).
            gamma: 0 gives the base model with CFG w1, 1 (with w1 = w2) the LoRA model with CFG; the paper
                uses 1.5.
            progress: show a progress bar over the steps.
            branches_per_call: UNet branches batched into one call (see `condlora.diffusion.guided`): 0 all
                four in one call (fastest), 2 two calls of CFG's size (CFG's peak memory).
        Returns:
            `StableDiffusionPipelineOutput` (images; no safety check), or a tuple when not `return_dict`.
        """
        if not peft_lora_layers(self.unet):
            raise ValueError("AutoLoRA needs a LoRA in the UNet: load one with load_lora_weights() or add_adapter()")
        if lora_scale < 0 or guidance_scale < 0 or (base_guidance_scale or 0) < 0:
            raise ValueError("AutoLoRA: lora_scale, guidance_scale and base_guidance_scale must be >= 0")
        w1 = guidance_scale if base_guidance_scale is None else base_guidance_scale
        device = self._execution_device
        height = height or self.unet.config.sample_size * self.vae_scale_factor
        width = width or self.unet.config.sample_size * self.vae_scale_factor

        def encode(scale: float) -> tuple[torch.Tensor, torch.Tensor | None]:
            with peft_lora_scale(self.text_encoder, scale):
                return self.encode_prompt(
                    prompt, device, num_images_per_prompt, w1 != 1.0 or guidance_scale != 1.0, negative_prompt,
                    prompt_embeds=prompt_embeds, negative_prompt_embeds=negative_prompt_embeds,
                )  # fmt: skip

        text_lora = bool(peft_lora_layers(self.text_encoder))
        base_pos, base_neg = encode(0.0)
        lora_pos, lora_neg = encode(float(lora_scale)) if text_lora else (base_pos, base_neg)
        batch = base_pos.shape[0]

        def model(pos, neg, scale, w) -> Guidance:
            scales = torch.full((batch,), float(scale), device=device)
            cond = Conditions(context=pos, lora_scale=scales)
            return classifier_free(cond, w, None if neg is None else Conditions(context=neg, lora_scale=scales))

        guidance = mix(
            (1.0 - gamma, model(base_pos, base_neg, 0.0, w1)),
            (gamma, model(lora_pos, lora_neg, lora_scale, guidance_scale)),
        )

        def predict(x: torch.Tensor, t: torch.Tensor, cond: Conditions) -> torch.Tensor:
            with peft_lora_scale(self.unet, cond.lora_scale):
                return self.unet(x, t, encoder_hidden_states=cond.context, return_dict=False)[0]

        denoise = guided(predict, guidance, branches_per_call)
        channels = self.unet.config.in_channels
        latents = self.prepare_latents(batch, channels, height, width, base_pos.dtype, device, generator, latents)
        self.scheduler.set_timesteps(num_inference_steps, device=device)
        extra = self.prepare_extra_step_kwargs(generator, eta)
        for t in tqdm(self.scheduler.timesteps, disable=not progress, desc="AutoLoRA", unit="step"):
            x = self.scheduler.scale_model_input(latents, t)
            eps = denoise(x, t.expand(batch))
            latents = self.scheduler.step(eps, t, latents, **extra, return_dict=False)[0]
        if output_type == "latent":
            images = latents
        else:
            decoded = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False, generator=generator)
            images = self.image_processor.postprocess(decoded[0], output_type=output_type)
        self.maybe_free_model_hooks()
        if not return_dict:
            return images, None
        return StableDiffusionPipelineOutput(images=images, nsfw_content_detected=None)
