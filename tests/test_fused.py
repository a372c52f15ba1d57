"""The conditioned LoRA projection with its backward written out, against plain autograd over the expression."""

import pytest
import torch
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode

from condlora.diffusion import process_for
from condlora.lora import (
    UCMLP,
    ClassSelect,
    ConditionedLoRA,
    Conditions,
    TimeTable,
    bind_conditions,
    conditioned_layers,
    layer,
)
from condlora.lora.fused import conditioned_projection
from condlora.nets import build_network
from condlora.presets import build_config

C_IN, C_OUT, BASES, RANK, BATCH = 6, 9, 4, 3, 5
NAMES = ("x", "weight", "bias", "down", "up", "omega", "basis_bias")


def _operands(dtype=torch.float64, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "x": (BATCH, C_IN, 4, 3),
        "weight": (C_OUT, C_IN, 1, 1),
        "bias": (C_OUT,),
        "down": (RANK * BASES, C_IN),
        "up": (C_OUT, RANK * BASES),
        "omega": (BATCH, BASES),
        "basis_bias": (RANK * BASES, C_OUT),
    }
    return {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in shapes.items()}


def _reference(x, weight, bias, down, up, omega, basis_bias, channel_dim):
    """W x + b + B (omega_r * A x) + P^T omega_r by plain operations: omega repeated r times, each projection an
    einsum over the channels (moved to dim 1 for a linear layer's input), the bias term summed row by row."""
    if channel_dim == -1:
        return _reference(x.movedim(-1, 1), weight, bias, down, up, omega, basis_bias, 1).movedim(1, -1)
    omega_r = omega.repeat_interleave(RANK, dim=1)
    per_sample = [1] * (x.dim() - 2)
    h = torch.einsum("kc,nc...->nk...", down, x) * omega_r.reshape(*omega_r.shape, *per_sample)
    w = weight.reshape(C_OUT, C_IN)
    out = torch.einsum("oc,nc...->no...", w, x) + bias.reshape(-1, *per_sample) + torch.einsum("ok,nk...->no...", up, h)
    if basis_bias is not None:
        term = sum(omega_r[:, k, None] * basis_bias[k] for k in range(omega_r.shape[1]))  # (N, C_out)
        out = out + term.reshape(*term.shape, *per_sample)
    return out


def _fused(x, weight, bias, down, up, omega, basis_bias, channel_dim):
    return conditioned_projection(x, weight, bias, down, up, omega, RANK, basis_bias, channel_dim)


def _grads(fn, operands, needed, channel_dim):
    leaves = {name: None if t is None else t.clone().requires_grad_(name in needed) for name, t in operands.items()}
    out = fn(*(leaves[name] for name in NAMES), channel_dim)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
    return out.detach(), {name: None if t is None else t.grad for name, t in leaves.items()}


LAYOUTS = {  # the input in a layout, and its channel dimension
    "conv2d": (lambda x: x, 1),
    "conv1d": (lambda x: x.flatten(2), 1),
    "channels_last": (lambda x: x.contiguous(memory_format=torch.channels_last), 1),
    "strided": (lambda x: x.transpose(2, 3).contiguous().transpose(2, 3), 1),  # neither layout: the fallback sum
    "linear": (lambda x: x.flatten(2).mT.contiguous(), -1),  # tokens (N, L, C_in)
    "linear_2d": (lambda x: x[:, :, 0, 0].contiguous(), -1),  # one vector per sample (N, C_in)
}


def _in_layout(operands: dict, layout: str, basis_bias: bool) -> tuple[dict, int]:
    to_layout, channel_dim = LAYOUTS[layout]
    return {**operands, "x": to_layout(operands["x"]), "basis_bias": operands["basis_bias"] if basis_bias else None}, (
        channel_dim
    )


@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize(
    "needed", [NAMES, ("down", "up", "omega"), ("x", "up"), ("weight", "bias", "down"), ("omega", "basis_bias")]
)
def test_values_and_gradients_are_those_of_the_plain_expression(layout, needed, basis_bias):
    operands, channel_dim = _in_layout(_operands(), layout, basis_bias)
    out, grads = _grads(_fused, operands, needed, channel_dim)
    expected, expected_grads = _grads(_reference, operands, needed, channel_dim)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name in NAMES:
        if name in needed and operands[name] is not None:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert grads[name] is None


