"""A conditioned LoRA projection with its backward written out: the sums that autograd adds, done in place.

For a linear layer or a 1x1 convolution W (C_out, C_in) with bias b, stacked adapters A (r*M, C_in) and
B (C_out, r*M), per-sample mixing weights omega (N, M) (omega_r: each repeated r times, basis-major) and,
optionally, UC-LoRA's per-basis bias P (r*M, C_out),

    out = W x + b + B (omega_r * (A x)) + P^T omega_r

Given the indices (N, k) of the k bases each sample's omega weighs (see `ConditionedLoRA.selects`), with
omega (N, k) their weights, each sample projects through its own k adapters alone: they are gathered inside
(`gather_adapters`), their products batched over the samples, and their gradients summed back into A, B
and P's rows by one scatter-add each, with no autograd node for the gathering.

Autograd over these operations writes B's projection of the adapters' activations, then reads it back with
W x to sum them (and once more to add the per-basis bias term), and in the backward writes A's gradient with
respect to x, then reads it back with W's to sum them. Here each of those products accumulates into the other
term's fresh output instead (a matrix product with beta 1), which saves a write and a read of a whole
activation map each way. The per-basis bias term rides in the same product: omega (M channels, constant over
the positions) is appended to the weighed activations and each basis's summed bias rows to B, so the term
costs M more channels of the adapters' small activations instead of a pass over the output. On a GPU whose
eager step is bound by memory bandwidth that is what the adapters cost (see `benchmarks/op_count.py`); under
`torch.compile`, which fuses kernels itself, the layer keeps the plain operations. Results are those of the
plain expression up to the order of floating-point additions (tested, values and gradients).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F


def conditioned_projection(
    x: torch.Tensor,  # (N, C_in, *spatial) for a convolution, (N, ..., C_in) for a linear layer
    weight: torch.Tensor,  # W: (C_out, C_in), or its 1x1 kernel
    bias: torch.Tensor | None,  # b: (C_out,)
    down: torch.Tensor,  # A: (r*M, C_in)
    up: torch.Tensor,  # B: (C_out, r*M)
    omega: torch.Tensor,  # (N, M), or (N, k) with `index`; scaled
    rank: int,  # r
    basis_bias: torch.Tensor | None = None,  # P: (r*M, C_out)
    channel_dim: int = 1,  # 1: a convolution's channels; -1: a linear layer's
    index: torch.Tensor | None = None,  # (N, k): the bases omega weighs, for each sample
) -> torch.Tensor:
    """W x + b + B (omega_r * (A x)) + P^T omega_r, in x's layout, in autocast's dtype where autocast is on
    (every operand cast once, as autocast would for each product); with `index`, over each sample's bases
    index[n] alone, weighed by omega[n]."""
    device = x.device.type
    if torch.is_autocast_enabled(device) and x.is_floating_point():
        dtype = torch.get_autocast_dtype(device)
        x, weight, down, up, omega = (t.to(dtype) for t in (x, weight, down, up, omega))
        bias, basis_bias = (None if t is None else t.to(dtype) for t in (bias, basis_bias))
    dim = channel_dim % x.dim()
    return _ConditionedProjection.apply(
        x, weight.reshape(up.shape[0], -1), bias, down, up, omega, basis_bias, rank, dim, index
    )


class _ConditionedProjection(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, weight, bias, down, up, omega, basis_bias, rank, dim, index):
        given = (x, weight, bias, down, up, omega, basis_bias)  # what _plain_vjp differentiates
        ctx.rank, ctx.dim, ctx.bases = rank, dim, down.shape[0] // rank
        if index is not None:  # each sample's adapters (N, r*k, C_in), (N, C_out, r*k), (N, r*k, C_out)
            down, up, basis_bias = gather_adapters(down, up, basis_bias, index, rank)
        h = project(x, down, dim=dim)  # A x
        extended = up
        if basis_bias is None:
            weighed = weigh(h, omega, rank, dim)  # omega_r * A x
        else:  # [omega_r * A x | omega] and [B | P summed per basis]: the bias term is part of the product
            weighed = _empty_with_channels(h, h.shape[dim] + omega.shape[1], dim)
            weigh(h, omega, rank, dim, out=weighed.narrow(dim, 0, h.shape[dim]))
            weighed.narrow(dim, h.shape[dim], omega.shape[1]).copy_(_along(omega, dim, x.dim()))
            extended = torch.cat([up, summed_rows(basis_bias, rank).mT], dim=-1)
        out = project(x, weight, bias, dim)
        _accumulate(out, extended, weighed, dim)  # += B (omega_r * A x) (+ P^T omega_r)
        ctx.save_for_backward(*given, down, extended, h, weighed, index)
        return out

    @staticmethod
    def backward(ctx, grad):
        # A and B as the products used them: each sample's own where an index was given, B with the bias rows
        x, weight, bias, _, _, omega, _, down, up, h, weighed, index = ctx.saved_tensors
        if torch.is_grad_enabled():  # a graph of the gradients is asked for (create_graph): see _plain_vjp
            return (*_plain_vjp(ctx, grad, index), None, None, None)
        rank, dim, width = ctx.rank, ctx.dim, down.shape[-2]
        need_x, need_weight, need_bias, need_down, need_up, need_omega, need_basis = ctx.needs_input_grad[:7]
        need_h = need_x or need_down or need_omega
        grad_weighed, grad_up, _ = _grads(grad, weighed, up, (need_h, need_up or need_basis, False), dim)
        bias_shape = None if bias is None else bias.shape
        grad_x, grad_weight, grad_bias = _grads(grad, x, weight, (need_x, need_weight, need_bias), dim, bias_shape)
        grad_down = grad_omega = grad_basis = None
        if need_basis:  # each basis's summed rows: the same gradient for each of its r rows
            grad_basis = grad_up[..., width:].mT
            if index is not None:
                grad_basis = _scattered(grad_basis, index, ctx.bases)
            grad_basis = grad_basis.repeat_interleave(rank, dim=-2)
        if grad_up is not None:
            grad_up = grad_up[..., :width]
            if index is not None:
                grad_up = _scattered(grad_up.mT, index, ctx.bases).mT
        if need_h:
            grad_weighed, grad_constant = grad_weighed.split([width, grad_weighed.shape[dim] - width], dim)
        if need_omega:  # per basis: summed over its r channels and every position (and its bias channel's)
            per_basis = grad_weighed.unflatten(dim, (-1, rank)) * h.unflatten(dim, (-1, rank))
            grad_omega = _per_sample(per_basis, dim)
            if grad_constant.shape[dim]:  # the bias channels
                grad_omega = grad_omega + _per_sample(grad_constant, dim)
        if need_x or need_down:
            grad_h = weigh(grad_weighed, omega, rank, dim)
            if need_down:
                grad_down = _grads(grad_h, x, down, (False, True, False), dim)[1]
                if index is not None:
                    grad_down = _scattered(grad_down, index, ctx.bases)
            if need_x:
                _accumulate(grad_x, down.mT, grad_h, dim)  # += A^T grad_h
        return grad_x, grad_weight, grad_bias, grad_down, grad_up, grad_omega, grad_basis, None, None, None


def _plain_vjp(ctx, grad: torch.Tensor, index: torch.Tensor | None) -> list[torch.Tensor | None]:
    """The gradients of the plain expression, through autograd with a graph: the function's own backward uses
    activations saved without one, so gradients of its gradients (a gradient penalty, a Hessian-vector
    product) would miss their dependence on the inputs. Recomputes the forward, only when asked."""
    inputs = list(ctx.saved_tensors[:7])
    needed = [t for t, need in zip(inputs, ctx.needs_input_grad, strict=False) if need]
    x, weight, bias, down, up, omega, basis_bias = inputs
    rank, dim = ctx.rank, ctx.dim
    if index is not None:
        down, up, basis_bias = gather_adapters(down, up, basis_bias, index, rank)
    out = project(x, weight, bias, dim) + project(weigh(project(x, down, dim=dim), omega, rank, dim), up, dim=dim)
    if basis_bias is not None:
        term = (omega.unsqueeze(-2) @ summed_rows(basis_bias, rank)).squeeze(-2)  # (N, C_out)
        out = out + _along(term, dim, x.dim())
    grads = iter(torch.autograd.grad(out, needed, grad, create_graph=True))
    return [next(grads) if need else None for need in ctx.needs_input_grad[:7]]


def gather_adapters(
    down: torch.Tensor, up: torch.Tensor, basis_bias: torch.Tensor | None, index: torch.Tensor, rank: int
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Each sample's adapters among the stacked A (r*M, C_in), B (C_out, r*M) and P (r*M, C_out): those of its
    bases index[n] (N, k), as (N, r*k, C_in), (N, C_out, r*k) (a strided view) and (N, r*k, C_out). One row
    lookup each over the bases (r rows of A and P, r columns of B per basis); differentiable (its gradient
    is one scatter-add)."""
    batch, flat = index.shape[0], index.reshape(-1)

    def rows(stacked: torch.Tensor) -> torch.Tensor:  # (r*M, C), r rows per basis -> (N, r*k, C)
        return stacked.view(-1, rank * stacked.shape[1]).index_select(0, flat).view(batch, -1, stacked.shape[1])

    columns = up.view(up.shape[0], -1, rank).index_select(1, flat)  # (C_out, N*k, r)
    up = columns.view(up.shape[0], batch, -1).transpose(0, 1)
    return rows(down), up, None if basis_bias is None else rows(basis_bias)


