"""Cost of UC-LoRA on EDM's DDPM++ network, as ratios measured in one run on this machine.

    python benchmarks/edm_overhead.py [--device cpu|cuda] [--batch 64 128] [--precision fp32 bf16]
                                      [--model-channels 128] [--repeats 10]

1. training step (EDM loss + backward + Adam), UC-LoRA (m 18, r 4, per-basis bias; preset
   edm-cifar10-uncond-uc-lora) / baseline (edm-cifar10-uncond), per batch size and precision (fp32 uses TF32
   matmuls on a GPU, as the published figures; bf16 is autocast);
2. sampling forward (the preconditioned denoiser at one shared sigma, unconditional: every LoRA layer takes
   its merged path) UC-LoRA / baseline;
3. one qkv layer forward + backward with UC-LoRA / the bare 1x1 convolution.
`--model-channels` narrows both networks (e.g. 32 on a laptop CPU, where the CIFAR-10 width takes seconds
per step); the report names it.
"""

from __future__ import annotations

import argparse

import torch
from _timing import describe, median_pair

from condlora.conditions import Conditions
from condlora.diffusion import process_for
from condlora.lora import conditioned_layers
from condlora.nets import build_network
from condlora.presets import build_config


def _pair(device: torch.device, width: int):
    torch.manual_seed(0)
    overrides = {"ddpmpp": {"model_channels": width}, "edm": {"augment": 0.0}}
    cfg = build_config("edm-cifar10-uncond", overrides)
    base = build_network(cfg).to(device)
    lora = build_network(build_config("edm-cifar10-uncond-uc-lora", overrides)).to(device)
    for _, layer in conditioned_layers(lora):
        torch.nn.init.normal_(layer.lora_up, std=0.01)  # a trained adapter is non-zero
    return cfg, base, lora


def _train_step(net, process, x, precision: str):
    opt = torch.optim.Adam(net.parameters(), lr=1e-4)
    g = torch.Generator(x.device).manual_seed(0)

    def step():
        with torch.autocast(x.device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
            loss = process.loss(net, x, Conditions(), g)["loss"].mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def training_ratio(device, width, batch, precision, repeats) -> float:
    cfg, base, lora = _pair(device, width)
    process = process_for(cfg)
    x = torch.randn(batch, 3, 32, 32, device=device)
    t_lora, t_base = median_pair(*(_train_step(n, process, x, precision) for n in (lora, base)), repeats, device)
    print(
        f"training step  batch {batch:4d} {precision}  baseline {t_base * 1e3:8.1f} ms   UC-LoRA {t_lora * 1e3:8.1f} ms"
    )
    return t_lora / t_base


@torch.no_grad()
def sampling_ratio(device, width, batch, precision, repeats) -> float:
    cfg, base, lora = _pair(device, width)
    base.eval(), lora.eval()
    process = process_for(cfg)
    x = torch.randn(batch, 3, 32, 32, device=device)
    sigma = torch.full((batch,), 2.5, device=device)
    cond = Conditions(shared=True)  # one sigma, no class: the sampler vouches that the batch shares it

    def call(net):
        def run():
            with torch.autocast(device.type, dtype=torch.bfloat16, enabled=precision == "bf16"):
                return process.predict(net, x, sigma, cond)

        return run

    t_lora, t_base = median_pair(call(lora), call(base), repeats, device)
    print(
        f"sampling call  batch {batch:4d} {precision}  baseline {t_base * 1e3:8.1f} ms   UC-LoRA {t_lora * 1e3:8.1f} ms"
    )
    return t_lora / t_base


def layer_ratio(device, width, batch, repeats) -> float:
    _, _, lora = _pair(device, width)
    name, layer = next((n, m) for n, m in conditioned_layers(lora) if n.endswith("qkv"))
    x = torch.randn(batch, layer.c_in, 16, 16, device=device, requires_grad=True)
    emb = torch.randn(batch, layer.strategies["uc"].mlp[0].in_features, device=device)
    layer.conditions = Conditions(embedding=emb)

    def with_lora():
        layer(x).square().mean().backward()

    def bare():
        layer.base_layer(x).square().mean().backward()

    t_lora, t_bare = median_pair(with_lora, bare, repeats, device)
    print(
        f"one qkv layer  batch {batch:4d}  bare conv {t_bare * 1e3:8.2f} ms   UC-LoRA {t_lora * 1e3:8.2f} ms ({name})"
    )
    return t_lora / t_bare


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--batch", type=int, nargs="+", default=[64, 128])
    parser.add_argument("--precision", nargs="+", default=["fp32", "bf16"], choices=["fp32", "bf16"])
    parser.add_argument("--model-channels", type=int, default=128, help="width (128 is the CIFAR-10 network)")
    parser.add_argument("--repeats", type=int, default=10)
    args = parser.parse_args()
    device = torch.device(args.device)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = True
    print(f"{describe(device)}, DDPM++ model_channels {args.model_channels}")
    rows = []
    for precision in args.precision:
        for batch in args.batch:
            rows.append(
                (
                    f"training step  batch {batch} {precision}",
                    training_ratio(device, args.model_channels, batch, precision, args.repeats),
                    1.05,
                )
            )
        rows.append(
            (
                f"sampling call  batch {args.batch[-1]} {precision}",
                sampling_ratio(device, args.model_channels, args.batch[-1], precision, args.repeats),
                1.03,
            )
        )
    rows.append(
        (
            f"one qkv layer  batch {args.batch[-1]} (fwd+bwd)",
            layer_ratio(device, args.model_channels, args.batch[-1], args.repeats),
            None,
        )
    )
    for what, ratio, target in rows:
        print(f"ratio {what:<36} UC-LoRA / baseline  {ratio:.3f}" + (f"   (target <= {target})" if target else ""))


if __name__ == "__main__":
    main()
