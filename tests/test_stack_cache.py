"""Stacks of parameters kept between bindings (`StackCache` behind `LoRALayers`): served again only while
their sources are unchanged, never where autograd must see them, and a kept stack gives the outputs and
gradients of one made afresh (a plain list of layers, which keeps nothing)."""

import copy

import pytest
import torch
from test_lora import LAYOUTS, _base, _conditions, _input, _naive, _randomise, _strategies
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from condlora.conditions import Conditions
from condlora.lora import ConditionedLoRA, LoRALayers, bind_conditions, conditioned_layers
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


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_a_second_call_stacks_no_parameter_and_gives_the_same_outputs(kind, shared):
    _, layers = _network(kind)
    cond, inputs = _conditions(4, shared=shared), _inputs()
    first = _call(layers, cond, inputs)
    again = _call(layers, cond, inputs)
    for layer, x, a, b, fresh in zip(layers, inputs, first, again, _fresh(layers, cond, inputs), strict=True):
        assert torch.equal(a, b) and torch.equal(b, fresh)
        assert torch.allclose(b, _naive(layer, x, cond), atol=1e-4, rtol=1e-4)
    kept, made = _binding_ops(layers, cond), _binding_ops(list(layers), cond)
    # all that is still stacked on a kept call: the omegas, for the merge of a shared call (the layers have one
    # shape) or for the per-basis bias terms of a per-sample one
    assert kept.get("aten.stack.default", 0) == 1
    assert sum(kept.values()) < sum(made.values())


def _change_in_place(modules: nn.ModuleList) -> None:
    with torch.no_grad():
        modules[0].lora_up.add_(1.0)
        modules[3].base_layer.weight.mul_(2.0)


def _load_other_values(modules: nn.ModuleList) -> None:
    other, _ = _network("uc", seed=7)
    modules.load_state_dict(other.state_dict())


def _replace_data(modules: nn.ModuleList) -> None:
    for layer in modules:
        for p in layer.parameters():
            p.data = torch.randn_like(p)  # a new storage behind the same parameter object


def _round_trip_dtype(modules: nn.ModuleList) -> None:
    modules.double()
    modules.float()  # new storages, possibly at the addresses the first ones had
    _change_in_place(modules)


def _merge_one(modules: nn.ModuleList) -> None:
    modules[1].merge(_conditions(4, shared=True).replace(step=torch.full((4,), 3)))


@pytest.mark.parametrize("change", [_change_in_place, _load_other_values, _replace_data, _round_trip_dtype, _merge_one])
@pytest.mark.parametrize("shared", [True, False])
@torch.no_grad()
def test_kept_stacks_follow_every_change_of_the_parameters(change, shared):
    modules, layers = _network("uc")
    cond, inputs = _conditions(4, shared=shared), _inputs()
    before = _call(layers, cond, inputs)
    change(modules)
    after = _call(layers, cond, inputs)
    fresh = _fresh(layers, cond, inputs)
    assert any(not torch.equal(a, b) for a, b in zip(before, after, strict=True)) or change is _merge_one
    for a, b in zip(after, fresh, strict=True):
        assert torch.allclose(a, b, atol=1e-6, rtol=1e-6)


@torch.no_grad()
def test_a_time_table_buffer_moved_to_another_dtype_is_stacked_anew():
    modules, layers = _network("time_fixed")
    cond, inputs = _conditions(4, shared=True), _inputs()
    _call(layers, cond, inputs)
    modules.double()  # buffers become new tensor objects
    out = _call(layers, cond, [x.double() for x in inputs])
    assert all(o.dtype == torch.float64 for o in out)
    for a, b in zip(out, _fresh(layers, cond, [x.double() for x in inputs]), strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("shared", [True, False])
def test_training_through_a_cache_gives_the_gradients_of_fresh_stacks(shared):
    """Trainable sources are stacked anew on every call (autograd sees them); frozen ones (the base weights)
    are kept: both give the gradients of a call that keeps nothing, over two optimizer steps of two
    accumulated backward passes each."""
    modules, layers = _network("time_and_class")
    for layer in modules:
        layer.base_layer.requires_grad_(False)  # adapters only, as train.trainable=lora
    twin = copy.deepcopy(modules)
    cond, inputs = _conditions(4, shared=shared), _inputs()
    optimizers = [torch.optim.SGD(m.parameters(), lr=0.1) for m in (modules, twin)]
    for _ in range(2):
        for held, opt in ((layers, optimizers[0]), (list(twin), optimizers[1])):
            opt.zero_grad()
            for _ in range(2):  # gradient accumulation: the parameters are unchanged between the two calls
                sum(out.square().sum() for out in _call(held, cond, inputs)).backward()
            opt.step()
        for p, q in zip(modules.parameters(), twin.parameters(), strict=True):
            assert torch.allclose(p, q, atol=1e-6), "a kept stack changed the training"


def test_a_stack_kept_in_inference_mode_is_not_served_to_autograd():
    """UC-LoRA MLPs frozen, the embedding trained: a stack made under inference mode would fail to be saved
    for backward, so a call with grad makes its own."""
    modules, layers = _network("uc", basis_bias=False)
    for layer in modules:
        layer.strategies.requires_grad_(False)
    cond, inputs = _conditions(4), _inputs()
    with torch.inference_mode():
        _call(layers, cond, inputs)
    embedding = cond.embedding.clone().requires_grad_(True)
    sum(out.sum() for out in _call(layers, cond.replace(embedding=embedding), inputs)).backward()
    reference = cond.embedding.clone().requires_grad_(True)
    sum(out.sum() for out in _fresh(layers, cond.replace(embedding=reference), inputs)).backward()
    assert torch.allclose(embedding.grad, reference.grad, atol=1e-6)


@torch.no_grad()
def test_a_network_copy_keeps_its_own_stacks():
    net = build_network(build_config("mnist-nano", {"nano": {"channels": 8}}))
    for _, layer in conditioned_layers(net):
        nn.init.normal_(layer.lora_up)
    nn.init.normal_(net.out_conv.weight)  # zero at init: every output would be 0
    net.eval()
    x = torch.randn(2, 1, 28, 28)
    cond = Conditions(labels=torch.full((2,), 3), step=torch.full((2,), 40), shared=True)
    level = cond.step.float()
    before = net(x, level, cond)
    twin = copy.deepcopy(net)
    assert isinstance(twin._lora_layers, LoRALayers)
    assert [id(layer) for layer in twin._lora_layers] == [id(layer) for _, layer in conditioned_layers(twin)]
    for _, layer in conditioned_layers(twin):
        layer.lora_up.mul_(-1.0)
    with CountOps() as first:
        changed = twin(x, level, cond)
    with CountOps() as second:
        assert torch.equal(twin(x, level, cond), changed)
    assert second.count < first.count  # the copy stacked its own parameters once, then kept them
    assert not torch.allclose(changed, before)
    assert torch.equal(net(x, level, cond), before)  # the original's kept stacks are its own
