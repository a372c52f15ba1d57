"""`condlora train | finetune | sample | eval | plots | study | adapt-study | info | convert-edm`: parse
arguments, call the library."""

from __future__ import annotations

import argparse
import dataclasses
import functools
import json
import pickle
import sys
import time
from pathlib import Path
from typing import Any

from condlora.config import SECTIONS, ConfigError, RunConfig, field_help, literal_choices
from condlora.presets import PRESETS, build_config


def _add_config_options(parser: argparse.ArgumentParser, preset: str | None = "mnist-nano") -> None:
    """`--preset` and one `--section.field` option per config field, with its help, type and default."""
    parser.add_argument(
        "--preset", default=preset, choices=list(PRESETS), help=f"named configuration [default: {preset}]"
    )
    for section in SECTIONS:
        group = parser.add_argument_group(f"{section} options")
        for name, annotation, default, text in field_help(section):
            choices = literal_choices(annotation)
            shown = ",".join(map(str, default)) if isinstance(default, tuple) else default
            extra = f" (one of {', '.join(choices)})" if choices else ""
            group.add_argument(
                f"--{section}.{name}",
                dest=f"{section}.{name}",
                default=None,
                metavar=_metavar(annotation, choices),
                help=f"{text}{extra} [default: {shown}]",
            )


def _metavar(annotation: Any, choices: tuple[Any, ...] | None) -> str:
    if choices:
        return "{" + ",".join(map(str, choices)) + "}"
    return "LIST" if getattr(annotation, "__origin__", None) is tuple else annotation.__name__.upper()


def _overrides(args: argparse.Namespace) -> dict[str, dict[str, Any]]:
    out: dict[str, dict[str, Any]] = {}
    for key, value in vars(args).items():
        if "." in key and value is not None:
            section, name = key.split(".", 1)
            out.setdefault(section, {})[name] = value
    return out


def _config_from_args(args: argparse.Namespace) -> RunConfig:
    return build_config(args.preset, _overrides(args))


def cmd_info(args: argparse.Namespace) -> None:
    from condlora.nets import build_network, summarize

    cfg = _config_from_args(args)
    print(summarize(build_network(cfg), cfg))


def _resume_config(args: argparse.Namespace) -> tuple[RunConfig, str]:
    """The saved config of a run directory with command-line overrides (e.g. more steps) on top."""
    import json

    path = Path(args.resume) / "config.json"
    if not path.is_file():
        raise ConfigError(f"--resume {args.resume}: no config.json there (not a run directory)")
    try:
        saved = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as err:
        raise ConfigError(f"--resume {args.resume}: {path} is not valid JSON ({err})") from None
    if not isinstance(saved, dict):
        raise ConfigError(f"--resume {args.resume}: {path} does not hold a run configuration")
    preset = saved.pop("preset", "")
    try:
        return RunConfig.from_dict(saved, _overrides(args)), preset
    except ConfigError as err:
        raise ConfigError(f"--resume {args.resume}: {path}: {err}") from None


def cmd_train(args: argparse.Namespace) -> None:
    if args.resume:
        cfg, preset = _resume_config(args)
    else:
        cfg, preset = _config_from_args(args), args.preset
    _train_and_sample(args, cfg, preset)


def cmd_finetune(args: argparse.Namespace) -> None:
    from condlora.train.finetune import finetune_config

    if args.resume:
        cfg, preset = _resume_config(args)
    else:
        if not args.source or not args.stage:
            raise ConfigError("finetune: give SOURCE and --stage (or --resume RUN_DIR)")
        cfg, preset = finetune_config(args.stage, args.source, _overrides(args), args.preset), f"finetune-{args.stage}"
    if args.sequential:
        _foster_sequentially(args, cfg, preset)
        return
    out_dir = _train_and_sample(args, cfg, preset)
    if out_dir is not None and cfg.lora.plain and cfg.model.backbone == "diffusers":
        from condlora.lora import export_peft
        from condlora.pipeline import load_model

        net, _, _ = load_model(out_dir)
        print(f"PEFT adapter (peft / diffusers load it onto the source UNet): {export_peft(net, out_dir / 'peft')}")


