"""Operations that LoRA conditioning adds to a network: the device-independent side of its overhead.

    python benchmarks/op_count.py [--family nano edm iddpm] [--batch 2] [--at-batch 128]

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

Where a GPU step is bound by memory bandwidth or arithmetic instead (an eager step at batch 128), what counts
is the bytes each phase moves in a first-order model of unfused kernels (`CountOps.bytes`) and its
floating-point operations (`torch.utils.flop_counter`): both are counted at `--batch` and twice it and
extrapolated to `--at-batch` (128), since both are affine in the batch size.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable
from typing import NamedTuple

import torch
from torch.utils import flop_counter
from torch.utils.flop_counter import FlopCounterMode

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


PHASES = ("training forward", "training backward", "sampling call", "bf16 forward", "bf16 backward")
STEPS = {"training step": (0, 1), "sampling call": (2,), "bf16 autocast training step": (3, 4)}  # their PHASES


class Tally(NamedTuple):
    """What one phase does: ATen operations, bytes moved (`CountOps.bytes`), floating-point operations."""

    ops: int
    bytes: int
    flops: int


def _counted_as(packet: torch._ops.OpOverloadPacket) -> Callable[..., int]:
    """The FLOP counter's formula for `packet`, for another operation (it takes the call's values)."""
    formula = flop_counter.flop_registry[packet]

    def count(*args, **kwargs) -> int:
        return formula(*args, **kwargs)

    count._get_raw = True  # the formula reads the shapes from the call's values itself
    return count


aten = torch.ops.aten  # the in-place products the fused LoRA projection accumulates with, as their out-of-place forms
IN_PLACE_FLOPS = {aten.addmm_: _counted_as(aten.addmm), aten.baddbmm_: _counted_as(aten.baddbmm)}


def _tally(fn: Callable[[], object]) -> tuple[Tally, object]:
    with FlopCounterMode(display=False, custom_mapping=IN_PLACE_FLOPS) as flops, CountOps() as counter:
        out = fn()
    return Tally(counter.count, counter.bytes, flops.get_total_flops()), out


def count(preset: str, overrides: dict, shape: tuple[int, ...], level: float, batch: int) -> tuple[list[Tally], int]:
    """(a Tally for each of PHASES, number of LoRA layers) of one preset at one batch size."""
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

    tallies = []
    for step_loss in (loss, loss_bf16):
        step_loss().backward()  # warm-up: lazy initialisations are not counted
        net.zero_grad(set_to_none=True)  # as a training step does: gradients are stored, not accumulated
        forward, value = _tally(step_loss)
        backward, _ = _tally(value.backward)
        tallies += [forward, backward]
    net.eval()
    shared = Conditions(labels=None if labels is None else torch.full_like(labels, 3), shared=True)
    steps = torch.full((batch,), level)  # int64 steps for DDPM / IDDPM, float sigma for EDM
    with torch.no_grad(), keep_stacks(net):  # as a sampler: the stacks of parameters are made on its first call
        process.predict(net, x, steps, shared)
        sampling, _ = _tally(lambda: process.predict(net, x, steps, shared))
    return [*tallies[:2], sampling, *tallies[2:]], len(list(conditioned_layers(net)))


def at_batch(small: Tally, large: Tally, batch: int, target: int) -> Tally:
    """Bytes and FLOPs at `target` samples from those at `batch` and 2 * `batch`: both are affine in the batch
    size (a fixed part for the weights, a part per sample for the activations)."""
    per_sample = [(b - a) / batch for a, b in zip(small, large, strict=True)]
    return Tally(small.ops, *(round(a + (target - batch) * p) for a, p in zip(small[1:], per_sample[1:], strict=True)))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", nargs="+", default=list(FAMILIES), choices=list(FAMILIES))
    parser.add_argument("--batch", type=int, default=2, help="counted at this batch size and twice it")
    parser.add_argument("--at-batch", type=int, default=128, help="bytes and FLOPs extrapolated to this batch size")
    args = parser.parse_args()
    print(f"torch {torch.__version__}, operation counts (device-independent), batch {args.batch}; bytes and FLOPs")
    print(f"at batch {args.at_batch}, from batches {args.batch} and {2 * args.batch}")
    for family in args.family:
        base_preset, lora_preset, overrides, shape, level = FAMILIES[family]
        tallies = []
        for preset in (base_preset, lora_preset):
            small, layers = count(preset, overrides, shape, level, args.batch)
            large, _ = count(preset, overrides, shape, level, 2 * args.batch)
            tallies.append([at_batch(a, b, args.batch, args.at_batch) for a, b in zip(small, large, strict=True)])
        base, lora = tallies
        print(f"{family}: {lora_preset} ({layers} LoRA layers) / {base_preset}")
        for what, b, n in zip(PHASES, base, lora, strict=True):
            added = n.ops - b.ops
            print(
                f"  {what:<18} ops baseline {b.ops:5d}   LoRA {n.ops:5d}   +{added:4d}"
                f" ({added / layers:.1f} per LoRA layer)   GB {b.bytes / 1e9:7.2f} / {n.bytes / 1e9:7.2f}"
                f"   GFLOP {b.flops / 1e9:7.1f} / {n.flops / 1e9:7.1f}"
            )
        for what, phases in STEPS.items():
            for field, unit in (("ops", "operations"), ("bytes", "bytes moved"), ("flops", "FLOPs")):
                ratio = sum(getattr(lora[i], field) for i in phases) / sum(getattr(base[i], field) for i in phases)
                print(f"ratio {family} {unit} per {what}  LoRA / baseline  {ratio:.3f}")


if __name__ == "__main__":
    main()
