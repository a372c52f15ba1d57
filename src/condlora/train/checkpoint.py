"""Checkpoints: tensors in safetensors files, everything else in plain JSON, written atomically.

Layout of one checkpoint directory `checkpoints/step-000001500/`:
    model.safetensors      network weights
    ema.safetensors        EMA weights
    optimizer.safetensors  optimizer state tensors (flattened names `state.<param>.<key>`)
    state.json             step, run config, RNG states, optimizer hyper-parameters, and the size and
                           SHA-256 of each tensor file so a truncated or corrupt file is detected on load.
The directory is assembled under a temporary name and renamed into place, so a kill at any moment leaves
every earlier checkpoint intact and never leaves a half-written one under a real name.
"""

from __future__ import annotations

import base64
import hashlib
import json
import os
import shutil
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

FORMAT_VERSION = 1
STATE_FILE = "state.json"
_TEMPORARY_PREFIXES = (".tmp-step-", ".stale-step-")  # the only names `remove_temporaries` deletes


class CheckpointError(RuntimeError):
    """A checkpoint is missing, truncated, corrupt or incompatible; the message names the file."""


@dataclass
class Checkpoint:
    """A loaded checkpoint: tensor groups by file stem, plus the JSON state."""

    path: Path
    tensors: dict[str, dict[str, torch.Tensor]]
    state: dict[str, Any]

    @property
    def step(self) -> int:
        return int(self.state["step"])


