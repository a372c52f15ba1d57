"""The training loop: data order, train step, EMA, logging, previews, checkpoints and exact resume."""

from __future__ import annotations

import csv
import dataclasses
import math
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import DataLoader, Sampler
from tqdm.auto import tqdm

from condlora.conditions import NULL_LABEL, Conditions
from condlora.config import RunConfig, differences
from condlora.data import DataError, ImageDataset, build_datasets, random_hflip, unscale
from condlora.diffusion import Process, process_for
from condlora.diffusion.generate import generate
from condlora.eval.images import save_grid
from condlora.nets import build_network, count_parameters
from condlora.train.checkpoint import (
    Checkpoint,
    CheckpointError,
    decode_bytes,
    encode_bytes,
    load_checkpoint,
    load_latest,
    optimizer_from_checkpoint,
    optimizer_to_checkpoint,
    remove_temporaries,
    save_checkpoint,
    write_json_atomic,
)
from condlora.train.distributed import DistContext, init_distributed
from condlora.train.ema import EMA
from condlora.train.rundir import check_fresh_run_dir, clear_run_dir, trim_metrics
from condlora.train.weights import apply_trainable, init_base, load_base, load_saved_state, saved_state


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


def _check_batch_fits(global_batch: int, num_items: int) -> None:
    if global_batch > num_items:
        raise DataError(f"train.batch_size={global_batch} exceeds the {num_items} training images")


class StepBatchSampler(Sampler[list[int]]):
    """Index batches for steps [start_step, total_steps): a pure function of (seed, step), so resuming needs
    only the step. Each epoch is a fresh permutation; each rank takes its contiguous slice of the global batch.

    Args:
        num_items: dataset size N.
        global_batch: batch size summed over ranks (<= N).
        rank, world_size: this process's slice of every global batch.
        seed: seed of the permutations.
        start_step, total_steps: the range of steps to serve.
    """

    def __init__(self, num_items, global_batch, rank, world_size, seed, start_step, total_steps):
        _check_batch_fits(global_batch, num_items)
        self.n, self.batch, self.rank, self.world = num_items, global_batch, rank, world_size
        self.seed, self.start, self.total = seed, start_step, total_steps
        self.per_epoch = num_items // global_batch  # the incomplete last batch of each epoch is dropped

    def __len__(self) -> int:
        return max(self.total - self.start, 0)

    def __iter__(self):
        perm, perm_epoch = None, -1
        local = self.batch // self.world
        for step in range(self.start, self.total):
            epoch, index = divmod(step, self.per_epoch)
            if epoch != perm_epoch:
                g = torch.Generator().manual_seed(self.seed * 1_000_003 + epoch)
                perm, perm_epoch = torch.randperm(self.n, generator=g), epoch
            start = index * self.batch + self.rank * local
            yield perm[start : start + local].tolist()


def lr_at(step: int, cfg) -> float:
    """Linear warm-up over `warmup_steps`, then constant or cosine decay to 10% at the last step."""
    if step < cfg.warmup_steps:
        return cfg.lr * (step + 1) / cfg.warmup_steps
    if cfg.lr_decay == "constant":
        return cfg.lr
    progress = (step - cfg.warmup_steps) / max(cfg.steps - cfg.warmup_steps, 1)
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * min(progress, 1.0))))


def checks_on_host(device: torch.device) -> bool:
    """Whether a step's divergence check reads the host at once (the CPU: no stream to stall) or is left on
    the device for the loop's next check (a GPU, where the fused optimizer skips a non-finite step)."""
    return device.type == "cpu"


