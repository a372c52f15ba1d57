"""Stacks of parameters kept between bindings (`StackCache` behind `LoRALayers`, opened by `keep_stacks`):
kept only inside the scope a sampler opens, never where autograd must see them, dropped on leaving it; a
kept stack gives the outputs and gradients of one made afresh (a plain list of layers, which keeps
nothing)."""

import contextlib
import copy
import pickle

import pytest
import torch
from test_lora import LAYOUTS, D, _base, _conditions, _input, _naive, _randomise, _strategies
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from condlora.conditions import Conditions
from condlora.diffusion import generate as generate_module
from condlora.diffusion import process_for
from condlora.lora import ConditionedLoRA, LoRALayers, bind_conditions, conditioned_layers, keep_stacks
from condlora.nets import build_network
from condlora.ops import CountOps
from condlora.presets import build_config

KINDS = ["time_fixed", "time_and_class", "class_comp", "uc"]


def _network(kind: str, basis_bias: bool = True, seed: int = 0) -> tuple[nn.ModuleList, LoRALayers]:
    """Two layers of every layout (so each shape merges together), randomised, held as a backbone holds them."""
    torch.manual_seed(seed)
    modules = nn.ModuleList(
        ConditionedLoRA(_base(layout), _strategies(kind), rank=2, basis_bias=basis_bias)
        for layout in LAYOUTS
        for _ in range(2)
    )
    for layer in modules:
        _randomise(layer)
    return modules, LoRALayers(list(modules))


def _inputs(batch: int = 4) -> list[torch.Tensor]:
    torch.manual_seed(1)
    return [_input(layout, batch) for layout in LAYOUTS for _ in range(2)]