def _scattered(per_sample: torch.Tensor, index: torch.Tensor, bases: int) -> torch.Tensor:
    """The gradient of the rows `gather_adapters` took: each sample's rows (N, k*s, C) (s per basis) summed into
    their bases' rows (bases*s, C), in one scatter-add (the gradient of a lookup, deterministic on a GPU)."""
    rows = per_sample.reshape(*index.shape, -1)  # (N, k, s*C)
    summed = torch.ops.aten.embedding_dense_backward(rows, index, bases, -1, False)  # (M, s*C)
    return summed.view(-1, per_sample.shape[-1])


def weigh(
    h: torch.Tensor, omega: torch.Tensor, rank: int, dim: int = 1, out: torch.Tensor | None = None
) -> torch.Tensor:
    """h's r*M channels at `dim` (basis-major, r per basis) times their basis's per-sample omega (N, M), through
    a view that splits the channels into (M, r), so omega is never repeated; into `out` if given."""
    dim %= h.dim()
    split = h.unflatten(dim, (-1, rank))  # (..., M, r, ...)
    omega = _along(omega, dim, split.dim())
    if out is None:
        return (split * omega).flatten(dim, dim + 1)
    torch.mul(split, omega, out=out.unflatten(dim, (-1, rank)))
    return out


def summed_rows(basis_bias: torch.Tensor, rank: int) -> torch.Tensor:
    """Per-basis biases (..., r*M, C_out), r rows per basis, with each basis's rows summed: (..., M, C_out)."""
    return basis_bias.unflatten(-2, (-1, rank)).sum(-2)