def train_step(
    model: nn.Module,
    opt: torch.optim.Optimizer,
    process: Process,
    x0: torch.Tensor,
    labels: torch.Tensor | None,
    generator: torch.Generator,
    cfg: RunConfig,
    dist: DistContext,
) -> tuple[dict[str, torch.Tensor], torch.Tensor, torch.Tensor]:
    """One optimizer step on the process's loss.

    The loss returns named per-sample terms; "loss" is what is minimised (its batch mean), every term's
    mean is reported. Returns ({term: mean over the batch and the ranks}, gradient norm, finite), all
    device tensors. A step whose loss or gradient norm is not finite changes nothing: on the CPU it raises
    TrainingDiverged at once; on a GPU the fused optimizer skips the update on the device (no host
    synchronisation) and `finite` is False, which the loop reads at its next check.
    """
    if cfg.data.hflip:
        x0 = random_hflip(x0, generator)
    if labels is not None and cfg.diffusion.label_dropout > 0:
        drop = torch.rand(labels.shape, generator=generator, device=labels.device) < cfg.diffusion.label_dropout
        labels = torch.where(drop, NULL_LABEL, labels)
    with torch.autocast(x0.device.type, dtype=torch.bfloat16, enabled=cfg.train.precision == "bf16"):
        terms = process.loss(model, x0, Conditions(labels=labels), generator)
    loss = terms["loss"].mean()
    means = {name: dist.mean(value.detach().mean()) for name, value in terms.items()}
    on_host = checks_on_host(x0.device)
    if on_host and not torch.isfinite(means["loss"]):
        raise TrainingDiverged(f"loss became {means['loss'].item()}")
    opt.zero_grad(set_to_none=True)
    loss.backward()
    max_norm = cfg.train.grad_clip if cfg.train.grad_clip > 0 else float("inf")
    params = [p for p in model.parameters() if p.requires_grad]
    grad_norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
    if on_host and not torch.isfinite(grad_norm):  # gradients are already averaged over ranks: all ranks agree
        raise TrainingDiverged(f"gradient norm became {grad_norm.item()}")
    finite = torch.isfinite(means["loss"]) & torch.isfinite(grad_norm)
    if not on_host:
        opt.found_inf = (~finite).float()  # the fused update is skipped on the device when set
    opt.step()
    return means, grad_norm, finite


@dataclass
class TrainResult:
    """What a finished run left behind."""

    out_dir: Path
    checkpoint: Path | None
    steps: int
    train_seconds: float
    final_loss: float
    net: nn.Module
    ema: EMA
    process: Process


@dataclass
class _State:
    net: nn.Module
    ema: EMA
    opt: torch.optim.Optimizer
    generator: torch.Generator
    process: Process | None = None  # its own training state (IDDPM's importance sampler) is checkpointed
    base: dict[str, Any] | None = None  # where the frozen base comes from (see condlora.train.weights)
    step: int = 0
    checkpoint: Path | None = None  # the checkpoint the state was restored from


def _check_data(cfg: RunConfig, train_set: ImageDataset) -> None:
    h, w = train_set.image_size
    m = cfg.model
    if (h, w) != (m.image_size, m.image_size):
        raise DataError(
            f"dataset images are {h}x{w} but model.image_size={m.image_size}; "
            f"set --data.image_size {m.image_size} to resize or --model.image_size {h}"
        )
    if train_set.channels != m.in_channels:
        raise DataError(f"dataset images have {train_set.channels} channels but model.in_channels={m.in_channels}")
    if m.num_classes and train_set.num_classes > m.num_classes:
        raise DataError(
            f"dataset has {train_set.num_classes} classes but model.num_classes={m.num_classes}; "
            f"labels would be out of range"
        )


def _build_network(cfg: RunConfig, dist: DistContext) -> nn.Module:
    """The seeded network (same initial weights on every rank) with `train.trainable` applied."""
    torch.manual_seed(cfg.train.seed)
    net = build_network(cfg).to(dist.device)
    if cfg.train.channels_last:
        net = net.to(memory_format=torch.channels_last)
    apply_trainable(net, cfg.train.trainable)
    return net


