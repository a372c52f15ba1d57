"""Conditioned LoRA against a naive per-sample reference W_t = W + sum_i omega_i B_i A_i."""

import contextlib
import json

import pytest
import torch
from torch import nn

from condlora.lora import (
    UCMLP,
    ClassSelect,
    ClassTable,
    ConditionedLoRA,
    Conditions,
    LoRASpec,
    PlainLoRA,
    TimeTable,
    basis_timesteps,
    bind_conditions,
    grouping,
    inject_conditioned_lora,
    inject_lora,
    linear_interpolation_table,
    load_lora,
    lora_state_dict,
    merge_lora,
    onehot_table,
    save_lora,
    strategies,
    unmerge_lora,
)
from condlora.lora.grouping import grouped_bias_terms, grouped_merged_weights, grouped_omegas
from condlora.ops import CountOps

T, C, D = 50, 4, 16


def _strategies(kind: str) -> dict[str, nn.Module]:
    return {
        "time_fixed": {"time": TimeTable(T, 6)},
        "time_noncomp": {"time": TimeTable(T, T, init="onehot")},
        "time_train_gaussian": {"time": TimeTable(T, 6, trainable=True, init="gaussian")},
        "class": {"class": ClassSelect(C)},
        "class_comp": {"class": ClassTable(C, 3)},
        "uc": {"uc": UCMLP(D, 5, widths=(8, 8))},
        "time_and_class": {"time": TimeTable(T, 6, trainable=True, init="onehot"), "class": ClassSelect(C)},
        "time_fixed_and_class": {"time": TimeTable(T, 6), "class": ClassSelect(C)},
    }[kind]


def _base(layout: str) -> nn.Module:
    return {"linear": nn.Linear(12, 10), "conv1d": nn.Conv1d(12, 10, 1), "conv2d": nn.Conv2d(12, 10, 1)}[layout]


def _input(layout: str, batch: int) -> torch.Tensor:
    return {
        "linear": torch.randn(batch, 7, 12),
        "conv1d": torch.randn(batch, 12, 7),
        "conv2d": torch.randn(batch, 12, 3, 2),
    }[layout]


def _conditions(batch: int, shared: bool = False) -> Conditions:
    """Random per-sample conditions, or one condition repeated over the batch."""
    g = torch.Generator().manual_seed(1)
    n = 1 if shared else batch
    step = torch.randint(0, T, (n,), generator=g).expand(batch)
    labels = torch.randint(-1, C, (n,), generator=g).expand(batch)
    embedding = torch.randn(n, D, generator=g).expand(batch, D)
    return Conditions(step=step, labels=labels, embedding=embedding, shared=shared)


def _randomise(layer: ConditionedLoRA) -> None:
    with torch.no_grad():
        layer.lora_up.normal_()  # B = 0 at init would make every check trivial
        if layer.basis_bias is not None:
            layer.basis_bias.normal_()


def _naive(layer: ConditionedLoRA, x: torch.Tensor, cond: Conditions) -> torch.Tensor:
    """Build W_t for each sample and apply it to that sample alone."""
    omega = layer.omega(cond, x)
    w0 = layer.base_layer.weight.reshape(layer.c_out, layer.c_in)
    outs = []
    for i in range(x.shape[0]):
        w = w0.clone()
        bias = layer.base_layer.bias.clone()
        for j in range(layer.num_bases):
            rows = slice(j * layer.rank, (j + 1) * layer.rank)
            w = w + omega[i, j] * layer.lora_up[:, rows] @ layer.lora_down[rows]  # omega_j B_j A_j
            if layer.basis_bias is not None:
                bias = bias + omega[i, j] * layer.basis_bias[rows].sum(0)
        xi = x[i : i + 1]
        if layer.channel_dim == -1:
            outs.append(xi @ w.T + bias)
        else:
            flat = xi.flatten(2)  # (1, C_in, L)
            outs.append((torch.einsum("oc,bcl->bol", w, flat) + bias[:, None]).reshape(1, layer.c_out, *xi.shape[2:]))
    return torch.cat(outs)


