"""The contract between networks, conditions, processes and adapters: net(x, noise_level, cond)."""

import functools
import warnings
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from torch import nn

from condlora.conditions import NULL_LABEL, Conditions
from condlora.config import ConfigError, RunConfig
from condlora.diffusion import process_for
from condlora.lora import ClassSelect, ConditionedLoRA, TimeTable, grouping
from condlora.nets import build_network
from condlora.pipeline import load_model
from condlora.presets import PRESETS, build_config

FIXTURE = Path(__file__).parent / "fixtures" / "run-v0.1"
TINY = {
    "model": {"image_size": 8},
    "nano": {"channels": 8, "channel_mult": (1, 2), "attn_levels": (1,), "num_heads": 2},
    "ddpm": {"num_timesteps": 100},
}
WITH_LORA = {
    "model": {"image_size": 8, "conditioning": "with_lora"},
    "lora": {"time": "compositional", "classes": "select"},
}


def _tiny(**sections) -> RunConfig:
    merged = {name: dict(values) for name, values in TINY.items()}
    for name, values in sections.items():
        merged.setdefault(name, {}).update(values)
    return build_config("digits-nano", merged)


def _trained_lora_net(cfg: RunConfig) -> nn.Module:
    torch.manual_seed(0)
    net = build_network(cfg)
    for p in net.parameters():  # non-zero everywhere, adapters included, as after training
        nn.init.normal_(p, std=0.1)
    return net.eval()


def _inputs(batch: int = 4):
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batch, 1, 8, 8, generator=g)
    t = torch.randint(0, 100, (batch,), generator=g)
    labels = torch.randint(-1, 10, (batch,), generator=g)
    return x, t, labels


def _predict(net, x, t, cond):
    return process_for(_tiny()).predict(net, x, t, cond)


# LoRA scale -------------------------------------------------------------------------------------------------------


@torch.no_grad()
def test_lora_scale_zero_is_exactly_the_base_network_and_one_the_adapted_one_in_one_batch():
    cfg = _tiny(**WITH_LORA)
    net = _trained_lora_net(cfg)
    base = build_network(_tiny())  # the same network without adapters
    weights = {k.replace(".base_layer.", "."): v for k, v in net.state_dict().items()}
    base.load_state_dict({k: v for k, v in weights.items() if k in base.state_dict()})
    x, t, labels = _inputs()
    cond = Conditions(labels=labels)
    reference_base = _predict(base.eval(), x, t, cond)
    adapted = _predict(net, x, t, cond)
    assert not torch.allclose(adapted, reference_base)  # the adapters do something
    assert torch.equal(_predict(net, x, t, cond.replace(lora_scale=torch.zeros(4))), reference_base)
    assert torch.equal(_predict(net, x, t, cond.replace(lora_scale=torch.ones(4))), adapted)
    mixed = _predict(net, x, t, cond.replace(lora_scale=torch.tensor([0.0, 1.0, 0.0, 1.0])))
    assert torch.equal(mixed[0::2], reference_base[0::2]) and torch.equal(mixed[1::2], adapted[1::2])
    half = _predict(net, x, t, cond.replace(lora_scale=torch.full((4,), 0.5)))
    assert not torch.allclose(half, adapted) and not torch.allclose(half, reference_base)


@torch.no_grad()
def test_lora_scale_on_the_shared_merged_path():
    net = _trained_lora_net(_tiny(**WITH_LORA))
    x = _inputs()[0]
    t, labels = torch.full((4,), 30), torch.full((4,), 2)
    for scale in (0.0, 0.7, 1.0):
        cond = Conditions(labels=labels, lora_scale=torch.full((4,), scale))
        shared = _predict(net, x, t, cond.replace(shared=True))
        assert torch.allclose(shared, _predict(net, x, t, cond), atol=1e-5)


# an input-reading strategy ----------------------------------------------------------------------------------------


class TokenGate(nn.Module):
    """A router-like strategy: omega = FC(x) + E[step] for every position (no squashing), in x's layout."""

    reads_input = True

    def __init__(self, channels: int, num_bases: int, num_timesteps: int, channel_dim: int):
        super().__init__()
        self.num_bases, self.channel_dim = num_bases, channel_dim
        self.fc = nn.Linear(channels, num_bases)
        self.table = nn.Parameter(torch.randn(num_timesteps, num_bases))

    def forward(self, cond: Conditions, x: torch.Tensor) -> torch.Tensor:
        tokens = x.movedim(self.channel_dim, -1)  # (B, ..., C)
        extra = self.table[cond.step].reshape(x.shape[0], *([1] * (x.dim() - 2)), self.num_bases)
        return (self.fc(tokens) + extra).movedim(-1, self.channel_dim)