def _build_state(
    cfg: RunConfig, net: nn.Module, process: Process, dist: DistContext, base: dict[str, Any] | None
) -> _State:
    params = [p for p in net.parameters() if p.requires_grad]
    fused = not checks_on_host(dist.device)  # one kernel for the whole update, and it can skip a bad step
    opt = torch.optim.AdamW(params, lr=cfg.train.lr, weight_decay=cfg.train.weight_decay, fused=fused or None)
    generator = torch.Generator(dist.device).manual_seed(cfg.train.seed + 7919 * (dist.rank + 1))
    t = cfg.train
    ema = EMA(net, t.ema_decay, t.ema_halflife_kimg * 1000, t.ema_rampup_ratio, t.batch_size)
    return _State(net=net, ema=ema, opt=opt, generator=generator, process=process, base=base)


def _rng_states(state: _State, dist: DistContext) -> list[dict[str, str]]:
    """Every rank's RNG states, gathered so that rank 0 can save them all (each rank draws its own noise)."""
    own = {"generator": encode_bytes(state.generator.get_state()), "torch": encode_bytes(torch.get_rng_state())}
    if dist.device.type == "cuda":
        own["cuda"] = encode_bytes(torch.cuda.get_rng_state(dist.device))
    return dist.gather_all(own)


def _checkpoint_payload(state: _State, cfg: RunConfig, dist: DistContext, rng: list[dict[str, str]]):
    opt_tensors, opt_meta = optimizer_to_checkpoint(state.opt)
    tensors = {
        "model": saved_state(state.net),  # everything but the frozen base, which `base` references
        "ema": state.ema.state_dict(),
        "optimizer": opt_tensors,
    }
    process_state = state.process.state_dict() if hasattr(state.process, "state_dict") else {}
    if process_state:
        tensors["process"] = process_state
    return tensors, {
        "config": cfg.to_dict(),
        "base": state.base,
        "rng": rng,  # one entry per rank
        "optimizer": opt_meta,
        "world_size": dist.world_size,
    }


def _resume_checkpoint(root: Path, dist: DistContext) -> Checkpoint | None:
    """Rank 0 picks the newest checkpoint that verifies; every other rank loads that same one."""
    found: list[Checkpoint | None] = [None]

    def pick() -> str | None:
        found[0] = load_latest(root)
        return str(found[0].path) if found[0] else None

    path = _on_main(dist, pick)
    if dist.is_main or path is None:
        return found[0]
    return load_checkpoint(Path(path))


_SAMPLER_ONLY = {"edm": ("sigma_min", "sigma_max", "rho", "S_churn", "S_min", "S_max", "S_noise")}


def _changed_training_settings(saved: RunConfig, cfg: RunConfig) -> list[str]:
    """What differs between two configs in the network and the process it is trained with (a resumed run
    must not change either; the edm section's sampler settings, which only previews read, may)."""
    changed = []
    for name in ("model", "nano", "iddpm", "ddpmpp", "lora", "diffusion", "ddpm", "edm"):
        before, after = getattr(saved, name), getattr(cfg, name)
        free = {field: getattr(after, field) for field in _SAMPLER_ONLY.get(name, ())}
        changed += differences(dataclasses.replace(before, **free), after, name)
    return changed


def _check_resumable(ckpt: Checkpoint, cfg: RunConfig, dist: DistContext) -> None:
    """Refuse to resume with settings that would change the run (before anything is written)."""
    saved = RunConfig.from_dict(ckpt.state["config"])
    changed = _changed_training_settings(saved, cfg)
    if changed:
        raise CheckpointError(
            f"{ckpt.path} holds another network or process; resume with its settings: {'; '.join(changed)}"
        )
    if ckpt.state.get("world_size", 1) != dist.world_size:
        raise CheckpointError(
            f"{ckpt.path} was written by {ckpt.state['world_size']} processes; resume with the same number"
        )


def _restore(state: _State, ckpt: Checkpoint, dist: DistContext) -> None:
    load_saved_state(state.net, ckpt.tensors["model"], str(ckpt.path))
    state.ema.load_state_dict(ckpt.tensors["ema"])
    optimizer_from_checkpoint(state.opt, ckpt.tensors["optimizer"], ckpt.state["optimizer"])
    if "process" in ckpt.tensors and hasattr(state.process, "load_state_dict"):
        state.process.load_state_dict(ckpt.tensors["process"])
    rng = ckpt.state["rng"][dist.rank]
    state.generator.set_state(decode_bytes(rng["generator"]))
    torch.set_rng_state(decode_bytes(rng["torch"]))
    if "cuda" in rng and dist.device.type == "cuda":
        torch.cuda.set_rng_state(decode_bytes(rng["cuda"]), dist.device)
    state.step, state.checkpoint = ckpt.step, ckpt.path


