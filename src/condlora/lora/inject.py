"""Attach conditioned LoRA to any model by module-name pattern, pass conditions per call, merge.

Conditions reach the layers explicitly: `bind_conditions(model, cond)` hands them to every conditioned
layer of `model` for the duration of one forward call and takes them back afterwards, so no state
outlives the call and nothing is global. Foreign modules (a diffusers UNet's `to_q`) keep their own
signatures. A backbone keeps the `LoRALayers` that `inject_lora` returns and binds those on every call:
they carry the stacks of parameters that binding reuses from one call to the next inside `keep_stacks`.
"""

from __future__ import annotations

import copy
import fnmatch
from collections.abc import Callable, Iterator, Sequence
from contextlib import ExitStack, contextmanager

import torch
from torch import nn

from condlora.conditions import Conditions
from condlora.lora.grouping import (
    StackCache,
    alike_layers,
    grouped_bias_terms,
    grouped_merged_weights,
    grouped_selections,
    omega_groups,
    split_omegas,
)
from condlora.lora.layer import CallValues, ConditionedLoRA
from condlora.lora.spec import LoRASpec

StrategyFactory = Callable[[str, nn.Module], dict[str, nn.Module]]


def _matches(name: str, patterns: Sequence[str]) -> bool:
    return any(fnmatch.fnmatchcase(name, p) for p in patterns)


def inject_conditioned_lora(
    model: nn.Module,
    targets: Sequence[str],
    strategies: StrategyFactory,
    rank: int = 4,
    basis_bias: bool = False,
    alpha: float | None = None,
    dropout: float = 0.0,
) -> list[str]:
    """Replace every module whose qualified name matches one of `targets` (fnmatch patterns such as
    "*.qkv" or "*attn1.to_q") by a ConditionedLoRA wrapping it.

    Args:
        model: any nn.Module; modified in place.
        targets: name patterns; each match must be nn.Linear or a 1x1 nn.Conv1d / nn.Conv2d.
        strategies: called as strategies(name, base_layer) -> {bank name: strategy}, fresh per layer.
        rank: r.
        basis_bias: add the per-basis bias.
        alpha: scale the adapters by alpha / r (None: alpha = r).
        dropout: dropout on the adapters' input in training.
    Returns:
        The names of the wrapped modules; an error if none matched.
    """
    wrapped = [f"{name}." for name, _ in conditioned_layers(model)]  # never wrap inside a LoRA layer
    found = [
        (name, module)
        for name, module in model.named_modules()
        if name
        and _matches(name, targets)
        and not isinstance(module, ConditionedLoRA)
        and not any(name.startswith(prefix) for prefix in wrapped)
    ]
    if not found:
        raise ValueError(f"no module of {type(model).__name__} matches {list(targets)}")
    for name, module in found:
        parent_name, _, child = name.rpartition(".")
        parent = model.get_submodule(parent_name) if parent_name else model
        layer = ConditionedLoRA(module, strategies(name, module), rank, alpha, basis_bias, dropout)
        setattr(parent, child, layer.to(device=module.weight.device, dtype=module.weight.dtype))
    return [name for name, _ in found]


class LoRALayers(Sequence[ConditionedLoRA]):
    """The conditioned LoRA layers of a network in module order, as a backbone binds them on every call,
    with the stacks of their parameters that binding keeps between calls inside `keep_stacks`
    (`StackCache`). A copy of the network (`copy.deepcopy`) gets its own layers and cache."""

    def __init__(self, layers: Sequence[ConditionedLoRA] = ()):
        self.layers = tuple(layers)
        self.stacks = StackCache()

    def __getitem__(self, index):
        return self.layers[index]

    def __len__(self) -> int:
        return len(self.layers)

    def __deepcopy__(self, memo: dict) -> LoRALayers:
        return LoRALayers(copy.deepcopy(self.layers, memo))


def inject_lora(model: nn.Module, spec: LoRASpec) -> LoRALayers:
    """Wrap the modules `spec.targets` names with the adapters and strategies `spec` describes; returns the
    layers (in module order) so a backbone can bind conditions to them on every call."""
    inject_conditioned_lora(
        model, spec.targets, spec.strategies, spec.rank, spec.basis_bias, spec.alpha or None, spec.dropout
    )
    return LoRALayers([layer for _, layer in conditioned_layers(model)])


