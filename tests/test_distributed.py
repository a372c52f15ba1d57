"""A 2-process DDP run (gloo on CPU) through torchrun."""

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from condlora.train.checkpoint import list_checkpoints, load_checkpoint, load_latest

WORKER = Path(__file__).with_name("ddp_worker.py")


@pytest.mark.skipif(
    shutil.which("torchrun") is None and not Path(sys.executable).with_name("torchrun").exists(),
    reason="torchrun not installed",
)
@pytest.mark.parametrize("family", ["ddpm", "iddpm", "edm"])
def test_two_process_ddp_run(tmp_path, family):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", str(WORKER), str(tmp_path / "run"), family]
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]

    rank0 = load_file(str(tmp_path / "rank0-2.safetensors"))
    rank1 = load_file(str(tmp_path / "rank1-2.safetensors"))
    assert rank0.keys() == rank1.keys()
    for key in rank0:  # gradients were averaged, so both replicas took identical steps
        assert torch.equal(rank0[key], rank1[key]), key
    # rank 0 alone wrote the checkpoints and the log; the checkpoint holds the synced weights
    assert [p.name for p in list_checkpoints(tmp_path / "run" / "checkpoints")] == ["step-000000003", "step-000000006"]
    ckpt = load_latest(tmp_path / "run" / "checkpoints")
    assert ckpt.state["world_size"] == 2
    rng = ckpt.state["rng"]  # each rank's own generator state, so a resume restores every rank's noise
    assert len(rng) == 2 and rng[0]["generator"] != rng[1]["generator"]
    for key, value in ckpt.tensors["model"].items():
        assert torch.equal(value, rank0[key])
    if family == "iddpm":  # the importance sampler saw both ranks' losses: 2 ranks x 8 samples x 6 steps
        assert rank0["process.counts"].sum() == 96 and torch.equal(
            ckpt.tensors["process"]["counts"], rank0["process.counts"]
        )
    rows = list(csv.DictReader(open(tmp_path / "run" / "metrics.csv")))
    assert [int(r["step"]) for r in rows] == [2, 4, 6]
    # training moved the weights between the two checkpoints
    first = load_checkpoint(list_checkpoints(tmp_path / "run" / "checkpoints")[0]).tensors["model"]
    assert any(not torch.equal(value, rank0[key]) for key, value in first.items())


def test_cli_under_torchrun_agrees_on_one_default_run_directory(tmp_path):
    torchrun = Path(sys.executable).with_name("torchrun")
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    tiny = [
        "--preset",
        "digits-nano",
        "--nano.channels",
        "8",
        "--nano.channel_mult",
        "1,2",
        "--nano.attn_levels",
        "1",
        "--nano.num_heads",
        "2",
        "--ddpm.num_timesteps",
        "100",
        "--train.steps",
        "2",
        "--train.batch_size",
        "8",
        "--train.progress",
        "false",
        "--train.device",
        "cpu",
        "--no-sample",
    ]
    cmd = [str(torchrun), "--standalone", "--nproc_per_node=2", "-m", "condlora.cli", "train", *tiny]
    done = subprocess.run(cmd, env=env, cwd=tmp_path, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    runs = list((tmp_path / "runs").iterdir())
    assert len(runs) == 1 and runs[0].name.startswith("digits-nano-")
    assert [p.name for p in list_checkpoints(runs[0] / "checkpoints")] == ["step-000000002"]
    assert done.stdout.count("trained 2 steps") == 1  # only rank 0 reports
