"""TimeStep Master: interval routing (Eq. 7), fostering one expert per sample, the assembled mixture of a core
expert and routed context experts (Eq. 5-6) against a per-sample, per-position reference."""

import json
import math

import pytest
import torch
from torch import nn

from condlora.conditions import Conditions
from condlora.lora import ConditionedLoRA, conditioned_layers
from condlora.lora.strategies import TimestepExperts, expert_intervals

T = 1000


def test_intervals_follow_eq7_at_the_boundaries():
    steps = torch.arange(T)  # 0-based; the paper's t = step + 1
    for n in (1, 2, 3, 4, 7, 8, 1000):
        got = expert_intervals(steps, T, n)
        want = torch.tensor([math.ceil((s + 1) * n / T) for s in range(T)])  # integer ceil, exact
        assert torch.equal(got, want), n
        assert got.min() == 1 and got.max() == n
    # t = T/n is the last step of interval 1, t = T/n + 1 the first of interval 2 (1-based t)
    assert expert_intervals(torch.tensor([0, 249, 250, 499, 500, 999]), T, 4).tolist() == [1, 1, 2, 2, 3, 4]
    assert expert_intervals(torch.tensor([332, 333, 665, 666]), T, 3).tolist() == [1, 2, 2, 3]


def _layer(kind: str, **tsm) -> ConditionedLoRA:
    torch.manual_seed(0)
    base = nn.Linear(12, 10) if kind == "linear" else nn.Conv2d(12, 10, 1)
    channel_dim = -1 if kind == "linear" else 1
    strategy = TimestepExperts(T, (1, 2, 4), 12, channel_dim, **tsm)
    layer = ConditionedLoRA(base, {"tsm": strategy}, rank=3)
    with torch.no_grad():
        layer.lora_up.normal_()  # trained experts are non-zero
        for p in strategy.parameters():
            p.normal_()  # and so is a trained router
    return layer


def _input(kind: str, batch: int) -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(batch, 5, 12) if kind == "linear" else torch.randn(batch, 12, 3, 2)


def _expert_delta(layer: ConditionedLoRA, e: int, x: torch.Tensor) -> torch.Tensor:
    """B_e A_e x for one expert, channels last."""
    r = layer.rank
    return x @ layer.lora_down[e * r : (e + 1) * r].T @ layer.lora_up[:, e * r : (e + 1) * r].T


