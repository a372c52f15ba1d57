"""Adapter files: condlora's own format, and plain LoRA exported as a PEFT adapter.

condlora's format (`save_lora` / `load_lora`), version 1, is a directory holding

    condlora_adapter.safetensors   every LoRA-owned tensor, named `<layer>.<tensor>` as in `lora_state_dict`:
                                   `lora_down` (r*M, C_in), `lora_up` (C_out, r*M), `basis_bias` (r*M, C_out),
                                   `strategies.<bank>.*` (omega tables, class tables, UC-LoRA MLPs)
    condlora_adapter.json          {"format": "condlora-adapter", "format_version": 1, "lora": the LoRASpec
                                   (the `lora` config fields plus T, C, D), "layers": the wrapped module names}

The JSON is also stored in the safetensors header, so a weights file and a config file from different
saves are caught. A conditioned bank has no PEFT equivalent; a plain, unconditioned LoRA (`lora.plain`
alone) is exported by `export_peft` as a real PEFT adapter (adapter_config.json + adapter_model.safetensors,
which `peft.PeftModel.from_pretrained` loads) plus `pytorch_lora_weights.safetensors`, the file diffusers'
`load_lora_adapter` reads.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from torch import nn

from condlora.lora.inject import conditioned_layers, lora_state_dict
from condlora.lora.spec import LoRASpec

ADAPTER_WEIGHTS = "condlora_adapter.safetensors"
ADAPTER_CONFIG = "condlora_adapter.json"
ADAPTER_FORMAT, ADAPTER_VERSION = "condlora-adapter", 1
PEFT_CONFIG, PEFT_WEIGHTS, DIFFUSERS_LORA_WEIGHTS = (
    "adapter_config.json",
    "adapter_model.safetensors",
    "pytorch_lora_weights.safetensors",
)


def _write_atomic(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    write(tmp)
    os.replace(tmp, path)


def save_lora(model: nn.Module, directory: str | Path, spec: LoRASpec | None = None) -> Path:
    """Write `model`'s LoRA tensors and recipe in condlora's format (see the module docstring), atomically.

    Args:
        model: a network with conditioned LoRA layers.
        directory: created if missing.
        spec: the recipe; defaults to `model.lora_spec` (condlora's backbones keep it there).
    """
    spec = spec if spec is not None else getattr(model, "lora_spec", None)
    if spec is None:
        raise ValueError("save_lora needs the LoRA recipe: pass spec= (this model has no lora_spec)")
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    meta = {
        "format": ADAPTER_FORMAT,
        "format_version": ADAPTER_VERSION,
        "lora": spec.to_dict(),
        "layers": [name for name, _ in conditioned_layers(model)],
    }
    text = json.dumps(meta, indent=2, sort_keys=True)
    tensors = {k: v.detach().cpu().contiguous() for k, v in lora_state_dict(model).items()}
    _write_atomic(directory / ADAPTER_WEIGHTS, lambda p: save_file(tensors, str(p), metadata={"condlora": text}))
    _write_atomic(directory / ADAPTER_CONFIG, lambda p: p.write_text(text))
    return directory


def read_lora(directory: str | Path) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """The metadata and tensors of a condlora adapter directory, checked; clear errors otherwise."""
    directory = Path(directory)
    weights, config = directory / ADAPTER_WEIGHTS, directory / ADAPTER_CONFIG
    if not weights.is_file() and (directory / PEFT_CONFIG).is_file():
        raise ValueError(f"{directory} holds a PEFT adapter, not a condlora one: load it with peft")
    for path in (weights, config):
        if not path.is_file():
            raise FileNotFoundError(f"LoRA file missing: {path}")
    try:
        with safe_open(str(weights), framework="pt") as f:
            header = (f.metadata() or {}).get("condlora")
        tensors = load_file(str(weights))
        meta = json.loads(config.read_text())
    except Exception as err:  # safetensors raises its own error type; JSON its own
        raise ValueError(f"corrupt LoRA files in {directory}: {err}") from None
    if header is None or json.loads(header) != meta:
        raise ValueError(f"{config} does not match the config stored with {weights}; they come from different saves")
    if meta.get("format") != ADAPTER_FORMAT or meta.get("format_version") != ADAPTER_VERSION:
        raise ValueError(
            f"{config}: format {meta.get('format')!r} version {meta.get('format_version')!r} is not "
            f"{ADAPTER_FORMAT!r} version {ADAPTER_VERSION}"
        )
    return meta, tensors


def load_lora(model: nn.Module, directory: str | Path) -> LoRASpec:
    """Load adapters saved by `save_lora` into a model with the same injection; returns their recipe."""
    meta, tensors = read_lora(directory)
    expected = lora_state_dict(model)
    missing, unexpected = set(expected) - set(tensors), set(tensors) - set(expected)
    if missing or unexpected:
        raise ValueError(
            f"LoRA weights in {directory} do not fit this model: missing {sorted(missing)[:5]}, "
            f"unexpected {sorted(unexpected)[:5]}"
        )
    for name, layer in conditioned_layers(model):
        prefix = f"{name}."
        own = {k[len(prefix) :]: v for k, v in tensors.items() if k.startswith(prefix)}
        layer.load_state_dict(own, strict=False)
    return LoRASpec.from_dict(meta["lora"])


def export_peft(model: nn.Module, directory: str | Path, root: nn.Module | None = None) -> Path:
    """Export plain, unconditioned LoRA as a PEFT adapter (and diffusers' LoRA weights file).

    Args:
        model: a network whose LoRA layers each hold the plain bank alone (`lora.plain`, no conditioned bank,
            no per-basis bias).
        directory: where adapter_config.json, adapter_model.safetensors and pytorch_lora_weights.safetensors go.
        root: the module the names are relative to (the diffusers UNet inside `DiffusersUNet`); default: the
            module holding the LoRA layers, found by `model.unet` if present, else `model` itself.
    Returns:
        The directory.
    """
    root = root if root is not None else getattr(model, "unet", model)
    layers = list(conditioned_layers(root))
    if not layers:
        raise ValueError("nothing to export: the model has no LoRA layers")
    ranks, scalings, dropouts, lora_a, lora_b = set(), set(), set(), {}, {}
    for name, layer in layers:
        banks = sorted(layer.strategies)
        if banks != ["plain"] or layer.basis_bias is not None:
            raise ValueError(
                f"{name}: only plain, unconditioned LoRA exports to PEFT; this layer has banks {banks}"
                + (" and a per-basis bias" if layer.basis_bias is not None else "")
            )
        ranks.add(layer.rank)
        scalings.add(layer.scaling)
        dropouts.add(layer.dropout)
        spatial = (1,) * (layer.base_layer.weight.dim() - 2)  # 1x1 convolutions keep their kernel dimensions
        lora_a[name] = layer.lora_down.detach().reshape(*layer.lora_down.shape, *spatial)
        lora_b[name] = layer.lora_up.detach().reshape(*layer.lora_up.shape, *spatial)
    if len(ranks) != 1 or len(scalings) != 1:
        raise ValueError(f"PEFT export needs one rank and one scaling for all layers, got {ranks} and {scalings}")
    rank, scaling = ranks.pop(), scalings.pop()
    config = {
        "peft_type": "LORA",
        "r": rank,
        "lora_alpha": rank * scaling,
        "target_modules": sorted(lora_a),
        "lora_dropout": max(dropouts),  # a training setting: the exported weights do not depend on it
        "bias": "none",
        "fan_in_fan_out": False,
        "init_lora_weights": True,
        "use_rslora": False,
        "use_dora": False,
        "inference_mode": True,
        "task_type": None,
        "base_model_name_or_path": None,
        "modules_to_save": None,
    }
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    by_module = {f"{name}.lora_A.weight": a for name, a in lora_a.items()} | {
        f"{name}.lora_B.weight": b for name, b in lora_b.items()
    }
    tensors = {k: v.cpu().contiguous() for k, v in by_module.items()}
    peft = {f"base_model.model.{k}": v for k, v in tensors.items()}
    _write_atomic(directory / PEFT_WEIGHTS, lambda p: save_file(peft, str(p), metadata={"format": "pt"}))
    _write_atomic(directory / PEFT_CONFIG, lambda p: p.write_text(json.dumps(config, indent=2, sort_keys=True)))
    diffusers_meta = {"format": "pt", "lora_adapter_metadata": json.dumps(config, sort_keys=True)}
    _write_atomic(directory / DIFFUSERS_LORA_WEIGHTS, lambda p: save_file(tensors, str(p), metadata=diffusers_meta))
    return directory