INDEX = torch.tensor([[0, 2], [3, 3], [2, 0], [3, 2], [0, 2]])  # k = 2 bases per sample: 3 twice in one, 1 unused


def _selected_operands(operands: dict) -> dict:
    """The operands with omega the weights (N, k) of each sample's bases INDEX."""
    g = torch.Generator().manual_seed(1)
    return {**operands, "omega": torch.randn(*INDEX.shape, generator=g, dtype=operands["x"].dtype)}


def _selected(x, weight, bias, down, up, omega, basis_bias, channel_dim):
    return conditioned_projection(x, weight, bias, down, up, omega, RANK, basis_bias, channel_dim, INDEX)


def _selected_reference(x, weight, bias, down, up, omega, basis_bias, channel_dim):
    """The plain expression sample by sample, over that sample's adapters picked out of the stacked ones row
    by row (the r rows of A and P, the r columns of B, of each of its bases in turn)."""
    outs = []
    for n in range(x.shape[0]):
        rows = [int(i) * RANK + j for i in INDEX[n] for j in range(RANK)]
        basis = None if basis_bias is None else basis_bias[rows]
        sample = x[n : n + 1], weight, bias, down[rows], up[:, rows], omega[n : n + 1], basis
        outs.append(_reference(*sample, channel_dim))
    return torch.cat(outs)


@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize("layout", LAYOUTS)
def test_selected_bases_give_each_samples_plain_expression_over_its_own(layout, basis_bias):
    """With the indices of each sample's bases (a basis may come twice, as interpolation weights may name
    it): values and gradients of every operand are those of the plain expression evaluated sample by sample
    with that sample's adapters; the stacked adapters' gradients sum over the samples that used each basis,
    and are zero elsewhere."""
    operands, channel_dim = _in_layout(_operands(), layout, basis_bias)
    operands = _selected_operands(operands)
    out, grads = _grads(_selected, operands, NAMES, channel_dim)
    expected, expected_grads = _grads(_selected_reference, operands, NAMES, channel_dim)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name in NAMES:
        if operands[name] is not None:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-12, atol=1e-12, msg=name)
    unused = [i * RANK + j for i in range(BASES) if i not in INDEX for j in range(RANK)]
    assert unused and not grads["down"][unused].any() and not grads["up"][:, unused].any()


class _Recorded(TorchDispatchMode):
    """The operations run, each with the number of elements it returns."""

    def __init__(self):
        super().__init__()
        self.ops: list[tuple[str, int]] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        self.ops.append((func.__name__.split(".")[0], out.numel() if isinstance(out, torch.Tensor) else 0))
        return out


@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize(
    ("layout", "product"), [("conv2d", "baddbmm_"), ("channels_last", "addmm_"), ("linear", "addmm_")]
)
def test_every_sum_accumulates_in_place(layout, product, basis_bias):
    """Where the layouts allow it, B's projection (with the per-basis bias term) and A's input gradient are
    added into the other term's output by the product itself: no sum over an activation map, and no pass of
    its own for the bias term."""
    operands, channel_dim = _in_layout(_operands(), layout, basis_bias)
    leaves = [None if operands[name] is None else operands[name].requires_grad_() for name in NAMES]
    with _Recorded() as recorded:
        conditioned_projection(*leaves[:6], RANK, leaves[6], channel_dim).sum().backward()
    names = [name for name, _ in recorded.ops]
    assert names.count(product) == 2  # forward: += B h; backward: += A^T grad_h
    smallest_map = BATCH * min(C_IN, C_OUT) * operands["x"][0, 0].numel()
    assert all(size < smallest_map for name, size in recorded.ops if name in ("add", "add_", "sum"))


@pytest.mark.parametrize("layout", ["conv2d", "linear"])
def test_bf16_autocast_casts_every_operand_once_and_agrees_with_float32(layout):
    operands, channel_dim = _in_layout(_operands(torch.float32), layout, basis_bias=True)
    expected, expected_grads = _grads(_reference, operands, NAMES, channel_dim)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(_fused, operands, NAMES, channel_dim)
    assert out.dtype == torch.bfloat16 and all(grads[name].dtype == torch.float32 for name in NAMES)
    scale = expected.abs().max()
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.03 * scale)
    for name in NAMES:
        reference = expected_grads[name]
        torch.testing.assert_close(grads[name], reference, rtol=0, atol=0.03 * reference.abs().max(), msg=name)


