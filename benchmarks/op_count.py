"""Operations that LoRA conditioning adds to a network: the device-independent side of its overhead.

    python benchmarks/op_count.py [--family nano edm iddpm] [--batch 2]

On a GPU, an eager step of a network that is small for its batch is bound by launching kernels: every
ATen operation costs host time, whatever arithmetic it does. This script counts the operations (each
non-view ATen call, through a TorchDispatchMode; nothing is timed) of each family's baseline and LoRA preset
(nano: mnist-nano-baseline / mnist-nano; edm: EDM DDPM++ CIFAR-10 / UC-LoRA m 18 r 4; iddpm: IDDPM CIFAR-10
class-conditional / TimeLoRA + ClassLoRA) in a training step's forward (the family's loss) and backward and
in one sampling call at a shared condition (every LoRA layer on its merged path; after a first call inside
`keep_stacks`, as in a sampler, so the stacks of parameters kept over its calls are not counted), and prints
the operations added per LoRA layer; and the training step again under bf16 autocast (with the CPU's
autocast lists, which cast as a GPU's do for these networks: every weight of a matrix product or
convolution, per call). Counts are taken on the CPU; a GPU runs the same operations. They do not depend on
the batch size.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable

import torch

from condlora.conditions import Conditions
from condlora.diffusion import process_for
from condlora.lora import conditioned_layers, keep_stacks
from condlora.nets import build_network
from condlora.ops import CountOps
from condlora.presets import build_config

FAMILIES = {  # baseline preset, LoRA preset, overrides, image shape, a noise level of the family's network
    "nano": ("mnist-nano-baseline", "mnist-nano", {}, (1, 28, 28), 500),
    "edm": ("edm-cifar10-uncond", "edm-cifar10-uncond-uc-lora", {"edm": {"augment": 0.0}}, (3, 32, 32), 2.5),
    "iddpm": ("iddpm-cifar10-cond", "iddpm-cifar10-cond-lora", {}, (3, 32, 32), 1000),
}


def _count(fn: Callable[[], object]) -> tuple[int, object]:
    with CountOps() as counter:
        out = fn()
    return counter.count, out


def count(preset: str, overrides: dict, shape: tuple[int, ...], level: float, batch: int) -> tuple[list[int], int]:
    """([forward, backward, sampling call, bf16 autocast forward, its backward] operation counts, number of
    LoRA layers) of one preset."""
    torch.manual_seed(0)
    cfg = build_config(preset, overrides)
    net, process = build_network(cfg), process_for(cfg)
    x = torch.randn(batch, *shape)
    labels = torch.arange(batch) % cfg.model.num_classes if cfg.model.num_classes else None
    generator = torch.Generator().manual_seed(0)

    def loss() -> torch.Tensor:
        return process.loss(net, x, Conditions(labels=labels), generator)["loss"].mean()

    def loss_bf16() -> torch.Tensor:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            return loss()

    counts = []
    for step_loss in (loss, loss_bf16):
        step_loss().backward()  # warm-up: lazy initialisations are not counted
        net.zero_grad(set_to_none=True)  # as a training step does: gradients are stored, not accumulated
        forward, value = _count(step_loss)
        backward, _ = _count(value.backward)
        counts += [forward, backward]
    net.eval()
    shared = Conditions(labels=None if labels is None else torch.full_like(labels, 3), shared=True)
    steps = torch.full((batch,), level)  # int64 steps for DDPM / IDDPM, float sigma for EDM
    with torch.no_grad(), keep_stacks(net):  # as a sampler: the stacks of parameters are made on its first call
        process.predict(net, x, steps, shared)
        sampling, _ = _count(lambda: process.predict(net, x, steps, shared))
    return [*counts[:2], sampling, *counts[2:]], len(list(conditioned_layers(net)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=2)
    args = parser.parse_args()
    print(f"torch {torch.__version__}, operation counts (device-independent), batch {args.batch}")
    for family in args.family:
        base_preset, lora_preset, overrides, shape, level = FAMILIES[family]
        base, _ = count(base_preset, overrides, shape, level, args.batch)
        lora, layers = count(lora_preset, overrides, shape, level, args.batch)
        print(f"{family}: {lora_preset} ({layers} LoRA layers) / {base_preset}")
        rows = ("training forward", "training backward", "sampling call", "bf16 forward", "bf16 backward")
        for what, b, n in zip(rows, base, lora, strict=True):
            print(f"  {what:<18} baseline {b:5d}   LoRA {n:5d}   +{n - b:4d} ({(n - b) / layers:.1f} per LoRA layer)")
        step, step_bf16 = ((lora[i] + lora[i + 1]) / (base[i] + base[i + 1]) for i in (0, 3))
        print(f"ratio {family} operations per training step  LoRA / baseline  {step:.3f}")
        print(f"ratio {family} operations per sampling call  LoRA / baseline  {lora[2] / base[2]:.3f}")
        print(f"ratio {family} operations per bf16 autocast training step  LoRA / baseline  {step_bf16:.3f}")


if __name__ == "__main__":
    main()
