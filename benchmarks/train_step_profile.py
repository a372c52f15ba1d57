"""Where a training step of a preset spends its time: steps/s of the loop's parts and a profile of the step.

    python benchmarks/train_step_profile.py [--preset mnist-nano] [--device cpu|cuda] [--compile MODE]
                                            [--batch N] [--steps 50] [--top 15] [--convs]

Builds the preset's network, process, optimizer (fused AdamW on a GPU, as `condlora train`) and EMA, and
feeds random images of the preset's shape (no dataset needed). It times, in one run:
1. the training step alone (`condlora.train.loop.train_step`: loss, backward, gradient clipping, AdamW);
2. the step followed by the EMA update, as the training loop runs it;
then profiles `--steps` steps of (2) with torch.profiler and prints the operators that take the most host
time and, on a GPU, the most device time. On a GPU, host time per step well above device time per step
means the step is bound by launching kernels (the remedy is `--compile reduce-overhead`: CUDA graphs).
`--convs` adds the convolutions' share: every distinct convolution of the network (its weight and input
shape), timed alone forward and backward, with its arithmetic throughput in GFLOP/s and its time per step;
on the CPU a step whose convolutions run near the cores' peak is bound by the network's arithmetic, and
only fewer images (or a smaller network) make it faster.
"""

from __future__ import annotations

import argparse
import time

import torch
from _timing import describe, synchronize

from condlora.diffusion import process_for
from condlora.nets import build_network
from condlora.presets import build_config
from condlora.train.distributed import DistContext
from condlora.train.ema import EMA
from condlora.train.loop import checks_on_host, train_step

_CONV_TIMING_CALLS = 10


def _steps_per_sec(fn, steps: int, device: torch.device) -> float:
    """Calls of `fn` per second over `steps` calls, after three to warm up."""
    for _ in range(3):  # warm-up (and compilation)
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return steps / (time.perf_counter() - start)


def conv_table(net: torch.nn.Module, step, device: torch.device, channels_last: bool) -> float:
    """Print every distinct convolution of `net` (as one call of `step` runs it) timed alone, forward and
    backward; returns the seconds per step they add up to."""
    calls: dict[tuple, int] = {}

    def record(module, inputs, _output):
        key = (module.in_channels, module.out_channels, module.kernel_size, module.stride, module.padding)
        key += (inputs[0].requires_grad, tuple(inputs[0].shape))  # the first one needs no input gradient
        calls[key] = calls.get(key, 0) + 1

    hooks = [m.register_forward_hook(record) for m in net.modules() if isinstance(m, torch.nn.Conv2d)]
    step()
    for hook in hooks:
        hook.remove()
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    total = 0.0
    print(f"{'convolution':<44} {'calls':>5} {'ms fwd+bwd':>10} {'GFLOP/s':>8} {'ms/step':>8}")
    for (c_in, c_out, kernel, stride, padding, needs_grad, shape), count in sorted(
        calls.items(), key=lambda kv: kv[0][-1][-1]
    ):
        conv = torch.nn.Conv2d(c_in, c_out, kernel, stride, padding).to(device, memory_format=fmt)
        x = torch.randn(shape, device=device).contiguous(memory_format=fmt).requires_grad_(needs_grad)
        out = conv(x)
        grad = torch.ones_like(out)

        def fwd_bwd(conv=conv, x=x, grad=grad):
            conv(x).backward(grad)

        seconds = 1 / _steps_per_sec(fwd_bwd, _CONV_TIMING_CALLS, device)
        flops = (2 + needs_grad) * 2 * out.numel() * c_in * kernel[0] * kernel[1]  # forward, weight and input grads
        total += count * seconds
        name = f"{c_in}->{c_out} k{kernel[0]} s{stride[0]} on {shape[-2]}x{shape[-1]} (batch {shape[0]})"
        gflops, per_step = flops / seconds / 1e9, count * seconds * 1e3
        print(f"{name:<44} {count:>5} {seconds * 1e3:>10.2f} {gflops:>8.1f} {per_step:>8.1f}")
    return total


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-nano")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--compile", default="", help="torch.compile mode for the network (default: eager)")
    parser.add_argument("--batch", type=int, default=0, help="batch size (default: the preset's)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--top", type=int, default=15)
    parser.add_argument("--convs", action="store_true", help="also time every convolution alone (its GFLOP/s)")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = build_config(args.preset, {"train": {"batch_size": args.batch}} if args.batch else None)
    fmt = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    dist = DistContext(rank=0, world_size=1, device=device)
    torch.manual_seed(0)
    net = build_network(cfg).to(device, memory_format=fmt)  # as the training loop lays it out
    model = torch.compile(net, mode=args.compile) if args.compile else net
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, fused=not checks_on_host(device) or None)
    ema = EMA(net, cfg.train.ema_decay)
    process, m, batch = process_for(cfg).to(device), cfg.model, cfg.train.batch_size
    x0 = (torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=device) * 2 - 1).contiguous(
        memory_format=fmt
    )
    labels = torch.arange(batch, device=device) % m.num_classes if m.num_classes else None
    generator = torch.Generator(device).manual_seed(0)
    count = [0]

    def step():
        train_step(model, opt, process, x0, labels, generator, cfg, dist)

    def step_and_ema():
        step()
        ema.update(net, count[0])
        count[0] += 1

    mode = f"compile {args.compile}" if args.compile else "eager"
    layout = ", channels-last" if cfg.train.channels_last else ""
    print(f"{describe(device)}, {args.preset}, batch {batch}, {mode}{layout}")
    step_rate = _steps_per_sec(step, args.steps, device)
    print(f"steps/s  training step                {step_rate:8.1f}")
    print(f"steps/s  training step + EMA update   {_steps_per_sec(step_and_ema, args.steps, device):8.1f}")
    activities = [torch.profiler.ProfilerActivity.CPU]
    if device.type == "cuda":
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        for _ in range(args.steps):
            step_and_ema()
        synchronize(device)
    events = prof.key_averages()
    host = sum(e.self_cpu_time_total for e in events) / args.steps / 1e3
    print(f"per step: host {host:.2f} ms in operators", end="")
    if device.type == "cuda":
        gpu = sum(e.self_device_time_total for e in events) / args.steps / 1e3
        print(f", device {gpu:.2f} ms in kernels", end="")
    print(f", {sum(e.count for e in events) / args.steps:.0f} operator calls")
    print(events.table(sort_by="self_cpu_time_total", row_limit=args.top, max_name_column_width=60))
    if device.type == "cuda":
        print(events.table(sort_by="self_cuda_time_total", row_limit=args.top, max_name_column_width=60))
    if args.convs:
        conv_seconds = conv_table(net, step, device, cfg.train.channels_last)
        print(f"convolutions alone: {conv_seconds * 1e3:.1f} ms of a {1e3 / step_rate:.1f} ms training step")


if __name__ == "__main__":
    main()