def sha256_of(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json_atomic(path: Path, data: Any) -> None:
    """Write JSON to a temporary file beside `path`, fsync it, then rename it over `path`."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "w") as f:
        json.dump(data, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def save_checkpoint(
    root: Path,
    step: int,
    tensors: dict[str, dict[str, torch.Tensor]],
    state: dict[str, Any],
    keep: int = 2,
) -> Path:
    """Write checkpoint `root/step-<step>` atomically, then prune by step: keep the `keep` newest checkpoints
    up to `step` and remove every checkpoint of a later step (a timeline this run has left: after a resume
    those are the ones that failed verification).

    Args:
        root: the checkpoints directory.
        step: training step reached (the number of optimizer steps taken).
        tensors: {file stem: {name: tensor}}, e.g. {"model": net.state_dict(), ...}.
        state: JSON-ready data (config, RNG states, ...); `step` and file digests are added.
    Returns:
        The final checkpoint directory.
    """
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:09d}"
    tmp = root / f".tmp-step-{step:09d}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    files = {}
    for stem, group in tensors.items():
        path = tmp / f"{stem}.safetensors"
        save_file({k: v.detach().cpu().contiguous() for k, v in group.items()}, str(path))
        with open(path, "rb+") as f:
            os.fsync(f.fileno())
        files[path.name] = {"bytes": path.stat().st_size, "sha256": sha256_of(path)}
    write_json_atomic(tmp / STATE_FILE, {**state, "format_version": FORMAT_VERSION, "step": step, "files": files})
    _fsync_dir(tmp)
    if final.exists():  # re-saving the same step (e.g. after a resume): move the old one aside first
        stale = root / f".stale-{final.name}-{os.getpid()}"  # .stale-step-*
        os.replace(final, stale)
        shutil.rmtree(stale, ignore_errors=True)
    os.replace(tmp, final)
    _fsync_dir(root)
    existing = list_checkpoints(root)
    kept = [p for p in existing if checkpoint_step(p) <= step][-keep:]
    for old in existing:
        if old not in kept:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoint_step(path: Path) -> int:
    """The step in a checkpoint directory's name `step-<step>`."""
    return int(path.name.removeprefix("step-"))


def list_checkpoints(root: Path) -> list[Path]:
    """Checkpoint directories under `root`, ordered by step, oldest first (temporary ones are ignored)."""
    if not root.is_dir():
        return []
    found = [p for p in root.iterdir() if p.is_dir() and p.name.startswith("step-") and p.name[5:].isdigit()]
    return sorted(found, key=checkpoint_step)


def remove_temporaries(root: Path) -> list[Path]:
    """Delete the temporary directories a killed checkpoint write leaves in `root` (`.tmp-step-*`,
    `.stale-step-*`; nothing else); returns what was removed."""
    if not root.is_dir():
        return []
    stale = [p for p in root.iterdir() if p.is_dir() and p.name.startswith(_TEMPORARY_PREFIXES)]
    for path in stale:
        shutil.rmtree(path, ignore_errors=True)
    return stale


def load_checkpoint(path: Path) -> Checkpoint:
    """Load and verify one checkpoint directory; raise CheckpointError naming the bad file."""
    state_path = path / STATE_FILE
    if not state_path.is_file():
        raise CheckpointError(f"checkpoint {path} has no {STATE_FILE} (incomplete or not a checkpoint)")
    try:
        state = json.loads(state_path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise CheckpointError(f"corrupt checkpoint file {state_path}: {err}") from None
    if state.get("format_version") != FORMAT_VERSION or "files" not in state or "step" not in state:
        raise CheckpointError(f"{state_path} is not a condlora checkpoint of format {FORMAT_VERSION}")
    tensors = {}
    for name, meta in state["files"].items():
        file = path / name
        if not file.is_file():
            raise CheckpointError(f"checkpoint file missing: {file}")
        size = file.stat().st_size
        if size != meta["bytes"]:
            raise CheckpointError(f"truncated checkpoint file {file}: {size} bytes, expected {meta['bytes']}")
        if sha256_of(file) != meta["sha256"]:
            raise CheckpointError(f"corrupt checkpoint file {file}: SHA-256 does not match state.json")
        try:
            tensors[file.name.removesuffix(".safetensors")] = load_file(str(file))
        except (SafetensorError, OSError) as err:
            raise CheckpointError(f"corrupt checkpoint file {file}: {err}") from None
    return Checkpoint(path=path, tensors=tensors, state=state)


def load_latest(root: Path) -> Checkpoint | None:
    """The newest checkpoint under `root` that loads and verifies, warning about each bad one skipped.

    Returns None when there is no checkpoint at all; raises CheckpointError when all are bad.
    """
    candidates = list_checkpoints(root)
    errors = []
    for path in reversed(candidates):
        try:
            return load_checkpoint(path)
        except CheckpointError as err:
            errors.append(str(err))
            warnings.warn(f"skipping bad checkpoint: {err}", stacklevel=2)
    if errors:
        raise CheckpointError("no usable checkpoint under {}: {}".format(root, "; ".join(errors)))
    return None


def resolve_checkpoint(path: str | Path) -> Checkpoint:
    """Load a checkpoint given a run directory (newest good one), a checkpoints/ directory, or one checkpoint."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint path does not exist: {path}")
    if any((path / name).exists() for name in (STATE_FILE, "model.safetensors")) or path.name.startswith("step-"):
        return load_checkpoint(path)  # one checkpoint directory: names the missing or bad file
    for root in (path / "checkpoints", path):
        found = load_latest(root) if root.is_dir() else None
        if found is not None:
            return found
    raise CheckpointError(
        f"no checkpoint found under {path}: expected a run directory (with checkpoints/step-*), "
        "a checkpoints/ directory, or one checkpoint directory (with state.json)"
    )


def encode_bytes(t: torch.Tensor) -> str:
    """A uint8 RNG-state tensor as base64 text for JSON."""
    return base64.b64encode(t.cpu().numpy().tobytes()).decode("ascii")


def decode_bytes(text: str) -> torch.Tensor:
    """Inverse of `encode_bytes`."""
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8).clone()


def optimizer_to_checkpoint(opt: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-ready hyper-parameters."""
    sd = opt.state_dict()
    tensors, scalars = {}, {}
    for index, entries in sd["state"].items():
        for key, value in entries.items():
            if torch.is_tensor(value):
                tensors[f"state.{index}.{key}"] = value
            else:
                scalars[f"{index}.{key}"] = value
    return tensors, {"param_groups": sd["param_groups"], "scalars": scalars}


def optimizer_from_checkpoint(
    opt: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], meta: dict[str, Any]
) -> None:
    """Restore what `optimizer_to_checkpoint` split apart."""
    state: dict[int, dict[str, Any]] = {}
    for name, value in tensors.items():
        _, index, key = name.split(".", 2)
        state.setdefault(int(index), {})[key] = value
    for name, value in meta["scalars"].items():
        index, key = name.split(".", 1)
        state.setdefault(int(index), {})[key] = value
    opt.load_state_dict({"state": state, "param_groups": meta["param_groups"]})
