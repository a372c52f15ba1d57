"""Training only some weights, initialising from another run or a diffusers folder, loss terms in metrics.csv."""

import csv
import json
from pathlib import Path

import pytest
import torch
from helpers import predict as _predict
from helpers import tiny_unet, train_until_killed
from helpers import tiny_unet as _tiny_unet
from safetensors.torch import load_file

from condlora.conditions import Conditions
from condlora.diffusion import DDPM
from condlora.lora import conditioned_layers
from condlora.pipeline import load_model
from condlora.train import train
from condlora.train.checkpoint import CheckpointError, load_latest
from condlora.train.weights import lora_owned

CLASS_LORA = {"model": {"conditioning": "with_lora"}, "lora": {"classes": "select", "rank": 2}}


def test_trainable_lora_leaves_every_base_weight_untouched_and_checkpoints_hold_only_adapters(tiny_config):
    cfg = tiny_config(**CLASS_LORA, train={"trainable": ("lora",), "lr": 1e-2})
    run = Path(cfg.train.out_dir)
    result = train(cfg, run)
    base = load_file(str(run / "base.safetensors"))  # the seeded initial weights of everything frozen
    state = result.net.state_dict()
    assert base and all(torch.equal(state[k], v) for k, v in base.items())
    owned = lora_owned(result.net)
    assert not (set(base) & owned) and set(base) | owned == set(state)
    ckpt = load_latest(run / "checkpoints")
    assert set(ckpt.tensors["model"]) == owned  # adapters and strategies only
    trainable = {n for n, p in result.net.named_parameters() if p.requires_grad}
    assert set(ckpt.tensors["ema"]) == trainable and trainable <= owned
    assert ckpt.state["base"]["kind"] == "run" and ckpt.state["base"]["path"] == "base.safetensors"
    net, _, _ = load_model(run, use_ema=False)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in state.items())


def test_trainable_patterns_and_errors(tiny_config):
    cfg = tiny_config(train={"trainable": ("out_conv.*",), "steps": 2})
    result = train(cfg, Path(cfg.train.out_dir))
    assert {n for n, p in result.net.named_parameters() if p.requires_grad} == {"out_conv.weight", "out_conv.bias"}
    with pytest.raises(ValueError, match="matches no parameter"):
        train(tiny_config(train={"trainable": ("nothing.*",), "out_dir": ""}), Path(cfg.train.out_dir).with_name("b"))
    with pytest.raises(ValueError, match="no LoRA layers"):
        train(tiny_config(train={"trainable": ("lora",)}), Path(cfg.train.out_dir).with_name("c"))


def test_init_from_a_run_round_trip(tiny_config, tmp_path):
    source_cfg = tiny_config(train={"out_dir": str(tmp_path / "source")})
    train(source_cfg, tmp_path / "source")
    source, _, _ = load_model(tmp_path / "source")  # EMA weights
    cfg = tiny_config(**CLASS_LORA, train={"trainable": ("lora",), "init_from": str(tmp_path / "source"),
                                           "out_dir": str(tmp_path / "tuned"), "lr": 1e-2})  # fmt: skip
    result = train(cfg, tmp_path / "tuned")
    ckpt = load_latest(tmp_path / "tuned" / "checkpoints")
    assert ckpt.state["base"]["kind"] == "condlora" and len(ckpt.state["base"]["sha256"]) == 64
    assert set(ckpt.tensors["model"]) == lora_owned(result.net)  # the base is referenced, not copied
    assert not (tmp_path / "tuned" / "base.safetensors").exists()
    ups = [layer.lora_up for _, layer in conditioned_layers(result.net)]
    assert all(u.abs().sum() > 0 for u in ups)  # on a trained base, the adapters train
    tuned, _, _ = load_model(tmp_path / "tuned")
    x, t = torch.randn(4, 1, 8, 8, generator=torch.Generator().manual_seed(0)), torch.tensor([0, 10, 50, 99])
    labels = torch.tensor([1, 2, 3, -1])
    with torch.no_grad():
        at_zero = _predict(tuned, x, t, Conditions(labels=labels, lora_scale=torch.zeros(4)))
        assert torch.equal(at_zero, _predict(source, x, t, Conditions(labels=labels)))  # the base is the source
        assert not torch.allclose(_predict(tuned, x, t, Conditions(labels=labels)), at_zero)
    # the source changed under the tuned run: loading it names the problem
    state = tmp_path / "source" / "checkpoints" / "step-000000012" / "state.json"
    state.write_text(json.dumps({**json.loads(state.read_text()), "note": "edited"}))
    with pytest.raises(CheckpointError, match="changed since the run started"):
        load_model(tmp_path / "tuned")


