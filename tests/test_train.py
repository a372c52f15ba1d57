"""Training loop: loss goes down, exact resume, checkpoints, divergence, data order, EMA, LR schedule."""

import csv
import json
import math
import re
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import poison_loss, train_until_killed

from condlora.data import DataError
from condlora.train import EMA, StepBatchSampler, TrainingDiverged, lr_at, train
from condlora.train.checkpoint import CheckpointError, list_checkpoints, load_checkpoint, load_latest


def _weights(run_dir: Path) -> dict[str, torch.Tensor]:
    ckpt = load_latest(run_dir / "checkpoints")
    return {
        **{f"model.{k}": v for k, v in ckpt.tensors["model"].items()},
        **{f"ema.{k}": v for k, v in ckpt.tensors["ema"].items()},
        **{f"opt.{k}": v for k, v in ckpt.tensors["optimizer"].items()},
    }


def test_loss_drops_on_a_tiny_run(tiny_config):
    cfg = tiny_config(train={"steps": 120, "log_every": 20, "lr": 3e-3, "checkpoint_every": 0})
    result = train(cfg, Path(cfg.train.out_dir))
    rows = list(csv.DictReader(open(result.out_dir / "metrics.csv")))
    losses = [float(r["loss"]) for r in rows]
    assert len(rows) == 6 and int(rows[-1]["step"]) == 120
    assert losses[-1] < 0.6 * losses[0], losses
    assert result.checkpoint is not None and result.checkpoint.name == "step-000000120"


def test_resume_equals_an_uninterrupted_run(tiny_config, tmp_path, monkeypatch):
    full = tiny_config(train={"out_dir": str(tmp_path / "full")}, data={"hflip": True})
    train(full, tmp_path / "full")
    # kill the run during step 10 (the checkpoint of step 8 is on disk), then resume it
    part = tiny_config(train={"out_dir": str(tmp_path / "part")}, data={"hflip": True})
    train_until_killed(part, tmp_path / "part", monkeypatch)
    assert load_latest(tmp_path / "part" / "checkpoints").step == 8
    result = train(part, tmp_path / "part", resume=True)
    assert result.steps == 12
    a, b = _weights(tmp_path / "full"), _weights(tmp_path / "part")
    assert a.keys() == b.keys()
    for key in a:
        assert torch.equal(a[key], b[key]), key
    state = json.loads((result.checkpoint / "state.json").read_text())
    assert state["step"] == 12 and "generator" in state["rng"][0]


def test_resume_refuses_another_network_or_process_and_takes_new_sampler_settings(tiny_config, tmp_path):
    run = tmp_path / "run"
    train(tiny_config(train={"out_dir": str(run)}), run)
    written = (run / "config.json").read_bytes()
    for changed, message in (
        ({"ddpm": {"schedule": "cosine"}}, "ddpm.schedule: 'linear' -> 'cosine'"),
        ({"diffusion": {"family": "iddpm"}}, "diffusion.family: 'ddpm' -> 'iddpm'"),
        ({"nano": {"channels": 16}}, "nano.channels: 8 -> 16"),
    ):
        with pytest.raises(CheckpointError, match=re.escape(message)):
            train(tiny_config(train={"out_dir": str(run), "steps": 14}, **changed), run, resume=True)
        assert (run / "config.json").read_bytes() == written  # a refused resume leaves the run's settings alone
    sampler_only = {"edm": {"S_churn": 5.0, "rho": 5.0}, "sample": {"steps": 7}}  # only previews read them
    result = train(tiny_config(train={"out_dir": str(run), "steps": 14}, **sampler_only), run, resume=True)
    assert result.steps == 14


def test_a_batch_larger_than_the_data_is_refused_before_the_run_directory_is_made(tiny_config, tmp_path):
    run = tmp_path / "too-big"
    cfg = tiny_config(train={"out_dir": str(run), "batch_size": 4096})  # the 8x8 digits hold 1,797 images
    with pytest.raises(DataError, match=r"train.batch_size=4096 exceeds the \d+ training images"):
        train(cfg, run)
    assert not run.exists()


def test_checkpoints_are_pruned_and_verified(tiny_config):
    cfg = tiny_config(train={"keep_checkpoints": 2})
    train(cfg, Path(cfg.train.out_dir))
    names = [p.name for p in list_checkpoints(Path(cfg.train.out_dir) / "checkpoints")]
    assert names == ["step-000000008", "step-000000012"]
    ckpt = load_checkpoint(Path(cfg.train.out_dir) / "checkpoints" / names[-1])
    assert ckpt.step == 12 and set(ckpt.tensors) == {"model", "ema", "optimizer"}


