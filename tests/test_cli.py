"""The command line: info, train (with sampling), sample, resume, and errors for bad input."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from condlora.cli import main
from condlora.nets import build_network, count_parameters
from condlora.presets import build_config

TINY = [
    "--preset", "digits-nano",
    "--nano.channels", "8", "--nano.channel_mult", "1,2", "--nano.attn_levels", "1", "--nano.num_heads", "2",
    "--ddpm.num_timesteps", "100",
    "--train.steps", "6", "--train.batch_size", "16", "--train.checkpoint_every", "3", "--train.progress", "false",
    "--train.device", "cpu",
    "--sample.steps", "5", "--sample.count", "12",
]  # fmt: skip


def test_info_ends_with_the_parameter_count(capsys):
    assert main(["info", "--preset", "mnist-nano"]) == 0
    last = capsys.readouterr().out.strip().splitlines()[-1]
    expected = count_parameters(build_network(build_config("mnist-nano")))
    assert last == f"parameters: {expected}"
    assert 400_000 < expected < 600_000  # the nano backbone is ~0.5M parameters


def test_info_applies_overrides(capsys):
    assert main(["info", "--preset", "mnist-nano-baseline", "--nano.channels", "32", "--model.num_classes", "0"]) == 0
    out = capsys.readouterr().out
    cfg = build_config("mnist-nano-baseline", {"model": {"num_classes": 0}, "nano": {"channels": 32}})
    expected = count_parameters(build_network(cfg))
    assert out.strip().endswith(f"parameters: {expected}") and "unconditional" in out


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--ddpm.schedule", "quadratic"], "ddpm.schedule: must be one of linear, cosine"),
        (["--train.lr", "-1"], "train.lr: must be > 0"),
        (["--nano.channel_mult", "1,x"], "nano.channel_mult: expected"),
        (["--data.hflip", "maybe"], "data.hflip: expected bool"),
        (["--sample.steps", "5000"], "sample.steps: must be <= ddpm.num_timesteps"),
        (["--model.num_classes", "0"], "lora.classes: needs a class-conditional model"),
        (["--model.conditioning", "baseline"], "LoRA banks are set, so conditioning must be with_lora or lora_only"),
        (["--model.backbone", "diffusers"], "train.init_from: the diffusers backbone is read from a local model"),
        (["--lora.time_bases", "1"], "lora.time_bases: must be >= 2"),
    ],
)
def test_bad_override_names_the_field(capsys, argv, message):
    assert main(["info", *argv]) == 2
    assert message in capsys.readouterr().err


def test_train_then_sample_end_to_end(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"samples: {run / 'samples.png'}" in out
    data = np.load(run / "samples.npz")
    assert data["images"].dtype == np.uint8 and data["images"].shape == (12, 8, 8, 1)
    assert data["labels"].tolist() == [i % 10 for i in range(12)]
    assert Image.open(run / "samples.png").size[0] > 8 * 10
    saved = json.loads((run / "config.json").read_text())
    assert saved["preset"] == "digits-nano" and saved["train"]["steps"] == 6

    # sample one class with another seed; same seed twice gives identical images
    for prefix in ("a", "b"):
        assert (
            main(
                [
                    "sample",
                    str(run),
                    "--class",
                    "3",
                    "--count",
                    "4",
                    "--steps",
                    "4",
                    "--seed",
                    "9",
                    "--guidance-scale",
                    "3",
                    "--sampler",
                    "ddpm",
                    "--out",
                    str(tmp_path / prefix),
                ]
            )
            == 0
        )
    a, b = np.load(tmp_path / "a.npz"), np.load(tmp_path / "b.npz")
    assert a["labels"].tolist() == [3, 3, 3, 3]
    assert np.array_equal(a["images"], b["images"])


def test_train_on_mnist_ends_with_the_class_accuracy(tmp_path, capsys, monkeypatch):
    """The main job's last stage: after sampling, `train` scores the digits with the reference classifier
    (an untrained stand-in here: what matters is that the report runs and prints)."""
    from condlora.eval.classifier import DigitClassifier

    torch.manual_seed(0)
    net = DigitClassifier().eval()
    monkeypatch.setattr("condlora.eval.classifier.cached_digit_classifier", lambda *a, **k: net)
    mnist = ["--preset", "mnist-nano", *TINY[2:], "--train.steps", "2", "--sample.count", "10"]
    assert main(["train", *mnist, "--train.out_dir", str(tmp_path / "run")]) == 0
    out = capsys.readouterr().out
    assert "class accuracy (reference MNIST classifier):" in out and "| samples | accuracy |" in out


def test_resume_extends_a_finished_run(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    assert main(["train", "--resume", str(run), "--train.steps", "9", "--no-sample"]) == 0
    out = capsys.readouterr().out
    assert "resuming from" in out and "step-000000006" in out
    assert (run / "checkpoints" / "step-000000009").is_dir()


def test_sample_errors(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--train.out_dir", str(run), "--no-sample"]) == 0
    capsys.readouterr()
    assert main(["sample", str(run), "--class", "10"]) == 2
    assert "sample.class_label: must be -1 or in [0, 9]" in capsys.readouterr().err
    assert main(["sample", str(tmp_path / "nowhere")]) == 2
    assert "checkpoint path does not exist" in capsys.readouterr().err


def test_bad_data_is_reported_before_training(tmp_path, capsys):
    assert main(["train", *TINY, "--data.dataset", str(tmp_path / "missing")]) == 2
    assert "dataset path does not exist" in capsys.readouterr().err
    np.savez(tmp_path / "rgb.npz", images=np.zeros((20, 8, 8, 3), np.uint8), labels=np.zeros(20, np.int64))
    assert main(["train", *TINY, "--data.dataset", str(tmp_path / "rgb.npz")]) == 2
    assert "3 channels but model.in_channels=1" in capsys.readouterr().err
    np.savez(tmp_path / "big.npz", images=np.zeros((20, 16, 16), np.uint8), labels=np.zeros(20, np.int64))
    assert main(["train", *TINY, "--data.dataset", str(tmp_path / "big.npz")]) == 2
    assert "dataset images are 16x16 but model.image_size=8" in capsys.readouterr().err


def test_console_script_help_documents_every_field():
    exe = Path(sys.executable).with_name("condlora")
    done = subprocess.run([str(exe), "train", "--help"], capture_output=True, text=True, env=os.environ, check=True)
    from condlora.config import SECTIONS, field_help

    for section in SECTIONS:
        for name, *_ in field_help(section):
            assert f"--{section}.{name}" in done.stdout
