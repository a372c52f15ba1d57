"""Named run configurations. Presets are data: each is a dict of overrides on the `RunConfig` defaults."""

from __future__ import annotations

from typing import Any

from condlora.config import ConfigError, RunConfig

_WITH_LORA = {"conditioning": "with_lora"}
_TIME_CLASS_LORA = {"time": "compositional", "classes": "select"}


def merge_sections(preset: dict[str, dict[str, Any]], sections: dict[str, dict[str, Any]]) -> dict[str, dict[str, Any]]:
    """`preset` with each of `sections` merged into its section of the same name."""
    return {**preset, **{name: {**preset.get(name, {}), **values} for name, values in sections.items()}}


def _edm(dataset: str, image_size: int, num_classes: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """EDM (DDPM++, `--arch=ddpmpp --precond=edm`) as published: Adam at lr 1e-3 ramped up over 10 Mimg,
    EMA half-life 0.5 Mimg, batch 512, 200 Mimg, 18 Heun steps; `sections` override per dataset."""
    batch = sections.get("train", {}).get("batch_size", 512)
    preset = {
        "data": {"dataset": dataset, "image_size": image_size},
        "model": {"backbone": "ddpmpp", "image_size": image_size, "in_channels": 3, "num_classes": num_classes},
        "diffusion": {"family": "edm", "label_dropout": 0.0},
        "train": {
            "steps": 200_000_000 // batch,
            "batch_size": batch,
            "lr": 1e-3,
            "warmup_steps": 10_000_000 // batch,
            "lr_decay": "constant",
            "grad_clip": 0.0,
            "ema_halflife_kimg": 500.0,
            "sample_every": 10_000,
            "checkpoint_every": 10_000,
        },
        "sample": {"sampler": "heun", "steps": 18, "guidance_scale": 1.0, "batch_size": 250},
    }
    return merge_sections(preset, sections)


def _iddpm(dataset: str, image_size: int, num_classes: int, **sections: dict[str, Any]) -> dict[str, dict[str, Any]]:
    """IDDPM as the papers ran it: the U-Net with 128 channels, 3 residual blocks, attention at 16 and 8,
    learned variance and the hybrid loss, cosine schedule with T = 4000, Adam at lr 1e-4, batch 128, EMA
    0.9999, 4000 sampling steps; `sections` override per dataset and adapter."""
    preset = {
        "data": {"dataset": dataset, "image_size": image_size},
        "model": {"backbone": "iddpm", "image_size": image_size, "in_channels": 3, "num_classes": num_classes},
        "iddpm": {"dropout": 0.3},
        "diffusion": {"family": "iddpm", "label_dropout": 0.1 if num_classes else 0.0},
        "ddpm": {"num_timesteps": 4000, "schedule": "cosine", "learn_sigma": True},
        "train": {
            "steps": 500_000,
            "batch_size": 128,
            "lr": 1e-4,
            "warmup_steps": 0,
            "lr_decay": "constant",
            "grad_clip": 0.0,
            "ema_decay": 0.9999,
            "sample_every": 10_000,
            "checkpoint_every": 10_000,
        },
        "sample": {"sampler": "ddpm", "steps": 4000, "guidance_scale": 1.0, "batch_size": 250},
    }
    return merge_sections(preset, sections)


# TimeLoRA as in the papers' LoRA rows: T = 4001 so that m = 10 divides T - 1, 11 bases of rank 4, the omega
# table trained from linear interpolation; 4001 sampling steps. ClassLoRA: one adapter per class.
_TIME_LORA = {
    "model": _WITH_LORA,
    "ddpm": {"num_timesteps": 4001},
    "lora": {"time": "compositional", "time_bases": 11, "rank": 4, "omega": "train", "omega_init": "linear"},
    "sample": {"steps": 4001},
}
_TIME_CLASS_LORA_4001 = {**_TIME_LORA, "lora": {**_TIME_LORA["lora"], "classes": "select"}}
_IMAGENET64 = {"iddpm": {"channel_mult": (1, 2, 3, 4), "dropout": 0.0}, "train": {"steps": 1_500_000}}

# UC-LoRA as published: m bases of rank 4 on every attention qkv and proj, MLP widths 128, 64, per-basis bias.
_UC_LORA = {"model": _WITH_LORA, "lora": {"uc_bases": 18, "rank": 4, "uc_widths": (128, 64), "basis_bias": True}}
_FFHQ = {
    "ddpmpp": {"channel_mult": (1, 2, 2, 2), "dropout": 0.05},
    "edm": {"augment": 0.15},
    "train": {"batch_size": 256, "lr": 2e-4},
    "sample": {"steps": 40},
}

PRESETS: dict[str, dict[str, dict[str, Any]]] = {
    # The main job: class-conditional nano U-Net with TimeLoRA + ClassLoRA on its attention layers, beside the
    # usual scale-and-shift, on the 5,000 bundled MNIST digits; under 10 minutes on 2 CPU cores.
    "mnist-nano": {"model": _WITH_LORA, "lora": _TIME_CLASS_LORA},
    # The same network conditioned by scale-and-shift alone (the papers' baseline).
    "mnist-nano-baseline": {},
    # Attention conditioned by LoRA alone: no time / class embeddings, no scale-and-shift.
    "mnist-nano-lora-only": {"model": {"conditioning": "lora_only"}, "lora": _TIME_CLASS_LORA},
    # UC-LoRA on the shared embedding (MLP widths 50, 50 as in the paper's nano experiment).
    "mnist-nano-uc-lora": {"model": _WITH_LORA, "lora": {"uc_bases": 10, "uc_widths": (50, 50)}},
    "mnist-nano-uncond": {"model": {"num_classes": 0}, "sample": {"guidance_scale": 1.0}},
    # scikit-learn's 1,797 8x8 digits: a seconds-scale smoke configuration.
    "digits-nano": {
        "data": {"dataset": "digits"},
        "model": {"image_size": 8},
        "nano": {"channels": 16, "channel_mult": (1, 2), "attn_levels": (1,)},
        "train": {"steps": 300, "batch_size": 64, "sample_every": 0, "checkpoint_every": 100},
        "sample": {"count": 20, "steps": 50},
    },
    # CIFAR-10 from a local python-batches directory (pass --data.dataset PATH); meant for a GPU.
    "cifar10-nano": {
        "data": {"dataset": "cifar-10-batches-py", "hflip": True},
        "model": {"image_size": 32, "in_channels": 3},
        "nano": {"channels": 32, "channel_mult": (1, 2, 2)},
        "train": {
            "steps": 100_000,
            "batch_size": 128,
            "lr": 2e-4,
            "sample_every": 5000,
            "checkpoint_every": 5000,
        },
    },
    # EDM (DDPM++ U-Net, continuous sigma, Heun sampler) with UC-LoRA on the 5,000 MNIST digits, sized for a CPU.
    "mnist-edm": {
        "model": {"backbone": "ddpmpp", **_WITH_LORA},
        "ddpmpp": {
            "model_channels": 16,
            "channel_mult": (1, 2, 2),
            "num_blocks": 1,
            "attn_resolutions": (7,),
            "dropout": 0.0,
        },
        "lora": {"uc_bases": 8, "uc_widths": (64, 32), "basis_bias": True},
        "diffusion": {"family": "edm"},
        "edm": {"augment": 0.0},
        "train": {"batch_size": 64, "steps": 1200},
        "sample": {"sampler": "heun", "steps": 18},
    },
    # IDDPM with TimeLoRA + ClassLoRA beside scale-and-shift on the 5,000 MNIST digits, sized for a CPU.
    "mnist-iddpm": {
        "model": {"backbone": "iddpm", **_WITH_LORA},
        "iddpm": {
            "model_channels": 16,
            "channel_mult": (1, 2, 3),
            "num_res_blocks": 1,
            "attention_resolutions": (7,),
            "norm_groups": 8,
        },
        "diffusion": {"family": "iddpm"},
        "ddpm": {"num_timesteps": 1000, "schedule": "cosine", "learn_sigma": True},
        "lora": _TIME_CLASS_LORA,
        "train": {"batch_size": 64, "steps": 1200},
        "sample": {"steps": 100},
    },
    # IDDPM on CIFAR-10 (pass --data.dataset PATH to a local cifar-10-batches-py directory) and on ImageNet-64
    # (an image folder or .npz of 64x64 images); meant for GPUs. The -lora presets add TimeLoRA (+ ClassLoRA);
    # add --model.conditioning lora_only for the papers' "only LoRA" rows.
    "iddpm-cifar10-uncond": _iddpm("cifar-10-batches-py", 32, 0),
    "iddpm-cifar10-cond": _iddpm("cifar-10-batches-py", 32, 10),
    "iddpm-cifar10-uncond-lora": _iddpm("cifar-10-batches-py", 32, 0, **_TIME_LORA),
    "iddpm-cifar10-cond-lora": _iddpm("cifar-10-batches-py", 32, 10, **_TIME_CLASS_LORA_4001),
    "iddpm-imagenet64": _iddpm("imagenet-64x64", 64, 0, **_IMAGENET64),
    "iddpm-imagenet64-lora": _iddpm("imagenet-64x64", 64, 0, **_IMAGENET64, **_TIME_LORA),
    # EDM on CIFAR-10 (pass --data.dataset PATH to a local cifar-10-batches-py directory); meant for GPUs.
    "edm-cifar10-uncond": _edm("cifar-10-batches-py", 32, 0),
    "edm-cifar10-cond": _edm("cifar-10-batches-py", 32, 10),
    "edm-cifar10-uncond-uc-lora": _edm("cifar-10-batches-py", 32, 0, **_UC_LORA),
    "edm-cifar10-cond-uc-lora": _edm("cifar-10-batches-py", 32, 10, **_UC_LORA),
    # EDM on FFHQ-64 (an image folder or .npz of 64x64 faces): 40 Heun steps = 79 evaluations, UC-LoRA m = 20.
    "edm-ffhq64": _edm("ffhq-64x64", 64, 0, **_FFHQ),
    "edm-ffhq64-uc-lora": _edm(
        "ffhq-64x64", 64, 0, **_FFHQ, model=_WITH_LORA, lora={**_UC_LORA["lora"], "uc_bases": 20}
    ),
}


def build_config(preset: str, overrides: dict[str, dict[str, Any]] | None = None) -> RunConfig:
    """The preset's configuration with `overrides` ({section: {field: value}}) applied on top.

    Values may be strings (from the command line); each is converted and validated by its field.
    """
    if preset not in PRESETS:
        raise ConfigError(f"unknown preset {preset!r}; available: {', '.join(PRESETS)}")
    return RunConfig.from_dict(PRESETS[preset], overrides)
