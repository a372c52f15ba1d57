"""Figures: omega tables, cosine similarity, class interpolation / extrapolation grids."""

import functools

import numpy as np
import pytest
import torch
from PIL import Image

from condlora.cli import main
from condlora.conditions import NULL_LABEL, Conditions
from condlora.diffusion import PerSampleNoise, classifier_free, ddim_sample, guided, process_for
from condlora.eval.plots import binned_omega, class_path_vectors, cosine_matrix
from condlora.lora import linear_interpolation_table
from condlora.nets import build_network
from condlora.presets import build_config

TINY = [
    "--preset", "digits-nano", "--nano.channels", "8", "--nano.channel_mult", "1,2", "--nano.attn_levels", "1",
    "--nano.num_heads", "2", "--ddpm.num_timesteps", "60", "--train.steps", "4", "--train.batch_size", "16",
    "--train.progress", "false", "--train.device", "cpu", "--no-sample", "--sample.steps", "4",
]  # fmt: skip


def test_binned_omega_of_a_linear_table_is_the_identity():
    table = linear_interpolation_table(1001, 11)
    binned = binned_omega(table)
    assert binned.shape == (11, 11)
    assert torch.allclose(binned.diagonal(), binned.max(dim=1).values)  # each knot's own basis dominates


def test_cosine_matrix_properties():
    omegas = torch.randn(30, 5)
    cos = cosine_matrix(omegas)
    assert torch.allclose(cos.diagonal(), torch.ones(30), atol=1e-6)
    assert torch.allclose(cos, cos.T)
    assert cos.abs().max() <= 1 + 1e-6
    assert cos[0, 1].item() == pytest.approx(torch.nn.functional.cosine_similarity(omegas[0], omegas[1], dim=0).item(),
                                             abs=1e-6)  # fmt: skip


def test_class_path_vectors():
    v = class_path_vectors(4, 1, 3, 5)
    assert torch.allclose(v["interpolation"][0], torch.tensor([0.0, 0, 0, 1]))
    assert torch.allclose(v["interpolation"][-1], torch.tensor([0.0, 1, 0, 0]))
    assert torch.allclose(v["interpolation"][2], torch.tensor([0.0, 0.5, 0, 0.5]))
    assert torch.allclose(v["extrapolation"][0], torch.tensor([0.0, -1, 0, 0]))
    assert torch.allclose(v["extrapolation"][-1], torch.tensor([0.0, 1, 0, 0]))


@pytest.mark.parametrize("lora", [{}, {"classes": "select"}])
def test_one_hot_class_vector_equals_the_label(lora):
    nano = {"channels": 8, "channel_mult": "1,2", "attn_levels": "1", "num_heads": 2}
    model = {"conditioning": "with_lora"} if lora else {}
    cfg = build_config("digits-nano", {"model": model, "nano": nano, "lora": lora, "ddpm": {"num_timesteps": 60}})
    torch.manual_seed(0)
    net = build_network(cfg).eval()
    for p in net.parameters():
        torch.nn.init.normal_(p, std=0.1)
    process = process_for(cfg)
    predict = functools.partial(process.predict, net)
    null = torch.full((2,), NULL_LABEL)
    onehot = Conditions(labels=null, class_vector=torch.nn.functional.one_hot(torch.tensor([3, 3]), 10).float())
    label = Conditions(labels=torch.tensor([3, 3]))
    a, b = (
        ddim_sample(guided(predict, classifier_free(c, 2.0)), process.schedule, PerSampleNoise([1, 2]), (1, 8, 8), 5)
        for c in (onehot, label)
    )
    assert torch.allclose(a, b, atol=1e-5)


def test_plots_command_writes_every_figure(tmp_path, capsys):
    run = tmp_path / "run"
    lora = ["--model.conditioning", "with_lora", "--lora.time", "compositional", "--lora.time_bases", "4",
            "--lora.omega", "train", "--lora.omega_init", "onehot", "--lora.classes", "select"]  # fmt: skip
    assert main(["train", *TINY, *lora, "--train.out_dir", str(run)]) == 0
    assert main(["plots", str(run), "--classes", "2", "5", "--steps", "3"]) == 0
    figures = run / "figures"
    names = sorted(p.name for p in figures.iterdir())
    assert len([n for n in names if n.startswith("omega-cosine-")]) == 8
    assert len([n for n in names if n.startswith("omega-") and "cosine" not in n and "similarity" not in n]) == 8
    assert "omega-similarity-t30.png" in names
    grid = np.asarray(Image.open(figures / "class-interpolation-2-5.png"))
    assert grid.shape[0] > 4 * 8 and grid.shape[1] > 9 * 8  # 4 rows x 9 columns of 8x8 digits
    assert (figures / "class-extrapolation-2-5.png").is_file()


def test_plots_needs_something_to_plot(tmp_path, capsys):
    run = tmp_path / "run"
    assert main(["train", *TINY, "--model.num_classes", "0", "--train.out_dir", str(run)]) == 0
    assert main(["plots", str(run)]) == 2
    assert "nothing to plot" in capsys.readouterr().err