def _training_layer(base: nn.Module, basis_bias: bool) -> ConditionedLoRA:
    torch.manual_seed(0)
    strategies = {"time": TimeTable(20, 4, trainable=True), "class": ClassSelect(3), "uc": UCMLP(8, 2, (6,))}
    lora = ConditionedLoRA(base, strategies, rank=2, basis_bias=basis_bias).double()
    with torch.no_grad():
        lora.lora_up.normal_()
        if basis_bias:
            lora.basis_bias.normal_()
    return lora


def _conditions() -> Conditions:
    return Conditions(
        step=torch.arange(BATCH) * 3,
        labels=torch.arange(BATCH) % 3,
        embedding=torch.linspace(-1, 1, BATCH * 8).view(BATCH, 8).double(),
    )


def _run(lora: ConditionedLoRA, x: torch.Tensor) -> tuple[torch.Tensor, list[torch.Tensor]]:
    lora.zero_grad(set_to_none=True)
    with bind_conditions([lora], _conditions()):
        out = lora(x)
    out.square().sum().backward()
    return out.detach(), [p.grad for p in lora.parameters()]


BASES_AND_INPUTS = {
    "conv1d": (lambda: nn.Conv1d(C_IN, C_OUT, 1), (BATCH, C_IN, 7)),
    "conv2d": (lambda: nn.Conv2d(C_IN, C_OUT, 1), (BATCH, C_IN, 4, 3)),
    "linear": (lambda: nn.Linear(C_IN, C_OUT), (BATCH, 7, C_IN)),
}


@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize("base", BASES_AND_INPUTS)
def test_a_training_layer_computes_what_the_plain_operations_compute(base, basis_bias, monkeypatch):
    """The layer takes this path on per-sample calls in eager mode; under a compiler it keeps the plain
    operations (and binding computes the per-basis bias terms). Both give the same output and gradients for
    every parameter."""
    make, shape = BASES_AND_INPUTS[base]
    lora = _training_layer(make(), basis_bias)
    x = torch.randn(shape, dtype=torch.float64)
    assert lora.fuses()
    fused, fused_grads = _run(lora, x)
    monkeypatch.setattr(layer, "recorded", lambda: True)  # as under torch.compile: the plain operations
    assert not lora.fuses()
    plain, plain_grads = _run(lora, x)
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


class _ScaledLinear(nn.Linear):
    """A subclass whose forward is not F.linear (as a quantised or instrumented layer's is not)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return 2 * super().forward(x)


def test_a_base_layer_with_its_own_forward_or_hooks_is_called_as_it_is():
    """The function computes what nn.Linear / nn.Conv computes: a subclass's forward or a hook on the base
    layer would be skipped by it, so such a layer keeps the plain operations, which call the base layer."""
    calls, gradients = [], []
    hooked = _training_layer(nn.Linear(C_IN, C_OUT), basis_bias=True)
    hooked.base_layer.register_forward_hook(lambda module, args, out: calls.append(out.shape))
    backward_hooked = _training_layer(nn.Conv2d(C_IN, C_OUT, 1), basis_bias=True)
    backward_hooked.base_layer.register_full_backward_hook(lambda module, grad_in, grad_out: gradients.append(1))
    subclassed = _training_layer(_ScaledLinear(C_IN, C_OUT), basis_bias=True)
    x = torch.randn(BATCH, 7, C_IN, dtype=torch.float64)
    assert not hooked.fuses() and not backward_hooked.fuses() and not subclassed.fuses()
    _run(hooked, x)
    _run(backward_hooked, torch.randn(BATCH, C_IN, 4, 3, dtype=torch.float64))
    assert calls == [(BATCH, 7, C_OUT)] and gradients == [1]
    plain = _training_layer(nn.Linear(C_IN, C_OUT), basis_bias=True)
    plain.base_layer.load_state_dict(subclassed.base_layer.state_dict())
    subclassed_out, plain_out = _run(subclassed, x)[0], _run(plain, x)[0]
    with torch.no_grad():  # the adapters' part is the same; the base's is the subclass's own
        torch.testing.assert_close(subclassed_out - subclassed.base_layer(x), plain_out - plain.base_layer(x))


def test_a_gradient_in_any_layout_is_taken_as_it_comes():
    """Autograd hands the output's gradient in whatever layout the next operation made it."""
    operands = _operands()
    leaves = {name: t.clone().requires_grad_() for name, t in operands.items()}
    reference_leaves = {name: t.clone().requires_grad_() for name, t in operands.items()}
    out = conditioned_projection(*(leaves[name] for name in NAMES[:6]), RANK, leaves["basis_bias"])
    expected = _reference(*(reference_leaves[name] for name in NAMES), 1)
    grad = torch.randn(out.shape[0], out.shape[3], out.shape[2], out.shape[1], dtype=out.dtype).permute(0, 3, 2, 1)
    out.backward(grad)
    expected.backward(grad)
    for name in NAMES:
        torch.testing.assert_close(leaves[name].grad, reference_leaves[name].grad, rtol=1e-12, atol=1e-12, msg=name)


