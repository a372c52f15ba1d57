"""The operation and memory-traffic tally that the benchmarks and the operation-count tests rely on."""

import torch

from condlora.ops import CountOps


def test_each_operation_reads_its_inputs_and_writes_its_output_once():
    a, b = torch.randn(1000), torch.randn(1, 1000)
    with CountOps() as ops:
        a + b.expand(7, 1000)  # the broadcast row is read once: 1,000 + 1,000 read, 7,000 written
    assert (ops.count, ops.bytes) == (1, 4 * (1000 + 1000 + 7000))

    m, n = torch.randn(3, 4, dtype=torch.bfloat16), torch.randn(4, 5, dtype=torch.bfloat16)
    with CountOps() as ops:
        m @ n
    assert (ops.count, ops.bytes) == (1, 2 * (12 + 20 + 15))


def test_views_are_free_and_allocations_write_nothing():
    x = torch.randn(6, 8)
    with CountOps() as ops:
        x.view(8, 6).t()[1:3]
        torch.empty(100)
    assert (ops.count, ops.bytes) == (1, 0)
    with CountOps() as ops:
        x.t().contiguous()  # a copy: reads 48 elements, writes 48
    assert (ops.count, ops.bytes) == (1, 4 * 96)


def test_a_tensor_only_written_to_is_not_read():
    a, b, dest = torch.randn(100), torch.randn(100), torch.empty(100)
    with CountOps() as ops:
        torch.mul(a, b, out=dest)  # reads a and b, writes dest
        dest.copy_(a)  # reads a, writes dest
        dest.zero_()  # writes dest
        dest.add_(b)  # reads dest and b, writes dest
    assert (ops.count, ops.bytes) == (4, 4 * (300 + 200 + 100 + 300))