@pytest.mark.parametrize("damage", ["truncate", "flip", "state"])
def test_corrupt_checkpoint_is_named_and_the_previous_one_is_used(tiny_config, damage):
    cfg = tiny_config()
    run = Path(cfg.train.out_dir)
    train(cfg, run)
    newest = list_checkpoints(run / "checkpoints")[-1]
    if damage == "truncate":
        victim = newest / "model.safetensors"
        victim.write_bytes(victim.read_bytes()[:100])
    elif damage == "flip":
        victim = newest / "ema.safetensors"
        data = bytearray(victim.read_bytes())
        data[-1] ^= 0xFF
        victim.write_bytes(bytes(data))
    else:
        victim = newest / "state.json"
        victim.write_text('{"step": 1')
    with pytest.raises(CheckpointError, match=str(victim.name)):
        load_checkpoint(newest)
    with pytest.warns(UserWarning, match="skipping bad checkpoint"):
        fallback = load_latest(run / "checkpoints")
    assert fallback.step == 8


def test_all_checkpoints_corrupt_is_an_error(tmp_path):
    bad = tmp_path / "checkpoints" / "step-000000001"
    bad.mkdir(parents=True)
    with pytest.warns(UserWarning), pytest.raises(CheckpointError, match="no usable checkpoint"):
        load_latest(tmp_path / "checkpoints")


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tiny_config, monkeypatch):
    cfg = tiny_config()
    run = Path(cfg.train.out_dir)
    poison_loss(monkeypatch, 6, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 6.*step-000000004"):
        train(cfg, run)
    ckpt = load_latest(run / "checkpoints")
    assert ckpt.step == 4
    assert all(torch.isfinite(v).all() for v in ckpt.tensors["model"].values())


def test_step_batch_sampler_covers_each_epoch_once_and_splits_ranks():
    full = list(StepBatchSampler(20, 4, 0, 1, seed=3, start_step=0, total_steps=10))
    epoch0 = sorted(i for batch in full[:5] for i in batch)
    assert epoch0 == list(range(20))
    assert full[:5] != full[5:10]  # a new permutation each epoch
    # resuming at step 7 serves the same batches as the uninterrupted sampler
    assert list(StepBatchSampler(20, 4, 0, 1, 3, 7, 10)) == full[7:]
    ranks = [list(StepBatchSampler(20, 4, r, 2, 3, 0, 10)) for r in (0, 1)]
    for step in range(10):
        assert ranks[0][step] + ranks[1][step] == full[step]


def test_ema_follows_its_closed_form():
    net = torch.nn.Linear(2, 1, bias=False)
    torch.nn.init.zeros_(net.weight)
    ema = EMA(net, decay=0.9)
    expected = torch.zeros(1, 2)
    for n in range(30):
        with torch.no_grad():
            net.weight.fill_(float(n + 1))
        ema.update(net, n)
        d = min(0.9, (1 + n) / (10 + n))
        expected = d * expected + (1 - d) * (n + 1)
    assert torch.allclose(ema.shadow["weight"], expected)


def test_learning_rate_schedule(tiny_config):
    cfg = tiny_config(train={"steps": 110, "warmup_steps": 10, "lr": 1.0, "lr_decay": "cosine"}).train
    assert lr_at(0, cfg) == pytest.approx(0.1)
    assert lr_at(9, cfg) == pytest.approx(1.0)
    assert lr_at(10, cfg) == pytest.approx(1.0)
    assert lr_at(60, cfg) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(110, cfg) == pytest.approx(0.1)
    constant = tiny_config(train={"lr_decay": "constant", "warmup_steps": 0, "lr": 0.5}).train
    assert lr_at(7, constant) == 0.5


def test_metrics_csv_columns(tiny_config):
    cfg = tiny_config()
    train(cfg, Path(cfg.train.out_dir))
    rows = list(csv.DictReader(open(Path(cfg.train.out_dir) / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(math.isfinite(float(r["loss"])) and float(r["steps_per_sec"]) > 0 for r in rows)


def test_dataloader_workers_do_not_change_the_result(tiny_config, tmp_path):
    runs = {}
    for workers in (0, 2):
        cfg = tiny_config(train={"steps": 4, "out_dir": str(tmp_path / f"w{workers}")}, data={"num_workers": workers})
        runs[workers] = train(cfg, tmp_path / f"w{workers}").net.state_dict()
    for key, value in runs[0].items():
        assert torch.equal(value, runs[2][key]), key


def test_non_finite_gradient_with_a_finite_loss_stops_before_the_update(tiny_config, monkeypatch):
    cfg = tiny_config()
    # sqrt(0 * loss) adds 0 to the value, but its gradient is inf * 0 = nan
    poison_loss(monkeypatch, 6, lambda loss: loss + torch.sqrt(0 * loss))
    with pytest.raises(TrainingDiverged, match="gradient norm became nan at step 6"):
        train(cfg, Path(cfg.train.out_dir))
    ckpt = load_latest(Path(cfg.train.out_dir) / "checkpoints")
    assert ckpt.step == 4 and all(torch.isfinite(v).all() for v in ckpt.tensors["model"].values())


def test_deferred_divergence_check_skips_the_bad_step_on_the_device(tiny_config, monkeypatch):
    """The GPU path, run on the CPU: the fused optimizer skips the non-finite step 6 without a host read; the
    loop notices at its next log row (step 6, log_every 2) and stops before writing anything more."""
    import condlora.train.loop as loop

    monkeypatch.setattr(loop, "checks_on_host", lambda device: False)
    steps_taken = []
    original = torch.optim.AdamW.step

    def step(self, *args, **kwargs):
        steps_taken.append(bool(getattr(self, "found_inf", torch.zeros(())).item()))
        return original(self, *args, **kwargs)

    monkeypatch.setattr(torch.optim.AdamW, "step", step)
    cfg = tiny_config(train={"checkpoint_every": 4})
    run = Path(cfg.train.out_dir)
    poison_loss(monkeypatch, 6, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingDiverged, match="non-finite between steps 5 and 6.*step-000000004"):
        train(cfg, run)
    assert steps_taken == [False] * 5 + [True]  # step 6 was flagged to the fused update
    ckpt = load_latest(run / "checkpoints")
    assert ckpt.step == 4 and all(torch.isfinite(v).all() for v in ckpt.tensors["model"].values())


def test_fused_update_with_found_inf_changes_nothing():
    net = torch.nn.Linear(3, 2)
    opt = torch.optim.AdamW(net.parameters(), lr=0.1, fused=True)
    net(torch.ones(1, 3)).sum().backward()
    opt.step()
    before = {k: v.clone() for k, v in net.state_dict().items()}
    state_steps = [s["step"].clone() for s in opt.state.values()]
    opt.found_inf = torch.ones(())
    opt.step()
    assert all(torch.equal(before[k], v) for k, v in net.state_dict().items())
    assert all(torch.equal(a, s["step"]) for a, s in zip(state_steps, opt.state.values(), strict=True))


def test_resident_batches_equal_the_per_item_dataset():
    from condlora.data import ImageDataset

    rng = np.random.default_rng(0)
    data = ImageDataset(rng.integers(0, 256, (10, 4, 4, 3), dtype=np.uint8), rng.integers(0, 3, 10), 3)
    index = torch.tensor([7, 2, 2, 9])
    images, labels = data.to("cpu").batch(index)
    assert torch.equal(images, torch.stack([data[i][0] for i in index.tolist()]))
    assert labels.tolist() == [data[i][1] for i in index.tolist()]


@pytest.mark.parametrize("workers", [0, 1])
def test_channels_last_and_loader_workers_train_like_the_default(tiny_config, tmp_path, workers):
    reference = train(tiny_config(train={"out_dir": str(tmp_path / "a")}), tmp_path / "a")
    cfg = tiny_config(train={"out_dir": str(tmp_path / "b"), "channels_last": True}, data={"num_workers": workers})
    other = train(cfg, tmp_path / "b")
    for (name, a), b in zip(reference.net.state_dict().items(), other.net.state_dict().values(), strict=True):
        assert torch.allclose(a, b, atol=1e-4), name  # the same batches; only the convolution layout differs


def test_compile_option_trains_the_compiled_network(tiny_config, monkeypatch):
    compiled = []
    original = torch.compile

    def record(model, mode=None, **kwargs):
        compiled.append(mode)
        return original(model, backend="aot_eager")  # the loop's code path without a C++ toolchain

    monkeypatch.setattr(torch, "compile", record)
    cfg = tiny_config(train={"compile": "reduce-overhead", "steps": 3, "checkpoint_every": 0})
    result = train(cfg, Path(cfg.train.out_dir))
    assert compiled == ["reduce-overhead"] and math.isfinite(result.final_loss)
