"""Figures of the LoRA-conditioning papers: omega tables (Fig. 3), omega cosine similarity (Figs. 4, 7) and
class interpolation / extrapolation grids (Figs. 5, 8-10)."""

from __future__ import annotations

import os
from pathlib import Path

import torch
from torch import nn

from condlora.conditions import NULL_LABEL, Conditions
from condlora.lora import ConditionedLoRA, conditioned_layers
from condlora.lora.strategies import basis_timesteps


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path: Path) -> Path:
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}.png")
    fig.savefig(tmp, dpi=110, bbox_inches="tight")
    os.replace(tmp, path)
    _pyplot().close(fig)
    return path


@torch.no_grad()
def omega_over_time(net: nn.Module, layer: ConditionedLoRA, num_timesteps: int) -> torch.Tensor:
    """(T, M) omega of one layer's time-dependent bank for every step t (null class for UC-LoRA)."""
    if "time" in layer.strategies:
        return layer.strategies["time"].table.detach().float().cpu()
    if "uc" in layer.strategies:
        t = torch.arange(num_timesteps, dtype=torch.float32)  # the DDPM noise level of step t
        null = Conditions(labels=torch.full((num_timesteps,), NULL_LABEL, dtype=torch.long))
        emb = net.embed(t, null, layer.lora_down.dtype)
        return layer.strategies["uc"](null.replace(embedding=emb)).float().cpu()
    raise ValueError("this layer has no time-dependent LoRA bank (TimeLoRA or UC-LoRA)")


def time_layers(net: nn.Module) -> list[tuple[str, ConditionedLoRA]]:
    """Conditioned layers whose omega depends on the timestep."""
    return [(n, layer) for n, layer in conditioned_layers(net) if {"time", "uc"} & set(layer.strategies)]


def binned_omega(table: torch.Tensor) -> torch.Tensor:
    """(m+1, m+1) mean |omega_i(t)| over the steps nearest to each basis knot (rows: knots, columns: bases),
    the summary the TimeLoRA paper shows in its Fig. 3."""
    num_timesteps, bases = table.shape
    knots = basis_timesteps(num_timesteps, bases)
    s = torch.arange(1, num_timesteps + 1, dtype=torch.float64)
    nearest = (s[:, None] - knots[None, :]).abs().argmin(dim=1)
    return torch.stack([table[nearest == k].abs().mean(0) for k in range(bases)])


def plot_omega_table(table: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Heat maps of a TimeLoRA omega table: the full (T, m+1) table and its per-knot average |omega|."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    im = axes[0].imshow(table.numpy(), aspect="auto", cmap="viridis", interpolation="nearest")
    axes[0].set(xlabel="basis i", ylabel="timestep t", title="omega_i(t)")
    fig.colorbar(im, ax=axes[0])
    if table.shape[1] <= 64:
        im = axes[1].imshow(binned_omega(table).numpy(), cmap="viridis", interpolation="nearest")
        axes[1].set(xlabel="basis i", ylabel="steps nearest knot k", title="mean |omega_i| near each knot")
        fig.colorbar(im, ax=axes[1])
    else:
        axes[1].axis("off")
    fig.suptitle(title)
    return _save(fig, path)


def cosine_matrix(omegas: torch.Tensor) -> torch.Tensor:
    """(T, T) cosine similarity between omega(t1) and omega(t2)."""
    unit = torch.nn.functional.normalize(omegas.double(), dim=1)
    return (unit @ unit.T).float()


def plot_omega_cosine(omegas: torch.Tensor, path: str | Path, title: str = "") -> Path:
    """Cosine-similarity matrix of omega across timesteps (Figs. 4 / 7)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5, 4.3))
    im = ax.imshow(cosine_matrix(omegas).numpy(), cmap="RdBu_r", vmin=-1, vmax=1, interpolation="nearest")
    ax.set(xlabel="t2", ylabel="t1", title=title or "cos(omega(t1), omega(t2))")
    fig.colorbar(im, ax=ax)
    return _save(fig, path)


def plot_similarity_to_reference(layers: dict[str, torch.Tensor], reference_t: int, path: str | Path) -> Path:
    """cos(omega(t), omega(reference_t)) against t for every layer (Fig. 7)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for name, omegas in layers.items():
        ax.plot(cosine_matrix(omegas)[reference_t].numpy(), label=name, lw=1)
    ax.set(xlabel="timestep t", ylabel=f"cos(omega(t), omega({reference_t}))", ylim=(-1.05, 1.05))
    if len(layers) <= 12:
        ax.legend(fontsize=6)
    return _save(fig, path)


def class_path_vectors(num_classes: int, first: int, second: int, columns: int) -> dict[str, torch.Tensor]:
    """Class vectors for the paper's sec. 5.6 grids, each (columns, C):
    interpolation alpha c_first + (1 - alpha) c_second for alpha in [0, 1], and extrapolation beta c_first
    for beta in [-1, 1]."""
    eye = torch.eye(num_classes)
    alpha = torch.linspace(0, 1, columns)[:, None]
    beta = torch.linspace(-1, 1, columns)[:, None]
    return {
        "interpolation": alpha * eye[first] + (1 - alpha) * eye[second],
        "extrapolation": beta * eye[first],
    }


__all__ = [
    "binned_omega",
    "class_path_vectors",
    "cosine_matrix",
    "omega_over_time",
    "plot_omega_cosine",
    "plot_omega_table",
    "plot_similarity_to_reference",
    "time_layers",
]
