"""What alike conditioned LoRA layers need for one call, computed for all of them together.

A network's layers usually carry alike strategies (the same table sizes, the same MLP widths) and come in a
few shapes (every preset has two: the attention's qkv and output projections). Binding the conditions of
a call (`bind_conditions`) computes here, once for each group of alike layers: their omegas
(`grouped_omegas`), their per-basis bias terms (`grouped_bias_terms`) or, when the call's samples share one
condition, their merged weights (`grouped_merged_weights`). Each layer then only projects. Where a step is
bound by launching kernels (a GPU, eager), a few operations per group instead of a few per layer is most of
what the conditioning costs.

Grouping stacks the layers' parameters (time tables, MLP weights, adapters, base weights). A `StackCache`
keeps those stacks from one call to the next while a sampler keeps it open, so a sampler's calls stack
nothing after the first.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import TYPE_CHECKING, TypeVar

import torch

from condlora.conditions import Conditions
from condlora.lora.fused import summed_rows
from condlora.lora.layer import combined_selection, compute_dtype, defines, scaled_up
from condlora.lora.strategies import Stack
from condlora.ops import recorded

if TYPE_CHECKING:
    from condlora.lora.layer import ConditionedLoRA, Merged, Selection

T = TypeVar("T")


def stack_parameters(tensors: Sequence[torch.Tensor], shape: Sequence[int] | None = None) -> torch.Tensor:
    """The tensors, each viewed as `shape` if given (a 1x1 kernel as a matrix), stacked along a new first
    dimension."""
    return torch.stack(tensors if shape is None else [t.view(shape) for t in tensors])


def summed_basis_biases(biases: Sequence[torch.Tensor], rank: int) -> torch.Tensor:
    """Per-basis biases, (r*M, C_out) each with r rows per basis, stacked with each basis's rows summed:
    (L, M, C_out), what omega_i weighs (sum_i omega_i b_i is then one batched product)."""
    return summed_rows(stack_parameters(biases), rank)


class StackCache:
    """Stacks of parameters, and the groups of alike layers, kept from one binding to the next while a caller
    keeps them (`keeping`).

    A sampler calls its network tens to thousands of times with the same parameters: inside `keep_stacks`
    (`condlora.lora.inject`), which `generate` opens around its sampling loop, each stack and each grouping
    of the layers is made on the first call and served on the others, and all are dropped when it closes.
    The caller vouches that the network's parameters, buffers, modes and merges stay as they are meanwhile,
    as it vouches for a shared condition (`Conditions.shared`): nothing is checked per call. Outside it,
    and wherever autograd must see the stack (a source requires grad and grad is enabled), under
    `torch.compile` (which fuses the stack away) or while tracing, every stack is made anew.
    """

    def __init__(self):
        self._kept: dict[tuple, torch.Tensor] = {}
        self._sources: list[Sequence[torch.Tensor]] = []  # held, so no other tensor can take their ids
        self._groups: dict[str, list[list[int]]] = {}
        self._values: dict[tuple, object] = {}
        self._depth = 0

    def __getstate__(self) -> dict:
        """A pickled (or copied) cache is a closed, empty one: what it kept belongs to this process's scope."""
        return StackCache().__dict__

    def stack(self, tensors: Sequence[torch.Tensor], shape: tuple[int, ...] | None = None) -> torch.Tensor:
        """`stack_parameters(tensors, shape)`, kept while the cache is kept open. The tensors must be
        parameters or buffers (the same objects on every call): a fresh tensor is never found again."""
        if _must_stack_anew(tensors) or not self._depth:  # (a compiler never reads the depth: no guard on it)
            return stack_parameters(tensors, shape)
        key = (*map(id, tensors), shape, torch.is_inference_mode_enabled())
        stacked = self._kept.get(key)
        if stacked is None:
            stacked = self._kept[key] = stack_parameters(tensors, shape)
            self._sources.append(tensors)
        return stacked

    def groups(self, kind: str, keys: Callable[[], list[tuple | None]]) -> list[list[int]]:
        """The indices of the layers with equal `keys()` (see `_groups`), kept while the cache is kept open,
        where the layers' keys cannot change: computing them is most of binding's host time."""
        if recorded() or not self._depth:
            return _groups(keys())
        found = self._groups.get(kind)
        if found is None:
            found = self._groups[kind] = _groups(keys())
        return found

    def value(self, key: tuple, make: Callable[[], T]) -> T:
        """make(), kept under `key` while the cache is kept open and grad is off (a sampler's calls: what it
        makes from the parameters then needs no graph)."""
        if recorded() or torch.is_grad_enabled() or not self._depth:
            return make()
        key = (*key, torch.is_inference_mode_enabled())
        if key not in self._values:
            self._values[key] = make()
        return self._values[key]

    @contextmanager
    def keeping(self) -> Iterator[None]:
        """Keep stacks for the enclosed calls (nested: until the outermost closes), then drop them."""
        self._depth += 1
        try:
            yield
        finally:
            self._depth -= 1
            if not self._depth:
                self._kept, self._sources, self._groups, self._values = {}, [], {}, {}


