"""The fine-tuning study: adapt a pretrained class-conditional model to a few-shot target domain, and guide
the adapted model with its base (`condlora adapt-study`).

Arms, each trained at one budget of `steps` optimizer steps of `batch_size` target images (3 seeds):

    lora       vanilla LoRA (`finetune --stage lora`)
    tsm1       TimeStep Master, fostering only: `tsm_scale` experts, each on its interval's steps
    tsm2       TimeStep Master, both stages: experts of scales (1, tsm_scale) fostered for
               (1 - assemble_share) * steps, then their routers assembled for the rest (`tsm2-foster` is
               the fostering run)
    full       full fine-tuning (`finetune --stage full`), the reference point

plus `base`, the source model itself. Every arm is sampled with the same seeds and scored against the
target domain (in-domain FID, precision, recall, diversity, class accuracy). With `gammas`, the LoRA arm is
then swept under guidance, mirroring the AutoLoRA paper's Table 1: plain LoRA at each LoRA scale alpha of
`lora_scales` and AutoLoRA at each (alpha, gamma), each with and without classifier-free guidance.

Layout (everything resumes from the files: finished runs and evaluations are skipped):

    <dir>/adapt.json            the specification (a resumed study must match it)
    <dir>/runs/<arm>-seed<s>/   a `condlora finetune` run directory
    <dir>/evals.json            {"<entry>": {"<seed>": metrics}}, written as each evaluation finishes
    <dir>/report/               report.md, results.json and sample grids
"""

from __future__ import annotations

import dataclasses
import json
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from condlora.config import ConfigError
from condlora.train.checkpoint import checkpoint_step, list_checkpoints, write_json_atomic

SPEC_FILE = "adapt.json"
ARMS = ("lora", "tsm1", "tsm2", "full")
SAMPLE_SEED = 10_000  # sampling seed of study seed s: SAMPLE_SEED * (s + 1), the same for every arm


@dataclass(frozen=True)
class AdaptSpec:
    """A fine-tuning study of `source` (a condlora run or checkpoint without adapters) on the dataset
    `target`, `shots` images per class (`data.max_per_class`)."""

    source: str
    target: str = "mnist5k-bold"
    shots: int = 10
    steps: int = 600
    batch_size: int = 32
    lr: float = 2e-3
    full_lr: float = 2e-4
    rank: int = 8
    ema_decay: float = 0.99
    tsm_scale: int = 4
    assemble_share: float = 0.25
    arms: tuple[str, ...] = ARMS
    seeds: tuple[int, ...] = (0, 1, 2)
    eval_count: int = 500
    eval_steps: int = 25
    guidance_scale: float = 2.0
    lora_scales: tuple[float, ...] = (0.4, 0.7, 1.0, 1.3)
    gammas: tuple[float, ...] = (1.5, 2.0)

    def __post_init__(self) -> None:
        def need(ok: bool, name: str, rule: str) -> None:
            if not ok:
                raise ConfigError(f"adapt-study: {name} {rule}, got {getattr(self, name)!r}")

        need(bool(self.arms) and set(self.arms) <= set(ARMS), "arms", f"must be some of {', '.join(ARMS)}")
        need(bool(self.seeds) and len(set(self.seeds)) == len(self.seeds), "seeds", "must be distinct, at least one")
        for name in ("shots", "steps", "batch_size", "rank", "eval_steps"):
            need(getattr(self, name) >= 1, name, "must be >= 1")
        need(self.eval_count >= 20, "eval_count", "must be >= 20 (diversity needs two samples of each digit)")
        need(self.tsm_scale >= 2, "tsm_scale", "must be >= 2 (scale 1 is one expert: vanilla LoRA)")
        need(0 < self.assemble_share < 1, "assemble_share", "must be in (0, 1)")
        need(round(self.steps * self.assemble_share) >= 1, "assemble_share", "leaves no assembling step")
        need(all(a >= 0 for a in self.lora_scales), "lora_scales", "must be >= 0")
        need(all(g >= 0 for g in self.gammas), "gammas", "must be >= 0")
        need(not self.gammas or "lora" in self.arms, "gammas", "need the lora arm (it is the guided LoRA)")

    @property
    def assemble_steps(self) -> int:
        return round(self.steps * self.assemble_share)

    def to_dict(self) -> dict[str, Any]:
        return json.loads(json.dumps(dataclasses.asdict(self)))

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> AdaptSpec:
        tuples = {k: tuple(v) for k, v in data.items() if isinstance(v, list)}
        return cls(**(data | tuples))


