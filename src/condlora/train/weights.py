"""Which weights train, where the frozen ones come from, and how a checkpoint rebuilds a network.

A run trains `train.trainable` (all parameters, the LoRA adapters and their strategies, or parameter-name
patterns); everything else is its frozen *base*. Checkpoints hold only what is not base. The base is
referenced, never copied into every checkpoint: by path and SHA-256 of its source (`train.init_from`: a
condlora checkpoint or a local diffusers folder), or, for a base the run initialised itself, in the run's
own `base.safetensors`, written once.
"""

from __future__ import annotations

import fnmatch
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from condlora.config import RunConfig
from condlora.lora import conditioned_layers
from condlora.train.checkpoint import STATE_FILE, Checkpoint, CheckpointError, resolve_checkpoint, sha256_of

BASE_FILE = "base.safetensors"


def lora_owned(net: nn.Module) -> set[str]:
    """State-dict keys that belong to LoRA layers themselves (adapters, strategies), not to their base layers."""
    return {
        f"{name}.{key}"
        for name, layer in conditioned_layers(net)
        for key in layer.state_dict()
        if not key.startswith("base_layer.")
    }


def apply_trainable(net: nn.Module, trainable: Sequence[str]) -> list[str]:
    """Set requires_grad per `trainable` and return the names of the parameters that train.

    Args:
        trainable: ("all",); ("lora",) for the LoRA adapters and their strategies; or fnmatch patterns
            of parameter names (e.g. "*.lora_*", "out_conv.*").
    """
    names = [name for name, _ in net.named_parameters()]
    if tuple(trainable) == ("all",):
        chosen = set(names)
    elif tuple(trainable) == ("lora",):
        chosen = lora_owned(net) & set(names)
        if not chosen:
            raise ValueError("train.trainable is lora but the network has no LoRA layers (set the lora section)")
    else:
        chosen = {n for n in names if any(fnmatch.fnmatchcase(n, p) for p in trainable)}
        if not chosen:
            raise ValueError(f"train.trainable {list(trainable)} matches no parameter; some names: {names[:6]}")
    for name, p in net.named_parameters():
        p.requires_grad_(name in chosen)
    return [n for n in names if n in chosen]


def base_keys(net: nn.Module) -> list[str]:
    """State-dict keys of the frozen base: neither a trainable parameter nor part of a LoRA layer's own state.
    Empty when every parameter trains (then checkpoints hold the whole network)."""
    trainable = {n for n, p in net.named_parameters() if p.requires_grad}
    if trainable == {n for n, _ in net.named_parameters()}:
        return []
    own = lora_owned(net)
    return [k for k in net.state_dict() if k not in trainable and k not in own]


def saved_state(net: nn.Module) -> dict[str, torch.Tensor]:
    """What a checkpoint holds of `net`: everything but the base."""
    skip = set(base_keys(net))
    return {k: v for k, v in net.state_dict().items() if k not in skip}


def load_saved_state(net: nn.Module, tensors: dict[str, torch.Tensor], where: str) -> None:
    """Load what `saved_state` wrote (the base must already be in place): every non-base key must be given."""
    missing, unexpected = net.load_state_dict(tensors, strict=False)
    lacking = sorted(set(missing) - set(base_keys(net)))
    if lacking or unexpected:
        raise CheckpointError(f"{where} does not fit this network: missing {lacking[:5]}, unexpected {unexpected[:5]}")


def adapt_to(net: nn.Module, source: dict[str, torch.Tensor], where: str) -> dict[str, torch.Tensor]:
    """`source` weights renamed to `net`'s keys: a plain layer's `w` fills a LoRA-wrapped `base_layer.w`.

    LoRA-owned keys of `net` may be missing (fresh adapters); any other missing key, a shape mismatch, or
    a source key with no place in `net` (e.g. LoRA weights the target lacks) is an error naming them.
    """
    target = net.state_dict()
    own = lora_owned(net)
    out, used = {}, set()
    for key, value in target.items():
        src = key if key in source else key.replace(".base_layer.", ".")
        if src not in source:
            continue
        if source[src].shape != value.shape:
            raise ValueError(f"{where}: {src} has shape {tuple(source[src].shape)}, the network {tuple(value.shape)}")
        out[key], _ = source[src], used.add(src)
    missing = [k for k in target if k not in out and k not in own]
    unused = [k for k in source if k not in used]
    if missing or unused:
        raise ValueError(f"{where} does not fit this network: missing {missing[:5]}, unexpected {unused[:5]}")
    return out


