"""A conditioned LoRA convolution with its backward written out: the two sums that autograd adds, done in place.

For a channels-first 1x1 convolution W (C_out, C_in) with bias b, stacked adapters A (r*M, C_in) and
B (C_out, r*M), and per-sample mixing weights omega (N, M) (omega_r: each repeated r times, basis-major),

    out = W x + b + B (omega_r * (A x))

Autograd over these operations writes B's projection of the adapters' activations, then reads it back with
W x to sum them, and in the backward writes A's gradient with respect to x, then reads it back with W's to
sum them. Here each of those products accumulates into the other term's fresh output instead (a matrix
product with beta 1), which saves a write and a read of a whole activation map each way: a quarter to a
third of the bytes the adapters of a qkv layer add. On a GPU whose eager step is bound by memory bandwidth
that is what the adapters cost (see `benchmarks/op_count.py`); under `torch.compile`, which fuses kernels
itself, the layer keeps the plain operations. Results are those of the plain expression up to the order of
floating-point additions (tested, values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conditioned_conv(
    x: torch.Tensor,  # (N, C_in, *spatial)
    weight: torch.Tensor,  # W: (C_out, C_in), or its 1x1 kernel
    bias: torch.Tensor | None,  # b: (C_out,)
    down: torch.Tensor,  # A: (r*M, C_in)
    up: torch.Tensor,  # B: (C_out, r*M)
    omega: torch.Tensor,  # (N, M), scaled
    rank: int,  # r
) -> torch.Tensor:
    """W x + b + B (omega_r * (A x)), (N, C_out, *spatial), in autocast's dtype where autocast is on (every
    operand cast once, as autocast would for each convolution)."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        x, weight, down, up, omega = (t.to(dtype) for t in (x, weight, down, up, omega))
        bias = None if bias is None else bias.to(dtype)
    return _ConditionedConv.apply(x, weight.reshape(up.shape[0], -1), bias, down, up, omega, rank)


class _ConditionedConv(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, omega, rank):
        h = conv1x1(x, down)  # A x
        weighed = weigh(h, omega, rank)  # omega_r * A x
        out = conv1x1(x, weight, bias)
        _accumulate(out, up, weighed)  # += B (omega_r * A x)
        ctx.save_for_backward(x, weight, down, up, omega, h, weighed)
        ctx.rank, ctx.bias_shape = rank, None if bias is None else bias.shape
        return out

    @staticmethod
    def backward(ctx, grad):
        x, weight, down, up, omega, h, weighed = ctx.saved_tensors
        need_x, need_weight, need_bias, need_down, need_up, need_omega = ctx.needs_input_grad[:6]
        need_h = need_x or need_down or need_omega
        grad_weighed, grad_up, _ = _conv_grads(grad, weighed, up, (need_h, need_up, False))
        grad_x, grad_weight, grad_bias = _conv_grads(grad, x, weight, (need_x, need_weight, need_bias), ctx.bias_shape)
        grad_down = grad_omega = None
        if need_omega:  # per basis: summed over its r channels and every position
            per_basis = grad_weighed.unflatten(1, (-1, ctx.rank)) * h.unflatten(1, (-1, ctx.rank))
            grad_omega = per_basis.sum([2, *range(3, per_basis.dim())])
        if need_x or need_down:
            grad_h = weigh(grad_weighed, omega, ctx.rank)
            if need_down:
                grad_down = _conv_grads(grad_h, x, down, (False, True, False))[1]
            if need_x:
                _accumulate(grad_x, down.mT, grad_h)  # += A^T grad_h
        return grad_x, grad_weight, grad_bias, grad_down, grad_up, grad_omega, None


def weigh(h: torch.Tensor, omega: torch.Tensor, rank: int, dim: int = 1) -> torch.Tensor:
    """h's r*M channels at `dim` (basis-major, r per basis) times their basis's per-sample omega (N, M), through
    a view that splits the channels into (M, r), so omega is never repeated."""
    split = h.unflatten(dim, (-1, rank))  # (..., M, r, ...)
    shape = [1] * split.dim()
    shape[0], shape[dim] = omega.shape
    return (split * omega.reshape(shape)).flatten(dim, dim + 1)


def conv1x1(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
    """A (C_out, C_in) matrix applied along dim 1 of x (N, C_in, *spatial) as a 1x1 convolution."""
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    return conv(x, _kernel(matrix, x.dim() - 2), bias)


def _kernel(matrix: torch.Tensor, spatial: int) -> torch.Tensor:
    """A (C_out, C_in) matrix as the kernel of a 1x1 convolution over `spatial` dimensions."""
    return matrix.reshape(*matrix.shape, *([1] * spatial))


def _conv_grads(grad, inputs, matrix, mask, bias_shape=None):
    """The 1x1 convolution's gradients (input, weight as a matrix, bias), each None where `mask` says so."""
    spatial = inputs.dim() - 2
    ones, zeros = [1] * spatial, [0] * spatial
    grad_input, grad_kernel, grad_bias = torch.ops.aten.convolution_backward(
        grad, inputs, _kernel(matrix, spatial), bias_shape, ones, zeros, ones, False, zeros, 1, list(mask)
    )
    return grad_input, None if grad_kernel is None else grad_kernel.view(matrix.shape), grad_bias


def _accumulate(out: torch.Tensor, matrix: torch.Tensor, h: torch.Tensor) -> None:
    """out += matrix (C_out, K) applied along dim 1 of h (N, K, ...), in place: one matrix product with beta 1
    over the positions where both are channels-last (EDM's activations after its first attention are), one
    batched product where both are channels-first, a convolution and a sum otherwise."""
    rows_out, rows_h = _rows(out), _rows(h)
    if rows_out is not None and rows_h is not None:
        rows_out.addmm_(rows_h, matrix.mT)
    elif out.is_contiguous() and h.is_contiguous():
        batch = out.shape[0]
        out.view(batch, out.shape[1], -1).baddbmm_(matrix.expand(batch, *matrix.shape), h.view(batch, h.shape[1], -1))
    else:
        out.add_(conv1x1(h, matrix))


def _rows(t: torch.Tensor) -> torch.Tensor | None:
    """A channels-last tensor (N, C, ...) as the (positions, C) matrix it is in memory; None if it is not one."""
    last = t.movedim(1, -1)
    return last.view(-1, last.shape[-1]) if t.dim() > 2 and last.is_contiguous() else None
