"""The conditioned LoRA layer: a base layer plus a bank of rank-r adapters mixed per sample by omega.

out = base(x) + s * sum_i omega_i B_i A_i x  (+ s * sum_i omega_i b_i with the optional per-basis bias)

where s = lora_scale * alpha / r (the per-sample LoRA scale of the call times the layer's fixed scaling).
All adapters are stacked into one down projection A (r*M x C_in) and one up projection B (C_out x r*M), so
the per-sample sum is a single rank-(r*M) product scaled by omega repeated r times: no per-sample weight
is ever built. When the caller vouches that every sample shares one condition (`Conditions.shared`), the
weighted delta is merged into the base weight once for that call instead. No path reads a tensor on the
host: which path runs depends only on Python-level facts. A per-sample call in eager mode runs this sum as
one autograd function that accumulates the adapters' projection (and the per-basis bias term) into the base
output, and their input gradient into the base's, in place (`condlora.lora.fused`): the same arithmetic,
fewer bytes moved. Where each sample's omega weighs only a few of the M bases by construction (ClassLoRA's
one-hot rows, a fixed TimeLoRA table, one adapter per step), a per-sample call projects through those k
alone: each sample's k adapters are gathered and applied by batched products, rank r*k instead of r*M.

A network's layers usually carry alike strategies: binding the conditions of a call (`bind_conditions`)
computes what alike layers need for it together (`condlora.lora.grouping`) and hands each layer its part
(`ConditionedLoRA.bind`).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from condlora.conditions import Conditions
from condlora.lora.fused import conditioned_projection, gather_adapters, project, weigh
from condlora.ops import recorded

Merged = tuple[torch.Tensor, torch.Tensor | None]  # a merged (weight (C_out, C_in), bias (C_out,) or None)
Selection = tuple[torch.Tensor, torch.Tensor]  # the bases each sample's omega weighs: indices (B, k), weights (B, k)


class CallValues(NamedTuple):
    """What `bind_conditions` computed for one layer's call together with other layers, and for which
    conditions: a layer uses them only while its `conditions` are those (one set directly is computed anew)."""

    conditions: Conditions
    omega: torch.Tensor | None = None  # (B, M), scaled
    bias: torch.Tensor | None = None  # per-basis bias term sum_i omega_i b_i (B, C_out)
    weight: Merged | None = None  # merged weight and bias, for a call whose samples share one condition
    selection: Selection | None = None  # the bases each sample's omega weighs, for a call that selects them


def scaled_up(up: torch.Tensor, omega: torch.Tensor, rank: int) -> torch.Tensor:
    """[omega_1 B_1 | ... | omega_M B_M]: up projections (..., C_out, r*M), whose columns are basis-major
    (r per basis), times omega (..., M); the leading dimensions broadcast (one layer, or L stacked)."""
    split = up.unflatten(-1, (-1, rank))  # (..., C_out, M, r)
    return (split * omega.to(up.dtype)[..., None, :, None]).flatten(-2)


def compute_dtype(parameter: torch.Tensor) -> torch.dtype:
    """The dtype the layers compute in: autocast's where it is on for the parameter's device and casts the
    parameter (a float32 one: the adapters' projections come out in autocast's dtype), else the parameter's."""
    device = parameter.device.type
    if parameter.dtype == torch.float32 and torch.is_autocast_enabled(device):
        return torch.get_autocast_dtype(device)
    return parameter.dtype


def combined_selection(
    parts: list[Selection], sizes: list[int], cond: Conditions, scaling: float, dtype: torch.dtype
) -> Selection:
    """The selections of a layer's strategies, in order, as one among the layer's bases: each part's indices
    offset by the bases of the strategies before it, the weights times the call's LoRA scale and the layer's
    scaling, in `dtype`. Parts may have leading dimensions (L layers) before (B, k)."""
    offsets = [sum(sizes[:i]) for i in range(len(parts))]
    index = torch.cat([i + offset if offset else i for (i, _), offset in zip(parts, offsets, strict=True)], dim=-1)
    weight = torch.cat([w.to(dtype) for _, w in parts], dim=-1)
    if cond.lora_scale is not None:
        weight = weight * cond.lora_scale.to(dtype)[:, None]
    return index, weight * scaling if scaling != 1.0 else weight


