"""Never lose a run, and a clear error for every bad input: each case here once failed under fault injection."""

import csv
import hashlib
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from helpers import poison_loss, train_until_killed
from safetensors.torch import load_file
from test_cli import TINY

from condlora.cli import main
from condlora.config import ConfigError, RunConfig
from condlora.train import RunDirectoryError, TrainingDiverged, train
from condlora.train.checkpoint import list_checkpoints, load_latest, save_checkpoint
from condlora.train.distributed import init_distributed

NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")


def _snapshot(directory: Path) -> dict[str, tuple[str, int]]:
    """SHA-256 and modification time of every file under `directory`."""
    return {
        str(p.relative_to(directory)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
        for p in sorted(directory.rglob("*"))
        if p.is_file()
    }


def _steps(metrics: Path) -> list[int]:
    return [int(row["step"]) for row in csv.DictReader(open(metrics))]


# 1. a fresh run never writes into an existing one ------------------------------------------------------------


def test_fresh_train_into_an_existing_run_refuses_and_changes_nothing(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--train.out_dir", str(run), "--train.steps", "3", "--no-sample"]) == 2
    err = capsys.readouterr().err
    assert "already holds a run" in err and f"--resume {run}" in err and "--overwrite" in err
    assert _snapshot(run) == before


def test_overwrite_replaces_an_earlier_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    (run / "samples-step6-seed0.png").write_bytes(b"an earlier `condlora sample` output")
    assert main(["train", *TINY, "--train.out_dir", str(run), "--train.steps", "3", "--overwrite", "--no-sample"]) == 0
    assert [p.name for p in list_checkpoints(run / "checkpoints")] == ["step-000000003"]
    assert json.loads((run / "config.json").read_text())["train"]["steps"] == 3
    assert _steps(run / "metrics.csv") == [3]
    assert not (run / "samples-step6-seed0.png").exists()


def test_overwrite_never_deletes_files_condlora_did_not_write(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    (run / "notes.txt").write_text("my notes")
    before = _snapshot(run)
    capsys.readouterr()
    assert main(["train", *TINY, "--train.out_dir", str(run), "--overwrite", "--no-sample"]) == 2
    assert "files condlora did not write (notes.txt)" in capsys.readouterr().err
    assert _snapshot(run) == before


def test_library_train_refuses_a_non_empty_directory(tiny_config, tmp_path):
    out = tmp_path / "elsewhere"
    out.mkdir()
    (out / "config.json").write_text("{}")
    with pytest.raises(RunDirectoryError, match="already holds a run"):
        train(tiny_config(), out)
    assert (out / "config.json").read_text() == "{}"
    with pytest.raises(ValueError, match="resume and overwrite exclude each other"):
        train(tiny_config(), out, resume=True, overwrite=True)


def _fake_checkpoint(root: Path, step: int) -> Path:
    path = root / f"step-{step:09d}"
    path.mkdir(parents=True)
    (path / "state.json").write_text('{"step": ')  # corrupt on purpose
    return path


def test_pruning_keeps_the_newest_checkpoints_by_the_runs_own_steps(tmp_path):
    root = tmp_path / "checkpoints"
    _fake_checkpoint(root, 1000)
    _fake_checkpoint(root, 1500)  # newer than the step being written: an abandoned timeline
    weights = {"model": {"w": torch.ones(2)}}
    saved = save_checkpoint(root, 1200, weights, {}, keep=2)
    assert [p.name for p in list_checkpoints(root)] == ["step-000001000", "step-000001200"]
    assert saved.name == "step-000001200"
    # steps past nine digits still order by number, not by name
    save_checkpoint(root, 999_999_999, weights, {}, keep=3)
    save_checkpoint(root, 1_000_000_000, weights, {}, keep=3)
    assert [p.name for p in list_checkpoints(root)][-2:] == ["step-999999999", "step-1000000000"]


# 2. CUDA asked for on a machine without it ---------------------------------------------------------------------


@NO_CUDA
def test_cuda_without_cuda_is_the_same_clean_error_for_train_and_sample(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--device", "cuda"]) == 2
    sample_err = capsys.readouterr().err
    assert "--device is 'cuda' but no CUDA device is available" in sample_err
    assert main(["train", *TINY, "--train.out_dir", str(tmp_path / "b"), "--train.device", "cuda"]) == 2
    train_err = capsys.readouterr().err
    assert "train.device is 'cuda' but no CUDA device is available" in train_err
    assert "Traceback" not in sample_err + train_err
    assert not (tmp_path / "b").exists()
    assert main(["sample", str(run), "--device", "tpu"]) == 2
    assert "expected auto, cpu, cuda or cuda:N, got 'tpu'" in capsys.readouterr().err


def test_more_processes_than_gpus_is_a_clear_error(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    monkeypatch.setenv("LOCAL_RANK", "1")
    with pytest.raises(ValueError, match=r"local rank 1 has no GPU.*--nproc_per_node=1.*--train.device cpu"):
        init_distributed("auto")


# 3. a corrupt config.json on --resume --------------------------------------------------------------------------


def test_resume_with_a_corrupt_config_names_the_file(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    (run / "config.json").write_text('{"model": {"channels": 8,')
    capsys.readouterr()
    assert main(["train", "--resume", str(run), "--no-sample"]) == 2
    assert f"{run / 'config.json'} is not valid JSON" in capsys.readouterr().err


# 4. non-finite values, and divergence before the first checkpoint -----------------------------------------------


@pytest.mark.parametrize(
    "option", ["--train.lr", "--train.grad_clip", "--ddpm.beta_end", "--sample.eta", "--data.holdout_fraction"]
)
@pytest.mark.parametrize("value", ["inf", "nan", "-inf"])
def test_non_finite_floats_are_rejected(capsys, option, value):
    assert main(["info", f"{option}={value}"]) == 2
    assert f"{option.removeprefix('--')}: must be finite, got {float(value)!r}" in capsys.readouterr().err


def test_non_finite_floats_in_a_saved_config_are_rejected():
    with pytest.raises(ConfigError, match="train.ema_decay: must be finite"):
        RunConfig.from_dict({"train": {"ema_decay": float("nan")}})


def test_divergence_before_any_checkpoint_says_so(tiny_config, monkeypatch):
    cfg = tiny_config()
    poison_loss(monkeypatch, 2, lambda loss: loss * float("nan"))
    with pytest.raises(TrainingDiverged, match="loss became nan at step 2; stopping. No checkpoint was written yet"):
        train(cfg, Path(cfg.train.out_dir))


# 5 + 6. a kill during a checkpoint write, resumed through the CLI -----------------------------------------------

# Runs `condlora train`, killing itself with SIGKILL right after the N-th tensor file of the checkpoints is
# written: the kill lands in the middle of a checkpoint write.
KILL_DURING_CHECKPOINT = """
import os, signal, sys
import condlora.train.checkpoint as checkpoint
real_save, written = checkpoint.save_file, [0]
def save_then_die(*args, **kwargs):
    real_save(*args, **kwargs)
    written[0] += 1
    if written[0] == int(os.environ["KILL_AFTER_FILES"]):
        os.kill(os.getpid(), signal.SIGKILL)
checkpoint.save_file = save_then_die
from condlora.cli import main
sys.exit(main(sys.argv[1:]))
"""


def _condlora(*argv: str, env: dict | None = None) -> subprocess.CompletedProcess:
    exe = Path(sys.executable).with_name("condlora")
    return subprocess.run([str(exe), *argv], capture_output=True, text=True, env=env or os.environ, timeout=300)


@pytest.mark.slow
def test_sigkill_during_a_checkpoint_write_then_resume_is_bit_identical(tmp_path):
    options = [*TINY, "--train.log_every", "1", "--no-sample"]
    full, part = tmp_path / "full", tmp_path / "part"
    done = _condlora("train", *options, "--train.out_dir", str(full))
    assert done.returncode == 0, done.stderr[-2000:]

    env = {**os.environ, "KILL_AFTER_FILES": "5"}  # the 2nd file of the 2nd checkpoint (step 6)
    killed = subprocess.run(
        [sys.executable, "-c", KILL_DURING_CHECKPOINT, "train", *options, "--train.out_dir", str(part)],
        capture_output=True,
        text=True,
        env=env,
        timeout=300,
    )
    assert killed.returncode == -signal.SIGKILL, killed.stderr[-2000:]
    ckpt_dir = part / "checkpoints"
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step-000000003"]
    assert any(p.name.startswith(".tmp-step-000000006") for p in ckpt_dir.iterdir())
    (ckpt_dir / ".tmp-notes").mkdir()  # not a name condlora writes: left alone
    assert _steps(part / "metrics.csv") == [1, 2, 3, 4, 5, 6]

    resumed = _condlora("train", "--resume", str(part), "--no-sample")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resuming from" in resumed.stdout and "step-000000003" in resumed.stdout
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [".tmp-notes", "step-000000003", "step-000000006"]
    assert _steps(part / "metrics.csv") == [1, 2, 3, 4, 5, 6]  # steps 4-6 once, from the resumed run
    for name in ("model", "ema", "optimizer"):
        a = load_file(str(full / "checkpoints" / "step-000000006" / f"{name}.safetensors"))
        b = load_file(str(ckpt_dir / "step-000000006" / f"{name}.safetensors"))
        assert a.keys() == b.keys()
        assert all(torch.equal(a[k], b[k]) for k in a), name


def test_resume_removes_only_condlora_temporaries(tiny_config):
    cfg = tiny_config(train={"steps": 4})
    run = Path(cfg.train.out_dir)
    train(cfg, run)
    ckpt_dir = run / "checkpoints"
    for name in (".tmp-step-000000008-4242", ".stale-step-000000004-4242", ".tmp-mine", "mine"):
        (ckpt_dir / name).mkdir()
    train(tiny_config(train={"steps": 6}), run, resume=True)
    assert sorted(p.name for p in ckpt_dir.iterdir()) == [".tmp-mine", "mine", "step-000000004", "step-000000006"]


# 7. smaller messages --------------------------------------------------------------------------------------------


def test_sampling_a_checkpoint_folder_without_state_json_names_it(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    step = run / "checkpoints" / "step-000000006"
    (step / "state.json").unlink()
    capsys.readouterr()
    assert main(["sample", str(step)]) == 2
    assert f"checkpoint {step} has no state.json" in capsys.readouterr().err
    assert main(["sample", str(tmp_path)]) == 2
    assert "no checkpoint found under" in capsys.readouterr().err


def test_a_file_that_is_not_an_npz_is_named_without_pickle_advice(tmp_path, capsys):
    bad = tmp_path / "images.npz"
    bad.write_bytes(b"\x80\x04 not a zip archive at all")
    assert main(["train", *TINY, "--train.out_dir", str(tmp_path / "run"), "--data.dataset", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not an .npz archive" in err and "allow_pickle" not in err
    assert main(["eval", str(bad)]) == 2
    err = capsys.readouterr().err
    assert f"{bad} is not an .npz archive" in err and "allow_pickle" not in err
    objects = tmp_path / "objects.npz"
    np.savez(objects, images=np.array([object()], dtype=object))
    assert main(["eval", str(objects)]) == 2
    err = capsys.readouterr().err
    assert "object arrays, which condlora never unpickles" in err and "allow_pickle" not in err


def test_model_mismatch_on_resume_names_the_fields(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    capsys.readouterr()
    argv = ["train", "--resume", str(run), "--nano.channels", "12", "--nano.dropout", "0.1", "--no-sample"]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "nano.channels: 8 -> 12; nano.dropout: 0.0 -> 0.1" in err
    assert "ModelConfig(" not in err and "backbone" not in err


# 8. timesteps are 0-based ---------------------------------------------------------------------------------------


def test_timesteps_are_zero_based_from_loss_to_sampler_to_omega_table():
    from condlora.diffusion import NoiseSchedule, PerSampleNoise, ddpm_sample
    from condlora.lora import TimeTable

    schedule = NoiseSchedule.create("linear", 20)
    seen: list[float] = []

    def eps(x, t):
        seen.append(float(t[0]))
        return torch.zeros_like(x)

    ddpm_sample(eps, schedule, PerSampleNoise([0]), (1, 2, 2))
    assert seen == [float(t) for t in range(19, -1, -1)]  # paper steps T..1 are t = T-1..0
    table = TimeTable(20, 3).table  # knots at paper steps 1, 10.5, 20, i.e. t = 0, 9.5, 19
    assert table[0].tolist() == [1.0, 0.0, 0.0] and table[19].tolist() == [0.0, 0.0, 1.0]


# 9. resume on a GPU is exact with train.deterministic -----------------------------------------------------------


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_deterministic_resume_on_a_gpu_is_bit_identical(tiny_config, tmp_path, monkeypatch):
    def config(name: str):
        return tiny_config(train={"device": "cuda", "deterministic": True, "out_dir": str(tmp_path / name)})

    train(config("full"), tmp_path / "full")
    train_until_killed(config("part"), tmp_path / "part", monkeypatch)  # the checkpoint of step 8 is on disk
    train(config("part"), tmp_path / "part", resume=True)
    a = load_latest(tmp_path / "full" / "checkpoints")
    b = load_latest(tmp_path / "part" / "checkpoints")
    assert a.step == b.step == 12
    for group in ("model", "ema", "optimizer"):
        assert all(torch.equal(a.tensors[group][k], b.tensors[group][k]) for k in a.tensors[group]), group
