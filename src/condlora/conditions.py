"""What every network call carries besides the noisy input and its noise level.

Contract: `net(x, noise_level, cond) -> raw output`. `noise_level` is what the diffusion family feeds its
network (the DDPM step as a float, IDDPM's rescaled step, EDM's c_noise) and a backbone never rounds it;
everything else a conditioned layer may depend on travels in `Conditions`, per sample.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass

import torch

NULL_LABEL = -1  # label value meaning "no class": classifier-free guidance's unconditional branch


@dataclass
class Conditions:
    """The per-sample conditions of one network call (B samples); every field is optional.

    Attributes:
        labels: (B,) int64 class index in [0, C), or NULL_LABEL for "no class".
        class_vector: (B, C) real weights over classes, used instead of `labels` where given (class
            interpolation and extrapolation, attention-conditioning paper sec. 5.6).
        step: (B,) int64 0-based diffusion step in [0, T) (the papers' step t + 1), set by the diffusion
            process, never derived from the noise level inside a backbone; read by TimeLoRA tables and experts.
        augment: (B, A) augmentation labels (EDM's non-leaking augmentation).
        context: (B, L, D) cross-attention context, e.g. text embeddings (diffusers' encoder_hidden_states).
        lora_scale: (B,) per-sample factor on every adapter's contribution: 0 gives exactly the base network,
            1 the adapters as trained; None means 1.
        embedding: (B, D) the backbone's shared condition embedding, filled in by the backbone (UC-LoRA).
        shared: the caller vouches that all B samples carry the same condition; conditioned layers then
            compute their weights once and merge them into the base weight for the call. A plain bool, so
            no layer ever compares tensors to find out.
    """

    labels: torch.Tensor | None = None
    class_vector: torch.Tensor | None = None
    step: torch.Tensor | None = None
    augment: torch.Tensor | None = None
    context: torch.Tensor | None = None
    lora_scale: torch.Tensor | None = None
    embedding: torch.Tensor | None = None
    shared: bool = False

    def replace(self, **changes) -> Conditions:
        """A copy with the given fields changed."""
        return dataclasses.replace(self, **changes)

    def tensors(self) -> dict[str, torch.Tensor]:
        """The fields that hold a tensor, by name."""
        return {
            f.name: getattr(self, f.name) for f in dataclasses.fields(self) if torch.is_tensor(getattr(self, f.name))
        }

    def repeat(self, times: int) -> Conditions:
        """The batch repeated `times` times along dim 0 (a guidance branch per copy of the input)."""
        return Conditions.cat([self] * times) if times > 1 else self

    @staticmethod
    def cat(parts: Sequence[Conditions]) -> Conditions:
        """Concatenate the batches of several conditions (guidance branches evaluated in one call).

        A field must be given in all parts or in none, except `lora_scale` (missing means 1). The result
        is `shared` only when there is one part and it is shared.
        """
        first = parts[0]
        if len(parts) == 1:
            return first
        sizes = [p.batch_size() for p in parts]
        known = next((n for n in sizes if n is not None), None)  # a part with no tensor has the same B as the others
        sizes = [known if n is None else n for n in sizes]
        out = {}
        for f in dataclasses.fields(Conditions):
            if f.name == "shared":
                continue
            values = [getattr(p, f.name) for p in parts]
            if all(v is None for v in values):
                continue
            if f.name == "lora_scale":
                values = [_ones(n, parts) if v is None else v for v, n in zip(values, sizes, strict=True)]
            elif any(v is None for v in values):
                raise ValueError(f"Conditions.cat: {f.name} is given in some parts but not in others")
            out[f.name] = torch.cat(values)
        return Conditions(**out)

    @staticmethod
    def concatenable(parts: Sequence[Conditions]) -> bool:
        """Whether `cat` can join these parts: each field (but `lora_scale`) given in all of them or in none."""
        for f in dataclasses.fields(Conditions):
            if f.name not in ("shared", "lora_scale"):
                given = {getattr(p, f.name) is not None for p in parts}
                if len(given) > 1:
                    return False
        return True

    def batch_size(self) -> int | None:
        """B, from the first tensor field; None if there is none."""
        tensors = self.tensors()
        return next(iter(tensors.values())).shape[0] if tensors else None

    def check(self, num_classes: int | None = None, num_timesteps: int | None = None) -> Conditions:
        """Validate the values against a model's sizes (reads them: call it at boundaries, never per layer)."""
        if self.labels is not None and num_classes is not None and self.labels.numel():
            low, high = int(self.labels.min()), int(self.labels.max())
            if low < NULL_LABEL or high >= num_classes:
                raise ValueError(f"labels must be in [0, {num_classes}) or {NULL_LABEL}, got {low}..{high}")
        if self.class_vector is not None and num_classes is not None and self.class_vector.shape[-1] != num_classes:
            raise ValueError(f"class_vector has {self.class_vector.shape[-1]} entries, expected {num_classes}")
        if self.step is not None and num_timesteps is not None and self.step.numel():
            low, high = int(self.step.min()), int(self.step.max())
            if low < 0 or high >= num_timesteps:
                raise ValueError(f"steps must be in [0, {num_timesteps}) (0-based), got {low}..{high}")
        return self


def _ones(n: int | None, parts: Sequence[Conditions]) -> torch.Tensor:
    like = next(p.lora_scale for p in parts if p.lora_scale is not None)
    return torch.ones(n or 0, dtype=like.dtype, device=like.device)