def _foster_sequentially(args: argparse.Namespace, cfg: RunConfig, preset: str) -> None:
    """One run per expert (see `sequential_foster`); finished runs are skipped, an interrupted one resumes."""
    from condlora.train.checkpoint import load_latest
    from condlora.train.finetune import sequential_foster

    if args.resume or args.stage != "foster":
        raise ConfigError("--sequential fosters from SOURCE with --stage foster (run it again to resume)")
    out_dir = Path(cfg.train.out_dir or _default_out_dir(preset))
    runs = sequential_foster(cfg, out_dir)
    for k, (run_dir, run_cfg) in enumerate(runs, 1):
        latest = load_latest(run_dir / "checkpoints")
        if latest is not None and latest.step >= run_cfg.train.steps:
            continue
        print(f"[{k}/{len(runs)}] {run_dir.name}: expert of steps {list(run_cfg.ddpm.train_steps)} ([first, last))")
        step = argparse.Namespace(resume=str(run_dir) if latest else None, overwrite=latest is None,
                                  no_sample=args.no_sample or k < len(runs))  # fmt: skip
        _train_and_sample(step, run_cfg, preset)
    print(f"fostered every expert; the last run holds them all: {runs[-1][0]}")


def _train_and_sample(args: argparse.Namespace, cfg: RunConfig, preset: str) -> Path | None:
    """Train (or resume) `cfg`, then sample the result and score MNIST digits; the run directory on the main
    process, None on the others."""
    from condlora.pipeline import load_model, sample_to_files
    from condlora.train import train
    from condlora.train.distributed import init_distributed, shutdown_distributed

    if args.resume and args.overwrite:
        raise ConfigError("--resume continues a run and --overwrite replaces one: give only one of them")
    dist = init_distributed(cfg.train.device)
    out_dir = Path(args.resume) if args.resume else Path(cfg.train.out_dir or dist.broadcast(_default_out_dir(preset)))
    try:
        result = train(cfg, out_dir, resume=bool(args.resume), preset=preset, overwrite=args.overwrite)
        if not dist.is_main:
            return None
        print(f"trained {result.steps} steps in {result.train_seconds / 60:.1f} min; checkpoint: {result.checkpoint}")
        if not args.no_sample:
            net, cfg, _ = load_model(result.checkpoint, cfg.sample.use_ema, dist.device)
            png, npz = sample_to_files(net, cfg, cfg.sample, out_dir / "samples", dist.device, cfg.train.progress)
            print(f"samples: {png}\n         {npz}")
            if cfg.data.dataset == "mnist5k" and cfg.model.num_classes == 10:
                cmd_eval(build_parser().parse_args(["eval", str(npz)]))
        return out_dir
    finally:
        shutdown_distributed()


def _default_out_dir(preset: str) -> str:
    """runs/<preset>-<date>-<time>, with a suffix if that directory exists already."""
    base = Path("runs") / f"{preset}-{time.strftime('%Y%m%d-%H%M%S')}"
    path, n = base, 1
    while path.exists():
        path, n = base.with_name(f"{base.name}-{n}"), n + 1
    return str(path)


def cmd_sample(args: argparse.Namespace) -> None:
    from condlora.pipeline import load_model, sample_to_files, with_sample_overrides
    from condlora.train.distributed import resolve_device

    device = resolve_device(args.device, "--device")
    net, cfg, ckpt = load_model(args.checkpoint, use_ema=not args.no_ema, device=device)
    sample = with_sample_overrides(
        cfg,
        sampler=args.sampler,
        steps=args.steps,
        eta=args.eta,
        guidance_scale=args.guidance_scale,
        guidance=args.guidance,
        lora_scale=args.lora_scale,
        autolora_gamma=args.gamma,
        base_guidance_scale=args.base_guidance_scale,
        branches_per_call=args.branches_per_call,
        count=args.count,
        class_label=args.class_label,
        seed=args.seed,
        batch_size=args.batch_size,
    )
    out = Path(args.out) if args.out else ckpt.path.parent.parent / f"samples-step{ckpt.step}-seed{sample.seed}"
    png, npz = sample_to_files(net, cfg, sample, out, device, progress=True)
    print(f"sampled {sample.count} images from {ckpt.path}\n  {png}\n  {npz}")


