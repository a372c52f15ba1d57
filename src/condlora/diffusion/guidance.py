"""Guidance as one batched combination of predictions: classifier-free guidance (Ho & Salimans 2022) and
AutoLoRA (Kasymov et al. 2025).

A `Guidance` lists branches (the conditions of each prediction) and weights; `guided` evaluates every
branch in one batched call of the prediction function and returns sum_k weight_k * D(x, t | branch_k).
Classifier-free guidance is two branches, (cond, null) with weights (w, 1 - w). AutoLoRA is four: the
base model and the LoRA model, each with and without the class. Both models are one network: a branch's
per-sample `Conditions.lora_scale` (0 for the base, alpha for the LoRA) sets how much of the adapters it
sees, so all four predictions come from one forward pass and no second copy of the network exists.
Every guidance's weights sum to 1, so combining eps, x0 or EDM's denoised output is the same.
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


def classifier_free(cond: Conditions, guidance_scale: float, null: Conditions | None = None) -> Guidance:
    """Classifier-free guidance eps^w = w * eps(x, t | y) + (1 - w) * eps(x, t | null)  (Ho & Salimans eq. 6).

    w = 1 is the plain conditional model (one branch), w = 0 the unconditional one, w > 1 strengthens the
    class. `null` is the unconditional branch: by default `null_condition(cond)` (the null label), and an
    unconditional `cond` (no labels, no class vector, no `null`) is one branch whatever the scale; a text
    model passes its negative prompt's embedding.
    """
    if guidance_scale == 1.0:
        return Guidance((cond,), (1.0,))
    if null is None:
        if cond.labels is None and cond.class_vector is None:
            return Guidance((cond,), (1.0,))
        null = null_condition(cond)
    if guidance_scale == 0.0:
        return Guidance((null,), (1.0,))
    return Guidance((cond, null), (guidance_scale, 1.0 - guidance_scale))


def mix(*parts: tuple[float, Guidance]) -> Guidance:
    """sum_j c_j * guidance_j as one guidance: the branches of all parts, each weight times its part's c_j.
    Branches whose weight is exactly 0 are dropped (they cost a network evaluation and add nothing)."""
    kept = [(c * w, b) for c, g in parts for w, b in zip(g.weights, g.branches, strict=True) if c * w != 0.0]
    if not kept:
        raise ValueError("guidance: every branch has weight 0")
    return Guidance(tuple(b for _, b in kept), tuple(w for w, _ in kept))


def with_lora_scale(
    cond: Conditions, lora_scale: float, batch_size: int | None = None, device: torch.device | str | None = None
) -> Conditions:
    """`cond` with every sample's LoRA scale set to `lora_scale` (no tensor for 1: the adapters as trained,
    which keeps the merged and routed fast paths of shared-condition calls). `batch_size` and `device` are
    needed only when `cond` has no per-sample field (an unconditional model)."""
    if lora_scale == 1.0:
        return cond.replace(lora_scale=None)
    like = next(iter(cond.tensors().values()), None)
    if like is None and batch_size is None:
        raise ValueError("a LoRA scale needs the batch size when the conditions carry no per-sample field")
    size, where = (batch_size, device) if like is None else (like.shape[0], like.device)
    scale = torch.full((size,), float(lora_scale), device=where)
    return cond.replace(lora_scale=scale)


def autolora(
    cond: Conditions,
    gamma: float,
    lora_scale: float = 1.0,
    guidance_scale: float = 1.0,
    base_guidance_scale: float | None = None,
    batch_size: int | None = None,
    device: torch.device | str | None = None,
) -> Guidance:
    """AutoLoRA guidance (Kasymov et al. 2025, eq. 7): the LoRA model guided by its own base model,

        eps = eps_base^{w1}(x, y) + gamma * (eps_LoRA^{w2}(x, y) - eps_base^{w1}(x, y)),

    where eps^w is the classifier-free-guided prediction with scale w (`classifier_free`), eps_base the
    network with its adapters off (LoRA scale 0) and eps_LoRA the network with its adapters at scale
    alpha (`lora_scale`). gamma = 0 is classifier-free guidance of the base, gamma = 1 with w1 = w2 that of
    the LoRA model, and w1 = w2 = 1 the paper's variant without CFG (eq. 6).

    Args:
        cond: the conditions of the B samples (labels, or none for an unconditional model).
        gamma: the AutoLoRA scale; > 1 pushes past the LoRA model, away from the base.
        lora_scale: alpha, the factor on every adapter's contribution in the LoRA branches.
        guidance_scale: w2, the classifier-free guidance of the LoRA model.
        base_guidance_scale: w1, that of the base model; None means w2.
        batch_size, device: B and where the scales live, when `cond` has no per-sample field.
    Returns:
        Up to four branches (base and LoRA, conditional and null); those of weight 0 are left out.
    """
    w1 = guidance_scale if base_guidance_scale is None else base_guidance_scale
    base = classifier_free(cond.replace(lora_scale=None), w1)
    lora = classifier_free(cond.replace(lora_scale=None), guidance_scale)
    base = Guidance(tuple(with_lora_scale(b, 0.0, batch_size, device) for b in base.branches), base.weights)
    lora = Guidance(tuple(with_lora_scale(b, lora_scale, batch_size, device) for b in lora.branches), lora.weights)
    return mix((1.0 - gamma, base), (gamma, lora))


def guided(predict: Predict, guidance: Guidance, branches_per_call: int = 0) -> Denoiser:
    """D(x, t) = sum_k w_k predict(x, t, branch_k), the branches batched into calls of `predict`.

    By default every branch goes into one batched call: the fastest on a device with room for it. A call
    of k branches holds k times the activations of one, so `branches_per_call` trades speed for memory:
    2 evaluates AutoLoRA's four branches in two calls, each the size of one classifier-free-guided call.
    Branches whose conditions carry different fields (a class vector beside the null label) cannot share
    a batch; they are evaluated one call each.

    Args:
        predict: `predict(x, t, cond)`, e.g. `functools.partial(process.predict, net)`.
        guidance: branches and weights.
        branches_per_call: at most this many branches per call of `predict`; 0 means all of them.
    Returns:
        A denoiser `D(x, t)` for the samplers; x (B, ...), t (B,).
    """
    if branches_per_call < 0:
        raise ValueError(f"branches_per_call must be >= 0 (0: all in one call), got {branches_per_call}")
    branches, weights = guidance.branches, guidance.weights
    if len(branches) == 1:
        cond, weight = branches[0], weights[0]
        return lambda x, t: predict(x, t, cond) if weight == 1.0 else weight * predict(x, t, cond)
    size = branches_per_call or len(branches)
    groups = [branches[i : i + size] for i in range(0, len(branches), size)]
    joined = [Conditions.cat(g) if len(g) > 1 and Conditions.concatenable(g) else None for g in groups]

    def denoise(x: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        parts = []
        for group, cond in zip(groups, joined, strict=True):
            if cond is not None:
                k = len(group)
                parts += predict(torch.cat([x] * k), torch.cat([t] * k), cond).chunk(k)
            else:
                parts += [predict(x, t, branch) for branch in group]
        out = weights[0] * parts[0]
        for w, part in zip(weights[1:], parts[1:], strict=True):
            out = out + w * part
        return out

    return denoise
