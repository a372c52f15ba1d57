"""Fit a diffusers denoiser (`UNet2DModel`, `UNet2DConditionModel`, `Transformer2DModel`) to condlora's network
contract, with LoRA.

diffusers is imported lazily (an optional dependency) and nothing here downloads: build the UNet from a
config, or read it from a local folder with `load_diffusers_unet(path)`, which takes safetensors weights
only (a pickled `.bin` could run code).
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from torch import nn

from condlora.conditions import NULL_LABEL, Conditions
from condlora.lora import LoRASpec, bind_conditions, inject_lora, rebinding_checkpoint
from condlora.ops import recorded

DIFFUSERS_ATTENTION_TARGETS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0")
DIFFUSERS_WEIGHTS = "diffusion_pytorch_model.safetensors"
_UNET_CLASSES = ("UNet2DModel", "UNet2DConditionModel", "Transformer2DModel")


class DiffusersUNet(nn.Module):
    """`net(x, noise_level, cond) -> eps` around a diffusers UNet or image transformer.

    The noise level goes to the model as its `timestep`; `cond.labels` become its `class_labels` when it has a
    class embedding (NULL_LABEL as index `num_classes`, so build it with `num_class_embeds=num_classes + 1`,
    or for a DiT-style `Transformer2DModel` with `norm_type="ada_norm_zero"`,
    `num_embeds_ada_norm=num_classes + 1`); `cond.context` becomes the `encoder_hidden_states` of a model with
    cross-attention. Conditioned LoRA layers receive `cond` for the call.

    Args:
        unet: a `diffusers.UNet2DModel`, `UNet2DConditionModel` or `Transformer2DModel` predicting eps.
        lora: optional LoRA recipe; its targets default to the attention projections of diffusers blocks.
        num_classes: classes the LoRA banks (and the UNet's own class embedding, if it has one) know about.
    """

    def __init__(self, unet: nn.Module, lora: LoRASpec | None = None, num_classes: int = 0):
        super().__init__()
        self.unet, self.num_classes = unet, num_classes
        self.lora_spec = lora.with_targets(DIFFUSERS_ATTENTION_TARGETS) if lora is not None and lora.active else None
        self._lora_layers = inject_lora(unet, self.lora_spec) if self.lora_spec is not None else []
        # the blocks that diffusers checkpoints (`enable_gradient_checkpointing`): see _rebind_checkpoints
        self._checkpointing = (
            [m for m in unet.modules() if hasattr(m, "gradient_checkpointing")] if self._lora_layers else []
        )
        config = getattr(unet, "config", {})
        self._cross_attention = bool(config.get("cross_attention_dim")) and type(unet).__name__ != "UNet2DModel"
        self._class_labels = getattr(unet, "class_embedding", None) is not None or (
            config.get("norm_type") == "ada_norm_zero" and bool(config.get("num_embeds_ada_norm"))
        )

    def forward(self, x: torch.Tensor, noise_level: torch.Tensor, cond: Conditions | None = None) -> torch.Tensor:
        cond = cond if cond is not None else Conditions()
        kwargs = {}
        if self._class_labels:
            labels = cond.labels
            if labels is None:
                labels = torch.full((x.shape[0],), NULL_LABEL, dtype=torch.long, device=x.device)
            kwargs["class_labels"] = torch.where(labels < 0, self.num_classes, labels)
        if self._cross_attention:
            if cond.context is None:
                raise ValueError(
                    f"a {type(self.unet).__name__} with cross-attention needs Conditions.context (its "
                    "encoder_hidden_states)"
                )
            kwargs["encoder_hidden_states"] = cond.context
        if torch.is_grad_enabled() and not recorded():  # (a compiler recomputes inside its own graph)
            self._rebind_checkpoints()
        with bind_conditions(self._lora_layers, cond):
            return self.unet(x, timestep=noise_level, **kwargs).sample

    def _rebind_checkpoints(self) -> None:
        """Blocks that checkpoint their activations run again in the backward pass, after this call's binding
        has ended: their checkpoint function (whichever `enable_gradient_checkpointing` set) is wrapped once so
        that the LoRA layers inside get their call's conditions again (`rebinding_checkpoint`)."""
        for module in self._checkpointing:
            function = getattr(module, "_gradient_checkpointing_func", None)
            if module.gradient_checkpointing and function is not None and not getattr(function, "rebinds", False):
                module._gradient_checkpointing_func = rebinding_checkpoint(function, self._lora_layers)


def load_diffusers_unet(folder: str | Path) -> nn.Module:
    """A diffusers UNet read from a local model folder (config.json + diffusion_pytorch_model.safetensors).

    Raises FileNotFoundError / ValueError naming what is missing or unsupported; never downloads.
    """
    folder = Path(folder)
    config, weights = folder / "config.json", folder / DIFFUSERS_WEIGHTS
    for path in (config, weights):
        if not path.is_file():
            raise FileNotFoundError(
                f"{folder} is not a diffusers model folder with safetensors weights: {path.name} is missing"
            )
    try:
        class_name = json.loads(config.read_text()).get("_class_name")
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ValueError(f"{config} is not valid JSON ({err})") from None
    if class_name not in _UNET_CLASSES:
        raise ValueError(f"{config}: _class_name {class_name!r} is not one of {', '.join(_UNET_CLASSES)}")
    import diffusers

    return getattr(diffusers, class_name).from_pretrained(folder, use_safetensors=True, local_files_only=True)