@pytest.mark.parametrize("layout", ["linear", "conv1d"])
@torch.no_grad()
def test_input_reading_strategy_batched_equals_a_per_position_reference(layout):
    torch.manual_seed(0)
    base = nn.Linear(6, 5) if layout == "linear" else nn.Conv1d(6, 5, 1)
    channel_dim = -1 if layout == "linear" else 1
    strategies = {"gate": TokenGate(6, 3, 20, channel_dim), "class": ClassSelect(4)}
    layer = ConditionedLoRA(base, strategies, rank=2, basis_bias=True)
    nn.init.normal_(layer.lora_up)
    nn.init.normal_(layer.basis_bias)
    x = torch.randn(3, 7, 6) if layout == "linear" else torch.randn(3, 6, 7)
    cond = Conditions(step=torch.tensor([0, 5, 19]), labels=torch.tensor([1, NULL_LABEL, 3]))
    layer.conditions = cond
    out = layer(x)
    tokens = x if layout == "linear" else x.transpose(1, 2)  # (B, L, C)
    w0 = base.weight.reshape(5, 6)
    for i in range(3):
        onehot = [1.0 if cond.labels[i] == c else 0.0 for c in range(4)]
        for p in range(7):
            xi = tokens[i, p]
            gate = strategies["gate"].fc(xi) + strategies["gate"].table[cond.step[i]]
            omega = torch.cat([gate, torch.tensor(onehot)])
            w, b = w0.clone(), base.bias.clone()
            for j in range(layer.num_bases):  # 3 gated bases, then 4 class bases
                rows = slice(2 * j, 2 * j + 2)
                w = w + omega[j] * layer.lora_up[:, rows] @ layer.lora_down[rows]
                b = b + omega[j] * layer.basis_bias[rows].sum(0)
            expected = w @ xi + b
            got = out[i, p] if layout == "linear" else out[i, :, p]
            assert torch.allclose(got, expected, atol=1e-4), (i, p)
    with pytest.raises(ValueError, match="do not depend on the input"):
        layer.merge(cond)


# compile, dtypes ------------------------------------------------------------------------------------------------


_AOT_TRACED = (
    "mnist-nano",
    "mnist-nano-lora-only",
    "mnist-nano-uc-lora",
    "edm-cifar10-cond-uc-lora",
    "iddpm-cifar10-cond-lora",
)


@pytest.mark.parametrize("preset", list(PRESETS))
@pytest.mark.parametrize("shared", [False, True])
def test_every_preset_network_compiles_without_a_graph_break(preset, shared):
    assert set(_AOT_TRACED) <= set(PRESETS)
    torch._dynamo.reset()
    cfg = build_config(preset)
    narrow = {  # the paper-scale networks, narrowed: the same code paths, seconds to trace
        "ddpmpp": {"ddpmpp": {"model_channels": 8, "num_blocks": 1}},
        "iddpm": {"iddpm": {"model_channels": 32, "num_res_blocks": 1}},
    }
    if cfg.model.backbone in narrow and cfg.train.batch_size > 64:
        cfg = build_config(preset, narrow[cfg.model.backbone])
    net = build_network(cfg)
    m = cfg.model
    x = torch.randn(2, m.in_channels, m.image_size, m.image_size)
    if cfg.diffusion.family == "edm":  # sigma
        t = torch.full((2,), 1.5) if shared else torch.tensor([0.01, 40.0])
    else:
        t = torch.full((2,), 7) if shared else torch.tensor([3, 900])
    labels = torch.full((2,), 1) if shared or not m.num_classes else torch.tensor([1, NULL_LABEL])
    cond = Conditions(labels=labels if m.num_classes else None, shared=shared)
    process = process_for(cfg)
    # Dynamo alone is where a graph break shows; AOT autograd, which also traces the backward (seconds per
    # network), runs on a training call of one LoRA preset per backbone and strategy kind.
    backend = "aot_eager" if preset in _AOT_TRACED and not shared else "eager"
    compiled = torch.compile(functools.partial(process.predict, net), fullgraph=True, backend=backend)
    with torch.set_grad_enabled(not shared):
        with warnings.catch_warnings():
            warnings.simplefilter("error", UserWarning)  # nor may the compiler warn (of a cache it traced through)
            out = compiled(x, t, cond)  # fullgraph: a graph break (a host read of a tensor) would raise here
        if not shared:
            out.square().mean().backward()
        assert torch.allclose(out, process.predict(net, x, t, cond), atol=1e-5)