def project(x: torch.Tensor, matrix: torch.Tensor, bias: torch.Tensor | None = None, dim: int = 1) -> torch.Tensor:
    """A (C_out, C_in) matrix, or one per sample (N, C_out, C_in), applied along x's channel dimension: the last
    (a linear layer) or dim 1 of (N, C_in, *spatial) (a 1x1 convolution)."""
    if matrix.dim() == 3:
        return _project_each(x, matrix, dim % x.dim())
    if dim == x.dim() - 1 or dim == -1:
        return F.linear(x, matrix, bias)
    conv = F.conv1d if x.dim() == 3 else F.conv2d
    return conv(x, _kernel(matrix, x.dim() - 2), bias)


def _project_each(x: torch.Tensor, matrices: torch.Tensor, dim: int) -> torch.Tensor:
    """Each sample's own (C_out, C_in) matrix applied along its channel dimension `dim`: one batched product,
    channels first where x has them so in memory, else over rows of channels."""
    batch, width = x.shape[0], matrices.shape[1]
    if dim == 1 and _rows(x, dim) is None:  # (N, C_out, C_in) @ (N, C_in, P)
        return torch.bmm(matrices, x.reshape(batch, x.shape[1], -1)).view(batch, width, *x.shape[2:])
    last = x.movedim(dim, -1)
    out = torch.bmm(last.reshape(batch, -1, last.shape[-1]), matrices.mT)  # (N, P, C_in) @ (N, C_in, C_out)
    return out.view(*last.shape[:-1], width).movedim(-1, dim)


def _along(omega: torch.Tensor, dim: int, dims: int) -> torch.Tensor:
    """omega (N, M) shaped to broadcast against a `dims`-dimensional tensor with its M at `dim`."""
    shape = [1] * dims
    shape[0], shape[dim] = omega.shape
    return omega.reshape(shape)


def _per_sample(t: torch.Tensor, dim: int) -> torch.Tensor:
    """t summed over every dimension but the sample's (0) and `dim`: (N, t.shape[dim])."""
    summed = [d for d in range(1, t.dim()) if d != dim]
    return t.sum(summed) if summed else t  # (an empty list would sum every dimension)


def _kernel(matrix: torch.Tensor, spatial: int) -> torch.Tensor:
    """A (C_out, C_in) matrix as the kernel of a 1x1 convolution over `spatial` dimensions."""
    return matrix.reshape(*matrix.shape, *([1] * spatial))