def test_init_from_a_run_with_another_architecture_is_named(tiny_config, tmp_path):
    train(tiny_config(train={"out_dir": str(tmp_path / "source"), "steps": 2}), tmp_path / "source")
    cfg = tiny_config(nano={"channels": 16}, train={"init_from": str(tmp_path / "source"), "steps": 2})
    with pytest.raises(ValueError, match="train.init_from .* has shape"):
        train(cfg, tmp_path / "other")


def test_loss_terms_each_get_a_metrics_column(tiny_config, monkeypatch):
    original = DDPM.loss

    def with_terms(self, *args, **kwargs):
        terms = original(self, *args, **kwargs)
        return {**terms, "half": terms["loss"] / 2}

    monkeypatch.setattr(DDPM, "loss", with_terms)
    cfg = tiny_config(train={"steps": 4})
    train(cfg, Path(cfg.train.out_dir))
    rows = list(csv.DictReader(open(Path(cfg.train.out_dir) / "metrics.csv")))
    assert list(rows[0]) == ["step", "loss", "half", "lr", "grad_norm", "steps_per_sec", "elapsed_s"]
    for row in rows:
        assert float(row["half"]) == pytest.approx(float(row["loss"]) / 2, rel=1e-6)


@pytest.mark.parametrize("kind", ["UNet2DModel", "UNet2DConditionModel", "Transformer2DModel"])
@torch.no_grad()
def test_conditions_reach_the_lora_layers_of_diffusers_unets(kind):
    from condlora.lora import LoRASpec
    from condlora.nets.diffusers_unet import DiffusersUNet

    unet = _tiny_unet(kind)
    net = DiffusersUNet(unet, LoRASpec(time="compositional", time_bases=4, num_timesteps=100, classes="select",
                                       num_classes=3), num_classes=3).eval()  # fmt: skip
    layers = [layer for _, layer in conditioned_layers(net)]
    assert layers and all(layer.conditions is None for layer in layers)
    for layer in layers:
        torch.nn.init.normal_(layer.lora_up, std=0.05)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 95])
    context = torch.randn(3, 4, 12) if kind == "UNet2DConditionModel" else None
    cond = Conditions(labels=torch.tensor([0, 1, 2]), context=context)
    batched = _predict(net, x, t, cond)
    for i in range(3):  # each sample alone gets what it got in the batch
        one = Conditions(labels=cond.labels[i : i + 1], context=None if context is None else context[i : i + 1])
        assert torch.allclose(_predict(net, x[i : i + 1], t[i : i + 1], one), batched[i : i + 1], atol=1e-5)
    assert all(layer.conditions is None for layer in layers)  # bound for the call only
    base = _predict(net, x, t, cond.replace(lora_scale=torch.zeros(3)))
    kwargs = {"encoder_hidden_states": context} if context is not None else {}
    if kind == "Transformer2DModel":
        kwargs["class_labels"] = cond.labels  # its adaLN-zero embeds classes
    plain = _tiny_unet(kind).eval()
    plain.load_state_dict({k.replace(".base_layer.", "."): v for k, v in unet.state_dict().items()
                           if "lora_" not in k and "strategies" not in k})  # fmt: skip
    assert torch.allclose(base, plain(x, timestep=t.float(), **kwargs).sample, atol=1e-5)


