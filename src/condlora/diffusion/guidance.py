"""Guidance as combinations of denoisers (classifier-free guidance, Ho & Salimans 2022)."""

from __future__ import annotations

from collections.abc import Callable

import torch

from condlora.nets.unet import NULL_LABEL

EpsFn = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # (x_t (B,C,H,W), t (B,)) -> eps (B,C,H,W)


def conditioned(net: Callable[..., torch.Tensor], labels: torch.Tensor | None) -> EpsFn:
    """Bind class labels to a network: eps(x, t) = net(x, t, labels)."""
    return lambda x, t: net(x, t, labels)


def classifier_free_guidance(
    net: Callable[..., torch.Tensor],
    labels: torch.Tensor | None,
    guidance_scale: float,
) -> EpsFn:
    """eps^w = eps(x, t, null) + w * (eps(x, t, y) - eps(x, t, null)).

    w = 1 is the plain conditional model, w = 0 the unconditional one, w > 1 strengthens the class. Both
    branches run in one batched call of the network.

    Args:
        net: eps-prediction network trained with label dropout.
        labels: (B,) class labels; None (unconditional model) ignores the scale.
        guidance_scale: w.
    """
    if labels is None or guidance_scale == 1.0:
        return conditioned(net, labels)
    null = torch.full_like(labels, NULL_LABEL)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        both = net(torch.cat([x, x]), torch.cat([t, t]), torch.cat([labels, null]))
        cond, uncond = both.chunk(2)
        return uncond.lerp(cond, guidance_scale)

    return eps


def class_vector_guidance(
    net: Callable[..., torch.Tensor],
    class_vector: torch.Tensor,
    guidance_scale: float,
) -> EpsFn:
    """Classifier-free guidance towards a real-valued class vector (interpolation / extrapolation, paper
    sec. 5.6): eps^w = eps(x, t, null) + w * (eps(x, t, class_vector) - eps(x, t, null)).

    Args:
        net: a network accepting `class_vector` (B, C) in place of labels.
        class_vector: (B, C) weights over classes, any real values.
        guidance_scale: w.
    """
    null = torch.full((class_vector.shape[0],), NULL_LABEL, dtype=torch.long, device=class_vector.device)

    def eps(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        cond = net(x, t, null, class_vector=class_vector)
        if guidance_scale == 1.0:
            return cond
        return net(x, t, null).lerp(cond, guidance_scale)

    return eps
