"""Cost of LoRA conditioning on the papers' networks, as ratios measured in one run on this machine.

    python benchmarks/paper_overhead.py --family edm|iddpm [--device cpu|cuda] [--batch 64 128]
                                        [--precision fp32 strict bf16] [--model-channels N] [--repeats 10]
                                        [--compile MODE]

edm: EDM's DDPM++ on CIFAR-10, UC-LoRA (m 18, r 4, per-basis bias; preset edm-cifar10-uncond-uc-lora) over
the baseline (edm-cifar10-uncond); iddpm: IDDPM on class-conditional CIFAR-10 (learned variance, hybrid
loss), TimeLoRA + ClassLoRA (iddpm-cifar10-cond-lora) over the baseline (iddpm-cifar10-cond). Reported:
1. training step (the family's loss + backward + Adam) per batch size and precision (fp32 uses TF32 matmuls
   on a GPU, as the published figures; strict is fp32 without TF32; bf16 is autocast), with the baseline's
   own time in ms;
2. sampling call (one network evaluation at one shared noise level, and one class for iddpm: every LoRA
   layer takes its merged path);
3. one qkv layer forward + backward with its LoRA / the bare 1x1 convolution.
`--compile MODE` runs both networks under torch.compile(fullgraph=True, mode=MODE), e.g. reduce-overhead
(CUDA graphs). `--model-channels` narrows both networks (e.g. 32 on a laptop CPU, where the full width takes seconds per
step); the report names it.
"""

from __future__ import annotations

import argparse
import contextlib

import torch
from _timing import describe, median_pair

from condlora.conditions import Conditions
from condlora.diffusion import process_for
from condlora.lora import conditioned_layers, keep_stacks
from condlora.nets import build_network
from condlora.presets import build_config

COMPILE = ""  # torch.compile mode for both networks; empty: eager
FAMILIES = {  # baseline preset, LoRA preset, architecture section, overrides, default width
    "edm": ("edm-cifar10-uncond", "edm-cifar10-uncond-uc-lora", "ddpmpp", {"edm": {"augment": 0.0}}, 128),
    "iddpm": ("iddpm-cifar10-cond", "iddpm-cifar10-cond-lora", "iddpm", {}, 128),
}


def _pair(family: str, device: torch.device, width: int):
    base_preset, lora_preset, section, overrides, _ = FAMILIES[family]
    overrides = {**overrides, section: {"model_channels": width}}
    torch.manual_seed(0)
    cfg = build_config(lora_preset, overrides)
    base = build_network(build_config(base_preset, overrides)).to(device)
    lora = build_network(cfg).to(device)
    for _, layer in conditioned_layers(lora):
        torch.nn.init.normal_(layer.lora_up, std=0.01)  # a trained adapter is non-zero
    if COMPILE:
        torch._dynamo.config.cache_size_limit = 64
        base, lora = (torch.compile(net, fullgraph=True, mode=COMPILE) for net in (base, lora))
    return cfg, base, lora


@contextlib.contextmanager
def _precision(device: torch.device, precision: str):
    """fp32 with TF32 matmuls and convolutions (as the published figures), strict fp32, or bf16 autocast."""
    tf32 = precision != "strict"
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = tf32
    with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
        yield


def _labels(cfg, batch: int, device: torch.device) -> torch.Tensor | None:
    return torch.arange(batch, device=device) % cfg.model.num_classes if cfg.model.num_classes else None


def training_ratio(family, device, width, batch, precision, repeats) -> float:
    cfg, base, lora = _pair(family, device, width)
    process = process_for(cfg).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    cond = Conditions(labels=_labels(cfg, batch, device))

    def step_of(net):
        opt = torch.optim.Adam(net.parameters(), lr=1e-4)
        g = torch.Generator(device).manual_seed(0)

        def step():
            with _precision(device, precision):
                loss = process.loss(net, x, cond, g)["loss"].mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        return step

    t_lora, t_base = median_pair(step_of(lora), step_of(base), repeats, device)
    print(f"training step  batch {batch:4d} {precision}  baseline {t_base * 1e3:8.1f} ms   LoRA {t_lora * 1e3:8.1f} ms")
    return t_lora / t_base