def _run_dir(study_dir: Path, arm: str, seed: int) -> Path:
    return study_dir / "runs" / f"{arm}-seed{seed}"


def _stages(spec: AdaptSpec, study_dir: Path, arm: str, seed: int) -> list[tuple[str, str, Path, dict[str, Any]]]:
    """(stage, source, run directory, overrides) of the runs that make `arm`, in order."""
    data = {"dataset": spec.target, "max_per_class": spec.shots}
    train = {"batch_size": spec.batch_size, "lr": spec.lr, "seed": seed, "ema_decay": spec.ema_decay}
    train |= {"sample_every": 0, "checkpoint_every": spec.steps, "warmup_steps": min(100, spec.steps // 6)}

    def run(stage: str, source: str, name: str, steps: int, lora=None, **more) -> tuple:
        out = _run_dir(study_dir, name, seed)
        sections = {"data": data, "train": train | {"steps": steps, "out_dir": str(out)} | more}
        return stage, source, out, sections | ({"lora": lora} if lora else {})

    rank = {"rank": spec.rank}
    if arm == "lora":
        return [run("lora", spec.source, "lora", spec.steps, rank)]
    if arm == "full":
        return [run("full", spec.source, "full", spec.steps, lr=spec.full_lr)]
    if arm == "tsm1":
        return [run("foster", spec.source, "tsm1", spec.steps, rank | {"tsm_scales": (spec.tsm_scale,)})]
    foster_steps = spec.steps - spec.assemble_steps
    foster = run("foster", spec.source, "tsm2-foster", foster_steps, rank | {"tsm_scales": (1, spec.tsm_scale)})
    return [foster, run("assemble", str(foster[2]), "tsm2", spec.assemble_steps)]


def train_arm(spec: AdaptSpec, study_dir: Path, arm: str, seed: int, progress: bool = True) -> Path:
    """Train (or resume, or skip when finished) the runs of `arm` for `seed`; its final run directory."""
    from condlora.train import train
    from condlora.train.finetune import finetune_config

    run_dir = study_dir
    for stage, source, run_dir, overrides in _stages(spec, study_dir, arm, seed):
        cfg = finetune_config(stage, source, overrides)
        cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=progress))
        ckpts = list_checkpoints(run_dir / "checkpoints")
        if not ckpts or checkpoint_step(ckpts[-1]) < cfg.train.steps:
            print(f"  training {run_dir.name} ({stage}, {cfg.train.steps} steps)")
            train(cfg, run_dir, resume=bool(ckpts), overwrite=not ckpts, preset=f"finetune-{stage}")
    return run_dir


def entry_name(lora_scale: float, gamma: float | None, tag: str) -> str:
    """The evaluation entry of the LoRA arm sampled at LoRA scale alpha, with AutoLoRA's `gamma` (None: plain
    LoRA), `tag` "cfg" or "nocfg"."""
    if gamma is None:
        return "lora" if (lora_scale, tag) == (1.0, "cfg") else f"lora-a{lora_scale:g}-{tag}"
    return f"autolora-a{lora_scale:g}-g{gamma:g}-{tag}"


def guidance_entries(spec: AdaptSpec) -> dict[str, dict[str, Any]]:
    """The guided samplings of the LoRA arm: entry name -> sample overrides (Table 1 of the AutoLoRA paper:
    plain LoRA and AutoLoRA at each LoRA scale, with and without CFG)."""
    out: dict[str, dict[str, Any]] = {}
    for w, tag in ((1.0, "nocfg"), (spec.guidance_scale, "cfg")):
        for a in spec.lora_scales:
            if (a, tag) != (1.0, "cfg"):  # that one is the lora arm's own evaluation
                out[entry_name(a, None, tag)] = {"guidance": "cfg", "guidance_scale": w, "lora_scale": a}
            for g in spec.gammas:
                out[entry_name(a, g, tag)] = {
                    "guidance": "autolora",
                    "guidance_scale": w,
                    "lora_scale": a,
                    "autolora_gamma": g,
                }
    return out


