"""Read the published EDM network pickles (`edm-cifar10-32x32-uncond-vp.pkl`, ...) without running their code.

Those pickles store each network class with its module's source code, which `pickle.load` would execute.
`read_edm_pickle` instead unpickles with an allow-list: tensors, storages, plain containers and numpy
scalars are rebuilt; a persistent EDM object becomes a `PickledObject` (class name + state, its source never
run); other torch / dnnlib containers become inert stand-ins; any other global (`os.system`, `builtins.eval`,
...) stops the load with an error naming it. `convert_edm_pickle` turns the EMA network into a condlora run
directory that `condlora sample` and `train.init_from` read.
"""

from __future__ import annotations

import io
import pickle
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

try:  # numpy >= 2 keeps the scalar constructor in numpy._core; pickles name either module
    from numpy._core.multiarray import scalar as _numpy_scalar
except ImportError:  # numpy 1.x
    from numpy.core.multiarray import scalar as _numpy_scalar


class UnsafePickleError(pickle.UnpicklingError):
    """The pickle references code that a weights-only reader refuses to load."""


@dataclass
class PickledObject:
    """A persistent object of the published code, not reconstructed: its class name and pickled state."""

    class_name: str
    state: dict[str, Any] = field(default_factory=dict)


class _Inert:
    """Stand-in for a torch / dnnlib class named in the pickle: keeps its state, runs none of its code."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: dict[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, dict) else {"state": state}


class _InertDict(dict):
    """Stand-in for dict subclasses such as dnnlib's EasyDict."""

    def __setstate__(self, state: Any) -> None:
        pass


def _persistent(meta: dict[str, Any]) -> PickledObject:
    return PickledObject(class_name=str(meta.get("class_name")), state=dict(meta.get("state") or {}))


def _storage_from_bytes(data: bytes) -> Any:
    return torch.load(io.BytesIO(data), weights_only=True, map_location="cpu")


_ALLOWED = {
    ("torch._utils", "_rebuild_tensor_v2"): torch._utils._rebuild_tensor_v2,
    ("torch._utils", "_rebuild_parameter"): torch._utils._rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _storage_from_bytes,
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _persistent,
    ("collections", "OrderedDict"): OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("numpy", "dtype"): np.dtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
    ("dnnlib.util", "EasyDict"): _InertDict,
}


class _WeightsOnlyUnpickler(pickle.Unpickler):
    def find_class(self, module: str, name: str) -> Any:
        target = _ALLOWED.get((module, name))
        if target is not None:
            return target
        if module.startswith("torch.nn.modules.") and name[:1].isupper():
            return _Inert  # ModuleDict, ModuleList, ...: only their state is read
        if module == "torch" and isinstance(getattr(torch, name, None), torch.dtype):
            return getattr(torch, name)
        raise UnsafePickleError(
            f"refusing to load {module}.{name} from the pickle: only tensors, plain data and EDM's persistent "
            "networks are read (a pickle naming other code may try to run it)"
        )


def read_edm_pickle(path: str | Path) -> dict[str, Any]:
    """The top-level dict of a published EDM pickle ('ema', 'loss_fn', 'augment_pipe', ...), read safely."""
    with open(path, "rb") as f:
        try:
            data = _WeightsOnlyUnpickler(f).load()
        except UnsafePickleError:
            raise
        except (pickle.UnpicklingError, EOFError, ValueError, TypeError, AttributeError) as err:
            raise ValueError(f"{path} is not a readable EDM network pickle ({err})") from None
    if not isinstance(data, dict):
        raise ValueError(f"{path}: expected a dict with an 'ema' network, got {type(data).__name__}")
    return data


def state_dict_of(obj: Any, prefix: str = "") -> dict[str, torch.Tensor]:
    """The flat state_dict of a pickled module tree (persistent buffers only), as `nn.Module.state_dict` gives."""
    state = obj.state if isinstance(obj, (PickledObject, _Inert)) else None
    if state is None:
        raise ValueError(f"{prefix or 'the network'} is not a pickled module (got {type(obj).__name__})")
    out: dict[str, torch.Tensor] = {}
    for name, value in (state.get("_parameters") or {}).items():
        if value is not None:
            out[prefix + name] = torch.Tensor(value.detach()) if isinstance(value, torch.nn.Parameter) else value
    skip = set(state.get("_non_persistent_buffers_set") or ())
    for name, value in (state.get("_buffers") or {}).items():
        if value is not None and name not in skip:
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is not None:
            out.update(state_dict_of(child, f"{prefix}{name}."))
    return out