def cmd_eval(args: argparse.Namespace) -> None:
    import json

    from condlora.data import read_npz
    from condlora.pipeline import digit_class_accuracy, digit_feature_metrics

    if args.dino and not args.fid:
        raise ValueError("eval --dino needs --fid (the DINOv2 diversity is one of the feature metrics)")
    results: dict = {"samples": str(args.samples)}
    archive = read_npz(Path(args.samples)) if Path(args.samples).is_file() else {}
    for name in ("network_calls_per_sample", "sampling_seconds"):
        if name in archive:  # written by condlora sample / train
            results[name] = float(archive[name])
    if "network_calls_per_sample" in results:
        print(f"network calls per sample: {results['network_calls_per_sample']:.0f} (each evaluates every "
              f"guidance branch); sampling took {results['sampling_seconds']:.1f} s")  # fmt: skip
    if args.fid:
        from condlora.eval.fid import IN_DOMAIN_FID_NAME

        results.update(
            digit_feature_metrics(args.samples, args.cache_dir, accuracy=True, dino=args.dino, reference=args.reference)
        )
        print(f"{IN_DOMAIN_FID_NAME}: {results['fid_in_domain']:.4f}")
        print(f"precision {results['precision']:.3f}  recall {results['recall']:.3f}  "
              f"diversity {results['diversity']:.4f}  ({results['count']} samples)")  # fmt: skip
        if "diversity_dino" in results:
            print(f"diversity (DINOv2 features) {results['diversity_dino']:.4f}")
        print(f"Div-X (diversity x class adherence, AutoLoRA paper) {results['div_x']:.4f}")
    if args.inception_weights:
        from condlora.eval.inception import INCEPTION_FID_NAME, inception_fid
        from condlora.pipeline import reference_digits

        results["fid_inception"] = inception_fid(
            archive["images"], reference_digits(args.reference), args.inception_weights, args.cache_dir
        )
        print(f"{INCEPTION_FID_NAME}: {results['fid_inception']:.4f}")
    overall, per_class = digit_class_accuracy(args.samples, args.cache_dir)
    results.update(accuracy=overall, per_class_accuracy=per_class)
    print(f"class accuracy (reference MNIST classifier): {overall:.1%}")
    print("  " + "  ".join(f"{c}:{a:.0%}" for c, a in per_class.items()))
    columns = [
        k
        for k in (
            "fid_inception",
            "fid_in_domain",
            "precision",
            "recall",
            "diversity",
            "diversity_dino",
            "accuracy",
            "div_x",
        )
        if k in results
    ]
    print("| samples | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns))
    print(f"| {args.samples} | " + " | ".join(f"{results[k]:.4f}" for k in columns) + " |")
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.json}")


def cmd_plots(args: argparse.Namespace) -> None:
    from condlora.pipeline import load_model, lora_figures, with_sample_overrides

    net, cfg, ckpt = load_model(args.checkpoint, use_ema=not args.no_ema)
    cfg.sample = with_sample_overrides(cfg, steps=args.steps, seed=args.seed, guidance_scale=args.guidance_scale)
    out = Path(args.out) if args.out else ckpt.path.parent.parent / "figures"
    classes = None if args.no_classes else tuple(args.classes)
    paths = lora_figures(net, cfg, out, classes=classes, reference_t=args.reference_t)
    if not paths:
        raise ValueError("nothing to plot: the model has no time-dependent LoRA bank and no classes")
    print("\n".join(f"  {p}" for p in paths))


_GRID_OPTIONS = ("preset", "modes", "omega", "seeds", "skip", "eval_every", "eval_count", "eval_sampler",
                 "eval_steps", "eval_guidance", "extrapolation", "extrapolation_count")  # fmt: skip


def _study_spec(args: argparse.Namespace):
    """The study in args.dir/study.json when no grid option is given, else the one the options describe."""
    from condlora.study import MODES, StudySpec, grid

    saved = Path(args.dir) / "study.json"
    given = [k for k in _GRID_OPTIONS if getattr(args, k) is not None] + list(_overrides(args))
    if saved.is_file() and not given:
        return StudySpec.load(saved)
    if args.only or args.report_only:
        raise ConfigError(f"study: {args.dir} holds no study.json to run --only / --report-only from")

    def values(text: str | None, default: tuple, kind=str) -> tuple:
        return default if text is None else tuple(kind(v) for v in text.split(",") if v.strip())

    preset, overrides = args.preset or "mnist-nano", _overrides(args)
    sample = {"sampler": args.eval_sampler, "steps": args.eval_steps, "guidance_scale": args.eval_guidance}
    return StudySpec(
        preset=preset,
        configs=grid(
            preset, values(args.modes, MODES), values(args.omega, ("fixed",)), overrides, values(args.skip, ())
        ),
        seeds=values(args.seeds, (0, 1, 2), int),
        overrides=overrides,
        eval_every=args.eval_every or 200,
        eval_count=args.eval_count or 500,
        eval_sample={k: v for k, v in sample.items() if v is not None},
        extrapolation=values(args.extrapolation, (-1.0, 2.0), float),
        extrapolation_count=args.extrapolation_count or 200,
    )