def test_gradient_checkpointing_of_a_diffusers_model_recomputes_its_lora_layers_with_their_conditions():
    """Blocks that diffusers checkpoints (`enable_gradient_checkpointing`, with its own or a given function)
    run again in the backward pass, after binding has ended: their LoRA layers get the call's conditions
    again, and every gradient is the one without checkpointing."""
    from condlora.lora import LoRASpec
    from condlora.nets.diffusers_unet import DiffusersUNet

    unet = _tiny_unet("Transformer2DModel")  # a DiT: its transformer blocks, attention included, are checkpointed
    spec = LoRASpec(time="compositional", time_bases=4, num_timesteps=100, classes="select", num_classes=3)
    net = DiffusersUNet(unet, spec, num_classes=3).eval()  # eval: no class-label dropout, the same draw twice
    layers = [layer for _, layer in conditioned_layers(net)]
    for layer in layers:
        torch.nn.init.normal_(layer.lora_up, std=0.05)
    calls = []
    layers[0].register_forward_hook(lambda module, args, out: calls.append(module.conditions is not None))
    x, t, cond = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 95]), Conditions(labels=torch.tensor([0, 1, -1]))

    def gradients() -> dict[str, torch.Tensor]:
        net.zero_grad(set_to_none=True)
        _predict(net, x, t, cond).square().sum().backward()
        return {name: p.grad for name, p in net.named_parameters() if p.grad is not None}

    expected = gradients()
    checkpointed = []

    def checkpoint(module, *args):
        checkpointed.append(module)
        return torch.utils.checkpoint.checkpoint(module, *args, use_reentrant=False)

    for given in (None, checkpoint):
        calls.clear()
        unet.enable_gradient_checkpointing(gradient_checkpointing_func=given)
        got = gradients()
        assert calls == [True, True]  # the forward call and its recomputation, both with conditions
        assert got.keys() == expected.keys()
        for name, grad in got.items():
            torch.testing.assert_close(grad, expected[name], rtol=1e-5, atol=1e-6, msg=name)
    assert checkpointed  # a function of one's own is kept, with the conditions around it


