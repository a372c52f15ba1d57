"""Sampling throughput (images per second) of each sampler on this machine, with freshly built networks
(speed does not depend on the weights).

    python benchmarks/sampling_throughput.py [--device cpu|cuda] [--batch 100] [--paper]

Default rows are the CPU-sized presets at their own sampler settings: the main job's 100-step ancestral
DDPM, DDIM with 50 steps, EDM's Heun with 18 steps (35 evaluations) and IDDPM's respaced sampler with the
learned variance. `--paper` adds the CIFAR-10 presets (UC-LoRA EDM, TimeLoRA + ClassLoRA IDDPM), meant for
a GPU at --batch 512. Classifier-free guidance is on where the preset uses it (two network evaluations).
"""

from __future__ import annotations

import argparse
import dataclasses
import time

import torch
from _timing import describe, synchronize

from condlora.diffusion import process_for
from condlora.diffusion.generate import generate
from condlora.nets import build_network
from condlora.presets import build_config

ROWS = [  # (preset, sampler, steps)
    ("mnist-nano", "ddpm", 100),
    ("mnist-nano", "ddim", 50),
    ("mnist-edm", "heun", 18),
    ("mnist-iddpm", "ddpm", 100),
]
PAPER_ROWS = [("edm-cifar10-cond-uc-lora", "heun", 18), ("iddpm-cifar10-cond-lora", "ddpm", 100)]


def images_per_second(preset: str, sampler: str, steps: int, batch: int, device: torch.device) -> float:
    cfg = build_config(preset)
    torch.manual_seed(0)
    net = build_network(cfg).to(device).eval()
    sample = dataclasses.replace(cfg.sample, sampler=sampler, steps=steps, count=batch, batch_size=batch)
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    process = process_for(cfg)
    warm = dataclasses.replace(sample, steps=2 if sampler == "heun" else 1, count=min(batch, 4))
    generate(net, process, warm, shape, cfg.model.num_classes, device, progress=False)
    synchronize(device)
    start = time.perf_counter()
    generate(net, process, sample, shape, cfg.model.num_classes, device, progress=False)
    synchronize(device)
    return batch / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, default=100, help="images per sampling call")
    parser.add_argument("--paper", action="store_true", help="add the CIFAR-10 presets")
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"{describe(device)}, batch {args.batch}")
    for preset, sampler, steps in ROWS + (PAPER_ROWS if args.paper else []):
        rate = images_per_second(preset, sampler, steps, args.batch, device)
        print(f"{preset:<26} {sampler:<5} {steps:4d} steps  {rate:10.1f} images/s")


if __name__ == "__main__":
    main()
