"""Fit a diffusers `UNet2DModel` to condlora's network contract, with conditioned LoRA on its attention.

diffusers is imported lazily by the caller (it is an optional dependency); this module only wraps an
already-built model, so nothing here downloads weights: build the UNet from a config or load it from a
local directory with `UNet2DModel.from_pretrained(path)`.
"""

from __future__ import annotations

import torch
from torch import nn

from condlora.lora import Conditions, LoRASpec, bind_conditions, conditioned_layers, inject_conditioned_lora

DIFFUSERS_ATTENTION_TARGETS = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0")


class DiffusersUNet(nn.Module):
    """`net(x, noise_level, labels, class_vector=None) -> eps` around a diffusers UNet2DModel.

    Args:
        unet: a `diffusers.UNet2DModel` predicting eps from (sample, timestep[, class_labels]).
        lora: optional LoRA recipe; its targets default to the attention projections of diffusers blocks.
        num_classes: classes the LoRA banks (and the UNet's own class embedding, if it has one) know about;
            the UNet receives NULL_LABEL as index `num_classes`, so give it `num_class_embeds=num_classes + 1`.
    """

    def __init__(self, unet: nn.Module, lora: LoRASpec | None = None, num_classes: int = 0):
        super().__init__()
        self.unet, self.num_classes, self.lora_spec = unet, num_classes, lora
        if lora is not None and lora.active:
            inject_conditioned_lora(unet, lora.targets, lora.strategies, lora.rank, lora.basis_bias)
        self._lora_layers = [layer for _, layer in conditioned_layers(unet)]

    def forward(
        self,
        x: torch.Tensor,
        noise_level: torch.Tensor,
        labels: torch.Tensor | None = None,
        class_vector: torch.Tensor | None = None,
    ) -> torch.Tensor:
        cond = Conditions(timestep=noise_level.round().long(), labels=labels, class_vector=class_vector)
        class_labels = None
        if getattr(self.unet, "class_embedding", None) is not None and labels is not None:
            class_labels = torch.where(labels < 0, self.num_classes, labels)
        with bind_conditions(self._lora_layers, cond):
            return self.unet(x, noise_level, class_labels=class_labels).sample
