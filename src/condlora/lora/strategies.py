"""Conditioning strategies: small modules that turn the conditions of a call into mixing weights omega.

A conditioned LoRA layer computes out = base(x) + sum_i omega_i B_i A_i x; each strategy below owns one bank
of `num_bases` adapters and is called as `strategy(cond, x)` with the call's `Conditions` and the layer's
input x. It returns omega (B, num_bases) per sample or, if it reads the input position by position (a
router), omega for every position in x's layout with num_bases channels; such a strategy sets
`reads_input = True`. Strategies never read tensors on the host: values are checked at the boundaries
(`Conditions.check`).

A strategy whose omega depends on the conditions alone may also offer `group_key()` and
`grouped(strategies, cond, dtype, stack)`: the omegas (L, B, num_bases) of L alike strategies (equal keys),
one per layer, in a few operations for the whole network instead of a few per layer (`grouped_omegas` in
`condlora.lora.grouping`); it stacks their parameters with `stack` (which may keep the stack for the next
call, so it is given parameters and buffers only). Where the network's step is bound by launching kernels
(a GPU), this is most of what the conditioning costs.

A strategy whose omega rows are sparse by construction (ClassLoRA's one-hot rows, a fixed TimeLoRA table
that interpolates between two bases, one adapter per step, a fostered TimeStep-Master expert) may also
offer `selection_size(cond)` and `selected(cond)`: the at most k bases each sample's omega weighs, as
indices and weights (B, k), k known before any tensor is read, so that a layer projects through those k
alone (`ConditionedLoRA`), r*k channels per sample instead of r*M; and `grouped_selected` for L alike
strategies at once.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Literal

import torch
import torch.nn.functional as F
from torch import nn

from condlora.conditions import Conditions
from condlora.ops import group_norm

OmegaInit = Literal["linear", "onehot", "gaussian"]
Stack = Callable[..., torch.Tensor]  # stacks parameters: torch.stack, or StackCache.stack (which keeps them)
STACK_LIMIT = 1 << 22  # elements: tables up to this size in all are stacked per call to gather them at once


def _require(value: torch.Tensor | None, name: str, strategy: str) -> torch.Tensor:
    if value is None:
        raise ValueError(f"{strategy} needs Conditions.{name}, which this call did not provide")
    return value


def sparse_rows(table: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The non-zero entries of each row of a (T, M) table, which has at most k per row, as column indices and
    values, (T, k) each; a row with fewer is padded with zero-weight columns."""
    index = torch.argsort(table.eq(0).to(torch.int8), dim=1, stable=True)[:, :k]  # non-zero columns first
    return index, table.gather(1, index)


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
        self.num_timesteps, self.num_bases, self.trainable = num_timesteps, num_bases, trainable
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
            self._index_rows({"linear": min(2, num_bases), "onehot": 1}.get(init, num_bases))

    def _index_rows(self, k: int) -> None:
        """A fixed table's non-zeros, k per row at most (`sparse_rows`), as buffers derived from it: at
        construction (k known from the initialisation) and on loading (k counted), so a table changed in place
        otherwise must be followed by this."""
        index, weight = sparse_rows(self.table, k)
        self.register_buffer("row_index", index, persistent=False)
        self.register_buffer("row_weight", weight, persistent=False)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        if not self.trainable and self.table.device.type != "meta":  # (loading reads the values anyway)
            with torch.no_grad():
                self._index_rows(max(int(self.table.ne(0).sum(1).max()), 1) if self.table.numel() else 1)

    def forward(self, cond: Conditions, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.table[_require(cond.step, "step", "TimeLoRA")]  # (B, m+1)

    def selection_size(self, cond: Conditions) -> int | None:
        """A fixed table's non-zeros per row: 2 interpolating linearly, 1 one-hot; None for a trained one."""
        return None if self.trainable else self.row_index.shape[1]

    def selected(self, cond: Conditions) -> tuple[torch.Tensor, torch.Tensor]:
        steps = _require(cond.step, "step", "TimeLoRA")
        return self.row_index[steps], self.row_weight[steps]  # (B, k) each

    def group_key(self) -> tuple:
        return self.num_timesteps, self.num_bases, None if self.trainable else self.row_index.shape[1]

    @staticmethod
    def grouped_selected(tables: list[TimeTable], cond: Conditions, stack: Stack = torch.stack):
        steps = _require(cond.step, "step", "TimeLoRA")
        indices, weights = [t.row_index for t in tables], [t.row_weight for t in tables]
        return _rows_at(indices, steps, stack), _rows_at(weights, steps, stack)

    @staticmethod
    def grouped(tables: list[TimeTable], cond: Conditions, dtype: torch.dtype, stack: Stack = torch.stack):
        return _rows_at([t.table for t in tables], _require(cond.step, "step", "TimeLoRA"), stack)  # (L, B, m+1)


def _rows_at(tables: list[torch.Tensor], steps: torch.Tensor, stack: Stack) -> torch.Tensor:
    """Rows `steps` of each of L alike (T, ...) tables: (L, B, ...), one gather from the stacked tables, or for
    large ones (e.g. one-hot T x T) a gather from each."""
    if len(tables) * tables[0].numel() <= STACK_LIMIT:
        return stack(tables)[:, steps]
    return torch.stack([table[steps] for table in tables])


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

    def selection_size(self, cond: Conditions) -> int | None:
        """One class per sample from labels; None from a class vector (any mixture)."""
        return 1 if cond.class_vector is None else None

    def selected(self, cond: Conditions) -> tuple[torch.Tensor, torch.Tensor]:
        """The label's adapter with weight 1; a label outside [0, C) (NULL_LABEL) weighs 0, as its zero row."""
        labels = _require(cond.labels, "labels", "ClassLoRA")[:, None]
        index = labels.clamp(0, self.num_classes - 1)  # a label inside [0, C) is its own index
        return index, (index == labels).float()

    def group_key(self) -> tuple:
        return (self.num_classes,)

    @staticmethod
    def grouped_selected(selects: list[ClassSelect], cond: Conditions, stack: Stack = torch.stack):
        index, weight = selects[0].selected(cond)  # the same for every layer
        return index.expand(len(selects), *index.shape), weight.expand(len(selects), *weight.shape)

    @staticmethod
    def grouped(selects: list[ClassSelect], cond: Conditions, dtype: torch.dtype, stack: Stack = torch.stack):
        weights = selects[0].class_weights(cond, dtype)  # the same one-hot rows for every layer
        return weights.expand(len(selects), *weights.shape)  # (L, B, C), no copy


class ClassTable(ClassSelect):
    """Compositional ClassLoRA for many classes: omega = w(y) @ Table with a trainable (C, m) table of
    class-to-basis weights (Gaussian init); w(y) is one-hot or the given class vector."""

    def __init__(self, num_classes: int, num_bases: int):
        super().__init__(num_classes)
        self.num_bases = num_bases
        self.table = nn.Parameter(torch.randn(num_classes, num_bases))

    def forward(self, cond: Conditions, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.class_weights(cond, self.table.dtype) @ self.table  # (B, m)

    def group_key(self) -> tuple:
        return self.num_classes, self.num_bases

    @staticmethod
    def grouped(tables: list[ClassTable], cond: Conditions, dtype: torch.dtype, stack: Stack = torch.stack):
        stacked = stack([t.table for t in tables])  # (L, C, m)
        return tables[0].class_weights(cond, stacked.dtype) @ stacked  # (B, C) @ (L, C, m) -> (L, B, m)


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
        self.sizes = (embedding_dim, tuple(widths), num_bases)

    def forward(self, cond: Conditions, x: torch.Tensor | None = None) -> torch.Tensor:
        return self.mlp(_require(cond.embedding, "embedding", "UC-LoRA"))  # (B, m)

    def group_key(self) -> tuple:
        return self.sizes

    @staticmethod
    def grouped(mlps: list[UCMLP], cond: Conditions, dtype: torch.dtype, stack: Stack = torch.stack):
        """The L MLPs side by side: each Linear one batched product over the stacked weights, each GroupNorm
        one layer norm over every layer's groups (GroupNorm of a (B, C) input normalises each group of C / G
        channels alone) followed by the stacked per-channel affine."""
        v = _require(cond.embedding, "embedding", "UC-LoRA")
        h = v.expand(len(mlps), *v.shape)  # (L, B, D)
        for modules in zip(*(m.mlp for m in mlps), strict=True):  # module k of every MLP
            module = modules[0]
            if isinstance(module, nn.Linear):  # as (W h^T + b)^T: the weights' gradients come out in their layout
                weight, bias = _stacked(modules, stack)
                h = torch.baddbmm(bias[:, :, None], weight, h.mT).mT  # (L, B, width)
            elif isinstance(module, nn.GroupNorm):
                weight, bias = _stacked(modules, stack)
                groups = h.unflatten(-1, (module.num_groups, -1))
                normed = F.layer_norm(groups, groups.shape[-1:], eps=module.eps).flatten(-2)
                h = torch.addcmul(bias[:, None, :], normed, weight[:, None, :])
            else:
                h = module(h)  # the activation
        return h  # (L, B, m)


def _stacked(modules: tuple[nn.Module, ...], stack: Stack) -> tuple[torch.Tensor, torch.Tensor]:
    """The weights and the biases of alike modules, each stacked along a new first dimension."""
    return stack([m.weight for m in modules]), stack([m.bias for m in modules])


class PlainLoRA(nn.Module):
    """A plain, unconditioned LoRA adapter: one basis with omega = 1 for every sample (PEFT's LoRA)."""

    num_bases = 1

    def forward(self, cond: Conditions, x: torch.Tensor) -> torch.Tensor:
        return torch.ones(x.shape[0], 1, dtype=x.dtype, device=x.device)


def expert_intervals(steps: torch.Tensor, num_timesteps: int, scale: int) -> torch.Tensor:
    """TimeStep Master's interval of each 0-based step at one scale (paper Eq. 7): i = ceil(t / T * n) for the
    1-based step t = step + 1, so i is in 1..n and interval i holds the steps t in ((i - 1) T / n, i T / n]."""
    return torch.div((steps + 1) * scale + num_timesteps - 1, num_timesteps, rounding_mode="floor")


def interval_steps(num_timesteps: int, scale: int, interval: int) -> tuple[int, int]:
    """The 0-based steps [first, last) of interval `interval` (1..n) at scale n: the steps whose
    `expert_intervals` is that interval."""
    if not 1 <= interval <= scale:
        raise ValueError(f"interval must be in 1..{scale}, got {interval}")
    return (interval - 1) * num_timesteps // scale, interval * num_timesteps // scale


class TimestepExperts(nn.Module):
    """TimeStep Master (TSM): LoRA experts per interval of timesteps at several scales, one adapter each.

    For each scale n of `scales` there are n experts; expert i of scale n serves the steps of its interval
    (`expert_intervals`), so sum(scales) adapters in all, scale by scale in the order given.

    Stage "foster" (paper sec. 3.1): omega is one-hot on one expert per sample. With `scale` = n, the experts
    of scale n (training and sampling). With `scale` = 0, in training each sample goes to the scale at its
    position in the batch (sample b to scale b mod S: every expert then trains only on its own interval's
    steps, as S separate runs would, within one mixed batch) and in evaluation to the finest scale.

    Stage "assemble" (sec. 3.2, Eq. 5-6): the finest scale's expert for t is the core expert with weight 1;
    the other scales' experts for t are context experts weighted by the router G = FC(x) + E[t], one output
    per context scale, with no squashing, computed at every position of the layer's input (per sample and
    per token, never pooled). `core=False` gives the symmetric mixture (every scale gated); `router` "time"
    keeps only E[t], "features" only FC(x). FC and E start at zero, so an assembled layer starts as the core
    expert alone; the experts stay as fostered and only FC and E are meant to train (`router_parameters`).

    Args:
        num_timesteps: T.
        scales: the scales n, each >= 1.
        c_in: input channels of the layer (the router's FC reads them).
        channel_dim: where x keeps its channels (-1 for Linear layers, 1 for convolutions).
    """

    def __init__(
        self,
        num_timesteps: int,
        scales: tuple[int, ...],
        c_in: int,
        channel_dim: int = -1,
        stage: Literal["foster", "assemble"] = "foster",
        scale: int = 0,
        router: Literal["both", "time", "features"] = "both",
        core: bool = True,
    ):
        super().__init__()
        if not scales or min(scales) < 1 or len(set(scales)) != len(scales):
            raise ValueError(f"TimeStep Master needs distinct scales >= 1, got {scales}")
        if scale and scale not in scales:
            raise ValueError(f"tsm scale {scale} is not one of the scales {scales}")
        if stage not in ("foster", "assemble") or router not in ("both", "time", "features"):
            raise ValueError(f"unknown TSM stage {stage!r} or router {router!r}")
        self.num_timesteps, self.scales, self.channel_dim = num_timesteps, tuple(scales), channel_dim
        self.stage, self.scale, self.router, self.core = stage, scale, router, core
        self.num_bases = sum(scales)
        self.register_buffer("offsets", torch.tensor([0, *scales[:-1]]).cumsum(0), persistent=False)
        finest = max(range(len(scales)), key=lambda k: scales[k])
        self.core_index = finest if core else -1
        self.gated = [k for k in range(len(scales)) if k != self.core_index]
        self.reads_input = stage == "assemble" and router != "time" and bool(self.gated)
        if stage == "assemble" and self.gated:
            if router != "features":
                self.time_embed = nn.Parameter(torch.zeros(num_timesteps, len(self.gated)))  # E: (T, K)
            if router != "time":
                self.fc = nn.Linear(c_in, len(self.gated))
                nn.init.zeros_(self.fc.weight)
                nn.init.zeros_(self.fc.bias)

    def experts(self, steps: torch.Tensor, scale_index: int) -> torch.Tensor:
        """(B,) index among all experts of each step's expert at scale `scales[scale_index]`."""
        n = self.scales[scale_index]
        return self.offsets[scale_index] + expert_intervals(steps, self.num_timesteps, n) - 1

    def forward(self, cond: Conditions, x: torch.Tensor) -> torch.Tensor:
        steps = _require(cond.step, "step", "TimeStep Master")
        if self.stage == "foster":
            return F.one_hot(self._foster_experts(steps), self.num_bases).to(x.dtype)
        omega = torch.zeros(steps.shape[0], self.num_bases, dtype=x.dtype, device=x.device)
        if self.core:
            omega = omega + F.one_hot(self.experts(steps, self.core_index), self.num_bases).to(x.dtype)
        if not self.gated:
            return omega
        context = torch.stack([F.one_hot(self.experts(steps, k), self.num_bases) for k in self.gated], 1)
        context = context.to(x.dtype)  # (B, K, M): where each context scale's expert for t sits
        gate = self.time_embed[steps].to(x.dtype) if self.router != "features" else None  # (B, K)
        if self.router == "time":
            return omega + torch.einsum("bk,bkm->bm", gate, context)
        h = x.movedim(self.channel_dim, -1) if self.channel_dim != -1 else x  # (B, ..., C)
        g = self.fc(h)  # (B, ..., K) per position
        if gate is not None:
            g = g + gate.reshape(gate.shape[0], *([1] * (g.dim() - 2)), gate.shape[1])
        flat = g.reshape(g.shape[0], -1, g.shape[-1])  # (B, P, K)
        per_position = torch.einsum("bpk,bkm->bpm", flat, context) + omega[:, None, :]
        per_position = per_position.reshape(*g.shape[:-1], self.num_bases)
        return per_position.movedim(-1, self.channel_dim) if self.channel_dim != -1 else per_position

    def selection_size(self, cond: Conditions) -> int | None:
        """One expert per sample while fostering; None assembled (a mixture)."""
        return 1 if self.stage == "foster" else None

    def selected(self, cond: Conditions) -> tuple[torch.Tensor, torch.Tensor]:
        experts = self._foster_experts(_require(cond.step, "step", "TimeStep Master"))[:, None]
        return experts, torch.ones(experts.shape, device=experts.device)

    def routed(self, cond: Conditions, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None:
        """The assembled mixture at one step shared by the whole batch, in parts a layer can compute cheaply:
        (core omega (M,) to merge into the weight, the K context experts' indices (K,), their gates G at every
        position of x (x's layout with K channels)); None where this does not apply (fostering, a router
        without features: their omega is per sample and merges whole)."""
        if self.stage != "assemble" or not self.reads_input:
            return None
        steps = _require(cond.step, "step", "TimeStep Master")[:1]
        core = torch.zeros(self.num_bases, dtype=x.dtype, device=x.device)
        if self.core:
            core = F.one_hot(self.experts(steps, self.core_index), self.num_bases)[0].to(x.dtype)
        index = torch.cat([self.experts(steps, k) for k in self.gated])  # (K,)
        h = x.movedim(self.channel_dim, -1) if self.channel_dim != -1 else x
        g = self.fc(h)
        if self.router == "both":
            g = g + self.time_embed[steps[0]].to(g.dtype)
        return core, index, g.movedim(-1, self.channel_dim) if self.channel_dim != -1 else g

    def _foster_experts(self, steps: torch.Tensor) -> torch.Tensor:
        if self.scale:
            return self.experts(steps, self.scales.index(self.scale))
        if not self.training:
            return self.experts(steps, max(range(len(self.scales)), key=lambda k: self.scales[k]))
        which = torch.arange(steps.shape[0], device=steps.device) % len(self.scales)  # sample b -> scale b mod S
        per_scale = torch.stack([self.experts(steps, k) for k in range(len(self.scales))], 1)  # (B, S)
        return per_scale.gather(1, which[:, None])[:, 0]

    def router_parameters(self) -> list[nn.Parameter]:
        return [p for name, p in self.named_parameters() if name.startswith(("fc.", "time_embed"))]