@pytest.mark.parametrize("merge_limit", [grouping.MERGE_LIMIT, 0])  # 0: every layer merges its own weights
@pytest.mark.parametrize("shared", [False, True])
@pytest.mark.parametrize(
    "lora", [{"time": "compositional", "classes": "select"}, {"uc_bases": 4, "uc_widths": (16,), "basis_bias": True}]
)
def test_adapters_under_autocast_agree_with_float32(lora, shared, merge_limit, monkeypatch):
    """Under bf16 autocast the omegas are cast once at binding (to the dtype the projections come out in):
    every path (batched, merged together, merged alone with a per-basis bias) must still take them."""
    monkeypatch.setattr(grouping, "MERGE_LIMIT", merge_limit)
    net = _trained_lora_net(_tiny(model={"image_size": 8, "conditioning": "with_lora"}, lora=lora))
    x, t, labels = _inputs()
    if shared:
        t, labels = torch.full_like(t, 7), torch.full_like(labels, 3)
    cond = Conditions(labels=labels, shared=shared)
    reference = _predict(net, x, t, cond)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = _predict(net, x, t, cond)
    assert (out.float() - reference).abs().max() < 0.05 * reference.abs().max()


@pytest.mark.parametrize("preset", ["mnist-nano", "mnist-nano-uc-lora", "mnist-edm", "mnist-iddpm"])
def test_a_call_builds_no_module(preset, monkeypatch):
    """Host time of a call is what an eager GPU step bound by launches pays: slicing a Sequential or a
    ModuleList builds a new module on every call (the published IDDPM ResBlock does), which none may do."""
    cfg = build_config(preset)
    net, process = build_network(cfg), process_for(cfg)
    x = torch.randn(2, 1, 28, 28)
    levels = torch.tensor([0.5, 3.0]) if cfg.diffusion.family == "edm" else torch.tensor([3, 900])
    cond = Conditions(labels=torch.tensor([1, 2]))
    built = []
    init = nn.Module.__init__

    def counting_init(module, *args, **kwargs):
        built.append(type(module).__name__)
        init(module, *args, **kwargs)

    monkeypatch.setattr(nn.Module, "__init__", counting_init)
    process.loss(net, x, cond, torch.Generator().manual_seed(0))["loss"].mean().backward()
    with torch.no_grad():
        process.predict(net.eval(), x, levels, cond)
        process.predict(net, x, levels, cond.replace(labels=torch.tensor([1, 1]), shared=True))
    assert built == []


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float64])
@pytest.mark.parametrize(
    "lora",
    [
        {},
        {"time": "compositional", "classes": "compositional"},
        {"uc_bases": 4, "uc_widths": (16,), "basis_bias": True},
    ],
)
def test_networks_and_adapters_run_in_bf16_and_float64(dtype, lora):
    sections = {"model": {"image_size": 8, "conditioning": "with_lora" if lora else "baseline"}, "lora": lora}
    cfg = _tiny(**sections)
    net = _trained_lora_net(cfg).train()
    x, t, labels = _inputs()
    cond = Conditions(labels=labels)
    reference = _predict(net.double(), x.double(), t, cond)
    low = net.to(dtype)
    out = _predict(low, x.to(dtype), t, cond)
    assert out.dtype == dtype
    out.float().square().mean().backward()
    assert all(p.grad is None or p.grad.dtype == dtype for p in low.parameters())
    tolerance = 1e-10 if dtype == torch.float64 else 0.1
    assert torch.allclose(out.double(), reference, atol=tolerance, rtol=tolerance)
    with torch.autocast("cpu", dtype=torch.bfloat16):  # mixed precision: float32 weights, bf16 compute
        assert _predict(net.float(), x, t, cond).isfinite().all()


# the 0.1 run directory -----------------------------------------------------------------------------------------


@torch.no_grad()
def test_a_run_directory_written_by_0_1_loads_and_gives_its_outputs():
    ref = load_file(str(FIXTURE / "reference.safetensors"))
    for use_ema, key in ((True, "eps_ema"), (False, "eps_model")):
        net, cfg, ckpt = load_model(FIXTURE, use_ema=use_ema)
        assert cfg.nano.channels == 8 and cfg.lora.time == "compositional" and cfg.lora.time_bases == 5
        assert cfg.lora.classes == "select" and cfg.lora.targets == () and ckpt.step == 40
        t = ref["t"].long()
        out = net(ref["x"], t.float(), Conditions(labels=ref["labels"], step=t))
        assert torch.allclose(out, ref[key], atol=1e-6, rtol=1e-5), key  # bit-equal on the torch that wrote it