def _reference(layer: ConditionedLoRA, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
    """Eq. 5-6 sample by sample and position by position: base + B_core A_core x + sum_j G_j B_j A_j x with
    G = FC(x) + E[t], and experts picked by Eq. 7 (1-based t = step + 1)."""
    s = layer.strategies["tsm"]
    last = x if s.channel_dim == -1 else x.movedim(1, -1)
    out = torch.empty(*last.shape[:-1], layer.c_out)
    offsets = [0, 1, 3]  # scales 1, 2, 4 in order
    for b in range(x.shape[0]):
        t = int(steps[b]) + 1
        expert = [offsets[k] + math.ceil(t * n / T) - 1 for k, n in enumerate((1, 2, 4))]
        for p in torch.cartesian_prod(*[torch.arange(d) for d in last.shape[1:-1]]).reshape(-1, last.dim() - 2):
            v = last[(b, *p.tolist())]
            y = layer.base_layer.weight.reshape(layer.c_out, -1) @ v + layer.base_layer.bias
            gates = []
            for j, k in enumerate(s.gated):
                g = torch.zeros(())
                if s.router != "time":
                    g = g + s.fc.weight[j] @ v + s.fc.bias[j]
                if s.router != "features":
                    g = g + s.time_embed[t - 1, j]
                gates.append((k, g))
            if s.core:
                y = y + _expert_delta(layer, expert[2], v)
            for k, g in gates:
                y = y + g * _expert_delta(layer, expert[k], v)
            out[(b, *p.tolist())] = y
    return out if s.channel_dim == -1 else out.movedim(-1, 1)


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize(
    "options",
    [{}, {"core": False}, {"router": "time"}, {"router": "features"}],
    ids=["both", "symmetric", "time", "features"],
)
def test_assembled_layer_matches_eq5_6_per_sample_and_position(kind, options):
    layer = _layer(kind, stage="assemble", **options)
    x = _input(kind, 6)
    steps = torch.tensor([0, 249, 250, 500, 998, 999])  # every interval of the finest scale, its edges
    layer.conditions = Conditions(step=steps)
    with torch.no_grad():
        got = layer(x)
        torch.testing.assert_close(got, _reference(layer, x, steps), rtol=1e-5, atol=1e-5)
        for b in range(6):  # no pooling over the batch: a sample alone gives its own rows
            layer.conditions = Conditions(step=steps[b : b + 1])
            torch.testing.assert_close(layer(x[b : b + 1]), got[b : b + 1], rtol=1e-5, atol=1e-5)


def test_time_router_at_one_shared_step_takes_the_merged_path():
    layer = _layer("linear", stage="assemble", router="time")
    x, steps = _input("linear", 4), torch.full((4,), 600)
    with torch.no_grad():
        layer.conditions = Conditions(step=steps)
        batched = layer(x)
        layer.conditions = Conditions(step=steps, shared=True)
        calls = []
        original = layer._forward_merged
        layer._forward_merged = lambda *a: calls.append(1) or original(*a)
        torch.testing.assert_close(layer(x), batched, rtol=1e-5, atol=1e-5)
    assert calls == [1]


def test_foster_routes_each_sample_to_one_expert_and_trains_only_it():
    layer = _layer("linear", stage="foster")
    strategy = layer.strategies["tsm"]
    steps = torch.tensor([10, 10, 10, 600, 600, 600, 900])
    x = _input("linear", len(steps))
    layer.train()
    layer.conditions = Conditions(step=steps)
    layer(x).square().sum().backward()
    # sample b goes to scale b mod 3 (scales 1, 2, 4 -> experts 0 | 1, 2 | 3..6)
    routed = set([0, 1, 3, 0, 2, 5, 0])  # sample by sample
    grads = layer.lora_up.grad.reshape(layer.c_out, strategy.num_bases, layer.rank).abs().sum(dim=(0, 2))
    assert {e for e in range(strategy.num_bases) if grads[e] > 0} == routed
    # one expert per sample, so a mixed batch equals the samples one by one at a fixed scale
    for scale in (1, 2, 4):
        fixed = _layer("linear", stage="foster", scale=scale)
        fixed.conditions = Conditions(step=steps)
        with torch.no_grad():
            together = fixed(x)
            for b in range(len(steps)):
                fixed.conditions = Conditions(step=steps[b : b + 1])
                torch.testing.assert_close(fixed(x[b : b + 1]), together[b : b + 1])
    layer.eval()  # sampling a mixed-scale fostering: the finest scale's experts
    with torch.no_grad():
        omega = strategy(Conditions(step=steps), x)
    assert omega.argmax(1).tolist() == [3, 3, 3, 5, 5, 5, 6] and omega.sum(1).eq(1).all()


def test_bad_tsm_settings_are_named():
    with pytest.raises(ValueError, match="distinct scales >= 1"):
        TimestepExperts(T, (2, 2), 4)
    with pytest.raises(ValueError, match="scale 3 is not one of the scales"):
        TimestepExperts(T, (1, 2), 4, scale=3)
    from condlora.config import ConfigError
    from condlora.presets import build_config

    with pytest.raises(ConfigError, match="lora.tsm_scale: must be 0 or one of tsm_scales"):
        build_config("mnist-nano", {"lora": {"tsm_scales": "1,2", "tsm_scale": "4"}})


def test_assembling_after_fostering_trains_only_the_routers(tiny_config, tmp_path):
    """Foster experts at scales 1 and 2 on a frozen trained base, then assemble from that run: only FC and E
    change."""
    from condlora.pipeline import load_model
    from condlora.train import train

    train(tiny_config(train={"out_dir": str(tmp_path / "base")}), tmp_path / "base")  # a trained base
    tsm = {"time": "none", "classes": "none", "tsm_scales": (1, 2)}
    foster = tiny_config(
        model={"conditioning": "with_lora"},
        lora=tsm,
        train={"trainable": ("lora",), "init_from": str(tmp_path / "base"), "lr": 1e-2},
    )
    train(foster, tmp_path / "run")
    fostered, _, _ = load_model(tmp_path / "run")  # EMA weights, what init_from takes
    assemble = tiny_config(
        model={"conditioning": "with_lora"},
        lora={**tsm, "tsm_stage": "assemble"},
        train={"trainable": ("*.strategies.tsm.*",), "init_from": str(tmp_path / "run"), "lr": 1e-2,
               "out_dir": str(tmp_path / "assembled")},
    )  # fmt: skip
    train(assemble, tmp_path / "assembled")
    assembled, _, _ = load_model(tmp_path / "assembled", use_ema=False)
    before, after = fostered.state_dict(), assembled.state_dict()
    routers = {k for k in after if ".strategies.tsm." in k}
    assert routers and routers.isdisjoint(before)  # FC and E exist only in the assembled network
    assert set(after) - routers == set(before)
    assert all(torch.equal(after[k], before[k]) for k in before)  # experts and base as fostered
    print(
        {k: float(after[k].abs().sum()) for k in routers},
        {k: float(after[k].abs().sum()) for k in after if k.endswith("lora_up")},
    )
    assert all(after[k].abs().sum() > 0 for k in routers)  # the routers, zero at the start, trained
    ups = [after[k] for k in after if k.endswith("lora_up")]
    assert ups and all(u.abs().sum() > 0 for u in ups)  # the fostered experts are not zero


@pytest.mark.parametrize("kind", ["UNet2DModel", "UNet2DConditionModel", "Transformer2DModel"])
@torch.no_grad()
def test_assembled_experts_on_diffusers_attention_per_sample(kind):
    """TSM on a diffusers UNet's to_q / to_k / to_v / to_out.0 (the paper's targets): routed per sample and per
    token, with cross-attention keys and values routed on the text tokens they read."""
    from helpers import predict, tiny_unet

    from condlora.lora import LoRASpec, conditioned_layers
    from condlora.nets.diffusers_unet import DiffusersUNet

    targets = ("*.to_q", "*.to_k", "*.to_v", "*.to_out.0")
    spec = LoRASpec(targets=targets, tsm_scales=(1, 2, 4), tsm_stage="assemble", num_timesteps=100)
    net = DiffusersUNet(tiny_unet(kind), spec, num_classes=3).eval()  # a DiT drops labels itself in training
    layers = [layer for _, layer in conditioned_layers(net)]
    assert len(layers) >= 4 and all("tsm" in layer.strategies for layer in layers)
    for layer in layers:
        torch.nn.init.normal_(layer.lora_up, std=0.05)
        for p in layer.strategies["tsm"].parameters():
            torch.nn.init.normal_(p, std=0.1)
    x, t = torch.randn(3, 1, 8, 8), torch.tensor([5, 50, 95])
    context = torch.randn(3, 4, 12) if kind == "UNet2DConditionModel" else None
    labels = torch.tensor([0, 2, -1])
    batched = predict(net, x, t, Conditions(labels=labels, context=context))
    for i in range(3):
        one = Conditions(labels=labels[i : i + 1], context=None if context is None else context[i : i + 1])
        torch.testing.assert_close(
            predict(net, x[i : i + 1], t[i : i + 1], one), batched[i : i + 1], atol=1e-5, rtol=1e-4
        )
    base = predict(net, x, t, Conditions(labels=labels, context=context, lora_scale=torch.zeros(3)))
    assert not torch.allclose(base, batched, atol=1e-4)  # the experts act


def test_interval_steps_are_exactly_the_steps_routed_to_that_expert():
    from condlora.lora.strategies import interval_steps

    steps = torch.arange(T)
    for n in (1, 2, 3, 4, 7, 8):
        owner = expert_intervals(steps, T, n)
        for i in range(1, n + 1):
            first, last = interval_steps(T, n, i)
            assert torch.equal((owner == i).nonzero()[:, 0], torch.arange(first, last)), (n, i)
    with pytest.raises(ValueError, match="interval must be in 1..4"):
        interval_steps(T, 4, 5)


def test_a_step_window_confines_training_steps():
    from condlora.config import ConfigError
    from condlora.diffusion import process_for
    from condlora.presets import build_config

    process = process_for(build_config("mnist-nano", {"ddpm": {"train_steps": "250,500"}}))
    drawn = process.timestep_sampler.sample(20_000, torch.Generator().manual_seed(0))
    assert drawn.min() == 250 and drawn.max() == 499  # both ends reached, nothing outside
    iddpm = {"diffusion": {"family": "iddpm"}, "ddpm": {"train_steps": "0,10"}}
    assert process_for(build_config("mnist-iddpm", iddpm)).timestep_sampler.high == 10
    for bad in ("500,250", "0,1001", "5"):
        with pytest.raises(ConfigError, match="ddpm.train_steps: must be two steps first,last"):
            build_config("mnist-nano", {"ddpm": {"train_steps": bad}})
    with pytest.raises(ConfigError, match="a step window needs the uniform timestep sampler"):
        build_config("mnist-iddpm", {"ddpm": {"train_steps": "0,10", "timestep_sampler": "loss-second-moment"}})
    with pytest.raises(ConfigError, match="TimeStep Master experts read discrete steps"):
        build_config("mnist-edm", {"lora": {"tsm_scales": "1,2"}})


def test_sequential_fostering_trains_one_expert_at_a_time_on_its_interval(tmp_path, capsys):
    from condlora.cli import main
    from condlora.pipeline import load_model

    tiny = ["--nano.channels", "8", "--nano.channel_mult", "1,2", "--nano.attn_levels", "1", "--nano.num_heads", "2"]
    common = ["--ddpm.num_timesteps", "100", "--train.batch_size", "8", "--train.progress", "false",
              "--train.device", "cpu", "--train.lr", "1e-2", "--sample.steps", "3", "--sample.count", "4"]  # fmt: skip
    base, foster = tmp_path / "base", tmp_path / "foster"
    assert (
        main(["train", "--preset", "digits-nano", *tiny, *common, "--train.steps", "6", "--train.out_dir", str(base)])
        == 0
    )
    args = ["finetune", str(base), "--stage", "foster", "--sequential", "--lora.tsm_scales", "1,2", *common]
    assert main([*args, "--train.steps", "6", "--train.out_dir", str(foster)]) == 0
    runs = [foster / "scale1-interval1", foster / "scale2-interval1", foster / "scale2-interval2"]
    windows = [json.loads((r / "config.json").read_text())["ddpm"]["train_steps"] for r in runs]
    assert windows == [[0, 100], [0, 50], [50, 100]]
    assert [json.loads((r / "config.json").read_text())["train"]["init_from"] for r in runs] == [
        str(base),
        str(runs[0]),
        str(runs[1]),
    ]

    def experts(run, ema):
        net, _, _ = load_model(run, use_ema=ema)
        layer = next(layer for _, layer in conditioned_layers(net))
        return layer.lora_up.detach().reshape(layer.c_out, 3, layer.rank)  # experts: scale 1 | scale 2 (x2)

    before, after = experts(runs[0], ema=True), experts(runs[1], ema=False)  # the second run's start and end
    assert torch.equal(after[:, 0], before[:, 0]) and torch.equal(after[:, 2], before[:, 2])
    assert not torch.equal(after[:, 1], before[:, 1])  # only expert 1 of scale 2 trained
    assert all(experts(runs[-1], ema=False)[:, e].abs().sum() > 0 for e in range(3))  # all fostered in the end
    stamps = {p: p.stat().st_mtime_ns for p in foster.rglob("*.safetensors")}
    capsys.readouterr()
    assert main([*args, "--train.steps", "6", "--train.out_dir", str(foster)]) == 0  # again: nothing to do
    assert "[1/3]" not in capsys.readouterr().out
    assert {p: p.stat().st_mtime_ns for p in foster.rglob("*.safetensors")} == stamps


@pytest.mark.parametrize("kind", ["linear", "conv"])
@pytest.mark.parametrize(
    "options", [{}, {"core": False}, {"router": "features"}], ids=["both", "symmetric", "features"]
)
def test_one_shared_step_merges_the_core_and_runs_only_the_context_experts(kind, options):
    layer = _layer(kind, stage="assemble", **options)
    x, steps = _input(kind, 4), torch.full((4,), 777)
    calls = []
    routed = layer._forward_routed
    layer._forward_routed = lambda *a: calls.append(1) or routed(*a)
    with torch.no_grad():
        layer.conditions = Conditions(step=steps)  # per sample: the general batched path
        batched = layer(x)
        layer.conditions = Conditions(step=steps, shared=True)
        torch.testing.assert_close(layer(x), batched, rtol=1e-5, atol=1e-5)
        assert calls == [1]
        layer.conditions = Conditions(step=steps, shared=True, lora_scale=torch.full((4,), 0.5))
        half = layer(x)  # a LoRA scale in the call: the general path
        assert calls == [1]
        layer.conditions = Conditions(step=steps, lora_scale=torch.full((4,), 0.5))
        torch.testing.assert_close(half, layer(x), rtol=1e-5, atol=1e-5)
