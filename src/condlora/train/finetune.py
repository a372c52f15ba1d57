"""Fine-tuning stages on a pretrained model: vanilla LoRA, and TimeStep Master's fostering and assembling.

Each stage is an ordinary training run (`condlora.train.train`) whose configuration is derived here from its
source: a condlora run or checkpoint (its saved configuration, so the architecture matches) or a local
diffusers UNet folder. The source becomes the frozen base (`train.init_from`), and only the stage's
parameters train (`train.trainable`):

    lora      plain LoRA adapters (rank, alpha, dropout, targets from the `lora` section)
    foster    TimeStep Master experts, `lora.tsm_scales` (default 1, 2, 4, 8), one expert per sample
    assemble  the routers of a fostered run's experts (the source must be a foster run); experts frozen
    full      every parameter of the source (full fine-tuning, the reference point of LoRA studies)
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from condlora.config import ConfigError, RunConfig
from condlora.presets import build_config, merge_sections

STAGES = ("lora", "foster", "assemble", "full")
ROUTERS = ("*.strategies.tsm.*",)
DEFAULT_TSM_SCALES = (1, 2, 4, 8)


def diffusers_folder(path: Path) -> dict[str, Any] | None:
    """The config of a local diffusers model folder (config.json naming a `_class_name`), else None."""
    config = path / "config.json"
    if not (path.is_dir() and config.is_file()):
        return None
    try:
        data = json.loads(config.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None
    return data if isinstance(data, dict) and "_class_name" in data else None


def _source_config(source: Path, preset: str) -> dict[str, dict[str, Any]]:
    """Sections describing the source network: its run configuration, or the diffusers folder's sizes."""
    from condlora.train.checkpoint import resolve_checkpoint

    unet = diffusers_folder(source)
    if unet is not None:
        ada = unet.get("num_embeds_ada_norm") if unet.get("norm_type") == "ada_norm_zero" else None
        embeds = unet.get("num_class_embeds") or ada  # classes + the null class (see DiffusersUNet)
        model = {"backbone": "diffusers", "image_size": unet.get("sample_size", 32)}
        model |= {"in_channels": unet.get("in_channels", 3), "num_classes": embeds - 1 if embeds else 0}
        return merge_sections(build_config(preset).to_dict(), {"model": model})
    if not source.exists():
        raise ConfigError(
            f"finetune: the source {source} does not exist (a condlora run, checkpoint or diffusers folder)"
        )
    saved = dict(resolve_checkpoint(source).state["config"])
    saved.pop("preset", None)
    return saved


def finetune_config(
    stage: str, source: str | Path, overrides: dict[str, dict[str, Any]] | None = None, preset: str = "mnist-nano"
) -> RunConfig:
    """The run configuration of one fine-tuning stage on `source`, with `overrides` (e.g. the target
    dataset, steps, rank) on top; `preset` supplies what a diffusers folder does not say (data, schedule)."""
    if stage not in STAGES:
        raise ConfigError(f"finetune: unknown stage {stage!r} (choose from {', '.join(STAGES)})")
    source, overrides = Path(source), overrides or {}
    base = _source_config(source, preset)
    lora = base.get("lora", {})
    has_lora = bool(lora.get("time", "none") != "none" or lora.get("classes", "none") != "none")
    has_lora = has_lora or bool(lora.get("uc_bases") or lora.get("plain") or lora.get("tsm_scales"))
    fresh_lora = {"time": "none", "classes": "none", "uc_bases": 0, "plain": False, "tsm_scales": ()}
    if stage == "full":
        stage_sections = {"train": {"trainable": ("all",)}}
    elif stage == "assemble":
        if not lora.get("tsm_scales") or lora.get("tsm_stage") != "foster":
            raise ConfigError(
                f"finetune --stage assemble: {source} is not a fostering run (no TSM experts to assemble)"
            )
        stage_sections = {"lora": {"tsm_stage": "assemble"}, "train": {"trainable": ROUTERS}}
    else:
        if has_lora:
            raise ConfigError(
                f"finetune --stage {stage}: {source} already has LoRA layers; fine-tune a model without "
                "adapters (e.g. a baseline run or a diffusers folder)"
            )
        bank = {"plain": True} if stage == "lora" else {"tsm_scales": DEFAULT_TSM_SCALES, "tsm_stage": "foster"}
        mode = base.get("model", {}).get("conditioning", "baseline")
        if stage == "foster":
            mode = "with_lora"  # the experts condition the attention beside the base's own conditioning
        elif mode not in ("baseline", "adaln_attn"):
            mode = "baseline"  # plain LoRA conditions nothing
        stage_sections = {"lora": {**fresh_lora, **bank}, "train": {"trainable": ("lora",)}}
        stage_sections["model"] = {"conditioning": mode}
    stage_sections = merge_sections(stage_sections, {"train": {"init_from": str(source)}})
    try:
        return RunConfig.from_dict(merge_sections(base, stage_sections), overrides)
    except ConfigError as err:
        raise ConfigError(f"finetune --stage {stage}: {err}") from None


def sequential_foster(cfg: RunConfig, out_dir: str | Path) -> list[tuple[Path, RunConfig]]:
    """The paper's fostering, one expert after another: for each scale n and each interval i of it, a run
    that trains only expert i of scale n (`lora.tsm_scale` n) on only its interval's steps
    (`ddpm.train_steps`), starting from the previous run (`train.init_from`; the first from the fostering
    run's own source). `cfg.train.steps` is the total budget, split evenly over the sum(scales) experts.
    Returns (run directory, configuration) in order; the last run holds every expert."""
    from condlora.lora.strategies import interval_steps

    scales, T = cfg.lora.tsm_scales, cfg.ddpm.num_timesteps
    if not scales or cfg.lora.tsm_stage != "foster":
        raise ConfigError("finetune --sequential needs a fostering configuration (lora.tsm_scales, stage foster)")
    per_expert = cfg.train.steps // sum(scales)
    if per_expert < 1:
        raise ConfigError(f"finetune --sequential: train.steps {cfg.train.steps} < {sum(scales)} experts")
    if cfg.train.weight_decay:
        raise ConfigError(
            "finetune --sequential: train.weight_decay would shrink the experts that are not training (AdamW "
            "decays a whole adapter tensor); set 0"
        )
    runs, source = [], cfg.train.init_from
    for n in scales:
        for i in range(1, n + 1):
            run_dir = Path(out_dir) / f"scale{n}-interval{i}"
            train = {"steps": per_expert, "init_from": source, "out_dir": str(run_dir)}
            train["warmup_steps"] = min(cfg.train.warmup_steps, per_expert - 1)
            sections = {"lora": {"tsm_scale": n}, "ddpm": {"train_steps": interval_steps(T, n, i)}, "train": train}
            runs.append((run_dir, RunConfig.from_dict(cfg.to_dict(), sections)))
            source = str(run_dir)
    return runs