@torch.no_grad()
def sampling_ratio(family, device, width, batch, precision, repeats) -> float:
    cfg, base, lora = _pair(family, device, width)
    base.eval(), lora.eval()
    process = process_for(cfg).to(device)
    x = torch.randn(batch, 3, 32, 32, device=device)
    level = torch.full((batch,), 2.5, device=device) if family == "edm" else torch.full((batch,), 1000, device=device)
    labels = torch.full((batch,), 3, device=device) if cfg.model.num_classes else None
    cond = Conditions(labels=labels, shared=True)  # one noise level and class: the sampler vouches for it

    def call(net):
        def run():
            with _precision(device, precision):
                return process.predict(net, x, level, cond)

        return run

    with keep_stacks(lora):  # as a sampler does: the parameters stay fixed over its calls
        t_lora, t_base = median_pair(call(lora), call(base), repeats, device)
    print(f"sampling call  batch {batch:4d} {precision}  baseline {t_base * 1e3:8.1f} ms   LoRA {t_lora * 1e3:8.1f} ms")
    return t_lora / t_base


def layer_ratio(family, device, width, batch, repeats) -> float:
    cfg, _, lora = _pair(family, device, width)
    name, layer = next((n, m) for n, m in conditioned_layers(lora) if n.endswith("qkv"))
    if family == "edm":  # Conv2d on the 16x16 map; UC-LoRA reads the shared embedding
        x = torch.randn(batch, layer.c_in, 16, 16, device=device, requires_grad=True)
        emb = torch.randn(batch, layer.strategies["uc"].mlp[0].in_features, device=device)
        layer.conditions = Conditions(embedding=emb)
    else:  # Conv1d on the 256 positions of the 16x16 map; TimeLoRA reads the step, ClassLoRA the label
        x = torch.randn(batch, layer.c_in, 256, device=device, requires_grad=True)
        step = torch.randint(0, cfg.ddpm.num_timesteps, (batch,), device=device)
        layer.conditions = Conditions(step=step, labels=_labels(cfg, batch, device))

    def with_lora():
        layer(x).square().mean().backward()

    def bare():
        layer.base_layer(x).square().mean().backward()

    t_lora, t_bare = median_pair(with_lora, bare, repeats, device)
    print(f"one qkv layer  batch {batch:4d}  bare conv {t_bare * 1e3:8.2f} ms   LoRA {t_lora * 1e3:8.2f} ms ({name})")
    return t_lora / t_bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--family", required=True, choices=sorted(FAMILIES))
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "strict", "bf16"])
    parser.add_argument("--compile", default="", help="torch.compile mode for both networks (default: eager)")
    parser.add_argument("--model-channels", type=int, default=0, help="width (default: the CIFAR-10 network's)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    global COMPILE
    device, family, COMPILE = torch.device(args.device), args.family, args.compile
    width = args.model_channels or FAMILIES[family][4]
    mode = f"compile {COMPILE}" if COMPILE else "eager"
    base_preset, lora_preset = FAMILIES[family][:2]
    print(f"{describe(device)}, {family}: {lora_preset} / {base_preset}, model_channels {width}, {mode}")
    for precision in args.precision:
        for batch in args.batch:
            ratio = training_ratio(family, device, width, batch, precision, args.repeats)
            _report(f"training step  batch {batch} {precision}", ratio, 1.05)
        ratio = sampling_ratio(family, device, width, args.batch[-1], precision, args.repeats)
        _report(f"sampling call  batch {args.batch[-1]} {precision}", ratio, 1.03)
    with _precision(device, "fp32"):
        ratio = layer_ratio(family, device, width, args.batch[-1], args.repeats)
    _report(f"one qkv layer  batch {args.batch[-1]} (fwd+bwd)", ratio, None)


def _report(what: str, ratio: float, target: float | None) -> None:
    """One ratio, printed as soon as it is measured (a run stopped early keeps what it measured)."""
    line = f"ratio {what:<36} LoRA / baseline  {ratio:.3f}" + (f"   (target <= {target})" if target else "")
    print(line, flush=True)


if __name__ == "__main__":
    main()