def _preview(state: _State, cfg: RunConfig, process: Process, path: Path, dist: DistContext) -> None:
    """A small sample grid from the EMA weights (4 per class, the process's cheap sampler settings)."""
    k = max(cfg.model.num_classes, 1)
    preview = dataclasses.replace(
        process.preview(cfg.sample), count=4 * k if cfg.model.num_classes else 16, class_label=-1
    )
    shape = (cfg.model.in_channels, cfg.model.image_size, cfg.model.image_size)
    with state.ema.applied(state.net) as net:
        net.eval()
        images, _ = generate(net, process, preview, shape, cfg.model.num_classes, dist.device, False)
        net.train()
    save_grid(unscale(images), path, nrow=k if cfg.model.num_classes else 4)


class _MetricsLog:
    """Appends a row to metrics.csv (rank 0 only) every `every` steps: the step, the window's mean of every
    loss term, the learning rate, the gradient norm, steps/s and the elapsed time. Terms are summed on their
    device and read once per row, so logging adds no per-step host synchronisation."""

    def __init__(self, path: Path, enabled: bool, every: int, last_step: int):
        self.path, self.enabled, self.every, self.last_step = path, enabled, every, last_step
        self.sums: dict[str, torch.Tensor] = {}
        self.count = 0
        self.start = self.window_start = time.perf_counter()

    def due(self, step: int) -> bool:
        return step % self.every == 0 or step == self.last_step

    def record(self, step: int, terms: dict[str, torch.Tensor], lr: float, grad_norm: torch.Tensor) -> dict | None:
        """Add one step; on a row step, write the row and return the window's means (else None)."""
        for name, value in {**terms, "grad_norm": grad_norm}.items():
            self.sums[name] = self.sums[name] + value.detach() if name in self.sums else value.detach()
        self.count += 1
        if not self.due(step):
            return None
        now = time.perf_counter()
        means = {name: total.item() / self.count for name, total in self.sums.items()}
        grad_norm_mean = means.pop("grad_norm")
        speed = self.count / max(now - self.window_start, 1e-9)
        row = {"step": step, **means, "lr": lr, "grad_norm": grad_norm_mean, "steps_per_sec": speed,
               "elapsed_s": now - self.start}  # fmt: skip
        if self.enabled:
            new = not self.path.exists()
            with open(self.path, "a", newline="") as f:
                writer = csv.DictWriter(f, fieldnames=list(row))
                if new:
                    writer.writeheader()
                writer.writerow(row)
        self.sums, self.count, self.window_start = {}, 0, now
        return means


def _check_batch_size(batch_size: int, num_items: int, world_size: int) -> None:
    """Refuse a batch that the processes cannot split or the data cannot fill (before the run directory)."""
    if batch_size % world_size:
        raise ValueError(f"train.batch_size={batch_size} must be divisible by {world_size} processes")
    _check_batch_fits(batch_size, num_items)


def _batches(cfg: RunConfig, train_set: ImageDataset, dist: DistContext, start_step: int):
    """(images, labels) on the training device for steps [start_step, train.steps). Without loader workers the
    (uint8) dataset is moved to the device once and each batch is one indexing operation there; with
    `data.num_workers` a DataLoader assembles batches in worker processes. Both serve the same values."""
    sampler = StepBatchSampler(
        len(train_set),
        cfg.train.batch_size,
        dist.rank,
        dist.world_size,
        cfg.train.seed,
        start_step,
        cfg.train.steps,
    )
    layout = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    if cfg.data.num_workers == 0:
        resident = train_set.to(dist.device)
        pin = dist.device.type == "cuda"  # a copy from pageable memory would wait for the GPU to catch up
        for indices in sampler:
            index = torch.tensor(indices).pin_memory() if pin else torch.tensor(indices)
            x0, labels = resident.batch(index.to(dist.device, non_blocking=True))
            yield x0.contiguous(memory_format=layout), labels
        return
    loader = DataLoader(
        train_set,
        batch_sampler=sampler,
        num_workers=cfg.data.num_workers,
        pin_memory=dist.device.type == "cuda",
        persistent_workers=False,
    )
    for x0, labels in loader:
        x0 = x0.to(dist.device, non_blocking=True).contiguous(memory_format=layout)
        yield x0, labels.to(dist.device, non_blocking=True)