def _must_stack_anew(tensors: Sequence[torch.Tensor]) -> bool:
    """Whether a stack must be made on this call: autograd must see it, or a compiler or tracer records it."""
    return recorded() or (torch.is_grad_enabled() and any(t.requires_grad for t in tensors))


def grouped_omegas(
    layers: Sequence[ConditionedLoRA], cond: Conditions, kept: StackCache | None = None
) -> list[torch.Tensor | None]:
    """Each layer's omega for a call with `cond` (what `layer.omega` gives), computed for all layers with equal
    `group_key` at once: a few operations per group instead of a few per layer. None for a layer that
    computes its own (its strategies read the input, or have no grouped form). `kept` may keep the groups
    and the stacked parameters for the next call (here, as in the functions below)."""
    return split_omegas(omega_groups(layers, cond, kept), len(layers))


OmegaGroups = list[tuple[list[int], torch.Tensor]]  # (indices of alike layers, their omegas (L, B, M))


def alike_layers(layers: Sequence[ConditionedLoRA], kept: StackCache) -> list[list[int]]:
    """The indices of each group of layers whose omegas are computed together (equal `group_key`)."""
    return kept.groups("omega", lambda: [layer.group_key() for layer in layers])


def omega_groups(
    layers: Sequence[ConditionedLoRA],
    cond: Conditions,
    kept: StackCache | None = None,
    alike: list[list[int]] | None = None,
) -> OmegaGroups:
    """The omegas of each group of alike layers (`alike_layers`, or `alike` if given), as one (L, B, M) tensor
    (see `grouped_omegas`); none for a group that selects its bases for this call (`grouped_selections`)."""
    kept = kept if kept is not None else StackCache()
    groups = []
    for indices in alike if alike is not None else alike_layers(layers, kept):
        members = [layers[i] for i in indices]
        if _selecting(members, cond):
            continue
        first, dtype = members[0], members[0].lora_down.dtype
        parts = [
            type(strategy).grouped([m.strategies[name] for m in members], cond, dtype, kept.stack).to(dtype)
            for name, strategy in first.strategies.items()
        ]
        omega = parts[0] if len(parts) == 1 else torch.cat(parts, dim=-1)  # (L, B, M)
        if cond.lora_scale is not None:
            omega = omega * cond.lora_scale.to(dtype)[None, :, None]
        if first.scaling != 1.0:
            omega = omega * first.scaling
        groups.append((indices, omega.to(compute_dtype(first.lora_down))))  # cast once for the group
    return groups


