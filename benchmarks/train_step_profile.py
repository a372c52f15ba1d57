"""Where a training step of a preset spends its time: steps/s of the loop's parts and a profile of the step.

    python benchmarks/train_step_profile.py [--preset mnist-nano] [--device cpu|cuda] [--compile MODE]
                                            [--steps 50] [--top 15]

Builds the preset's network, process, optimizer (fused AdamW on a GPU, as `condlora train`) and EMA, and
feeds random images of the preset's shape (no dataset needed). It times, in one run:
1. the training step alone (`condlora.train.loop.train_step`: loss, backward, gradient clipping, AdamW);
2. the step followed by the EMA update, as the training loop runs it;
then profiles `--steps` steps of (2) with torch.profiler and prints the operators that take the most host
time and, on a GPU, the most device time. On a GPU, host time per step well above device time per step
means the step is bound by launching kernels (the remedy is `--compile reduce-overhead`: CUDA graphs).
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


def _steps_per_sec(fn, steps: int, device: torch.device) -> float:
    for _ in range(3):  # warm-up (and compilation)
        fn()
    synchronize(device)
    start = time.perf_counter()
    for _ in range(steps):
        fn()
    synchronize(device)
    return steps / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-nano")
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--compile", default="", help="torch.compile mode for the network (default: eager)")
    parser.add_argument("--steps", type=int, default=50)
    parser.add_argument("--top", type=int, default=15)
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = build_config(args.preset)
    dist = DistContext(rank=0, world_size=1, device=device)
    torch.manual_seed(0)
    net = build_network(cfg).to(device)
    model = torch.compile(net, mode=args.compile) if args.compile else net
    opt = torch.optim.AdamW(net.parameters(), lr=cfg.train.lr, fused=not checks_on_host(device) or None)
    ema = EMA(net, cfg.train.ema_decay)
    process, m, batch = process_for(cfg), cfg.model, cfg.train.batch_size
    x0 = torch.rand(batch, m.in_channels, m.image_size, m.image_size, device=device) * 2 - 1
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
    print(f"{describe(device)}, {args.preset}, batch {batch}, {mode}")
    print(f"steps/s  training step                {_steps_per_sec(step, args.steps, device):8.1f}")
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


if __name__ == "__main__":
    main()