def _make_out_dir(out_dir: Path, dist: DistContext, overwrite: bool) -> None:
    """Create the run directory, clearing an earlier run first with `overwrite` (rank 0)."""
    if dist.is_main:
        if overwrite:
            clear_run_dir(out_dir)
        out_dir.mkdir(parents=True, exist_ok=True)
    dist.barrier()


def _on_main(dist: DistContext, fn: Callable[[], Any]) -> Any:
    """Run `fn` on rank 0 alone; every rank returns its (small, picklable) result or raises its error."""
    result, message, caught = None, None, None
    if dist.is_main:
        try:
            result = fn()
        except (ValueError, CheckpointError) as err:
            caught, message = err, str(err)
    result, message = dist.broadcast((result, message))
    if caught is not None:
        raise caught
    if message is not None:
        raise ValueError(message)
    return result


def _use_deterministic_algorithms() -> None:
    """Deterministic kernels everywhere (cuBLAS needs its workspace setting before its first call)."""
    os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
    torch.use_deterministic_algorithms(True)
    torch.backends.cudnn.benchmark = False
    torch.backends.cudnn.deterministic = True


def train(
    cfg: RunConfig,
    out_dir: Path,
    resume: bool = False,
    preset: str = "",
    overwrite: bool = False,
) -> TrainResult:
    """Train a diffusion model as configured, writing checkpoints, metrics.csv and preview grids to out_dir.

    Runs unchanged under torchrun (DDP); rank 0 writes all files. A fresh run refuses an `out_dir` that is not
    empty (`overwrite` replaces an earlier run there). With `resume`, training continues from the newest good
    checkpoint in out_dir/checkpoints exactly as if it had never stopped.
    """
    dist = init_distributed(cfg.train.device)
    out_dir = Path(out_dir)
    if resume and overwrite:
        raise ValueError("resume and overwrite exclude each other: resume continues a run, overwrite replaces it")
    if not resume:
        _on_main(dist, lambda: check_fresh_run_dir(out_dir, overwrite))
    if cfg.train.deterministic:
        _use_deterministic_algorithms()
    d = cfg.data
    train_set, _, _ = build_datasets(d.dataset, d.holdout_fraction, d.split_seed, d.image_size or None, d.max_per_class)
    _check_data(cfg, train_set)
    _check_batch_size(cfg.train.batch_size, len(train_set), dist.world_size)
    process = process_for(cfg).to(dist.device)  # its tables where the training step reads them
    net = _build_network(cfg, dist)
    ckpt_root = out_dir / "checkpoints"
    ckpt = _resume_checkpoint(ckpt_root, dist) if resume else None
    if ckpt is not None:
        _check_resumable(ckpt, cfg, dist)
    _make_out_dir(out_dir, dist, overwrite)
    if ckpt is not None:
        base = ckpt.state.get("base")
        net.load_state_dict(load_base(base, out_dir, net), strict=False)
    else:
        diffusers = cfg.model.backbone == "diffusers"
        base = init_base(net, cfg.train.init_from, out_dir, write=dist.is_main, diffusers=diffusers)
    state = _build_state(cfg, net, process, dist, base)
    if ckpt is not None:
        _restore(state, ckpt, dist)
        if dist.is_main:
            print(f"resuming from {ckpt.path} at step {state.step}")
    if dist.is_main:  # every check passed: the settings of the run are written last
        write_json_atomic(out_dir / "config.json", {"preset": preset, **cfg.to_dict()})
    if resume and dist.is_main:
        remove_temporaries(ckpt_root)  # left by a kill during a checkpoint write
        trim_metrics(out_dir / "metrics.csv", state.step)  # the steps after the checkpoint run again
    dist.barrier()
    model = DistributedDataParallel(state.net) if dist.world_size > 1 else state.net
    if cfg.train.compile != "none":
        model = torch.compile(model, mode=cfg.train.compile)
    return _run_loop(cfg, out_dir, state, model, train_set, process, dist)