def grouped_selections(
    layers: Sequence[ConditionedLoRA],
    cond: Conditions,
    kept: StackCache | None = None,
    alike: list[list[int]] | None = None,
) -> list[Selection | None]:
    """For a call whose layers select their bases (`ConditionedLoRA.selects`): each layer's selection (what
    `layer.selection` gives), computed for alike layers at once. None for a layer in no group, or in a group
    that computes omegas (`omega_groups`)."""
    kept = kept if kept is not None else StackCache()
    selections: list[Selection | None] = [None] * len(layers)
    for indices in alike if alike is not None else alike_layers(layers, kept):
        members = [layers[i] for i in indices]
        if not _selecting(members, cond):
            continue
        first, parts = members[0], []
        for name, strategy in first.strategies.items():
            strategies = [m.strategies[name] for m in members]
            if defines(type(strategy), "grouped_selected"):
                parts.append(type(strategy).grouped_selected(strategies, cond, kept.stack))
            else:  # (L, B, k) each, stacked from every layer's own
                parts.append(tuple(map(torch.stack, zip(*(s.selected(cond) for s in strategies), strict=True))))
        sizes = [strategy.num_bases for strategy in first.strategies.values()]
        index, weight = combined_selection(parts, sizes, cond, first.scaling, compute_dtype(first.lora_down))
        for i, layer_index, layer_weight in zip(indices, index.unbind(0), weight.unbind(0), strict=True):
            selections[i] = (layer_index, layer_weight)
    return selections


def _selecting(members: list[ConditionedLoRA], cond: Conditions) -> bool:
    """Whether alike layers select their bases for a call with `cond` (none of them holding a merged delta)."""
    return members[0].selects(cond) and not any(m.merged for m in members)


def split_omegas(groups: OmegaGroups, count: int) -> list[torch.Tensor | None]:
    """Each of `count` layers' omega (B, M), a view into its group's; None for a layer in no group."""
    omegas: list[torch.Tensor | None] = [None] * count
    for indices, omega in groups:
        for i, layer_omega in zip(indices, omega.unbind(0), strict=True):
            omegas[i] = layer_omega
    return omegas


def grouped_bias_terms(
    layers: Sequence[ConditionedLoRA], omegas: list[torch.Tensor | None], kept: StackCache | None = None
) -> list[torch.Tensor | None]:
    """sum_i omega_i b_i (B, C_out) of each layer with a per-basis bias whose omega is given, for layers of
    one bias shape at once (one batched product), so the layer adds it with one operation. None elsewhere,
    and for a layer whose per-sample call adds its term in its own projection (`ConditionedLoRA.fuses`)."""

    def keys() -> list[tuple | None]:
        return [
            None
            if layer.basis_bias is None or omega is None or layer.fuses()
            else (layer.basis_bias.shape, layer.rank, layer.basis_bias.dtype, layer.basis_bias.device)
            for layer, omega in zip(layers, omegas, strict=True)
        ]

    kept = kept if kept is not None else StackCache()
    terms: list[torch.Tensor | None] = [None] * len(layers)
    for indices in kept.groups("bias", keys):
        biases = [layers[i].basis_bias for i in indices]
        basis = kept.value(("bias", *indices), partial(summed_basis_biases, biases, layers[indices[0]].rank))
        stacked = torch.bmm(torch.stack([omegas[i] for i in indices]), basis)  # (L, B, M) @ (L, M, C_out)
        for i, term in zip(indices, stacked.unbind(0), strict=True):
            terms[i] = term
    return terms


MERGE_LIMIT = 1 << 22  # elements: merged weights computed together for one call, all shapes together