LAYOUTS = ["linear", "conv1d", "conv2d"]
KINDS = [
    "time_fixed",
    "time_noncomp",
    "time_train_gaussian",
    "class",
    "class_comp",
    "uc",
    "time_and_class",
    "time_fixed_and_class",
]
SELECTING = {"time_fixed", "time_noncomp", "class", "time_fixed_and_class"}  # omega rows sparse by construction


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("basis_bias", [False, True])
def test_batched_path_equals_naive_per_sample_reference(kind, layout, basis_bias):
    layer = ConditionedLoRA(_base(layout), _strategies(kind), rank=3, basis_bias=basis_bias)
    _randomise(layer)
    x, cond = _input(layout, 5), _conditions(5)
    layer.conditions = cond
    assert layer.selects(cond) == (kind in SELECTING)
    expected = _naive(layer, x, cond)
    assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)
    layer.conditions = None
    with bind_conditions([layer], cond):  # omega (or the selection) computed at binding, by the grouped form
        assert (layer.call.selection if kind in SELECTING else layer.call.omega) is not None
        assert torch.allclose(layer(x), expected, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("kind", sorted(SELECTING))
@pytest.mark.parametrize("layout", [*LAYOUTS, "channels_last"])
@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize("fused", [True, False])
def test_selected_bases_give_the_reference_values_and_gradients(kind, layout, basis_bias, fused):
    """The selected path (each sample's few bases gathered) against the naive per-sample reference, values
    and gradients of the input and of every parameter, float64, with NULL labels, a per-sample LoRA scale and
    alpha != r; the bases no sample selects get zero gradients. Fused (`conditioned_projection`) and by plain
    operations (a hooked base layer: as under a compiler)."""
    torch.manual_seed(0)
    base = _base("conv2d" if layout == "channels_last" else layout)
    if not fused:
        base.register_forward_hook(lambda module, args, out: None)
    layer = ConditionedLoRA(base, _strategies(kind), rank=3, alpha=6.0, basis_bias=basis_bias).double()
    _randomise(layer)
    x = _input("conv2d" if layout == "channels_last" else layout, 5).double()
    if layout == "channels_last":
        x = x.contiguous(memory_format=torch.channels_last)
    x.requires_grad_(True)
    cond = _conditions(5).replace(labels=torch.tensor([2, -1, 0, 3, -1]), lora_scale=torch.tensor([1.0, 0.5, 0, 2, 1]))
    assert layer.selects(cond) and layer.fuses() == fused
    params = [x, *layer.parameters()]
    out_grad = torch.randn_like(_naive(layer, x, cond))

    def values_and_grads(forward):
        out = forward()
        return out, torch.autograd.grad(out, params, out_grad)

    expected, expected_grads = values_and_grads(lambda: _naive(layer, x, cond))
    layer.conditions = cond
    for bound in (False, True):  # the layer's own selection, and the one binding computes
        with bind_conditions([layer], cond) if bound else contextlib.nullcontext():
            out, grads = values_and_grads(lambda: layer(x))
        torch.testing.assert_close(out, expected, rtol=1e-10, atol=1e-10)
        for grad, expected_grad in zip(grads, expected_grads, strict=True):
            torch.testing.assert_close(grad, expected_grad, rtol=1e-10, atol=1e-10)
    unused = set(range(layer.num_bases)) - set(layer.selection(cond)[0].flatten().tolist())
    grad_down = grads[next(i for i, p in enumerate(params) if p is layer.lora_down)].reshape(layer.num_bases, -1)
    assert unused and all(grad_down[i].abs().max() == 0 for i in unused)


def test_selected_bases_count_and_what_keeps_the_dense_path():
    """Selection takes at most half of the bases: a fixed linear table's 2 of 11 and a class's 1 of 10 select,
    a trained table, a class vector, a shared call or a merged layer do not."""
    cond = _conditions(4)
    index, weight = ClassSelect(10).selected(Conditions(labels=torch.tensor([-1, 3, 12, 9])))
    assert index.flatten().tolist() == [0, 3, 9, 9] and weight.flatten().tolist() == [0, 1, 0, 1]  # as its rows
    assert TimeTable(T, 11).selected(cond)[0].shape == (4, 2)
    assert TimeTable(T, T, init="onehot").selected(cond)[0].shape == (4, 1)
    layer = ConditionedLoRA(_base("linear"), {"time": TimeTable(T, 11), "class": ClassSelect(10)}, rank=2)
    assert layer.selects(cond) and layer.selection(cond)[0].shape == (4, 3)
    assert not ConditionedLoRA(_base("linear"), {"time": TimeTable(T, 3)}, rank=2).selects(cond)  # 2 of 3
    assert not ConditionedLoRA(_base("linear"), {"time": TimeTable(T, 11, trainable=True)}, rank=2).selects(cond)
    assert not layer.selects(cond.replace(class_vector=torch.rand(4, 10)))
    assert not layer.selects(cond.replace(shared=True))
    layer.merge(_conditions(4, shared=True).replace(labels=torch.full((4,), 3)))
    assert not layer.selects(cond)


def test_a_loaded_fixed_table_is_indexed_anew():
    """A fixed table's non-zeros are found again when a state dict loads another table into it."""
    table = TimeTable(T, 11)
    other = TimeTable(T, 11, init="onehot")
    table.load_state_dict(other.state_dict())
    cond = _conditions(6)
    index, weight = table.selected(cond)
    assert index.shape == (6, 1)
    assert torch.equal(torch.zeros(6, 11).scatter(1, index, weight), other(cond))


@pytest.mark.parametrize("stack_limit", [strategies.STACK_LIMIT, 0])  # 0: every time table gathered alone
def test_grouped_omegas_equal_each_layers_own_with_gradients(stack_limit, monkeypatch):
    """Layers of every kind, alike and not, in one network call: the grouped omegas and their gradients
    are those each layer computes alone (float64), with a per-sample LoRA scale and alpha != r."""
    monkeypatch.setattr(strategies, "STACK_LIMIT", stack_limit)
    torch.manual_seed(0)
    layers = [
        ConditionedLoRA(_base(layout), _strategies(kind), rank=3, alpha=6.0).double()
        for kind in KINDS
        for layout in ("linear", "conv2d")
    ]
    layers.append(ConditionedLoRA(_base("linear"), {"plain": PlainLoRA()}, rank=3).double())  # no grouped form
    for layer in layers:
        for p in layer.strategies.parameters():
            nn.init.normal_(p)  # GroupNorm's affine and zero-initialised tables become non-trivial
    cond = _conditions(5).replace(
        embedding=torch.randn(5, D, dtype=torch.float64), lora_scale=torch.tensor([0.0, 1.0, 0.5, 2.0, -1.0])
    )
    weights = [torch.randn(5, layer.num_bases, dtype=torch.float64) for layer in layers]

    def loss_and_grads(omegas):
        loss = sum((o * w).sum() for o, w in zip(omegas, weights, strict=True))
        params = [p for layer in layers for p in layer.strategies.parameters()]
        return torch.autograd.grad(loss, params)

    grouped = grouped_omegas(layers, cond)
    selecting = [layer.selects(cond) for layer in layers]
    assert grouped[-1] is None and all((o is None) == s for o, s in zip(grouped[:-1], selecting, strict=False))
    for layer, selection in zip(layers, grouping.grouped_selections(layers, cond), strict=True):
        assert (selection is not None) == layer.selects(cond)
        if selection is not None:  # the selections grouped equal each layer's own
            assert all(torch.equal(a, b) for a, b in zip(selection, layer.selection(cond), strict=True))
    x = _input("linear", 5).double()
    for i, layer in enumerate(layers[:-1]):
        if grouped[i] is None:  # a selecting layer: its omega compared as it computes it
            grouped[i] = layer.omega(cond, x)
    own = [layer.omega(cond, x) for layer in layers[:-1]]
    for o_grouped, o_own in zip(grouped[:-1], own, strict=True):
        assert o_grouped.dtype == torch.float64
        assert torch.allclose(o_grouped, o_own, atol=1e-12)
    plain = layers[-1].omega(cond, x)
    for g_grouped, g_own in zip(loss_and_grads([*grouped[:-1], plain]), loss_and_grads([*own, plain]), strict=True):
        assert torch.allclose(g_grouped, g_own, atol=1e-10)


def test_grouped_bias_terms_equal_the_per_basis_sum_with_gradients():
    """sum_i omega_i b_i for layers of two output widths, with and without a per-basis bias, in one call,
    against the sum over bases written out (float64), gradients included. Layers that drop their input in
    training take them (as under a compiler); the others add the term in their own projection and get none."""
    torch.manual_seed(0)
    layers = [
        ConditionedLoRA(nn.Linear(12, width), _strategies("uc"), rank=3, basis_bias=bias, dropout=0.1).double()
        for width in (10, 6, 10, 6)
        for bias in (True, False)
    ]
    for layer in layers:
        _randomise(layer)
    cond = Conditions(embedding=torch.randn(4, D, dtype=torch.float64))
    omegas = grouped_omegas(layers, cond)
    for layer in layers:
        layer.dropout = 0.0
    assert grouped_bias_terms(layers, omegas) == [None] * len(layers)
    for layer in layers:
        layer.dropout = 0.1
    terms = grouped_bias_terms(layers, omegas)
    assert [t is None for t in terms] == [layer.basis_bias is None for layer in layers]
    biased = [
        (layer, omega, term) for layer, omega, term in zip(layers, omegas, terms, strict=True) if term is not None
    ]
    expected = [
        sum(omega[:, j, None] * layer.basis_bias[j * 3 : (j + 1) * 3].sum(0) for j in range(layer.num_bases))
        for layer, omega, _ in biased
    ]
    params = [p for layer, _, _ in biased for p in (layer.basis_bias, *layer.strategies.parameters())]
    weights = [torch.randn_like(e) for e in expected]
    grads = [
        torch.autograd.grad(sum((t * w).sum() for t, w in zip(ts, weights, strict=True)), params, retain_graph=True)
        for ts in ([t for _, _, t in biased], expected)
    ]
    for (_, _, term), e in zip(biased, expected, strict=True):
        assert torch.allclose(term, e, atol=1e-12)
    for g_grouped, g_own in zip(*grads, strict=True):
        assert torch.allclose(g_grouped, g_own, atol=1e-10)


def test_the_omega_rows_of_a_shape_are_a_view_where_they_sit_evenly_in_one_group():
    omegas = torch.arange(7 * 2 * 3.0).view(7, 2, 3)
    groups = [([0, 2, 4, 6], omegas[:4]), ([1, 3, 5], omegas[4:])]
    assert grouping._evenly_placed([2, 4, 6], groups) == (0, slice(1, 4, 1))
    assert grouping._evenly_placed([1, 5], groups) == (1, slice(0, 3, 2))
    for uneven in ([0, 4, 6], [6, 4], [0, 1]):  # a gap, a reversed order, two groups
        assert grouping._evenly_placed(uneven, groups) is None
    omega_list = grouping.split_omegas(groups, 7)
    for part in ([2, 4, 6], [1, 5], [0, 4, 6], [0, 1]):
        rows = grouping._shared_rows(part, omega_list, groups, grouping.StackCache())
        assert torch.equal(rows, torch.stack([omega_list[i][0] for i in part]))


def _merged_written_out(layer: ConditionedLoRA, omega: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """W + sum_i omega_i B_i A_i and b + sum_i omega_i b_i for one omega (M,), basis by basis."""
    weight, bias = layer.base_layer.weight.reshape(layer.c_out, layer.c_in), layer.base_layer.bias
    for j in range(layer.num_bases):
        rows = slice(j * layer.rank, (j + 1) * layer.rank)
        weight = weight + omega[j] * layer.lora_up[:, rows] @ layer.lora_down[rows]
        if layer.basis_bias is not None:
            term = omega[j] * layer.basis_bias[rows].sum(0)
            bias = term if bias is None else bias + term
    return weight, bias


@pytest.mark.parametrize("rows_from_groups", [False, True])
@pytest.mark.parametrize(("merge_limit", "together"), [(grouping.MERGE_LIMIT, 14), (5 * 10 * 12, 5)])
def test_grouped_merged_weights_equal_each_layers_own_with_gradients(
    merge_limit, together, rows_from_groups, monkeypatch
):
    """A shared call over layers of every layout, with and without (per-basis) biases, and layers that must
    merge their own (a lone shape, a merged layer, dropout in training, no grouped omega): the weights and
    biases merged together, and their gradients, are those written out basis by basis (float64), whether
    the omega rows of a shape are stacked or read from their omega groups (as binding does)."""
    monkeypatch.setattr(grouping, "MERGE_LIMIT", merge_limit)
    torch.manual_seed(0)
    layers = [
        ConditionedLoRA(_base(layout), _strategies(kind), rank=3, alpha=6.0, basis_bias=basis_bias)
        for kind in ("time_and_class", "uc")
        for basis_bias in (False, True)
        for layout in LAYOUTS
    ]
    no_bias = [nn.Linear(12, 10, bias=False) for _ in range(2)]
    layers += [ConditionedLoRA(base, _strategies("uc"), rank=3, basis_bias=True) for base in no_bias]
    alone = [
        ConditionedLoRA(nn.Linear(12, 6), _strategies("uc"), rank=3),  # the only layer of its shape
        ConditionedLoRA(_base("linear"), _strategies("uc"), rank=3),  # merged below
        ConditionedLoRA(_base("linear"), _strategies("uc"), rank=3, dropout=0.5),  # in training
        ConditionedLoRA(_base("linear"), {"plain": PlainLoRA()}, rank=3),  # computes its own omega
    ]
    for layer in [*layers, *alone]:
        _randomise(layer)
        layer.double()
    cond = _conditions(4, shared=True)
    cond = cond.replace(embedding=cond.embedding.double(), lora_scale=torch.full((4,), 0.5, dtype=torch.float64))
    alone[1].merge(cond)
    layers = [*layers, *alone]
    groups = grouping.omega_groups(layers, cond)
    merged = grouped_merged_weights(
        layers, grouping.split_omegas(groups, len(layers)), None, groups if rows_from_groups else ()
    )
    # within MERGE_LIMIT: every layer of a shared shape; within 5 weights: the first trio and two of the second
    assert [m is not None for m in merged] == [i < together for i in range(len(layers))]
    pairs = [(layer, m) for layer, m in zip(layers, merged, strict=True) if m is not None]
    expected = [_merged_written_out(layer, layer.omega(cond, _input("linear", 4).double())[0]) for layer, _ in pairs]
    for (_, (weight, bias)), (weight_expected, bias_expected) in zip(pairs, expected, strict=True):
        assert torch.allclose(weight, weight_expected, atol=1e-12)
        assert (bias is None) == (bias_expected is None)
        assert bias is None or torch.allclose(bias, bias_expected, atol=1e-12)
    tensors = [[t for pair in ms for t in pair if t is not None] for ms in ([m for _, m in pairs], expected)]
    weights = [torch.randn_like(t) for t in tensors[0]]
    params = list(dict.fromkeys(p for layer, _ in pairs for p in layer.parameters()))
    grads = [
        torch.autograd.grad(sum((t * w).sum() for t, w in zip(ts, weights, strict=True)), params, allow_unused=True)
        for ts in tensors
    ]
    for g_grouped, g_own in zip(*grads, strict=True):
        assert (g_grouped is None) == (g_own is None)
        assert g_grouped is None or torch.allclose(g_grouped, g_own, atol=1e-10)


@pytest.mark.parametrize("kind", ["time_and_class", "uc"])
@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize("alpha", [None, 6.0])
@pytest.mark.parametrize("lora_scale", [None, 0.5])
def test_a_shared_call_merges_layers_of_one_shape_together_and_matches_the_reference(
    kind, basis_bias, alpha, lora_scale
):
    layers = [
        ConditionedLoRA(_base(layout), _strategies(kind), rank=2, alpha=alpha, basis_bias=basis_bias)
        for layout in LAYOUTS
    ]
    for layer in layers:
        _randomise(layer)
    cond = _conditions(4, shared=True)
    if lora_scale is not None:
        cond = cond.replace(lora_scale=torch.full((4,), lora_scale))
    inputs = [_input(layout, 4) for layout in LAYOUTS]
    with bind_conditions(layers, cond):
        assert all(layer.call.weight is not None for layer in layers)
        outs = [layer(x) for layer, x in zip(layers, inputs, strict=True)]
    for layer, x, out in zip(layers, inputs, outs, strict=True):
        assert layer.call is None and layer.conditions is None  # bound for the call only
        assert torch.allclose(out, _naive(layer, x, cond), atol=1e-4, rtol=1e-4)
        layer.conditions = cond  # the layer alone, merging its own weight
        assert torch.allclose(out, layer(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
def test_a_shared_call_merged_together_runs_in_bf16_and_float64(dtype):
    """The layers and their inputs in `dtype`, against the same call in float64 (bf16 to its precision)."""
    torch.manual_seed(0)
    layers = [ConditionedLoRA(_base(layout), _strategies("uc"), rank=2, basis_bias=True) for layout in LAYOUTS]
    for layer in layers:
        _randomise(layer)
    cond = _conditions(4, shared=True)
    inputs = [_input(layout, 4) for layout in LAYOUTS]

    def outputs(dtype: torch.dtype) -> list[torch.Tensor]:
        with bind_conditions([layer.to(dtype) for layer in layers], cond.replace(embedding=cond.embedding.to(dtype))):
            assert all(layer.call.weight is not None for layer in layers)
            return [layer(x.to(dtype)) for layer, x in zip(layers, inputs, strict=True)]

    reference = outputs(torch.float64)
    for out, expected in zip(outputs(dtype), reference, strict=True):
        assert out.dtype == dtype
        tolerance = 0.05 * expected.abs().max().item() if dtype == torch.bfloat16 else 1e-12
        assert torch.allclose(out.double(), expected, atol=tolerance)


def test_conditions_set_directly_inside_a_binding_are_not_served_what_was_computed_for_the_binding():
    layers = [ConditionedLoRA(_base("linear"), _strategies("time_and_class"), rank=2) for _ in range(2)]
    for layer in layers:
        _randomise(layer)
    x, other = _input("linear", 4), _conditions(4)  # per sample, unlike the bound shared condition
    expected = _naive(layers[0], x, other)
    with bind_conditions(layers, _conditions(4, shared=True).replace(step=torch.full((4,), 7))):
        layers[0].conditions = other
        assert torch.allclose(layers[0](x), expected, atol=1e-4, rtol=1e-4)


def test_merging_layers_of_one_shape_costs_the_same_operations_for_any_number_of_layers():
    def ops(num_layers: int) -> int:
        layers = [
            ConditionedLoRA(_base("linear"), _strategies("uc"), rank=2, basis_bias=True) for _ in range(num_layers)
        ]
        omegas = grouped_omegas(layers, _conditions(3, shared=True))
        with CountOps() as counter:
            merged = grouped_merged_weights(layers, omegas)
        assert all(m is not None for m in merged)
        return counter.count

    assert ops(2) == ops(7) > 0


def test_a_merged_layer_with_per_basis_bias_stays_right_under_binding():
    layer = ConditionedLoRA(_base("conv2d"), _strategies("uc"), rank=2, basis_bias=True)
    _randomise(layer)
    x, cond = _input("conv2d", 4), _conditions(4)
    layer.conditions = cond
    expected = _naive(layer, x, cond)
    layer.conditions = None
    layer.merge(_conditions(4, shared=True))  # another condition folded into the weights
    with bind_conditions([layer], cond):  # the bias term computed at binding would be for the whole omega
        assert torch.allclose(layer(x), expected, atol=1e-5)


def test_a_strategy_subclass_with_its_own_forward_is_not_grouped_with_its_parents_form():
    class Doubled(UCMLP):
        def forward(self, cond, x=None):
            return 2 * super().forward(cond, x)

    layers = [ConditionedLoRA(_base("linear"), {"uc": cls(D, 5, (8, 8))}, rank=2) for cls in (Doubled, Doubled, UCMLP)]
    _randomise(layers[0])
    cond = Conditions(embedding=torch.randn(3, D))
    x = _input("linear", 3)
    grouped = grouped_omegas(layers, cond)
    assert grouped[0] is None and grouped[1] is None  # computed by the layers themselves, with their forward
    assert torch.allclose(grouped[2], layers[2].omega(cond, x), atol=1e-6)
    with bind_conditions(layers, cond):
        assert torch.allclose(layers[0](x), _naive(layers[0], x, cond), atol=1e-5)


def test_grouped_uc_lora_costs_the_same_operations_for_any_number_of_layers():
    """The point of grouping: the operations that compute omega do not grow with the number of layers."""

    def ops(num_layers: int) -> int:
        layers = [ConditionedLoRA(_base("linear"), _strategies("uc"), rank=2) for _ in range(num_layers)]
        cond = Conditions(embedding=torch.randn(3, D))
        with CountOps() as counter:
            sum(o.sum() for o in grouped_omegas(layers, cond)).backward()
        return counter.count - 2 * num_layers  # less the per-layer sum and add of this loss

    assert ops(2) == ops(7) > 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("layout", ["linear", "conv2d"])
def test_shared_condition_takes_the_merged_path_and_matches(kind, layout, monkeypatch):
    layer = ConditionedLoRA(_base(layout), _strategies(kind), rank=2, basis_bias=True)
    _randomise(layer)
    x, cond = _input(layout, 4), _conditions(4, shared=True)
    layer.conditions = cond
    calls = []
    original = ConditionedLoRA._forward_merged
    monkeypatch.setattr(ConditionedLoRA, "_forward_merged", lambda *a: calls.append(1) or original(*a))
    out = layer(x)
    assert calls == [1]  # chosen by the caller's flag, not by comparing omegas
    assert torch.allclose(out, _naive(layer, x, cond), atol=1e-4, rtol=1e-4)
    layer.conditions = cond.replace(shared=False)  # the batched path gives the same answer
    assert torch.allclose(layer(x), out, atol=1e-4, rtol=1e-4)
    assert calls == [1]


@pytest.mark.parametrize("kind", KINDS)
def test_fresh_lora_leaves_the_output_unchanged(kind):
    base = _base("linear")
    layer = ConditionedLoRA(base, _strategies(kind), rank=4)
    x = _input("linear", 3)
    layer.conditions = _conditions(3)
    assert torch.equal(layer(x), base(x))
    assert layer.lora_down.std().item() == pytest.approx(1 / 4, rel=0.2)  # A ~ N(0, (1/r)^2)


def test_linear_interpolation_table_closed_form():
    table = linear_interpolation_table(1001, 11)  # m = 10 divides T - 1 = 1000: knots at 1, 101, ..., 1001
    knots = basis_timesteps(1001, 11)
    assert knots.tolist() == [1 + 100 * i for i in range(11)]
    assert torch.allclose(table.sum(1), torch.ones(1001))
    assert int((table != 0).sum(1).max()) <= 2
    for i, k in enumerate(knots.long().tolist()):
        assert torch.equal(table[k - 1], torch.nn.functional.one_hot(torch.tensor(i), 11).float())
    # step s = 151 lies halfway between knots 101 and 201
    assert table[150, 1].item() == pytest.approx(0.5) and table[150, 2].item() == pytest.approx(0.5)


def test_linear_interpolation_when_m_does_not_divide():
    table = linear_interpolation_table(1000, 11)  # knots 1, 100.9, 200.8, ...
    assert torch.allclose(table.sum(1), torch.ones(1000))
    assert int((table != 0).sum(1).max()) <= 2
    assert table[0, 0].item() == 1.0 and table[-1, -1].item() == pytest.approx(1.0)  # ends are integer knots
    assert table[:, 1].max().item() < 1.0  # a fractional knot is never hit exactly
    assert table[:, 1].argmax().item() == 101 - 1  # ...but peaks at the nearest step, s = 101


def test_onehot_table():
    table = onehot_table(1001, 11)
    assert torch.equal(table.sum(1), torch.ones(1001))
    assert table[0, 0] == 1 and table[99, 0] == 1 and table[100, 1] == 1 and table[-1, -1] == 1


def test_class_vector_interpolates_between_classes():
    select = ClassSelect(4)
    one = select(Conditions(labels=torch.tensor([2, -1])))
    assert torch.equal(one, torch.tensor([[0.0, 0, 1, 0], [0, 0, 0, 0]]))
    mix = torch.tensor([[0.3, 0.0, 0.7, 0.0], [1.5, -0.5, 0, 0]])  # interpolation, extrapolation
    assert torch.equal(select(Conditions(labels=torch.tensor([0, 0]), class_vector=mix)), mix)
    with pytest.raises(ValueError, match="TimeLoRA needs Conditions.step"):
        TimeTable(10, 3)(Conditions())


def test_conditions_are_validated_at_the_boundary():
    with pytest.raises(ValueError, match=r"labels must be in \[0, 4\) or -1, got 0..4"):
        Conditions(labels=torch.tensor([0, 4])).check(num_classes=4)
    with pytest.raises(ValueError, match=r"steps must be in \[0, 10\) \(0-based\), got 1..10"):
        Conditions(step=torch.tensor([1, 10])).check(num_timesteps=10)
    with pytest.raises(ValueError, match="class_vector has 3 entries, expected 4"):
        Conditions(class_vector=torch.zeros(1, 3)).check(num_classes=4)
    ok = Conditions(labels=torch.tensor([-1, 3]), step=torch.tensor([0, 9]))
    assert ok.check(num_classes=4, num_timesteps=10) is ok


def test_merge_unmerge_round_trip():
    model = nn.Sequential(nn.Linear(6, 6), nn.SiLU(), nn.Linear(6, 6))
    inject_conditioned_lora(model, ["0", "2"], lambda n, m: {"class": ClassSelect(3)}, rank=2, basis_bias=True)
    for _, layer in model.named_modules():
        if isinstance(layer, ConditionedLoRA):
            _randomise(layer)
    original = {k: v.clone() for k, v in model.state_dict().items()}
    x = torch.randn(4, 6)
    cond = Conditions(labels=torch.full((4,), 1))
    with bind_conditions(model, cond):
        expected = model(x)
    merge_lora(model, cond)
    assert torch.allclose(model(x), expected, atol=1e-5)  # merged layers ignore conditions
    unmerge_lora(model)
    for k, v in model.state_dict().items():
        assert torch.allclose(v, original[k], atol=1e-6), k


def test_save_load_round_trip(tmp_path):
    spec = LoRASpec(targets=("*",), rank=2, time="compositional", time_bases=4, omega="train", num_timesteps=T)

    def build():
        torch.manual_seed(3)
        model = nn.Sequential(nn.Linear(5, 5), nn.Linear(5, 5))
        inject_lora(model, spec)
        return model

    model = build()
    for _, layer in model.named_modules():
        if isinstance(layer, ConditionedLoRA):
            _randomise(layer)
            with torch.no_grad():
                layer.strategies["time"].table.add_(1.0)
    save_lora(model, tmp_path / "lora", spec)
    meta = json.loads((tmp_path / "lora" / "condlora_adapter.json").read_text())
    assert meta["format"] == "condlora-adapter" and meta["format_version"] == 1 and meta["layers"] == ["0", "1"]
    fresh = build()
    assert load_lora(fresh, tmp_path / "lora") == spec
    for k, v in lora_state_dict(model).items():
        assert torch.equal(v, lora_state_dict(fresh)[k])
    assert all(not k.endswith("base_layer.weight") for k in lora_state_dict(model))
    config = tmp_path / "lora" / "condlora_adapter.json"
    config.write_text(json.dumps({**meta, "format_version": 2}))
    with pytest.raises(ValueError, match="does not match the config stored"):
        load_lora(fresh, tmp_path / "lora")
    (tmp_path / "lora" / "condlora_adapter.safetensors").write_bytes(b"broken")
    with pytest.raises(ValueError, match="corrupt LoRA files"):
        load_lora(fresh, tmp_path / "lora")
    with pytest.raises(ValueError, match="needs the LoRA recipe"):
        save_lora(model, tmp_path / "other")


def test_conditions_are_only_bound_during_the_call():
    model = nn.Sequential(nn.Linear(4, 4))
    inject_conditioned_lora(model, ["0"], lambda n, m: {"c": ClassSelect(2)})
    with pytest.raises(RuntimeError, match="without conditions"):
        model(torch.randn(1, 4))
    with bind_conditions(model, Conditions(labels=torch.tensor([1]))):
        model(torch.randn(1, 4))
    assert model[0].conditions is None


def test_injection_errors():
    model = nn.Sequential(nn.Conv2d(3, 3, 3))
    with pytest.raises(TypeError, match="1x1"):
        inject_conditioned_lora(model, ["0"], lambda n, m: {"c": ClassSelect(2)})
    with pytest.raises(ValueError, match="no module"):
        inject_conditioned_lora(model, ["*.qkv"], lambda n, m: {"c": ClassSelect(2)})


def test_layer_rejects_padded_or_strided_convolutions():
    for base in (nn.Conv2d(4, 4, 1, padding=1), nn.Conv2d(4, 4, 1, stride=2), nn.Conv1d(4, 4, 3)):
        with pytest.raises(TypeError, match="1x1, stride-1, unpadded"):
            ConditionedLoRA(base, {"c": ClassSelect(2)})


def test_merged_layer_stays_right_for_other_conditions_and_failed_merge_changes_nothing():
    layer = ConditionedLoRA(nn.Linear(4, 4), {"c": ClassSelect(3)}, rank=2)
    _randomise(layer)
    x, other = torch.randn(2, 4), Conditions(labels=torch.tensor([1, 2]))
    layer.conditions = other
    expected = _naive(layer, x, other)
    layer.conditions = None
    layer.merge(Conditions(labels=torch.tensor([1, 1])))
    assert torch.allclose(layer(x[:1]), expected[:1], atol=1e-5)  # no conditions: the merged one (class 1)
    layer.conditions = other  # class 2 in the batch: the layer adds only what it differs by
    assert torch.allclose(layer(x), expected, atol=1e-5)
    layer.conditions = None
    with pytest.raises(ValueError, match="one condition shared by the whole batch"):
        ConditionedLoRA(nn.Linear(4, 4), {"c": ClassSelect(3)}).merge(other)
    layer.unmerge()
    no_bias = ConditionedLoRA(nn.Linear(4, 4, bias=False), {"c": ClassSelect(3)}, rank=2, basis_bias=True)
    _randomise(no_bias)
    before = no_bias.base_layer.weight.clone()
    with pytest.raises(RuntimeError, match="without bias"):
        no_bias.merge(Conditions(labels=torch.tensor([0])))
    assert torch.equal(no_bias.base_layer.weight, before) and not no_bias.merged


def test_injection_follows_the_base_dtype():
    model = nn.Sequential(nn.Linear(4, 4)).to(torch.bfloat16)
    inject_conditioned_lora(model, ["0"], lambda n, m: {"t": TimeTable(T, 3)})
    assert model[0].lora_down.dtype == torch.bfloat16
    with bind_conditions(model, Conditions(step=torch.tensor([3, 40]))):
        assert model(torch.randn(2, 4, dtype=torch.bfloat16)).dtype == torch.bfloat16


def test_lora_dropout_drops_only_the_adapters_input_in_training():
    from condlora.conditions import Conditions
    from condlora.lora import ConditionedLoRA
    from condlora.lora.strategies import PlainLoRA

    torch.manual_seed(0)
    layer = ConditionedLoRA(torch.nn.Linear(6, 4), {"plain": PlainLoRA()}, rank=2, dropout=0.5)
    torch.nn.init.normal_(layer.lora_up)
    x = torch.randn(3, 5, 6)
    layer.conditions = Conditions(shared=True)
    with torch.no_grad():
        base = layer.base_layer(x)
        full = base + x @ layer.lora_down.T @ layer.lora_up.T
        layer.eval()
        torch.testing.assert_close(layer(x), full)  # no dropout outside training (merged path)
        layer.train()
        torch.manual_seed(1)
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, training=True)  # the same draw
        torch.manual_seed(1)
        torch.testing.assert_close(layer(x), base + (x * mask) @ layer.lora_down.T @ layer.lora_up.T)
    with pytest.raises(ValueError, match=r"LoRA dropout must be in \[0, 1\)"):
        ConditionedLoRA(torch.nn.Linear(6, 4), {"plain": PlainLoRA()}, dropout=1.0)
