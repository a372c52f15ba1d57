"""Timing helper shared by the benchmark scripts: medians over interleaved repeats."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable

import torch


def synchronize(device: torch.device) -> None:
    """Wait for the device to finish (the only host synchronisation, outside the timed code)."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_pair(fn_a: Callable[[], object], fn_b: Callable[[], object], repeats: int, device: torch.device):
    """Median seconds of `fn_a` and `fn_b`, run alternately so slow drifts of the machine hit both alike, and
    each first in every other pair: on a CPU the call after a switch can pay for what the other one left
    (freed memory, caches), 3-4% of a full-width IDDPM training step on 2 cores. An odd number of repeats is
    rounded up, so that each runs first equally often (else the median favours the one that ran first less)."""
    for fn in (fn_a, fn_b):  # warm-up
        fn()
        fn()
    a, b = [], []
    for i in range(repeats + repeats % 2):
        pairs = ((fn_a, a), (fn_b, b))
        for fn, out in pairs if i % 2 == 0 else pairs[::-1]:
            synchronize(device)
            start = time.perf_counter()
            fn()
            synchronize(device)
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def describe(device: torch.device) -> str:
    """torch version and the device, for the first line of a report."""
    where = torch.cuda.get_device_name(device) if device.type == "cuda" else f"CPU, {torch.get_num_threads()} threads"
    return f"torch {torch.__version__}, {where}"