_convolution_backward = torch.ops.aten.convolution_backward.default
_ONES, _ZEROS = {1: [1], 2: [1, 1]}, {1: [0], 2: [0, 0]}  # a 1x1 convolution's stride and padding


def _grads(grad, inputs, matrix, mask, dim, bias_shape=None):
    """The projection's gradients (input, weight as a matrix, bias), each None where `mask` says so."""
    if matrix.dim() == 3:
        return _grads_each(grad, inputs, matrix, mask, dim)
    if dim == inputs.dim() - 1:  # a linear layer: products over the rows
        rows, grad_rows = inputs.reshape(-1, inputs.shape[-1]), grad.reshape(-1, grad.shape[-1])
        grad_input = (grad_rows @ matrix).view(inputs.shape) if mask[0] else None
        return grad_input, grad_rows.mT @ rows if mask[1] else None, grad_rows.sum(0) if mask[2] else None
    spatial = inputs.dim() - 2
    ones, zeros = _ONES[spatial], _ZEROS[spatial]
    grad_input, grad_kernel, grad_bias = _convolution_backward(
        grad, inputs, _kernel(matrix, spatial), bias_shape, ones, zeros, ones, False, zeros, 1, mask
    )
    return grad_input, None if grad_kernel is None else grad_kernel.view(matrix.shape), grad_bias


def _grads_each(grad, inputs, matrices, mask, dim):
    """`_grads` of per-sample matrices (N, C_out, K), without a bias: the input's and each sample's matrix's."""
    batch = grad.shape[0]
    if dim == 1 and _rows(inputs, dim) is None:  # channels first: (N, C, P)
        grad_flat, flat = grad.reshape(batch, grad.shape[1], -1), inputs.reshape(batch, inputs.shape[1], -1)
        grad_input = torch.bmm(matrices.mT, grad_flat).view(inputs.shape) if mask[0] else None
        return grad_input, torch.bmm(grad_flat, flat.mT) if mask[1] else None, None
    last, grad_last = inputs.movedim(dim, -1), grad.movedim(dim, -1)  # rows: (N, P, C)
    grad_rows, rows = grad_last.reshape(batch, -1, grad_last.shape[-1]), last.reshape(batch, -1, last.shape[-1])
    grad_input = torch.bmm(grad_rows, matrices).view(last.shape).movedim(-1, dim) if mask[0] else None
    return grad_input, torch.bmm(grad_rows.mT, rows) if mask[1] else None, None


def _accumulate(out: torch.Tensor, matrix: torch.Tensor, h: torch.Tensor, dim: int) -> None:
    """out += matrix (C_out, K), or each sample's (N, C_out, K), applied along `dim` of h (N, K, ...), in place:
    one matrix product with beta 1 over the positions where both have their channels last in memory (a linear
    layer's; EDM's activations after its first attention), one batched product where both are channels-first,
    a projection and a sum otherwise."""
    rows_out, rows_h = _rows(out, dim), _rows(h, dim)
    batch = out.shape[0]
    if rows_out is not None and rows_h is not None:
        if matrix.dim() == 3:
            rows_out.baddbmm_(rows_h, matrix.mT)
        else:
            rows_out.flatten(0, 1).addmm_(rows_h.flatten(0, 1), matrix.mT)
    elif out.is_contiguous() and h.is_contiguous():
        matrices = matrix if matrix.dim() == 3 else matrix.expand(batch, *matrix.shape)
        out.view(batch, out.shape[1], -1).baddbmm_(matrices, h.view(batch, h.shape[1], -1))
    else:
        out.add_(project(h, matrix, dim=dim))


def _rows(t: torch.Tensor, dim: int) -> torch.Tensor | None:
    """t as the (N, positions, channels) tensor it is in memory when its channel dimension `dim` is innermost;
    None if it is not."""
    last = t.movedim(dim, -1)
    return last.view(last.shape[0], -1, last.shape[-1]) if last.is_contiguous() else None


def _empty_with_channels(h: torch.Tensor, channels: int, dim: int) -> torch.Tensor:
    """An uninitialised tensor of h's shape with `channels` at `dim`, its channels innermost where h's are."""
    last = h.movedim(dim, -1)
    if last.is_contiguous():
        return h.new_empty(*last.shape[:-1], channels).movedim(-1, dim)
    return h.new_empty(*h.shape[:dim], channels, *h.shape[dim + 1 :])