def _run_loop(cfg, out_dir, state, model, train_set, process, dist) -> TrainResult:
    t_cfg = cfg.train
    log = _MetricsLog(out_dir / "metrics.csv", dist.is_main, t_cfg.log_every, t_cfg.steps)
    last_ckpt, saved_step = state.checkpoint, (state.step if state.checkpoint else None)
    if dist.is_main and state.step == 0:
        total, trained = count_parameters(state.net), count_parameters(state.net, trainable_only=True)
        which = "" if trained == total else f", {trained:,} of them trained"
        print(f"training {cfg.model.backbone} ({total:,} parameters{which}) for {t_cfg.steps} steps")
    bar = tqdm(total=t_cfg.steps, initial=state.step, disable=not (t_cfg.progress and dist.is_main), unit="step")
    terms = {"loss": float("nan")}
    skipped = torch.zeros((), dtype=torch.bool, device=dist.device)  # a non-finite step since the last check
    checked = state.step

    def stop(err: Exception | str, at: str) -> TrainingDiverged:
        bar.close()
        kept = f"Last good checkpoint kept: {last_ckpt}" if last_ckpt else "No checkpoint was written yet"
        return TrainingDiverged(f"{err} {at}; stopping. {kept}")

    for x0, labels in _batches(cfg, train_set, dist, state.step):
        lr = lr_at(state.step, t_cfg)
        for group in state.opt.param_groups:
            group["lr"] = lr
        try:
            cond = labels if cfg.model.num_classes else None
            means, grad_norm, finite = train_step(model, state.opt, process, x0, cond, state.generator, cfg, dist)
        except TrainingDiverged as err:
            raise stop(err, f"at step {state.step + 1}") from None
        skipped |= ~finite
        state.ema.update(state.net, state.step)
        state.step += 1
        row = log.record(state.step, means, lr, grad_norm)
        preview = bool(t_cfg.sample_every) and state.step % t_cfg.sample_every == 0  # every rank checks alike
        save = state.step == t_cfg.steps or (t_cfg.checkpoint_every and state.step % t_cfg.checkpoint_every == 0)
        if row is not None or preview or save:  # GPU runs: the deferred check, before any output
            if skipped.item():
                raise stop("loss or gradient norm became non-finite", f"between steps {checked + 1} and {state.step}")
            checked = state.step
        if row is not None:
            terms = row
            bar.set_postfix(loss=f"{terms['loss']:.4f}", refresh=False)
        bar.update(1)
        if preview and dist.is_main:
            _preview(state, cfg, process, out_dir / "samples" / f"step-{state.step:09d}.png", dist)
        if save:
            last_ckpt, saved_step = _save(state, cfg, out_dir, dist), state.step
    bar.close()
    if saved_step != state.step and state.step > 0:  # make sure the final state is on disk
        last_ckpt = _save(state, cfg, out_dir, dist)
    elapsed = time.perf_counter() - log.start
    return TrainResult(out_dir, last_ckpt, state.step, elapsed, terms["loss"], state.net, state.ema, process)


def _save(state: _State, cfg: RunConfig, out_dir: Path, dist: DistContext) -> Path | None:
    path = None
    rng = _rng_states(state, dist)  # a collective: every rank takes part
    if dist.is_main:
        tensors, meta = _checkpoint_payload(state, cfg, dist, rng)
        path = save_checkpoint(out_dir / "checkpoints", state.step, tensors, meta, cfg.train.keep_checkpoints)
    dist.barrier()
    return path