# EDM's DDPM++ flags; condlora implements this architecture only (NCSN++ / ADM are other networks).
_DDPMPP = {
    "model_type": "SongUNet",
    "embedding_type": "positional",
    "encoder_type": "standard",
    "decoder_type": "standard",
    "channel_mult_noise": 1,
    "resample_filter": [1, 1],
}
_SONGUNET_DEFAULTS = {
    "model_channels": 128,
    "channel_mult": [1, 2, 2, 2],
    "channel_mult_emb": 4,
    "num_blocks": 4,
    "attn_resolutions": [16],
    "dropout": 0.10,
    "augment_dim": 0,
    "label_dim": 0,
}


def config_of(network: PickledObject) -> dict[str, dict[str, Any]]:
    """condlora config sections for a pickled `EDMPrecond` of DDPM++, from the constructor arguments it records."""
    if network.class_name != "EDMPrecond":
        raise ValueError(
            f"the pickled network is {network.class_name}; condlora reads EDM-preconditioned networks (EDMPrecond)"
        )
    kwargs = {**_SONGUNET_DEFAULTS, **(network.state.get("_init_kwargs") or {})}
    for key, expected in _DDPMPP.items():
        given = kwargs.get(key, _DDPMPP[key] if key != "model_type" else None)
        if (list(given) if isinstance(given, (list, tuple)) else given) != expected:
            raise ValueError(
                f"the pickled network has {key}={given!r}; condlora implements DDPM++ ({key}={expected!r})"
            )
    if kwargs["augment_dim"] not in (0, 9):
        raise ValueError(f"augment_dim {kwargs['augment_dim']} is not EDM's 9 augmentation labels")
    return {
        "model": {
            "backbone": "ddpmpp",
            "image_size": int(kwargs["img_resolution"]),
            "in_channels": int(kwargs["img_channels"]),
            "num_classes": int(kwargs["label_dim"]),
        },
        "ddpmpp": {
            "model_channels": int(kwargs["model_channels"]),
            "channel_mult": tuple(int(m) for m in kwargs["channel_mult"]),
            "channel_mult_emb": int(kwargs["channel_mult_emb"]),
            "num_blocks": int(kwargs["num_blocks"]),
            "attn_resolutions": tuple(int(r) for r in kwargs["attn_resolutions"]),
            "dropout": float(kwargs["dropout"]),
        },
        "diffusion": {"family": "edm", "label_dropout": 0.0},
        "edm": {"sigma_data": float(kwargs.get("sigma_data", 0.5)), "augment": 0.12 if kwargs["augment_dim"] else 0.0},
        "sample": {"sampler": "heun", "steps": 18, "guidance_scale": 1.0},
    }


def convert_edm_pickle(source: str | Path, out_dir: str | Path, key: str = "ema") -> Path:
    """Write the network `key` of a published EDM pickle as a condlora run directory (config.json and one
    checkpoint at step 0 holding its weights as both the model and the EMA); returns the checkpoint path.

    The weights are loaded into condlora's DDPM++ with strict=True first, so a converted run is known to fit.
    """
    from condlora.config import RunConfig
    from condlora.nets import build_network
    from condlora.train.checkpoint import save_checkpoint, write_json_atomic

    source, out_dir = Path(source), Path(out_dir)
    data = read_edm_pickle(source)
    if key not in data:
        raise ValueError(f"{source} has no {key!r} entry (it has {sorted(data)})")
    network = data[key]
    if not isinstance(network, PickledObject):
        raise ValueError(f"{source}: {key!r} is not an EDM network")
    cfg = RunConfig.from_dict(config_of(network))
    weights = {k.removeprefix("model."): v for k, v in state_dict_of(network).items()}
    net = build_network(cfg)
    try:
        net.load_state_dict(weights, strict=True)
    except RuntimeError as err:
        raise ValueError(f"{source}: the weights do not fit condlora's DDPM++ ({err})") from None
    if out_dir.exists() and any(out_dir.iterdir()):
        raise FileExistsError(f"{out_dir} is not empty; convert into a new directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out_dir / "config.json", {"preset": f"converted from {source.name}", **cfg.to_dict()})
    tensors = {k: v.detach().contiguous() for k, v in net.state_dict().items()}
    meta = {"config": cfg.to_dict(), "base": None, "source": {"path": str(source), "key": key}}
    return save_checkpoint(out_dir / "checkpoints", 0, {"model": tensors, "ema": tensors}, meta, keep=1)
