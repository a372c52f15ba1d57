"""torch.distributed set-up from the environment `torchrun` provides (gloo on CPU, nccl on GPU)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist


@dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job: rank, world size and its device."""

    rank: int
    world_size: int
    device: torch.device

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def mean(self, value: torch.Tensor) -> torch.Tensor:
        """Mean of `value` over all processes (a no-op in a single process)."""
        if self.world_size == 1:
            return value
        value = value.clone()
        dist.all_reduce(value, op=dist.ReduceOp.SUM)
        return value / self.world_size

    def broadcast(self, obj: object) -> object:
        """Rank 0's value of a picklable Python object, on every rank."""
        if self.world_size == 1:
            return obj
        box = [obj]
        dist.broadcast_object_list(box, src=0)
        return box[0]

    def gather_all(self, obj: object) -> list[object]:
        """Every rank's value of a picklable Python object, in rank order, on every rank."""
        if self.world_size == 1:
            return [obj]
        out: list[object] = [None] * self.world_size
        dist.all_gather_object(out, obj)
        return out

    def barrier(self) -> None:
        if self.world_size > 1:
            dist.barrier()


def resolve_device(device: str, option: str = "device") -> torch.device:
    """The torch device for "auto" (cuda when available), "cpu", "cuda" or "cuda:N".

    Raises ValueError naming `option` when CUDA is asked for on a machine without it, or an index is out of range.
    """
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise ValueError(f"{option}: expected auto, cpu, cuda or cuda:N, got {device!r}") from None
    if dev.type not in ("cpu", "cuda"):
        raise ValueError(f"{option}: expected auto, cpu, cuda or cuda:N, got {device!r}")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            build = "a CPU-only build" if torch.version.cuda is None else f"built for CUDA {torch.version.cuda}"
            raise ValueError(
                f"{option} is {device!r} but no CUDA device is available (torch {torch.__version__} is {build}); "
                "use cpu"
            )
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise ValueError(f"{option} is {device!r} but only {torch.cuda.device_count()} CUDA device(s) are visible")
    return dev


def init_distributed(device: str = "auto") -> DistContext:
    """Join the process group when launched by torchrun (WORLD_SIZE > 1); otherwise a single process.

    Args:
        device: "auto" (cuda when available), "cpu" or "cuda". Under torchrun each process of a node takes
            the GPU of its local rank; more processes than GPUs is an error (ask for the CPU instead).
    """
    world_size = int(os.environ.get("WORLD_SIZE", "1"))
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    dev = resolve_device(device, "train.device")
    if dev.type == "cuda":
        visible = torch.cuda.device_count()
        if local_rank >= visible:
            raise ValueError(
                f"process with local rank {local_rank} has no GPU: this node has {visible} visible CUDA device(s); "
                f"start at most {visible} processes per node (torchrun --nproc_per_node={visible}) "
                "or train on the CPU with --train.device cpu"
            )
        dev = torch.device("cuda", local_rank)
    if world_size > 1 and not dist.is_initialized():
        if dev.type == "cuda":
            torch.cuda.set_device(dev)
        dist.init_process_group(backend="nccl" if dev.type == "cuda" else "gloo")
    return DistContext(rank=rank, world_size=world_size, device=dev)


def shutdown_distributed() -> None:
    """Leave the process group if one was joined."""
    if dist.is_initialized():
        dist.destroy_process_group()