@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize("layout", ["conv2d", "channels_last", "linear"])
@pytest.mark.parametrize("selected", [False, True])
def test_gradients_of_gradients_are_those_of_the_plain_expression(layout, basis_bias, selected):
    """With create_graph (a gradient penalty, a Hessian-vector product) the gradients carry their own graph,
    and differentiating them again gives what it gives for the plain expression, for every operand, over
    every basis or each sample's selected ones."""
    operands, channel_dim = _in_layout(_operands(), layout, basis_bias)
    functions = (_fused, _reference)
    if selected:
        operands, functions = _selected_operands(operands), (_selected, _selected_reference)
    names = [name for name in NAMES if operands[name] is not None]
    second = []
    for fn in functions:
        leaves = {name: None if t is None else t.clone().requires_grad_() for name, t in operands.items()}
        out = fn(*(leaves[name] for name in NAMES), channel_dim)
        grads = torch.autograd.grad(out.square().sum(), [leaves[name] for name in names], create_graph=True)
        penalty = sum((g * torch.linspace(-1, 1, g.numel(), dtype=g.dtype).view(g.shape)).square().sum() for g in grads)
        second.append(torch.autograd.grad(penalty, [leaves[name] for name in names]))
    for name, got, expected in zip(names, *second, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-10, msg=name)


class _Binding(nn.Module):
    def __init__(self, lora: ConditionedLoRA):
        super().__init__()
        self.lora = lora

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        with bind_conditions([self.lora], _conditions()):
            return self.lora(x)


@pytest.mark.parametrize("base", BASES_AND_INPUTS)
def test_under_a_torch_func_transform_the_layer_keeps_the_plain_operations(base):
    """A Python autograd function without a functorch rule cannot run under torch.func.grad or vmap
    (per-sample gradients, meta-learning): there the layer takes the plain operations, with the gradients
    that autograd gives the fused path."""
    make, shape = BASES_AND_INPUTS[base]
    lora = _training_layer(make(), basis_bias=True)
    x = torch.randn(shape, dtype=torch.float64)
    network = _Binding(lora)  # binds inside the call, as a backbone does: with the parameters of the call

    def loss(parameters: dict[str, torch.Tensor]) -> torch.Tensor:
        return torch.func.functional_call(network, parameters, (x,)).square().sum()

    got = torch.func.grad(loss)(dict(network.named_parameters()))
    _, expected = _run(lora, x)
    for (name, g), e in zip(got.items(), expected, strict=True):
        torch.testing.assert_close(g, e, rtol=1e-10, atol=1e-12, msg=name)


@pytest.mark.parametrize("preset", ["mnist-nano", "mnist-nano-uc-lora", "mnist-edm", "mnist-iddpm"])
def test_every_lora_layer_of_a_preset_takes_the_fused_path_in_a_training_step(preset, monkeypatch):
    """A training step of each kind of backbone runs every LoRA layer through the function: two in-place
    products per layer (forward and input gradient) more than the plain operations run."""
    cfg = build_config(preset)
    net, process = build_network(cfg), process_for(cfg)
    layers = len(list(conditioned_layers(net)))
    x = torch.randn(2, cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    labels = torch.arange(2) % cfg.model.num_classes if cfg.model.num_classes else None

    def products() -> int:
        with _Recorded() as recorded:
            loss = process.loss(net, x, Conditions(labels=labels), torch.Generator().manual_seed(0))["loss"]
            loss.mean().backward()
        return sum(name in ("addmm_", "baddbmm_") for name, _ in recorded.ops)

    fused = products()
    monkeypatch.setattr(layer, "recorded", lambda: True)
    assert layers > 0 and fused - products() == 2 * layers