@contextmanager
def keep_stacks(model: nn.Module | LoRALayers | object) -> Iterator[None]:
    """Keep the stacks of parameters that binding makes, from the first call of `model` inside to the last,
    for every `LoRALayers` a module of `model` holds (what a backbone binds), or for `model` itself if it is
    `LoRALayers` (any other object keeps nothing). The caller vouches that the parameters (the same tensors,
    unchanged), buffers, train / eval modes and merges of `model` stay as they are inside, as a sampling
    loop's do; the stacks are dropped on leaving. Outside, every call stacks anew."""
    modules = model.modules() if isinstance(model, nn.Module) else ()
    held = [value for module in modules for value in vars(module).values() if isinstance(value, LoRALayers)]
    if isinstance(model, LoRALayers):
        held = [model]
    with ExitStack() as scope:
        for layers in held:
            scope.enter_context(layers.stacks.keeping())
        yield


def conditioned_layers(model: nn.Module) -> Iterator[tuple[str, ConditionedLoRA]]:
    """(name, layer) for every conditioned LoRA layer in `model`."""
    for name, module in model.named_modules():
        if isinstance(module, ConditionedLoRA):
            yield name, module


@contextmanager
def bind_conditions(model: nn.Module | Sequence[ConditionedLoRA], cond: Conditions) -> Iterator[None]:
    """Give `cond` to every conditioned layer of `model` (or to the given layers) for the enclosed call(s),
    then take it back. The layers' omegas for `cond` are computed here, together (`grouped_omegas`), and so
    are their per-basis bias terms (`grouped_bias_terms`), the bases they select (`grouped_selections`) or,
    when the samples share one condition, their merged weights (`grouped_merged_weights`): they hold for
    forward calls with the parameters, merges and train / eval mode of the moment of binding (bind again after
    changing any of these). Given `LoRALayers` inside `keep_stacks`, the parameters stacked to compute these
    are kept for the next binding."""
    if isinstance(model, nn.Module):
        layers = [layer for _, layer in conditioned_layers(model)]
    else:
        layers = list(model)
    kept = model.stacks if isinstance(model, LoRALayers) else StackCache()  # a plain list keeps nothing
    alike = alike_layers(layers, kept)
    groups = omega_groups(layers, cond, kept, alike)
    omegas = split_omegas(groups, len(layers))
    nothing = [None] * len(layers)
    terms = nothing if cond.shared else grouped_bias_terms(layers, omegas, kept)  # shared: merged in the bias
    merged = grouped_merged_weights(layers, omegas, kept, groups) if cond.shared else nothing
    selections = nothing if cond.shared else grouped_selections(layers, cond, kept, alike)
    values = zip(omegas, terms, merged, selections, strict=True)
    states = [(cond, CallValues(cond, *call)) for call in values]
    with _bound_to(layers, states):
        yield


@contextmanager
def _bound_to(layers: Sequence[ConditionedLoRA], states: Sequence[tuple]) -> Iterator[None]:
    """Each layer bound to its (conditions, call values) in `states` for the enclosed calls, then to what it
    was bound to before."""
    previous = [(layer.conditions, layer.call) for layer in layers]
    for layer, state in zip(layers, states, strict=True):
        layer.bind(*state)
    try:
        yield
    finally:
        for layer, state in zip(layers, previous, strict=True):
            layer.bind(*state)


def rebinding_checkpoint(checkpoint: Callable, layers: Sequence[ConditionedLoRA]) -> Callable:
    """A gradient-checkpointing function, `checkpoint(module, *args)` as diffusers calls one, that gives the
    layers their conditions again when the backward pass recomputes the module: binding ends with the
    forward call, so a recomputed LoRA layer would otherwise find none. Each call captures what the layers
    are bound to at that moment (the conditions and what binding computed with them, omegas included) and
    recomputes under exactly that. Needs a non-reentrant checkpoint (diffusers' default), through which the
    gradients reach the omegas computed outside the checkpointed module."""

    def checkpoint_with_conditions(module: Callable, *args):
        bound = [(layer.conditions, layer.call) for layer in layers]

        def run(*inputs):  # (called as `module.__call__` or `module()`: a function is both)
            with _bound_to(layers, bound):
                return module(*inputs)

        return checkpoint(run, *args)

    checkpoint_with_conditions.rebinds = True
    return checkpoint_with_conditions


def lora_state_dict(model: nn.Module) -> dict[str, torch.Tensor]:
    """Only the LoRA and conditioning tensors (adapters, per-basis biases, omega tables, MLPs)."""
    out = {}
    for name, layer in conditioned_layers(model):
        for key, value in layer.state_dict().items():
            if not key.startswith("base_layer."):
                out[f"{name}.{key}"] = value
    return out


def merge_lora(model: nn.Module, cond: Conditions) -> None:
    """Fold the deltas for one shared condition into every base weight (see ConditionedLoRA.merge)."""
    for _, layer in conditioned_layers(model):
        layer.merge(cond)


def unmerge_lora(model: nn.Module) -> None:
    """Undo `merge_lora`."""
    for _, layer in conditioned_layers(model):
        layer.unmerge()