def cmd_study(args: argparse.Namespace) -> None:
    import shlex

    import torch

    from condlora.study import run_one, run_study, write_report
    from condlora.study.report import COMMAND_FILE
    from condlora.study.runner import prepare_study

    spec = _study_spec(args)
    if args.threads:
        torch.set_num_threads(args.threads)
    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
    if args.only:
        name, _, seed = args.only.rpartition(":")
        if not seed.lstrip("-").isdigit():
            raise ConfigError(f"study: --only takes CONFIG:SEED, got {args.only!r}")
        run_one(spec, Path(args.dir), name, int(seed), devices[0], progress=not args.no_progress)
        return
    prepare_study(spec, Path(args.dir))
    command = Path(args.dir) / COMMAND_FILE
    if not command.is_file():
        command.write_text("condlora " + shlex.join(sys.argv[1:] if args.argv is None else args.argv) + "\n")
    if args.report_only:
        path = write_report(spec, Path(args.dir))
    else:
        path = run_study(spec, args.dir, args.jobs, devices, args.threads, progress=not args.no_progress)
    print(f"report: {path}")


def _adapt_spec(args: argparse.Namespace):
    """The study in args.dir/adapt.json when no option is given, else the one the options describe."""
    from condlora.study.adapt import SPEC_FILE, AdaptSpec

    given = {f.name: getattr(args, f.name) for f in dataclasses.fields(AdaptSpec) if getattr(args, f.name) is not None}
    saved = Path(args.dir) / SPEC_FILE
    if saved.is_file() and not given:
        return AdaptSpec.from_dict(json.loads(saved.read_text()))
    if "source" not in given:
        raise ConfigError(f"adapt-study: {args.dir} holds no {SPEC_FILE}: give --source (the pretrained run)")
    return AdaptSpec(**given)


def cmd_adapt_study(args: argparse.Namespace) -> None:
    import shlex

    from condlora.study.adapt import check_source, prepare, run_adapt_study
    from condlora.study.adapt_report import write_adapt_report
    from condlora.study.report import COMMAND_FILE

    spec, study_dir = _adapt_spec(args), Path(args.dir)
    check_source(spec, study_dir)
    prepare(spec, study_dir)
    command = study_dir / COMMAND_FILE
    if not command.is_file():
        command.write_text("condlora " + shlex.join(sys.argv[1:] if args.argv is None else args.argv) + "\n")
    if args.report_only:
        path = write_adapt_report(spec, study_dir)
    else:
        path = run_adapt_study(spec, study_dir, args.device, progress=not args.no_progress)
    print(f"report: {path}")


def _add_spec_options(parser: argparse.ArgumentParser, spec_class: type) -> None:
    """One --option per field of a plain-data spec; tuples take comma-separated values."""

    def values(kind: type, text: str) -> tuple:
        return tuple(kind(v) for v in text.split(",") if v.strip())

    for f in dataclasses.fields(spec_class):
        default, option = f.default, f"--{f.name.replace('_', '-')}"
        if default is dataclasses.MISSING:
            parser.add_argument(option, dest=f.name, metavar="PATH", help=f"{f.name} (required for a new study)")
        elif isinstance(default, tuple):
            kind = type(default[0]) if default else str
            shown = ",".join(map(str, default))
            parser.add_argument(option, dest=f.name, type=functools.partial(values, kind), help=f"{f.name} [{shown}]")
        else:
            parser.add_argument(option, dest=f.name, type=type(default), help=f"{f.name} [{default}]")


