"""Conditioning strategies: small modules that turn the conditions of a call into mixing weights omega.

A conditioned LoRA layer computes out = base(x) + sum_i omega_i B_i A_i x; each strategy below owns one bank
of `num_bases` adapters and is called as `strategy(cond, x)` with the call's `Conditions` and the layer's
input x. It returns omega (B, num_bases) per sample or, if it reads the input position by position (a
router), omega for every position in x's layout with num_bases channels; such a strategy sets
`reads_input = True`. Strategies never read tensors on the host: values are checked at the boundaries
(`Conditions.check`).
"""

from __future__ import annotations

from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from condlora.conditions import Conditions
from condlora.ops import group_norm

OmegaInit = Literal["linear", "onehot", "gaussian"]


def _require(value: torch.Tensor | None, name: str, strategy: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"{strategy} needs Conditions.{name}, which this call did not provide")
    return value


def basis_timesteps(num_timesteps: int, num_bases: int) -> torch.Tensor:
    """Knots t_i = 1 + i (T - 1) / m for i = 0..m (m + 1 = num_bases), in 1-based steps (paper sec. 3.2).

    When m does not divide T - 1 the knots are fractional; see `linear_interpolation_table`.
    """
    m = num_bases - 1
    if m < 1:
        raise ValueError(f"a compositional table needs at least 2 bases, got {num_bases}")
    return 1 + torch.arange(num_bases, dtype=torch.float64) * (num_timesteps - 1) / m


def linear_interpolation_table(num_timesteps: int, num_bases: int) -> torch.Tensor:
    """(T, m+1) omega with, for t_i <= s < t_{i+1} (s = t + 1 the 1-based step),
    omega_i = (t_{i+1} - s) / (t_{i+1} - t_i), omega_{i+1} = (s - t_i) / (t_{i+1} - t_i), all others 0.

    Each row has at most two non-zeros and sums to 1; at s = t_i basis i gets weight 1 exactly. When m does
    not divide T - 1 some knots fall between integer steps: those bases never reach weight 1 (their largest
    weight is at the nearest steps) but every row is still a convex combination of the two nearest bases.
    """
    knots = basis_timesteps(num_timesteps, num_bases)
    s = torch.arange(1, num_timesteps + 1, dtype=torch.float64)
    i = (torch.searchsorted(knots, s, right=True) - 1).clamp(0, num_bases - 2)  # left knot index
    frac = (s - knots[i]) / (knots[i + 1] - knots[i])
    table = torch.zeros(num_timesteps, num_bases, dtype=torch.float64)
    rows = torch.arange(num_timesteps)
    table[rows, i] = 1 - frac
    table[rows, i + 1] += frac
    return table.float()


def onehot_table(num_timesteps: int, num_bases: int) -> torch.Tensor:
    """(T, m+1) omega_i(s) = 1 if t_i <= s < t_{i+1} (the last basis also owns s = T)."""
    knots = basis_timesteps(num_timesteps, num_bases)
    s = torch.arange(1, num_timesteps + 1, dtype=torch.float64)
    i = (torch.searchsorted(knots, s, right=True) - 1).clamp(0, num_bases - 1)
    return F.one_hot(i, num_bases).float()


class TimeTable(nn.Module):
    """TimeLoRA: omega(t) is row t of a per-layer table of T rows; t is 0-based (row t is the papers' step t + 1).

    Args:
        num_timesteps: T.
        num_bases: m + 1 basis adapters; `num_bases == T` with `init="onehot"` is the non-compositional
            TimeLoRA (one adapter per timestep).
        trainable: learn the table (paper "train" rows) or keep it fixed ("linear interpolation" rows).
        init: "linear" (interpolation between the two nearest bases), "onehot" (nearest basis to the left),
            or "gaussian" (N(0, 1) i.i.d.).
    """

    def __init__(self, num_timesteps: int, num_bases: int, trainable: bool = False, init: OmegaInit = "linear"):
        super().__init__()
        self.num_timesteps, self.num_bases = num_timesteps, num_bases
        if init == "linear":
            table = linear_interpolation_table(num_timesteps, num_bases)
        elif init == "onehot":
            table = onehot_table(num_timesteps, num_bases) if num_bases > 1 else torch.ones(num_timesteps, 1)
        elif init == "gaussian":
            table = torch.randn(num_timesteps, num_bases)
        else:
            raise ValueError(f"unknown omega init {init!r}; expected linear, onehot or gaussian")
        if trainable:
            self.table = nn.Parameter(table)
        else:
            self.register_buffer("table", table)

    def forward(self, cond: Conditions, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[_require(cond.step, "step", "TimeLoRA")]  # (B, m+1)


class ClassSelect(nn.Module):
    """ClassLoRA: one adapter per class, omega = one-hot(label); NULL_LABEL (no class) gives omega = 0.

    A `Conditions.class_vector` (B, C) is used as omega directly, so a mixture of classes, or a point
    beyond them, can be sampled (paper sec. 5.6 interpolation and extrapolation).
    """

    def __init__(self, num_classes: int):
        super().__init__()
        self.num_classes = self.num_bases = num_classes
        self.register_buffer("classes", torch.arange(num_classes), persistent=False)

    def class_weights(self, cond: Conditions, dtype: torch.dtype) -> torch.Tensor:
        """(B, C) weights over classes from class_vector or labels, in `dtype`."""
        if cond.class_vector is not None:
            return cond.class_vector.to(dtype)
        labels = _require(cond.labels, "labels", "ClassLoRA")
        return (labels[:, None] == self.classes).to(dtype)  # NULL_LABEL matches no class: a zero row

    def forward(self, cond: Conditions, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.class_weights(cond, x.dtype if x is not None else torch.float32)


class ClassTable(ClassSelect):
    """Compositional ClassLoRA for many classes: omega = w(y) @ Table with a trainable (C, m) table of
    class-to-basis weights (Gaussian init); w(y) is one-hot or the given class vector."""

    def __init__(self, num_classes: int, num_bases: int):
        super().__init__(num_classes)
        self.num_bases = num_bases
        self.table = nn.Parameter(torch.randn(num_classes, num_bases))

    def forward(self, cond: Conditions, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.class_weights(cond, self.table.dtype) @ self.table  # (B, m)


class UCMLP(nn.Module):
    """UC-LoRA: omega = MLP(v) on the shared condition embedding v, per layer:
    Linear-GroupNorm-SiLU for each hidden width, then Linear to m (the published widths are 128, 64).

    Args:
        embedding_dim: D of v.
        num_bases: m.
        widths: hidden widths.
    """

    def __init__(self, embedding_dim: int, num_bases: int, widths: tuple[int, ...] = (128, 64)):
        super().__init__()
        self.num_bases = num_bases
        layers: list[nn.Module] = []
        width_in = embedding_dim
        for width in widths:
            layers += [nn.Linear(width_in, width), group_norm(width), nn.SiLU()]
            width_in = width
        layers.append(nn.Linear(width_in, num_bases))
        self.mlp = nn.Sequential(*layers)

    def forward(self, cond: Conditions, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(_require(cond.embedding, "embedding", "UC-LoRA"))  # (B, m)


class PlainLoRA(nn.Module):
    """A plain, unconditioned LoRA adapter: one basis with omega = 1 for every sample (PEFT's LoRA)."""

    num_bases = 1

    def forward(self, cond: Conditions, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)