def test_diffusers_backbone_from_a_local_folder(tiny_config, tmp_path):
    unet = _tiny_unet("UNet2DModel")
    unet.save_pretrained(tmp_path / "unet")
    cfg = tiny_config(
        model={"backbone": "diffusers", "conditioning": "with_lora"},
        lora={"time": "compositional", "time_bases": 4, "classes": "select"},
        train={"init_from": str(tmp_path / "unet"), "trainable": ("lora",), "steps": 3},
    )
    result = train(cfg, Path(cfg.train.out_dir))
    ckpt = load_latest(Path(cfg.train.out_dir) / "checkpoints")
    assert ckpt.state["base"]["kind"] == "diffusers"
    assert set(ckpt.tensors["model"]) == lora_owned(result.net)
    net, _, _ = load_model(cfg.train.out_dir, use_ema=False)
    assert all(torch.equal(net.state_dict()[k], v) for k, v in result.net.state_dict().items())
    (tmp_path / "unet" / "diffusion_pytorch_model.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match="diffusion_pytorch_model.safetensors is missing"):
        load_model(cfg.train.out_dir)


def test_resume_of_an_adapter_run_is_exact(tiny_config, tmp_path, monkeypatch):

    train(tiny_config(train={"out_dir": str(tmp_path / "source"), "steps": 6}), tmp_path / "source")

    def config(name):
        return tiny_config(**CLASS_LORA, train={"trainable": ("lora",), "init_from": str(tmp_path / "source"),
                                                "out_dir": str(tmp_path / name), "lr": 1e-2})  # fmt: skip

    train(config("full"), tmp_path / "full")
    train_until_killed(config("part"), tmp_path / "part", monkeypatch)
    train(config("part"), tmp_path / "part", resume=True)
    a, b = (load_latest(tmp_path / name / "checkpoints") for name in ("full", "part"))
    assert a.step == b.step == 12
    for group in ("model", "ema", "optimizer"):
        assert a.tensors[group].keys() == b.tensors[group].keys()
        assert all(torch.equal(a.tensors[group][k], b.tensors[group][k]) for k in a.tensors[group]), group


def _cli_tiny(out: Path, steps: int = 4) -> list[str]:
    return ["--ddpm.num_timesteps", "100", "--train.steps", str(steps), "--train.batch_size", "8",
            "--train.checkpoint_every", "2", "--train.progress", "false", "--train.device", "cpu",
            "--sample.steps", "3", "--sample.count", "4", "--train.out_dir", str(out)]  # fmt: skip


def test_finetune_stages_from_the_command_line(tmp_path, capsys):
    from condlora.cli import main
    from condlora.presets import build_config

    tiny = ["--nano.channels", "8", "--nano.channel_mult", "1,2", "--nano.attn_levels", "1", "--nano.num_heads", "2"]
    base, foster, assemble = tmp_path / "base", tmp_path / "foster", tmp_path / "assemble"
    assert main(["train", "--preset", "digits-nano", *tiny, *_cli_tiny(base)]) == 0
    assert main(["finetune", str(base), "--stage", "foster", "--lora.tsm_scales", "1,2", *_cli_tiny(foster)]) == 0
    saved = json.loads((foster / "config.json").read_text())
    assert saved["lora"]["tsm_scales"] == [1, 2] and saved["lora"]["tsm_stage"] == "foster"
    assert saved["train"]["trainable"] == ["lora"] and saved["train"]["init_from"] == str(base)
    assert saved["model"]["conditioning"] == "with_lora" and saved["nano"]["channels"] == 8  # the base's net
    assert main(["finetune", str(foster), "--stage", "assemble", *_cli_tiny(assemble)]) == 0
    saved = json.loads((assemble / "config.json").read_text())
    assert saved["lora"]["tsm_stage"] == "assemble" and saved["train"]["trainable"] == ["*.strategies.tsm.*"]
    assert main(["finetune", "--resume", str(assemble), "--train.steps", "6"]) == 0
    assert load_latest(assemble / "checkpoints").step == 6
    assert main(["finetune", str(foster), "--stage", "full", *_cli_tiny(tmp_path / "full")]) == 0
    saved = json.loads((tmp_path / "full" / "config.json").read_text())
    assert saved["train"]["trainable"] == ["all"] and saved["lora"]["tsm_scales"] == [1, 2]  # the source's net
    before = load_latest(foster / "checkpoints").tensors["ema"]
    after = load_latest(tmp_path / "full" / "checkpoints").tensors["model"]
    assert set(before) < set(after)  # base weights train too
    assert all(not torch.equal(before[k], after[k]) for k in before)  # and so do the experts
    capsys.readouterr()
    assert main(["finetune", str(base), "--stage", "assemble", *_cli_tiny(tmp_path / "x")]) == 2
    assert "is not a fostering run" in capsys.readouterr().err
    assert main(["finetune", str(foster), "--stage", "lora", *_cli_tiny(tmp_path / "y")]) == 2
    assert "already has LoRA layers" in capsys.readouterr().err
    assert main(["finetune", str(tmp_path / "none"), "--stage", "lora", *_cli_tiny(tmp_path / "z")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert build_config("digits-nano")  # the presets are untouched by the stages


def test_finetune_lora_on_a_diffusers_folder_exports_a_peft_adapter(tmp_path):
    peft = pytest.importorskip("peft")
    from condlora.cli import main

    tiny_unet("UNet2DModel").save_pretrained(tmp_path / "unet")
    run = tmp_path / "run"
    args = ["finetune", str(tmp_path / "unet"), "--stage", "lora", "--preset", "digits-nano", "--lora.rank", "2"]
    assert main([*args, "--lora.dropout", "0.1", "--train.lr", "1e-2", *_cli_tiny(run)]) == 0
    saved = json.loads((run / "config.json").read_text())
    assert saved["model"]["backbone"] == "diffusers" and saved["model"]["image_size"] == 8
    assert saved["lora"]["plain"] and saved["train"]["trainable"] == ["lora"]
    tuned, _, _ = load_model(run)
    x, t = torch.randn(2, 1, 8, 8), torch.tensor([10.0, 70.0])
    with torch.no_grad():
        ours = tuned(x, t, Conditions())
        model = peft.PeftModel.from_pretrained(tiny_unet("UNet2DModel"), run / "peft").eval()
        torch.testing.assert_close(model(x, t).sample, ours, atol=1e-5, rtol=1e-4)
        assert not torch.allclose(tiny_unet("UNet2DModel")(x, t).sample, ours, atol=1e-4)  # the adapter trained
    assert json.loads((run / "peft" / "adapter_config.json").read_text())["lora_dropout"] == 0.1