def _checked(path: Path, expected: str) -> Path:
    if not path.is_file():
        raise CheckpointError(f"the base weights {path} are missing")
    if sha256_of(path) != expected:
        raise CheckpointError(f"the base weights {path} changed since the run started (SHA-256 differs)")
    return path


def restore_network(ckpt: Checkpoint, use_ema: bool = True) -> tuple[nn.Module, RunConfig]:
    """The network a checkpoint describes, on the CPU in train mode: built from its config, its base put back
    from the reference it records (hash-checked), then its own tensors (the EMA ones with `use_ema`)."""
    from condlora.nets import build_network

    cfg = RunConfig.from_dict(ckpt.state["config"])
    net = build_network(cfg)
    apply_trainable(net, cfg.train.trainable)
    net.load_state_dict(load_base(ckpt.state.get("base"), ckpt.path.parent.parent, net), strict=False)
    load_saved_state(net, ckpt.tensors["model"], str(ckpt.path))
    if use_ema:  # the averaged trainable parameters (0.1 checkpoints: the whole network)
        net.load_state_dict(ckpt.tensors["ema"], strict=False)
    return net, cfg


def load_base(reference: dict[str, Any] | None, run_dir: Path, net: nn.Module) -> dict[str, torch.Tensor]:
    """The base tensors a checkpoint's `base` reference names, under `net`'s names, after checking their
    SHA-256; {} for none.

    A `diffusers` base is part of the network as built (`build_network` reads the folder), so it only has
    its hash checked here.
    """
    if not reference:
        return {}
    kind, path = reference["kind"], Path(reference["path"])
    if kind == "run":
        return load_file(str(_checked(run_dir / path, reference["sha256"])))
    if kind == "diffusers":
        _checked(path, reference["sha256"])
        return {}
    if kind == "condlora":
        _checked(path / STATE_FILE, reference["sha256"])
        source, _ = restore_network(resolve_checkpoint(path), use_ema=reference.get("ema", True))
        return adapt_to(net, source.state_dict(), f"the base {path}")
    raise CheckpointError(f"unknown base reference kind {kind!r}")


def init_base(
    net: nn.Module,
    init_from: str,
    run_dir: Path,
    write: bool,
    diffusers: bool = False,
) -> dict[str, Any] | None:
    """Initialise `net`'s base and return the reference checkpoints record for it (None when every weight
    trains and nothing was loaded).

    Args:
        init_from: "" (keep the seeded initialisation), a condlora run / checkpoint (its EMA weights), or a
            local diffusers folder (already loaded by `build_network`).
        run_dir: where `base.safetensors` goes for a self-initialised frozen base.
        write: write that file (rank 0 only; the others just compute the reference).
        diffusers: the network is the diffusers backbone, built from `init_from` by `build_network`.
    """
    frozen = base_keys(net)
    if diffusers:
        from condlora.nets.diffusers_unet import DIFFUSERS_WEIGHTS

        weights = Path(init_from) / DIFFUSERS_WEIGHTS
        return {"kind": "diffusers", "path": str(weights), "sha256": sha256_of(weights)}
    if init_from:
        source = resolve_checkpoint(init_from)
        weights = restore_network(source)[0].state_dict()
        net.load_state_dict(adapt_to(net, weights, f"train.init_from {source.path}"), strict=False)
        state = source.path / STATE_FILE
        return {"kind": "condlora", "path": str(source.path), "sha256": sha256_of(state), "ema": True}
    if not frozen:
        return None
    path = run_dir / BASE_FILE
    if write:
        state = net.state_dict()
        tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
        save_file({k: state[k].detach().cpu().contiguous() for k in frozen}, str(tmp))
        os.replace(tmp, path)
    return {"kind": "run", "path": BASE_FILE, "sha256": sha256_of(path) if write else ""}