def cmd_convert_edm(args: argparse.Namespace) -> None:
    from condlora.nets.edm_pickle import convert_edm_pickle

    ckpt = convert_edm_pickle(args.pickle, args.out, key=args.key)
    print(f"converted {args.pickle} ({args.key}) to {ckpt}\n  sample it: condlora sample {args.out}")
    print(f"  fine-tune from it: condlora train --preset ... --train.init_from {args.out}")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="condlora", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("train", help="train a model (then sample it)", description="Train, then sample.")
    _add_config_options(p)
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the run in RUN_DIR from its newest good checkpoint")
    p.add_argument(
        "--overwrite", action="store_true", help="replace an earlier run in --train.out_dir (deletes its files)"
    )
    p.add_argument("--no-sample", action="store_true", help="skip sampling after training")
    p.set_defaults(func=cmd_train)

    p = sub.add_parser(
        "finetune",
        help="fine-tune a pretrained model: plain LoRA, or TimeStep Master fostering / assembling",
        description="Fine-tune SOURCE (a condlora run or checkpoint, or a local diffusers UNet folder) with its "
        "weights frozen: --stage lora trains plain LoRA adapters (exported for peft / diffusers when SOURCE is a "
        "diffusers UNet), foster trains TimeStep Master experts (lora.tsm_scales, default 1,2,4,8), assemble "
        "trains only the routers of a fostering run's experts, full trains every weight.",
    )
    p.add_argument("source", nargs="?", help="the pretrained model (for assemble: the fostering run)")
    p.add_argument("--stage", choices=["lora", "foster", "assemble", "full"], help="what to train")
    _add_config_options(p)
    p.add_argument(
        "--sequential",
        action="store_true",
        help="foster one expert after another on its own interval (one run each under --train.out_dir)",
    )
    p.add_argument("--resume", metavar="RUN_DIR", help="continue the fine-tuning run in RUN_DIR")
    p.add_argument("--overwrite", action="store_true", help="replace an earlier run in --train.out_dir")
    p.add_argument("--no-sample", action="store_true", help="skip sampling after training")
    p.set_defaults(func=cmd_finetune)

    p = sub.add_parser("sample", help="sample a trained model to a PNG grid and an .npz")
    p.add_argument("checkpoint", help="a run directory (newest good checkpoint) or one checkpoint directory")
    p.add_argument("--out", help="output prefix (writes PREFIX.png and PREFIX.npz)")
    p.add_argument("--sampler", choices=["ddpm", "ddim", "heun"], help="ddpm / ddim (ddpm family), heun (edm)")
    p.add_argument("--steps", type=int, help="ddpm / ddim: network evaluations per sample; heun: noise levels")
    p.add_argument("--eta", type=float, help="DDIM stochasticity in [0, 1]")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance scale (1 = conditional)")
    p.add_argument(
        "--guidance",
        choices=["cfg", "autolora"],
        help="cfg: classifier-free guidance; autolora: the LoRA model guided by its base model (AutoLoRA)",
    )
    p.add_argument("--lora-scale", type=float, help="alpha, the factor on the LoRA adapters (0: the base model)")
    p.add_argument("--gamma", type=float, help="AutoLoRA's gamma (0: base, 1: LoRA model, > 1: beyond) [1.5]")
    p.add_argument(
        "--base-guidance-scale", type=float, help="AutoLoRA's w1, the base model's CFG scale [--guidance-scale]"
    )
    p.add_argument(
        "--branches-per-call",
        type=int,
        help="guidance branches per network call: 0 all (fastest), 2 AutoLoRA in two CFG-sized calls (less memory)",
    )
    p.add_argument("--count", type=int, help="number of images")
    p.add_argument("--class", dest="class_label", type=int, help="sample only this class (default: cycle)")
    p.add_argument("--seed", type=int, help="sample i uses seed + i")
    p.add_argument("--batch-size", type=int, help="images per network call")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.set_defaults(func=cmd_sample)

    p = sub.add_parser("eval", help="class accuracy of MNIST samples under a reference classifier")
    p.add_argument("samples", help="a samples .npz written by `condlora sample` or `condlora train`")
    p.add_argument("--cache-dir", help="where the trained reference classifier is cached")
    p.add_argument(
        "--fid",
        action="store_true",
        help="also in-domain FID, precision, recall and diversity against MNIST-5k's training split (1000+ samples)",
    )
    p.add_argument(
        "--inception-weights",
        metavar="PTH",
        help="also the standard FID (Inception-v3 pool3) from this local pt_inception-2015-12-05-6726825d.pth",
    )
    p.add_argument(
        "--reference",
        default="mnist5k",
        help="the dataset whose training split the FIDs compare against, e.g. mnist5k-bold [mnist5k]",
    )
    p.add_argument(
        "--dino", metavar="DIR", help="with --fid: also the diversity of DINOv2 features from this local model folder"
    )
    p.add_argument("--json", help="write the results to this JSON file")
    p.set_defaults(func=cmd_eval)

    p = sub.add_parser("plots", help="omega heat maps, omega cosine similarity, class interpolation grids")
    p.add_argument("checkpoint", help="a run directory or one checkpoint directory")
    p.add_argument("--out", help="output directory (default: RUN_DIR/figures)")
    p.add_argument("--classes", type=int, nargs=2, default=[1, 7], metavar=("I", "J"), help="classes of the grids")
    p.add_argument("--no-classes", action="store_true", help="skip the class interpolation / extrapolation grids")
    p.add_argument("--reference-t", type=int, help="step whose omega the similarity plot compares to (T/2)")
    p.add_argument("--steps", type=int, help="DDIM steps of the class grids")
    p.add_argument("--seed", type=int, help="seed of the first grid row")
    p.add_argument("--guidance-scale", type=float, help="classifier-free guidance of the class grids")
    p.add_argument("--no-ema", action="store_true", help="use the raw weights instead of the EMA")
    p.set_defaults(func=cmd_plots)

    p = sub.add_parser(
        "study",
        help="train and evaluate a grid of configurations x seeds, then write a report",
        description="Run a grid of conditioning modes x omega types x seeds at one training budget, evaluate "
        "every K steps and write DIR/report/report.md. Run it again with only DIR to resume an interrupted study.",
    )
    p.add_argument("dir", help="study directory (holds study.json, runs/ and report/)")
    _add_config_options(p, preset=None)
    p.add_argument(
        "--modes", help="comma-separated conditioning modes [default: baseline,with_lora,lora_only,adaln_attn]"
    )
    p.add_argument(
        "--omega",
        help="omega types of compositional TimeLoRA: fixed, train, train-onehot, train-gaussian [default: fixed]",
    )
    p.add_argument("--seeds", help="comma-separated training seeds [default: 0,1,2]")
    p.add_argument("--skip", help="comma-separated configuration names to leave out of the grid")
    p.add_argument("--eval-every", type=int, help="evaluate every K steps (the checkpoint interval) [default: 200]")
    p.add_argument("--eval-count", type=int, help="samples per evaluation [default: 500]")
    p.add_argument(
        "--eval-sampler", choices=["ddpm", "ddim", "heun"], help="sampler of the evaluations [default: the preset's]"
    )
    p.add_argument("--eval-steps", type=int, help="sampling steps of the evaluations [default: the preset's]")
    p.add_argument("--eval-guidance", type=float, help="guidance scale of the evaluations [default: the preset's]")
    p.add_argument("--extrapolation", help="comma-separated class scales beta probed at the end [default: -1,2]")
    p.add_argument("--extrapolation-count", type=int, help="samples per extrapolation scale [default: 200]")
    p.add_argument("--jobs", type=int, default=1, help="runs at once, each in its own process [default: 1]")
    p.add_argument(
        "--devices", default="auto", help="comma-separated devices given to the runs in turn, e.g. cuda:0,cuda:1"
    )
    p.add_argument(
        "--threads", type=int, default=0, help="CPU threads per run (0: torch's default; with --jobs, cores / jobs)"
    )
    p.add_argument("--only", metavar="CONFIG:SEED", help="run just this run of the study in DIR (what each job runs)")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished runs")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_study, argv=None)

    from condlora.study.adapt import AdaptSpec

    p = sub.add_parser(
        "adapt-study",
        help="fine-tuning study: LoRA, TimeStep Master and full fine-tuning on a few-shot domain; AutoLoRA sweep",
        description="Fine-tune SOURCE on a few examples per class of a target domain with vanilla LoRA, TSM "
        "1-stage, TSM 2-stage and full fine-tuning at one budget (3 seeds), score each against the domain, sweep "
        "the LoRA under plain and AutoLoRA guidance, and write DIR/report/report.md. Run it again to resume.",
    )
    p.add_argument("dir", help="study directory (holds adapt.json, runs/, evals.json and report/)")
    _add_spec_options(p, AdaptSpec)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cpu, cuda or cuda:N")
    p.add_argument("--report-only", action="store_true", help="rewrite the report from the finished evaluations")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=cmd_adapt_study, argv=None)

    p = sub.add_parser("info", help="print the architecture of a preset + overrides and its parameter count")
    _add_config_options(p)
    p.set_defaults(func=cmd_info)

    p = sub.add_parser(
        "convert-edm",
        help="convert a published EDM network pickle (DDPM++) into a condlora run directory, without running its code",
    )
    p.add_argument("pickle", help="e.g. edm-cifar10-32x32-uncond-vp.pkl (a local file)")
    p.add_argument("out", help="new run directory to write")
    p.add_argument("--key", default="ema", help="which network of the pickle [default: ema]")
    p.set_defaults(func=cmd_convert_edm)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "study":
        args.argv = argv
    try:
        args.func(args)
    except (ConfigError, ValueError, RuntimeError, FileNotFoundError, FileExistsError, pickle.UnpicklingError) as err:
        print(f"condlora {args.command}: error: {err}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main())