def grouped_merged_weights(
    layers: Sequence[ConditionedLoRA],
    omegas: list[torch.Tensor | None],
    kept: StackCache | None = None,
    groups: OmegaGroups = (),
) -> list[Merged | None]:
    """For a call whose samples share one condition: each layer's merged weight W + sum_i omega_i B_i A_i
    (C_out, C_in) and bias (its base bias plus sum_i omega_i b_i with a per-basis bias), computed for layers of
    one shape at once: a few operations per shape instead of a few per layer. The merged weights are held
    for the whole call, so at most MERGE_LIMIT elements of them are made together (the attention weights of
    every preset; a large model's layers are not launch-bound, and would hold a copy of their weights).
    None for a layer that merges its own: its omega is its own, it holds a merged delta, it drops its input in
    training, it is alone in its shape, or its weights do not fit in what is left of MERGE_LIMIT. Given the
    `omega_groups` that `omegas` were split from, the rows that the layers of a shape share are read from
    them as a view where they can be (no stack)."""

    def keys() -> list[tuple | None]:
        return [None if omega is None else layer.merge_key() for layer, omega in zip(layers, omegas, strict=True)]

    kept = kept if kept is not None else StackCache()
    merged: list[Merged | None] = [None] * len(layers)
    stack, budget = kept.stack, MERGE_LIMIT
    for indices in kept.groups("merge", keys):
        first = layers[indices[0]]
        part = indices[: budget // (first.c_out * first.c_in)]
        if len(part) < 2:  # nothing to share: the layers merge their own
            continue
        budget -= len(part) * first.c_out * first.c_in
        members = [layers[i] for i in part]
        base, ups, downs, biases, basis = kept.value(("merge", *part), partial(_merge_stacks, members, stack))
        omega = _shared_rows(part, omegas, groups, kept)  # (L, M): the row all samples share
        weights = torch.baddbmm(base, scaled_up(ups, omega, first.rank), downs)  # W + sum omega_i B_i A_i
        if basis is not None:  # b + sum_i omega_i b_i, the r rows of each basis's bias summed beforehand
            scale = omega[:, None, :]  # (L, 1, M)
            stacked = torch.bmm(scale, basis) if biases is None else torch.baddbmm(biases[:, None, :], scale, basis)
            biases = list(stacked[:, 0].unbind(0))
        for i, weight, bias in zip(part, weights.unbind(0), biases, strict=True):
            merged[i] = (weight, bias)
    return merged


def _shared_rows(part: list[int], omegas: list[torch.Tensor | None], groups: OmegaGroups, kept: StackCache):
    """The first row of each omega of the layers in `part`, (L, M): a strided view of their omega group where
    they sit in one at evenly spaced places (a network's layers of one shape alternate with the others), else
    a stack. Where they sit is found once while `kept` is kept."""
    found = kept.value(("rows", *part), partial(_evenly_placed, part, groups))
    if found is None:
        return torch.stack([omegas[i][0] for i in part])
    group, rows = found
    return groups[group][1][rows, 0]


def _evenly_placed(part: list[int], groups: OmegaGroups) -> tuple[int, slice] | None:
    """(the omega group holding every layer of `part`, the slice of its rows that they are), if there is one."""
    for number, (indices, _) in enumerate(groups):
        places = {layer: place for place, layer in enumerate(indices)}
        if all(i in places for i in part):
            rows = [places[i] for i in part]
            step = rows[1] - rows[0] if len(rows) > 1 else 1
            if step > 0 and rows == list(range(rows[0], rows[0] + step * len(rows), step)):
                return number, slice(rows[0], rows[-1] + 1, step)
    return None


def _merge_stacks(members: list[ConditionedLoRA], stack: Stack) -> tuple:
    """What alike layers' merged weights are made of: W (L, C_out, C_in), B (L, C_out, r*M) and A (L, r*M,
    C_in) stacked; the base biases: with per-basis biases stacked (L, C_out), or None where the layers have
    none, else each layer's own (a tensor or None); and the per-basis biases (L, M, C_out), each basis's r rows
    summed (what omega_i weighs), or None."""
    first = members[0]
    ups, downs, base_weights, biases, basis_biases = zip(*(m.merge_parts() for m in members), strict=True)
    base = stack(base_weights, (first.c_out, first.c_in))  # (a 1x1 kernel viewed as a matrix)
    basis = None
    if first.basis_bias is not None:  # the biases are summed with the per-basis terms: stacked once, here
        basis = summed_basis_biases(basis_biases, first.rank)
        biases = None if biases[0] is None else stack(biases)
    return base, stack(ups), stack(downs), biases, basis


def _groups(keys: list[tuple | None]) -> list[list[int]]:
    """The indices of equal keys, one list per distinct key in order of first appearance; None joins no group."""
    groups: dict[tuple, list[int]] = {}
    for i, key in enumerate(keys):
        if key is not None:
            groups.setdefault(key, []).append(i)
    return list(groups.values())