def evaluate(
    run: str | Path, spec: AdaptSpec, seed: int, device, progress: bool = True, **sample: Any
) -> tuple[dict[str, float], np.ndarray]:
    """Metrics against the target domain of `spec.eval_count` DDIM samples of `run` (EMA weights, classes
    cycling, sampling seed of study seed `seed`), with `sample` overriding the sample section; and the first
    100 images."""
    from condlora.data import unscale
    from condlora.diffusion import process_for
    from condlora.diffusion.generate import generate
    from condlora.nets import count_parameters
    from condlora.pipeline import digit_metrics, load_model, with_sample_overrides

    net, cfg, _ = load_model(run, use_ema=True, device=device)
    sample = {"sampler": "ddim", "steps": spec.eval_steps, "eta": 0.0, "guidance_scale": spec.guidance_scale} | sample
    sample |= {"count": spec.eval_count, "seed": SAMPLE_SEED * (seed + 1), "class_label": -1}
    s = with_sample_overrides(cfg, **sample)
    m, stats = cfg.model, {}
    shape = (m.in_channels, m.image_size, m.image_size)
    images, labels = generate(net, process_for(cfg), s, shape, m.num_classes, device, progress, stats)
    images = unscale(images)
    metrics = digit_metrics(images, labels.numpy(), progress=progress, accuracy=True, reference=spec.target)
    metrics["sampling_seconds"] = stats["seconds"]
    metrics["parameters"] = count_parameters(net)
    return metrics, images[:100]


def check_source(spec: AdaptSpec, study_dir: Path) -> None:
    """Refuse, before any work, a source or target the arms cannot fine-tune (missing, already adapted,
    another image size): the first stage of every arm is configured once."""
    from condlora.train.finetune import finetune_config

    for arm in spec.arms:
        stage, source, _, overrides = _stages(spec, study_dir, arm, spec.seeds[0])[0]
        finetune_config(stage, source, overrides)


def prepare(spec: AdaptSpec, study_dir: Path) -> None:
    """Write adapt.json, or check that the one there (an interrupted study) is the same study."""
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / SPEC_FILE
    if path.is_file():
        saved = AdaptSpec.from_dict(json.loads(path.read_text()))
        if saved != spec:
            differ = sorted(k for k, v in spec.to_dict().items() if saved.to_dict()[k] != v)
            raise ConfigError(f"adapt-study: {study_dir} holds another study (differs in {', '.join(differ)})")
        return
    write_json_atomic(path, spec.to_dict())


def run_adapt_study(spec: AdaptSpec, study_dir: str | Path, device: str = "auto", progress: bool = True) -> Path:
    """Train every arm for every seed, evaluate the arms and the guidance sweep, write the report; returns
    report.md. Killed at any point, the same call resumes."""
    from condlora.eval.images import save_grid
    from condlora.study.adapt_report import write_adapt_report
    from condlora.train.distributed import resolve_device

    study_dir = Path(study_dir)
    check_source(spec, study_dir)
    prepare(spec, study_dir)
    dev = resolve_device(device, "--device")
    evals_path = study_dir / "evals.json"
    evals: dict[str, dict[str, Any]] = json.loads(evals_path.read_text()) if evals_path.is_file() else {}
    grids = study_dir / "report"

    def record(entry: str, seed: int, run: Path, **sample: Any) -> None:
        if str(seed) in evals.get(entry, {}):
            return
        start = time.perf_counter()
        metrics, first = evaluate(run, spec, seed, dev, progress, **sample)
        evals.setdefault(entry, {})[str(seed)] = metrics
        write_json_atomic(evals_path, evals)
        if seed == spec.seeds[0]:
            save_grid(first, grids / f"{entry}.png", nrow=10)
        print(f"  {entry} seed {seed}: FID {metrics['fid_in_domain']:.3f}  accuracy {metrics['accuracy']:.1%}  "
              f"diversity {metrics['diversity']:.3f}  ({time.perf_counter() - start:.0f} s)")  # fmt: skip

    for seed in spec.seeds:
        print(f"seed {seed}")
        record("base", seed, Path(spec.source))
        for arm in spec.arms:
            record(arm, seed, train_arm(spec, study_dir, arm, seed, progress))
        if spec.gammas:
            record("base-nocfg", seed, Path(spec.source), guidance_scale=1.0)
        for entry, sample in guidance_entries(spec).items():
            record(entry, seed, _run_dir(study_dir, "lora", seed), **sample)
    return write_adapt_report(spec, study_dir)
