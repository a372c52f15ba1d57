"""Guidance as one batched combination of predictions (classifier-free guidance, Ho & Salimans 2022).

A `Guidance` lists branches (the conditions of each prediction) and weights; `guided` evaluates every
branch in one batched call of the prediction function and returns sum_k weight_k * D(x, t | branch_k).
Classifier-free guidance is two branches, (cond, null) with weights (w, 1 - w); AutoLoRA's four
branches (base and LoRA, each with and without the class) are the same call with other weights.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from condlora.conditions import NULL_LABEL, Conditions

Predict = Callable[[torch.Tensor, torch.Tensor, Conditions], torch.Tensor]  # D(x, t, cond)
Denoiser = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]  # D(x, t) with the conditions bound


@dataclass(frozen=True)
class Guidance:
    """sum_k weights[k] * D(x, t | branches[k]).

    Attributes:
        branches: the conditions of each prediction, each for the same B samples.
        weights: one real weight per branch (they need not sum to 1).
    """

    branches: tuple[Conditions, ...]
    weights: tuple[float, ...]

    def __post_init__(self) -> None:
        if len(self.branches) != len(self.weights) or not self.branches:
            raise ValueError(f"guidance needs one weight per branch, got {len(self.weights)} for {len(self.branches)}")


def null_condition(cond: Conditions) -> Conditions:
    """The unconditional branch of `cond`: every label NULL_LABEL, no class vector."""
    size = cond.batch_size()
    like = cond.labels if cond.labels is not None else cond.class_vector
    null = torch.full((size,), NULL_LABEL, dtype=torch.long, device=like.device)
    return cond.replace(labels=null, class_vector=None)


def classifier_free(cond: Conditions, guidance_scale: float) -> Guidance:
    """Classifier-free guidance eps^w = w * eps(x, t | y) + (1 - w) * eps(x, t | null)  (Ho & Salimans eq. 6).

    w = 1 is the plain conditional model (one branch), w = 0 the unconditional one, w > 1 strengthens the
    class. An unconditional `cond` (no labels, no class vector) is one branch whatever the scale.
    """
    if guidance_scale == 1.0 or (cond.labels is None and cond.class_vector is None):
        return Guidance((cond,), (1.0,))
    return Guidance((cond, null_condition(cond)), (guidance_scale, 1.0 - guidance_scale))


def guided(predict: Predict, guidance: Guidance) -> Denoiser:
    """D(x, t) = sum_k w_k predict(x, t, branch_k), all branches in one batched call of `predict`.

    Branches whose conditions carry different fields (a class vector beside the null label) cannot share
    a batch; they are evaluated one call each.

    Args:
        predict: `predict(x, t, cond)`, e.g. `functools.partial(process.predict, net)`.
        guidance: branches and weights.
    Returns:
        A denoiser `D(x, t)` for the samplers; x (B, ...), t (B,).
    """
    branches, weights = guidance.branches, guidance.weights
    k = len(branches)
    if k == 1:
        cond, weight = branches[0], weights[0]
        return lambda x, t: predict(x, t, cond) if weight == 1.0 else weight * predict(x, t, cond)
    batched = Conditions.concatenable(branches)
    cond = Conditions.cat(branches) if batched else None

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        if batched:
            parts = predict(torch.cat([x] * k), torch.cat([t] * k), cond).chunk(k)
        else:
            parts = [predict(x, t, branch) for branch in branches]
        out = weights[0] * parts[0]
        for w, part in zip(weights[1:], parts[1:], strict=True):
            out = out + w * part
        return out

    return denoise