def _call(layers, cond: Conditions, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    with bind_conditions(layers, cond):
        return [layer(x) for layer, x in zip(layers, inputs, strict=True)]


def _fresh(layers: LoRALayers, cond: Conditions, inputs: list[torch.Tensor]) -> list[torch.Tensor]:
    """The same call with every stack made anew (a plain list of the same layers)."""
    return _call(list(layers), cond, inputs)


class _Operations(TorchDispatchMode):
    """How often each ATen operation runs inside it."""

    def __init__(self):
        super().__init__()
        self.counts: dict[str, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.counts[str(func)] = self.counts.get(str(func), 0) + 1
        return func(*args, **(kwargs or {}))


def _binding_ops(layers, cond: Conditions) -> dict[str, int]:
    with _Operations() as ops, bind_conditions(layers, cond):
        pass
    return ops.counts


@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_inside_the_scope_the_layers_are_grouped_once(shared, monkeypatch):
    keyed = []
    for method in ("group_key", "merge_key"):
        original = getattr(ConditionedLoRA, method)
        monkeypatch.setattr(ConditionedLoRA, method, lambda self, f=original: keyed.append(self) or f(self))
    _, layers = _network("uc")
    cond, inputs = _conditions(4, shared=shared), _inputs()
    with layers.stacks.keeping():
        _call(layers, cond, inputs)
        first = len(keyed)
        again = _call(layers, cond, inputs)
        assert len(keyed) == first > 0  # the groups of the first call are served again
    for a, b in zip(again, _fresh(layers, cond, inputs), strict=True):
        assert torch.equal(a, b)
    assert len(keyed) == 2 * first  # the call outside the scope computes them again


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_inside_the_scope_a_second_call_stacks_no_parameter_and_gives_the_same_outputs(kind, shared):
    _, layers = _network(kind)
    cond, inputs = _conditions(4, shared=shared), _inputs()
    with layers.stacks.keeping():
        first = _call(layers, cond, inputs)
        again = _call(layers, cond, inputs)
        kept = _binding_ops(layers, cond)
    for layer, x, a, b, fresh in zip(layers, inputs, first, again, _fresh(layers, cond, inputs), strict=True):
        assert torch.equal(a, b) and torch.equal(b, fresh)
        assert torch.allclose(b, _naive(layer, x, cond), atol=1e-4, rtol=1e-4)
    made = _binding_ops(layers, cond)  # after the scope: everything stacked anew
    # nothing is stacked on a kept call: a shared call's merge reads the omega rows of the layers of one shape
    # as a view of their group's, and a per-sample call's layers add their per-basis bias terms in their own
    # projections
    assert kept.get("aten.stack.default", 0) == 0 < made["aten.stack.default"]
    assert sum(kept.values()) < sum(made.values())


def _write_through_data(modules: nn.ModuleList) -> None:
    with torch.no_grad():
        modules[0].lora_up.data.copy_(torch.randn_like(modules[0].lora_up))  # no version counter sees this
        modules[3].base_layer.weight.data.mul_(2.0)


def _load_other_values(modules: nn.ModuleList) -> None:
    other, _ = _network("uc", seed=7)
    modules.load_state_dict(other.state_dict())


def _replace_data(modules: nn.ModuleList) -> None:
    for layer in modules:
        for p in layer.parameters():
            p.data = torch.randn_like(p)  # a new storage behind the same parameter object


def _merge_two(modules: nn.ModuleList) -> None:
    for layer in modules[:2]:  # they leave their shape's merge: each now merges its own
        layer.merge(_conditions(4, shared=True).replace(embedding=torch.randn(1, D).expand(4, D)))


@pytest.mark.parametrize("change", [_write_through_data, _load_other_values, _replace_data, _merge_two])
@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_after_the_scope_a_changed_network_is_stacked_and_grouped_anew(change, shared):
    """What a scope kept is dropped on leaving it, so a change between two scopes (an EMA swap, loading
    other weights, writing through `.data`, which no version counter sees, merging layers) is in the next
    call."""
    modules, layers = _network("uc")
    cond, inputs = _conditions(4, shared=shared), _inputs()
    with layers.stacks.keeping():
        before = _call(layers, cond, inputs)
    change(modules)
    for scoped in (False, True):
        with layers.stacks.keeping() if scoped else contextlib.nullcontext():
            after = _call(layers, cond, inputs)
        for layer, x, a, b in zip(layers, inputs, after, _fresh(layers, cond, inputs), strict=True):
            assert torch.equal(a, b)
            assert layer.merged or torch.allclose(a, _naive(layer, x, cond), atol=1e-4, rtol=1e-4)
        if change is not _merge_two:  # merging changes no output
            assert not torch.equal(before[0], after[0])


def test_scopes_nest_and_an_error_inside_closes_them():
    _, layers = _network("uc")
    cond, inputs = _conditions(4, shared=True), _inputs()
    with pytest.raises(KeyError), layers.stacks.keeping(), torch.no_grad():
        with layers.stacks.keeping():
            _call(layers, cond, inputs)
        kept = _binding_ops(layers, cond)
        assert kept.get("aten.stack.default", 0) == 0  # the outer scope still keeps them
        raise KeyError("a failure inside the sampling loop")
    with torch.no_grad():
        assert _binding_ops(layers, cond)["aten.stack.default"] > 1  # closed: nothing is kept


@pytest.mark.parametrize("shared", [True, False])
def test_training_inside_a_scope_gives_the_gradients_of_fresh_stacks(shared):
    """Trainable sources are stacked anew on every call (autograd sees them); frozen ones (the base weights)
    are kept: both give the gradients of a call that keeps nothing, over two accumulated backward passes."""
    modules, layers = _network("time_and_class")
    for layer in modules:
        layer.base_layer.requires_grad_(False)  # adapters only, as train.trainable=lora
    twin = copy.deepcopy(modules)
    cond, inputs = _conditions(4, shared=shared), _inputs()
    with layers.stacks.keeping():
        for held in (layers, list(twin)):
            for _ in range(2):  # gradient accumulation: the parameters are unchanged between the two calls
                sum(out.square().sum() for out in _call(held, cond, inputs)).backward()
    for p, q in zip(modules.parameters(), twin.parameters(), strict=True):
        assert (p.grad is None) == (q.grad is None)
        assert p.grad is None or torch.allclose(p.grad, q.grad, atol=1e-6)


def test_a_stack_kept_in_inference_mode_is_not_served_to_autograd():
    """UC-LoRA MLPs frozen, the embedding trained: a stack made under inference mode would fail to be saved
    for backward, so a call with grad in the same scope makes its own."""
    modules, layers = _network("uc", basis_bias=False)
    for layer in modules:
        layer.strategies.requires_grad_(False)
    cond, inputs = _conditions(4), _inputs()
    with layers.stacks.keeping():
        with torch.inference_mode():
            _call(layers, cond, inputs)
        embedding = cond.embedding.clone().requires_grad_(True)
        sum(out.sum() for out in _call(layers, cond.replace(embedding=embedding), inputs)).backward()
    reference = cond.embedding.clone().requires_grad_(True)
    sum(out.sum() for out in _fresh(layers, cond.replace(embedding=reference), inputs)).backward()
    assert torch.allclose(embedding.grad, reference.grad, atol=1e-6)


def _nano(**sample) -> tuple[nn.Module, object]:
    cfg = build_config("mnist-nano", {"nano": {"channels": 8}, "sample": {"count": 2, "batch_size": 2, **sample}})
    torch.manual_seed(0)
    net = build_network(cfg)
    for _, layer in conditioned_layers(net):
        nn.init.normal_(layer.lora_up)
    nn.init.normal_(net.out_conv.weight)  # zero at init: every output would be 0
    return net.eval(), cfg


@torch.no_grad()
def test_a_network_copy_keeps_its_own_stacks():
    net, _ = _nano()
    x = torch.randn(2, 1, 28, 28)
    cond = Conditions(labels=torch.full((2,), 3), step=torch.full((2,), 40), shared=True)
    level = cond.step.float()
    with keep_stacks(net):
        before = net(x, level, cond)
        twin = copy.deepcopy(net)
        assert isinstance(twin._lora_layers, LoRALayers)
        assert [id(layer) for layer in twin._lora_layers] == [id(layer) for _, layer in conditioned_layers(twin)]
        for _, layer in conditioned_layers(twin):
            layer.lora_up.mul_(-1.0)
        with keep_stacks(twin):
            with CountOps() as first:
                changed = twin(x, level, cond)
            with CountOps() as second:
                assert torch.equal(twin(x, level, cond), changed)
        assert second.count < first.count  # the copy stacked its own parameters once, then kept them
        assert not torch.allclose(changed, before)
        assert torch.equal(net(x, level, cond), before)  # the original's kept stacks are its own


@torch.no_grad()
def test_generate_keeps_the_stacks_for_its_sampling_loop(monkeypatch):
    """Extra sampling steps stack nothing when `generate` keeps the stacks (the merge reads the omega rows as
    views), every parameter stack without it; the images are the same."""
    stacks, images = {}, {}
    for keeping in (True, False):
        if not keeping:
            monkeypatch.setattr(generate_module, "keep_stacks", lambda net: contextlib.nullcontext())
        for steps in (2, 4):
            net, cfg = _nano(sampler="ddim", steps=steps, class_label=3, guidance_scale=1.0)
            with _Operations() as ops:
                images[keeping, steps], _ = generate_module.generate(
                    net, process_for(cfg), cfg.sample, (1, 28, 28), 10, progress=False
                )
            stacks[keeping, steps] = ops.counts.get("aten.stack.default", 0)
    per_step = {keeping: (stacks[keeping, 4] - stacks[keeping, 2]) / 2 for keeping in (True, False)}
    assert per_step[True] == 0 < per_step[False]
    assert torch.equal(images[True, 4], images[False, 4]) and torch.equal(images[True, 2], images[False, 2])


def test_a_pickled_cache_and_keep_stacks_of_bare_layers():
    """A network saved inside a scope loads with a closed, empty cache; `keep_stacks` takes the layers that
    `inject_lora` returned as well as a network holding them."""
    modules, layers = _network("uc")
    cond, inputs = _conditions(4, shared=True), _inputs()
    with torch.no_grad(), keep_stacks(layers):
        _call(layers, cond, inputs)
        assert _binding_ops(layers, cond).get("aten.stack.default", 0) == 0  # kept
        copied = pickle.loads(pickle.dumps((modules, layers)))
    copied_modules, copied_layers = copied
    _write_through_data(copied_modules)
    with torch.no_grad():
        for a, b in zip(_call(copied_layers, cond, inputs), _fresh(copied_layers, cond, inputs), strict=True):
            assert torch.equal(a, b)
        assert _binding_ops(copied_layers, cond)["aten.stack.default"] > 1  # nothing kept outside a scope