def test_an_unknown_config_version_is_named():
    with pytest.raises(ConfigError, match="config version 99 is not supported; this condlora reads versions 1"):
        RunConfig.from_dict({"config_version": 99, "model": {}})


def test_conditions_cat_and_repeat():
    a = Conditions(labels=torch.tensor([1, 2]), lora_scale=torch.tensor([0.0, 0.5]), shared=True)
    b = Conditions(labels=torch.tensor([3]))
    both = Conditions.cat([a, b])
    assert both.labels.tolist() == [1, 2, 3] and both.lora_scale.tolist() == [0.0, 0.5, 1.0] and not both.shared
    assert a.repeat(2).labels.tolist() == [1, 2, 1, 2]
    with pytest.raises(ValueError, match="step is given in some parts but not in others"):
        Conditions.cat([a, Conditions(labels=torch.tensor([0]), step=torch.tensor([4]))])
    unconditional = Conditions.cat([Conditions(lora_scale=torch.tensor([0.0, 0.0])), Conditions()])
    assert unconditional.lora_scale.tolist() == [0.0, 0.0, 1.0, 1.0]  # a part without tensors has the same B


@pytest.mark.parametrize("family", ["ddpm", "iddpm", "edm"])
def test_a_process_moves_every_table_a_training_step_reads(family):
    sections = {"diffusion": {"family": family}, "ddpm": {"min_snr_gamma": 5.0} if family == "ddpm" else {}}
    if family == "iddpm":
        sections["ddpm"] = {"timestep_sampler": "loss-second-moment", "schedule": "cosine"}
    process = process_for(build_config("mnist-edm" if family == "edm" else "digits-nano", sections))
    assert process.to("meta") is process
    tables = [v for v in vars(process).values() if torch.is_tensor(v)]
    for part in vars(process).values():  # the schedule, the chain, the importance sampler
        tables += [v for v in vars(part).values() if torch.is_tensor(v)] if hasattr(part, "__dict__") else []
    assert len(tables) >= {"ddpm": 2, "iddpm": 8, "edm": 0}[family]
    assert all(t.device.type == "meta" for t in tables)


def test_time_table_reads_the_step_the_process_sets_not_the_noise_level():
    layer = ConditionedLoRA(nn.Linear(4, 4), {"time": TimeTable(100, 3)}, rank=1)
    nn.init.normal_(layer.lora_up)
    x = torch.randn(2, 4)
    layer.conditions = Conditions(step=torch.tensor([0, 99]))
    first = layer(x)
    layer.conditions = Conditions(step=torch.tensor([99, 0]))
    assert not torch.allclose(first, layer(x))


@pytest.mark.skipif(not torch.__version__.startswith("2.13.0"), reason="CPU kernels of the torch that wrote it")
@pytest.mark.parametrize("selected", [False, True])
def test_training_today_reproduces_the_0_1_run_bit_for_bit(tmp_path, selected, monkeypatch):
    """With the dense adapter products of 0.1, bit for bit. Projecting through each sample's selected bases
    alone (the default since, `ConditionedLoRA.selects`) drops the products with zero weights, which changes
    the order of floating-point additions and nothing else: the same run to float32 rounding."""
    from condlora.cli import main

    if not selected:
        monkeypatch.setattr(ConditionedLoRA, "selects", lambda self, cond: False)
    argv = ["train", "--preset", "digits-nano", "--nano.channels", "8", "--nano.channel_mult", "1,2",
            "--nano.attn_levels", "1", "--nano.num_heads", "2", "--ddpm.num_timesteps", "100", "--train.steps", "40",
            "--train.lr", "3e-3", "--train.warmup_steps", "2", "--train.batch_size", "16",
            "--train.checkpoint_every", "0", "--train.log_every", "10", "--train.progress", "false",
            "--train.device", "cpu", "--model.conditioning", "with_lora", "--lora.time", "compositional",
            "--lora.time_bases", "5", "--lora.classes", "select", "--no-sample",
            "--train.out_dir", str(tmp_path / "r")]  # fmt: skip
    assert main(argv) == 0  # the command of tests/fixtures/README.md, in today's option names
    for group in ("model", "ema"):
        old = load_file(str(FIXTURE / "checkpoints" / "step-000000040" / f"{group}.safetensors"))
        new = load_file(str(tmp_path / "r" / "checkpoints" / "step-000000040" / f"{group}.safetensors"))
        if selected:  # 40 steps at lr 3e-3 amplify the rounding to ~2e-5 of each tensor's largest entry
            assert all(torch.allclose(v, old[k], rtol=0, atol=1e-4 * float(old[k].abs().max())) for k, v in new.items())
        else:
            assert all(torch.equal(old[k], v) for k, v in new.items()), group
