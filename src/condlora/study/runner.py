"""Run a study: train every (configuration, seed) at the same budget, evaluate each checkpoint, probe the
final model, and write the report. Every stage leaves a file, so a killed study resumes where it stopped:

    <study>/study.json                 the specification (a resumed study must match it)
    <study>/runs/<config>-seed<s>/     a `condlora train` run directory (checkpoints every eval_every steps)
        eval.json                      metrics of each evaluated checkpoint, written as each one finishes
        final.json                     parameter counts, class extrapolation, omega locality: the run is done
        figures/                       sample grid, extrapolation grids, omega heat map (first seed only)
    <study>/report/                    report.md, results.json and the figures it shows

With `jobs` > 1 the runs go to that many worker processes (`condlora study DIR --only CONFIG:SEED`), each
on its own device of `devices` in turn (GPUs) or sharing the CPU's cores.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from condlora.config import ConfigError
from condlora.study.spec import StudySpec
from condlora.train.checkpoint import checkpoint_step, list_checkpoints, write_json_atomic

SPEC_FILE = "study.json"
FIRST_CLASSES = (1, 7)  # the class pair of the interpolation / extrapolation grids


def prepare_study(spec: StudySpec, study_dir: Path) -> None:
    """Write `study.json`, or check that the one already there (an interrupted study) is the same study."""
    study_dir.mkdir(parents=True, exist_ok=True)
    path = study_dir / SPEC_FILE
    if path.is_file():
        saved = StudySpec.load(path)
        if saved.to_dict() != spec.to_dict():
            differ = sorted(k for k, v in spec.to_dict().items() if saved.to_dict().get(k) != v)
            raise ConfigError(
                f"study: {study_dir} holds another study (differs in {', '.join(differ)}); resume it without "
                "grid options, or choose a new directory"
            )
        return
    write_json_atomic(path, spec.to_dict())


def run_dir_of(spec: StudySpec, study_dir: Path, name: str, seed: int) -> Path:
    return study_dir / "runs" / spec.run_name(name, seed)


def is_done(spec: StudySpec, study_dir: Path, name: str, seed: int) -> bool:
    return (run_dir_of(spec, study_dir, name, seed) / "final.json").is_file()


def run_study(
    spec: StudySpec,
    study_dir: str | Path,
    jobs: int = 1,
    devices: tuple[str, ...] = ("auto",),
    threads: int = 0,
    progress: bool = True,
) -> Path:
    """Run every unfinished run of `spec` under `study_dir`, then write the report; returns report.md."""
    from condlora.study.report import write_report

    study_dir = Path(study_dir)
    if jobs < 1:
        raise ConfigError(f"study: jobs must be >= 1, got {jobs}")
    prepare_study(spec, study_dir)
    pending = [(n, s) for n, s in spec.runs() if not is_done(spec, study_dir, n, s)]
    total = len(spec.runs())
    print(f"study {study_dir}: {total} runs, {total - len(pending)} done, {len(pending)} to go")
    if jobs == 1:
        for i, (name, seed) in enumerate(pending, 1):
            print(f"[{i}/{len(pending)}] {spec.run_name(name, seed)}")
            run_one(spec, study_dir, name, seed, devices[0], progress)
    else:
        _run_in_processes(spec, study_dir, pending, jobs, devices, threads)
    return write_report(spec, study_dir)


def _run_in_processes(
    spec: StudySpec,
    study_dir: Path,
    pending: list[tuple[str, int]],
    jobs: int,
    devices: tuple[str, ...],
    threads: int,
) -> None:
    """One worker process per run, at most `jobs` at once; device i % len(devices) for the i-th worker."""
    threads = threads or max(1, (os.cpu_count() or 1) // jobs)
    queue, running, failed = list(enumerate(pending)), {}, []
    while queue or running:
        while queue and len(running) < jobs:
            i, (name, seed) = queue.pop(0)
            run = spec.run_name(name, seed)
            log = study_dir / "runs" / f"{run}.log"
            log.parent.mkdir(parents=True, exist_ok=True)
            command = [sys.executable, "-m", "condlora.cli", "study", str(study_dir), "--only", f"{name}:{seed}"]
            command += ["--devices", devices[i % len(devices)], "--threads", str(threads), "--no-progress"]
            with open(log, "a") as out:
                running[run] = subprocess.Popen(command, stdout=out, stderr=subprocess.STDOUT)
            print(f"started {run} on {devices[i % len(devices)]} (log: {log})")
        time.sleep(1.0)
        for run, proc in list(running.items()):
            if proc.poll() is not None:
                del running[run]
                (failed if proc.returncode else []).append(run)
                print(f"{'FAILED' if proc.returncode else 'finished'} {run}")
    if failed:
        raise RuntimeError(f"study: runs failed (see their .log under {study_dir / 'runs'}): {', '.join(failed)}")


def run_one(
    spec: StudySpec, study_dir: Path, name: str, seed: int, device: str = "auto", progress: bool = True
) -> dict[str, Any]:
    """Train (or resume) one run, evaluate its checkpoints not yet evaluated, then probe the final model."""
    from condlora.train import train
    from condlora.train.distributed import resolve_device

    run_dir = run_dir_of(spec, study_dir, name, seed)
    cfg = spec.run_config(name, seed, run_dir, device)
    cfg = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, progress=progress))
    ckpts = list_checkpoints(run_dir / "checkpoints")
    if not ckpts or checkpoint_step(ckpts[-1]) < cfg.train.steps:
        train(cfg, run_dir, resume=bool(ckpts), overwrite=not ckpts)
    dev = resolve_device(device, "--devices")
    evaluate_checkpoints(run_dir, dev, progress)
    final = probe_final(spec, run_dir, dev, figures=seed == spec.seeds[0])
    write_json_atomic(run_dir / "final.json", final)
    return final


def _read_json(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text()) if path.is_file() else {}


def evaluate_checkpoints(run_dir: Path, device: torch.device, progress: bool = True) -> dict[str, Any]:
    """Metrics of every checkpoint of a run not yet in its eval.json (EMA weights, the run's sample section):
    in-domain FID, precision, recall, diversity, class accuracy, network calls and sampling time."""
    from condlora.data import unscale
    from condlora.diffusion import process_for
    from condlora.diffusion.generate import generate
    from condlora.eval.images import save_grid
    from condlora.pipeline import digit_metrics, load_model

    path = run_dir / "eval.json"
    evals = _read_json(path)
    for ckpt in list_checkpoints(run_dir / "checkpoints"):
        step = checkpoint_step(ckpt)
        if str(step) in evals:
            continue
        net, cfg, _ = load_model(ckpt, use_ema=True, device=device)
        m, stats = cfg.model, {}
        shape = (m.in_channels, m.image_size, m.image_size)
        images, labels = generate(net, process_for(cfg), cfg.sample, shape, m.num_classes, device, progress, stats)
        images = unscale(images)
        metrics = digit_metrics(images, labels.numpy(), progress=progress, accuracy=True)
        metrics["network_calls_per_sample"] = stats["network_calls"] / stats["batches"]
        metrics["sampling_seconds"] = stats["seconds"]
        save_grid(images[:100], run_dir / "figures" / f"samples-step{step}.png", nrow=m.num_classes)
        evals[str(step)] = metrics
        write_json_atomic(path, evals)
        print(f"  step {step}: FID {metrics['fid_in_domain']:.4f}  accuracy {metrics['accuracy']:.1%}")
    return evals


def omega_locality(table: torch.Tensor) -> float:
    """Share of |omega| on the two bases whose knots are nearest each step, averaged over steps: 1 for the
    linear interpolation, 2 / (m + 1) in expectation for weights spread evenly over the m + 1 bases."""
    from condlora.lora.strategies import basis_timesteps

    steps, bases = table.shape
    knots = basis_timesteps(steps, bases).to(torch.float64)
    s = torch.arange(1, steps + 1, dtype=torch.float64)
    nearest = (s[:, None] - knots[None, :]).abs().topk(min(2, bases), dim=1, largest=False).indices
    weight = table.abs().to(torch.float64)
    return float((weight.gather(1, nearest).sum(1) / weight.sum(1).clamp_min(1e-12)).mean())


def probe_final(spec: StudySpec, run_dir: Path, device: torch.device, figures: bool) -> dict[str, Any]:
    """Parameter counts, class extrapolation (samples of beta * c for each beta: in-domain FID and the share
    recognised as c) and the omega locality of compositional TimeLoRA, for a run's last checkpoint; with
    `figures`, also its omega heat map and class interpolation / extrapolation grids."""
    from condlora.eval.images import save_grid
    from condlora.eval.plots import omega_over_time, plot_omega_table, time_layers
    from condlora.nets import build_network, count_parameters
    from condlora.pipeline import class_path_grids, digit_metrics, load_model, sample_class_vectors

    net, cfg, ckpt = load_model(run_dir, use_ema=True, device=device)
    out: dict[str, Any] = {
        "step": ckpt.step,
        "parameters": count_parameters(net),
        "extrapolation": {},
    }
    classes = torch.arange(spec.extrapolation_count) % cfg.model.num_classes
    seeds = [cfg.sample.seed + i for i in range(len(classes))]
    fig_dir = run_dir / "figures"
    for beta in spec.extrapolation:
        vectors = beta * torch.eye(cfg.model.num_classes)[classes]
        images = sample_class_vectors(net, cfg, vectors, seeds, device)
        metrics = digit_metrics(images, classes.numpy(), progress=False, accuracy=True)
        out["extrapolation"][str(beta)] = {k: metrics[k] for k in ("fid_in_domain", "accuracy", "precision")}
        if figures:
            save_grid(images[:100], fig_dir / f"extrapolation-beta{beta:g}.png", nrow=cfg.model.num_classes)
    time_lora = [(n, layer) for n, layer in time_layers(net) if "time" in layer.strategies]
    tables = {n: omega_over_time(net, layer, cfg.ddpm.num_timesteps) for n, layer in time_lora}
    if tables:
        out["omega_locality"] = float(np.mean([omega_locality(t) for t in tables.values()]))
        out["omega_locality_uniform"] = 2 / next(iter(tables.values())).shape[1]
        torch.manual_seed(cfg.train.seed)  # the omega the run started from
        fresh = dict(time_layers(build_network(cfg)))
        start = [omega_locality(omega_over_time(net, fresh[n], cfg.ddpm.num_timesteps)) for n in tables]
        out["omega_locality_init"] = float(np.mean(start))
    if figures:
        if tables:
            name, table = next(iter(tables.items()))
            plot_omega_table(table, fig_dir / "omega.png", title=name)
        class_path_grids(net, cfg, *FIRST_CLASSES, fig_dir, device=device)
    return out
