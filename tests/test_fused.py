"""The conditioned LoRA convolution with its backward written out, against plain autograd over the expression."""

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from condlora.lora import UCMLP, ClassSelect, ConditionedLoRA, Conditions, TimeTable, bind_conditions, layer
from condlora.lora.fused import conditioned_conv

C_IN, C_OUT, BASES, RANK, BATCH = 6, 9, 4, 3, 5
NAMES = ("x", "weight", "bias", "down", "up", "omega")


def _operands(dtype=torch.float64, seed=0) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    shapes = {
        "x": (BATCH, C_IN, 4, 3),
        "weight": (C_OUT, C_IN, 1, 1),
        "bias": (C_OUT,),
        "down": (RANK * BASES, C_IN),
        "up": (C_OUT, RANK * BASES),
        "omega": (BATCH, BASES),
    }
    return {name: torch.randn(shape, generator=g, dtype=dtype) for name, shape in shapes.items()}


def _reference(x, weight, bias, down, up, omega):
    """W x + b + B (omega_r * A x) by plain operations: omega repeated r times, each 1x1 convolution as an
    einsum over the channels."""
    omega_r = omega.repeat_interleave(RANK, dim=1)
    h = torch.einsum("kc,nc...->nk...", down, x) * omega_r.reshape(*omega_r.shape, *([1] * (x.dim() - 2)))
    w = weight.reshape(C_OUT, C_IN)
    return (
        torch.einsum("oc,nc...->no...", w, x)
        + bias.reshape(-1, *([1] * (x.dim() - 2)))
        + torch.einsum("ok,nk...->no...", up, h)
    )


def _grads(fn, operands, needed):
    leaves = {name: t.clone().requires_grad_(name in needed) for name, t in operands.items()}
    extra = [RANK] if fn is conditioned_conv else []
    out = fn(*(leaves[name] for name in NAMES), *extra)
    out.backward(torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view(out.shape))
    return out.detach(), {name: leaves[name].grad for name in NAMES}


LAYOUTS = {
    "conv2d": lambda x: x,
    "conv1d": lambda x: x.flatten(2),
    "channels_last": lambda x: x.contiguous(memory_format=torch.channels_last),
    "strided": lambda x: x.transpose(2, 3).contiguous().transpose(2, 3),  # neither layout: the fallback sum
}


@pytest.mark.parametrize("layout", LAYOUTS)
@pytest.mark.parametrize("needed", [NAMES, ("down", "up", "omega"), ("x", "up"), ("weight", "bias", "down")])
def test_values_and_gradients_are_those_of_the_plain_expression(layout, needed):
    operands = _operands()
    operands["x"] = LAYOUTS[layout](operands["x"])
    out, grads = _grads(conditioned_conv, operands, needed)
    expected, expected_grads = _grads(_reference, operands, needed)
    torch.testing.assert_close(out, expected, rtol=1e-12, atol=1e-12)
    for name in NAMES:
        if name in needed:
            torch.testing.assert_close(grads[name], expected_grads[name], rtol=1e-12, atol=1e-12, msg=name)
        else:
            assert grads[name] is None


class _Recorded(TorchDispatchMode):
    def __init__(self):
        super().__init__()
        self.names: list[str] = []

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        self.names.append(func.__name__.split(".")[0])
        return func(*args, **(kwargs or {}))


@pytest.mark.parametrize(("layout", "product"), [("conv2d", "baddbmm_"), ("channels_last", "addmm_")])
def test_both_sums_accumulate_in_place(layout, product):
    """Where the layouts allow it, B's projection and A's input gradient are added into the other term's
    output by the product itself: no full-size sum."""
    operands = {name: t.requires_grad_() for name, t in _operands().items()}
    operands["x"] = LAYOUTS[layout](operands["x"].detach()).requires_grad_()
    with _Recorded() as ops:
        conditioned_conv(*(operands[name] for name in NAMES), RANK).sum().backward()
    assert ops.names.count(product) == 2  # forward: += B h; backward: += A^T grad_h
    assert "add" not in ops.names and "add_" not in ops.names


def test_bf16_autocast_casts_every_operand_once_and_agrees_with_float32():
    operands = _operands(torch.float32)
    expected, expected_grads = _grads(_reference, operands, NAMES)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out, grads = _grads(conditioned_conv, operands, NAMES)
    assert out.dtype == torch.bfloat16 and all(grads[name].dtype == torch.float32 for name in NAMES)
    scale = expected.abs().max()
    torch.testing.assert_close(out.float(), expected, rtol=0, atol=0.03 * scale)
    for name in NAMES:
        reference = expected_grads[name]
        torch.testing.assert_close(grads[name], reference, rtol=0, atol=0.03 * reference.abs().max(), msg=name)


@pytest.mark.parametrize("basis_bias", [False, True])
@pytest.mark.parametrize("conv", [torch.nn.Conv1d, torch.nn.Conv2d])
def test_a_training_layer_computes_what_the_plain_operations_compute(conv, basis_bias, monkeypatch):
    """The layer takes this path on per-sample calls in eager mode; under a compiler it keeps the plain
    operations. Both give the same output and gradients for every parameter."""
    torch.manual_seed(0)
    strategies = {"time": TimeTable(20, 4, trainable=True), "class": ClassSelect(3), "uc": UCMLP(8, 2, (6,))}
    lora = ConditionedLoRA(conv(C_IN, C_OUT, 1), strategies, rank=2, basis_bias=basis_bias).double()
    with torch.no_grad():
        lora.lora_up.normal_()
        if basis_bias:
            lora.basis_bias.normal_()
    x = torch.randn(BATCH, C_IN, *([7] if conv is torch.nn.Conv1d else [4, 3]), dtype=torch.float64)
    cond = Conditions(
        step=torch.randint(0, 20, (BATCH,)), labels=torch.arange(BATCH) % 3, embedding=torch.randn(BATCH, 8).double()
    )

    def run() -> tuple[torch.Tensor, list[torch.Tensor]]:
        lora.zero_grad(set_to_none=True)
        with bind_conditions([lora], cond):
            out = lora(x)
        out.square().sum().backward()
        return out.detach(), [p.grad for p in lora.parameters()]

    fused, fused_grads = run()
    monkeypatch.setattr(layer, "recorded", lambda: True)  # as under torch.compile: the plain operations
    plain, plain_grads = run()
    torch.testing.assert_close(fused, plain, rtol=1e-12, atol=1e-12)
    for got, expected in zip(fused_grads, plain_grads, strict=True):
        torch.testing.assert_close(got, expected, rtol=1e-10, atol=1e-12)


def test_a_gradient_in_any_layout_is_taken_as_it_comes():
    """Autograd hands the output's gradient in whatever layout the next operation made it."""
    operands = _operands()
    leaves = {name: t.clone().requires_grad_() for name, t in operands.items()}
    reference_leaves = {name: t.clone().requires_grad_() for name, t in operands.items()}
    out = conditioned_conv(*(leaves[name] for name in NAMES), RANK)
    expected = _reference(*(reference_leaves[name] for name in NAMES))
    grad = torch.randn(out.shape[0], out.shape[3], out.shape[2], out.shape[1], dtype=out.dtype).permute(0, 3, 2, 1)
    out.backward(grad)
    expected.backward(grad)
    for name in NAMES:
        torch.testing.assert_close(leaves[name].grad, reference_leaves[name].grad, rtol=1e-12, atol=1e-12, msg=name)