def defines(strategy: type, form: str) -> bool:
    """Whether the class that defines the strategy's `forward` also defines `form` ("grouped", "selected"):
    a subclass that changes `forward` must not inherit a form that computes its parent's omega. Strategies
    that read the layer's input have no grouped form."""
    owner = next(cls for cls in strategy.__mro__ if "forward" in vars(cls))
    return form in vars(owner)


def layer_shape(base: nn.Module) -> tuple[int, int, int]:
    """(C_in, C_out, channel dim) of a supported base layer, else a clear error."""
    if isinstance(base, nn.Linear):
        return base.in_features, base.out_features, -1
    if isinstance(base, (nn.Conv1d, nn.Conv2d)):
        padded = base.padding not in ("valid", "same") and any(p != 0 for p in base.padding)
        if any(k != 1 for k in base.kernel_size) or base.groups != 1 or any(s != 1 for s in base.stride) or padded:
            raise TypeError(f"conditioned LoRA needs a 1x1, stride-1, unpadded, ungrouped convolution, got {base}")
        return base.in_channels, base.out_channels, 1
    raise TypeError(f"conditioned LoRA wraps nn.Linear, 1x1 nn.Conv1d or 1x1 nn.Conv2d, got {type(base).__name__}")


class ConditionedLoRA(nn.Module):
    """A base layer plus LoRA banks whose mixing weights come from conditioning strategies.

    Args:
        base_layer: nn.Linear (channels last) or 1x1 nn.Conv1d / nn.Conv2d (channels at dim 1).
        strategies: name -> strategy module with `num_bases`, called as `strategy(cond, x)`; their omegas
            are concatenated, so time and class banks (or any mix) share one layer.
        rank: r of every adapter.
        alpha: the adapters' output is scaled by alpha / r; None means alpha = r (scale 1, as in the
            conditioning papers).
        basis_bias: add the zero-initialised per-basis bias (r*M, C_out) of the published UC-LoRA code.
        dropout: dropout probability on the adapters' input in training (PEFT's lora_dropout); the base
            layer always sees the undropped input.

    A ~ N(0, (1/r)^2) (std 1/r, as in the published code) and B = 0, so a fresh layer equals its base.
    Conditions are set per call by `bind_conditions` (see `condlora.lora.inject`).
    """

    def __init__(
        self,
        base_layer: nn.Module,
        strategies: dict[str, nn.Module],
        rank: int = 4,
        alpha: float | None = None,
        basis_bias: bool = False,
        dropout: float = 0.0,
    ):
        super().__init__()
        if rank < 1:
            raise ValueError(f"LoRA rank must be >= 1, got {rank}")
        if not 0 <= dropout < 1:
            raise ValueError(f"LoRA dropout must be in [0, 1), got {dropout}")
        self.dropout = dropout
        self.base_layer = base_layer
        self.c_in, self.c_out, self.channel_dim = layer_shape(base_layer)
        self.rank, self.scaling = rank, (alpha if alpha is not None else rank) / rank
        self.strategies = nn.ModuleDict(strategies)
        self.num_bases = sum(s.num_bases for s in self.strategies.values())
        width = rank * self.num_bases
        self.lora_down = nn.Parameter(torch.randn(width, self.c_in) / rank)  # A_i stacked: (r*M, C_in)
        self.lora_up = nn.Parameter(torch.zeros(self.c_out, width))  # B_i stacked: (C_out, r*M)
        self.basis_bias = nn.Parameter(torch.zeros(width, self.c_out)) if basis_bias else None
        self.conditions: Conditions | None = None
        self.call: CallValues | None = None  # what was computed for this call with other layers
        self.merged = False

    def bind(self, cond: Conditions | None, call: CallValues | None = None) -> None:
        """Hand the layer its conditions for a call, with what `bind_conditions` computed for it together with
        other layers. Plain attributes, written without nn.Module's bookkeeping for parameters and submodules
        (which neither is): this runs twice per layer on every call, where host time is what a GPU step
        bound by launching kernels pays."""
        vars(self).update(conditions=cond, call=call)

    def omega(self, cond: Conditions, x: torch.Tensor) -> torch.Tensor:
        """Mixing weights times the LoRA scale: (B, M), or per position in x's layout (x's shape with M channels)
        when a strategy reads every position of the input."""
        parts = [s(cond, x) for s in self.strategies.values()]
        dim = 1
        if any(p.dim() > 2 for p in parts):  # per-position weights: bring the per-sample ones to that shape
            shape = next(p.shape for p in parts if p.dim() > 2)
            parts = [p if p.dim() > 2 else self._broadcast(p, x).expand(self._with_channels(shape, p)) for p in parts]
            dim = self.channel_dim
        omega = parts[0].to(x.dtype) if len(parts) == 1 else torch.cat([p.to(x.dtype) for p in parts], dim=dim)
        if cond.lora_scale is not None:
            omega = omega * cond.lora_scale.to(x.dtype).reshape(-1, *([1] * (omega.dim() - 1)))
        return omega * self.scaling if self.scaling != 1.0 else omega

    def group_key(self) -> tuple | None:
        """Layers with equal keys compute their omegas together (`grouped_omegas`); None: this one cannot
        (a strategy has no grouped form, e.g. it reads the input)."""
        parts = []
        for name, strategy in self.strategies.items():
            if not defines(type(strategy), "grouped"):
                return None
            parts.append((name, type(strategy), strategy.group_key()))
        down = self.lora_down
        return tuple(parts), self.scaling, down.dtype, down.device

    def merge_key(self) -> tuple | None:
        """Layers with equal keys whose omegas are given merge their weights together for a shared call
        (`grouped_merged_weights`); None: this one merges its own."""
        if self.merged or (self.training and self.dropout):
            return None
        bias, weight = self.base_layer.bias, self.base_layer.weight
        shape = (self.c_out, self.c_in, self.num_bases, self.rank)
        down = self.lora_down
        return shape, weight.dtype, weight.device, down.dtype, down.device, bias is None, self.basis_bias is None

    def _with_channels(self, shape: torch.Size, part: torch.Tensor) -> list[int]:
        """`shape` with its channel dimension set to the number of bases of `part`."""
        sizes = list(shape)
        sizes[self.channel_dim] = part.shape[1]
        return sizes

    def _scaled_up(self, omega: torch.Tensor) -> torch.Tensor:
        """[omega_1 B_1 | ... | omega_M B_M] for one omega (M,)."""
        return scaled_up(self.lora_up, omega, self.rank)

    def delta_weight(self, omega: torch.Tensor) -> torch.Tensor:
        """sum_i omega_i B_i A_i for one omega (M,), as a (C_out, C_in) matrix."""
        return self._scaled_up(omega) @ self.lora_down

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        cond = self.conditions
        if cond is None:
            if self.merged:  # a layer merged for one condition serves it without conditions
                return self.base_layer(x)
            raise RuntimeError("conditioned LoRA called without conditions; wrap the call in bind_conditions()")
        call = self.call if self.call is not None and self.call.conditions is cond else CallValues(cond)
        if call.weight is not None:  # merged with the other layers of its shape for a shared call
            return self._project(x, *call.weight)
        if cond.shared and self._routable(cond):
            parts = next(iter(self.strategies.values())).routed(cond, x)
            if parts is not None:
                return self._forward_routed(x, *parts)
        if call.selection is not None or (call.omega is None and self.selects(cond)):  # each sample's bases alone
            index, weight = call.selection if call.selection is not None else self.selection(cond)
            return self._forward_batched(x, weight, None, index)
        omega = self.omega(cond, x) if call.omega is None else call.omega
        if self.merged:  # the weight already holds the merged delta: add only what this call's omega differs by
            omega = omega - self._broadcast_merged(omega)
        if cond.shared and omega.dim() == 2 and not (self.training and self.dropout):
            return self._forward_merged(x, omega[0])
        return self._forward_batched(x, omega, None if self.merged else call.bias)  # (a merged omega is a difference)

    def selects(self, cond: Conditions) -> bool:
        """Whether a call with `cond` projects through the bases each sample's omega weighs alone: every
        strategy offers them (`selected`), they are at most half of the layer's bases, the samples do not
        share one condition (that call merges) and the layer holds no merged delta."""
        if cond.shared or self.merged:
            return False
        sizes = [s.selection_size(cond) if defines(type(s), "selected") else None for s in self.strategies.values()]
        return None not in sizes and 2 * sum(sizes) <= self.num_bases

    def selection(self, cond: Conditions) -> Selection:
        """Each sample's selected bases among the layer's M (indices (B, k)) and their weights times the LoRA
        scale (B, k), in the dtype the layer computes in (see `selects`)."""
        parts = [strategy.selected(cond) for strategy in self.strategies.values()]
        sizes = [strategy.num_bases for strategy in self.strategies.values()]
        return combined_selection(parts, sizes, cond, self.scaling, compute_dtype(self.lora_down))

    def fuses(self) -> bool:
        """Whether a per-sample call runs as one autograd function with its sums done in place
        (`conditioned_projection`, which adds the per-basis bias term itself): in eager mode (a compiler fuses
        its own), without dropout, on a base layer of exactly a supported type with no hooks (whose forward
        is what the function computes)."""
        base = self.base_layer
        hooked = base._forward_hooks or base._forward_pre_hooks or base._backward_hooks or base._backward_pre_hooks
        plain = type(base) in (nn.Linear, nn.Conv1d, nn.Conv2d) and not hooked
        return plain and not (self.training and self.dropout) and not recorded()

    def _routable(self, cond: Conditions) -> bool:
        """Whether a router's split path applies: one strategy offering `routed`, one LoRA scale for the call,
        nothing merged, no per-basis bias, no dropout to apply."""
        if len(self.strategies) != 1 or cond.lora_scale is not None:
            return False
        plain = not (self.merged or self.basis_bias is not None or (self.training and self.dropout))
        return plain and hasattr(next(iter(self.strategies.values())), "routed")

    def _forward_routed(self, x: torch.Tensor, core: torch.Tensor, index: torch.Tensor, gates: torch.Tensor):
        """Routed experts at one shared step: the core expert merged into the weight (one projection), and only
        the K context adapters run per position, scaled by their gates: rank r*K instead of r*M."""
        out = self._forward_merged(x, core * self.scaling)
        down = self.lora_down.view(self.num_bases, self.rank, self.c_in)[index].reshape(-1, self.c_in)
        up = self.lora_up.view(self.c_out, self.num_bases, self.rank)[:, index].reshape(self.c_out, -1)
        scale = gates.repeat_interleave(self.rank, dim=self.channel_dim) * self.scaling
        return self._add_projected(out, self._project(x, down) * scale.to(x.dtype), up)

    def _broadcast_merged(self, omega: torch.Tensor) -> torch.Tensor:
        merged = self._merged_omega.to(omega.dtype)
        if omega.dim() == 2:
            return merged[None, :]
        shape = [1] * omega.dim()
        shape[self.channel_dim] = merged.shape[0]
        return merged.reshape(shape)

    def _forward_batched(
        self, x: torch.Tensor, omega: torch.Tensor, bias_term: torch.Tensor | None, index: torch.Tensor | None = None
    ) -> torch.Tensor:
        """base(x) + B (omega_r * A x) (+ the per-basis bias term, `bias_term` if computed at binding) with the
        layer's adapters, or with those of each sample's bases `index` (B, k), weighed by omega (B, k)."""
        down, up, basis = self.lora_down, self.lora_up, self.basis_bias
        if self.channel_dim == -1:  # F.linear copies a strided input (transposed tokens): copy it once, for both
            x = x.contiguous()
        if omega.dim() == 2 and self.fuses():  # the same sum, its additions done in place
            weight, bias = self.base_layer.weight, self.base_layer.bias
            return conditioned_projection(x, weight, bias, down, up, omega, self.rank, basis, self.channel_dim, index)
        if index is not None:
            down, up, basis = gather_adapters(down, up, basis, index, self.rank)
        dropped = F.dropout(x, self.dropout, training=True) if self.training and self.dropout else x
        h = self._project(dropped, down)  # (B, ..., r*M, ...)
        out = self._add_projected(self.base_layer(x), self._weigh(h, omega), up)
        if bias_term is not None:  # computed at binding
            out = out + self._broadcast(bias_term.to(out.dtype), x)
        elif basis is not None:
            scale = omega.repeat_interleave(self.rank, dim=1 if omega.dim() == 2 else self.channel_dim)
            if scale.dim() == 2:  # (B, C_out) per sample
                out = out + self._broadcast((scale.unsqueeze(-2) @ basis.to(scale.dtype)).squeeze(-2), x)
            else:
                per_position = scale.movedim(self.channel_dim, -1) @ basis
                out = out + per_position.movedim(-1, self.channel_dim)
        return out

    def _add_projected(self, out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
        """out + h projected by weight (or by each sample's, (B, C_out, K)); channels last, one product does both."""
        if self.channel_dim != -1:
            return out + self._project(h, weight)
        if weight.dim() == 3:
            rows = (out.shape[0], -1)
            return torch.baddbmm(out.view(*rows, out.shape[-1]), h.view(*rows, h.shape[-1]), weight.mT).view(out.shape)
        return torch.addmm(out.flatten(0, -2), h.flatten(0, -2), weight.mT).view(out.shape)

    def _weigh(self, h: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        """h's r*M adapter channels (basis-major, r per basis) times their basis's omega: per sample through a
        view that splits the channels into (M, r), so omega is never repeated; per position by repeating."""
        dim, omega = self.channel_dim % h.dim(), omega.to(h.dtype)  # (h is what autocast made of x)
        if omega.dim() > 2:
            return h * omega.repeat_interleave(self.rank, dim=dim)
        return weigh(h, omega, self.rank, dim)

    def _forward_merged(self, x: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
        weight = torch.addmm(self.base_weight(), self._scaled_up(omega), self.lora_down)  # W + sum omega_i B_i A_i
        bias = self.base_layer.bias
        if self.basis_bias is not None:
            scale = omega.repeat_interleave(self.rank).to(self.basis_bias.dtype)  # (autocast: a bf16 omega)
            bias = scale @ self.basis_bias if bias is None else torch.addmv(bias, self.basis_bias.mT, scale)
        return self._project(x, weight, bias)

    def merge_parts(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None, torch.Tensor | None]:
        """What a merged weight and bias are made of, each the parameter itself (so a stack of them can be kept
        between calls): B (C_out, r*M), A (r*M, C_in), the base weight (C_out, C_in, or a 1x1 kernel of those
        sizes), the base bias and the per-basis bias (r*M, C_out), each None where the layer has none."""
        return self.lora_up, self.lora_down, self.base_layer.weight, self.base_layer.bias, self.basis_bias

    def base_weight(self) -> torch.Tensor:
        """The base layer's weight as a (C_out, C_in) matrix (a view of a convolution's kernel)."""
        weight = self.base_layer.weight
        return weight if self.channel_dim == -1 else weight.reshape(self.c_out, self.c_in)

    def _project(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        """A (C_out', C_in') matrix applied along the channel dimension of x."""
        return project(x, weight, bias, self.channel_dim)

    def _broadcast(self, per_sample: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """(B, K) -> a shape that broadcasts against x's channel dimension."""
        if self.channel_dim == -1:
            return per_sample.reshape(per_sample.shape[0], *([1] * (x.dim() - 2)), per_sample.shape[1])
        return per_sample.reshape(*per_sample.shape, *([1] * (x.dim() - 2)))

    @torch.no_grad()
    def merge(self, cond: Conditions) -> None:
        """Fold the delta for one condition shared by the batch into the base weight (e.g. a fixed class for
        deployment). Afterwards the layer still computes the right output for any condition (it adds what a
        call's omega differs by), and without conditions it serves the merged one."""
        if self.merged:
            raise RuntimeError("layer is already merged; unmerge() first")
        if self.basis_bias is not None and self.base_layer.bias is None:
            raise RuntimeError("cannot merge a per-basis bias into a base layer without bias")
        readers = [name for name, s in self.strategies.items() if getattr(s, "reads_input", False)]
        if readers:
            raise ValueError(f"merge() needs weights that do not depend on the input; {readers} read it")
        probe = torch.zeros(cond.batch_size() or 1, self.c_in, dtype=self.lora_down.dtype, device=self.lora_down.device)
        omega = self.omega(cond, probe if self.channel_dim == -1 else probe[..., None])
        if not bool((omega == omega[:1]).all()):  # an explicit call, not a forward path: checking here is fine
            raise ValueError("merge() needs one condition shared by the whole batch")
        self._merged_omega = omega[0].clone()
        self._add_delta(self._merged_omega, sign=1.0)
        self.merged = True

    @torch.no_grad()
    def unmerge(self) -> None:
        """Undo `merge`, restoring the base weight (up to float rounding)."""
        if not self.merged:
            raise RuntimeError("layer is not merged")
        self._add_delta(self._merged_omega, sign=-1.0)
        self.merged = False

    def _add_delta(self, omega: torch.Tensor, sign: float) -> None:
        w = self.base_layer.weight
        w.add_(sign * self.delta_weight(omega).reshape(w.shape))
        if self.basis_bias is not None:
            self.base_layer.bias.add_(sign * (omega.repeat_interleave(self.rank) @ self.basis_bias))
