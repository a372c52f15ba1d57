"""Cost of LoRA conditioning on the nano U-Net, as ratios measured in one run on this machine.

    python benchmarks/lora_overhead.py [--device cpu|cuda] [--compile MODE] [--batch 128] [--repeats 15]

1. training step (forward + backward + AdamW) with_lora (TimeLoRA + ClassLoRA) / baseline;
2. sampling step (one network call, one timestep and one class for the whole batch, marked `shared`, so
   every LoRA layer takes its merged path) with_lora / baseline, and the same call on the batched path;
3. one conditioned layer: batched rank-(r*M) product / naive per-sample W_t = W + sum_i omega_i B_i A_i;
4. on the CPU, eager: 1 and 2 host-bound, the network narrowed until its arithmetic is negligible (4
   channels, 8x8 images, batch 1, one thread), timing the host work an eager GPU step also pays.
With --compile, both networks run under torch.compile(fullgraph=True, mode=MODE) (e.g. default or
reduce-overhead, which adds CUDA graphs): on a GPU the eager nano U-Net is bound by the host issuing
kernels, so the extra LoRA operations cost host time there that compilation fuses away.
Timings are medians over interleaved repeats, so slow drifts of the machine hit both sides alike; on a GPU
each timing waits for the device to finish (the only host synchronisation, outside the timed code).
"""

from __future__ import annotations

import argparse

import torch
from _timing import describe, median_pair

from condlora.conditions import Conditions
from condlora.lora import ConditionedLoRA, conditioned_layers, keep_stacks
from condlora.nets import build_network
from condlora.presets import build_config

DEVICE = torch.device("cpu")
COMPILE = ""


def _median_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    return median_pair(fn_a, fn_b, repeats, DEVICE)


def _train_step(net, opt, x, t, cond):
    def step():
        loss = (net(x, t.float(), cond) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _nets(overrides: dict | None = None):
    torch.manual_seed(0)
    base = build_network(build_config("mnist-nano-baseline", overrides)).to(DEVICE)
    lora = build_network(build_config("mnist-nano", overrides)).to(DEVICE)  # TimeLoRA + ClassLoRA, scale-and-shift
    for _, layer in conditioned_layers(lora):
        torch.nn.init.normal_(layer.lora_up, std=0.01)  # a trained adapter is non-zero
    if COMPILE:
        torch._dynamo.config.cache_size_limit = 64
        return tuple(torch.compile(net, fullgraph=True, mode=COMPILE) for net in (base, lora))
    return base, lora


def _data(batch: int, shared: bool, size: int = 28) -> tuple[torch.Tensor, torch.Tensor, Conditions]:
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, size, size, generator=g)
    if shared:
        t, y = torch.full((batch,), 500), torch.full((batch,), 3)
    else:
        t, y = torch.randint(0, 1000, (batch,), generator=g), torch.randint(0, 10, (batch,), generator=g)
    x, t, y = x.to(DEVICE), t.to(DEVICE), y.to(DEVICE)
    return x, t, Conditions(labels=y, step=t, shared=shared)


def training_ratio(batch: int, repeats: int) -> float:
    base, lora = _nets()
    x, t, cond = _data(batch, shared=False)
    steps = [_train_step(net, torch.optim.AdamW(net.parameters(), lr=1e-4), x, t, cond) for net in (lora, base)]
    with_lora, baseline = _median_pair(*steps, repeats)
    print(f"training step      baseline {baseline * 1e3:8.1f} ms   with_lora {with_lora * 1e3:8.1f} ms")
    return with_lora / baseline


@torch.no_grad()
def sampling_ratios(batch: int, repeats: int) -> tuple[float, float]:
    base, lora = _nets()
    base.eval(), lora.eval()
    x, t, cond = _data(batch, shared=True)
    level = t.float()
    with keep_stacks(lora):  # as a sampler does: the parameters stay fixed over its calls
        merged, baseline = _median_pair(lambda: lora(x, level, cond), lambda: base(x, level, cond), repeats)
    unshared = cond.replace(shared=False)  # the same values, but nobody vouches that they are shared
    batched, baseline2 = _median_pair(lambda: lora(x, level, unshared), lambda: base(x, level, cond), repeats)
    print(f"sampling step      baseline {baseline * 1e3:8.1f} ms   merged LoRA {merged * 1e3:8.1f} ms   "
          f"batched LoRA {batched * 1e3:8.1f} ms")  # fmt: skip
    return merged / baseline, batched / baseline2


def host_ratios(repeats: int) -> tuple[float, float]:
    """The nano U-Net narrowed until its arithmetic is negligible (4 channels, 8x8 images, batch 1, one
    thread), so a call's time is host work: Python, dispatch, allocation. An eager GPU step bound by
    launching kernels pays this host work too, so these ratios are the CPU's view of that regime."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    base, lora = _nets({"model": {"image_size": 8}, "nano": {"channels": 4}})
    x, t, cond = _data(1, shared=False, size=8)
    steps = [_train_step(net, torch.optim.AdamW(net.parameters(), lr=1e-4), x, t, cond) for net in (lora, base)]
    train = _median_pair(*steps, repeats)
    base.eval(), lora.eval()
    x, t, cond = _data(1, shared=True, size=8)
    with torch.no_grad(), keep_stacks(lora):
        merged = _median_pair(lambda: lora(x, t.float(), cond), lambda: base(x, t.float(), cond), repeats)
    torch.set_num_threads(threads)
    for what, (with_lora, baseline) in (("training step", train), ("sampling step", merged)):
        print(f"host-bound {what:<12} baseline {baseline * 1e3:6.2f} ms   with_lora {with_lora * 1e3:6.2f} ms")
    return train[0] / train[1], merged[0] / merged[1]


def _naive(layer: ConditionedLoRA, x: torch.Tensor) -> torch.Tensor:
    omega = layer.omega(layer.conditions, x)
    w0 = layer.base_layer.weight
    outs = []
    for i in range(x.shape[0]):
        w = w0 + layer.delta_weight(omega[i])  # W_t = W + sum_i omega_i B_i A_i, built per sample
        outs.append(torch.nn.functional.linear(x[i], w, layer.base_layer.bias))
    return torch.stack(outs)


@torch.no_grad()
def layer_ratio(batch: int, repeats: int) -> float:
    _, lora = _nets()
    layer = next(layer for name, layer in conditioned_layers(lora) if name.endswith("qkv"))  # eager
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 49, layer.c_in, generator=g).to(DEVICE)  # the 7x7 tokens of the lowest level
    _, _, layer.conditions = _data(batch, shared=False)
    assert torch.allclose(layer(x), _naive(layer, x), atol=1e-4)
    batched, naive = _median_pair(lambda: layer(x), lambda: _naive(layer, x), repeats)
    print(f"one LoRA layer     naive per-sample {naive * 1e3:8.2f} ms   batched {batched * 1e3:8.2f} ms")
    return batched / naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    parser.add_argument("--compile", default="", help="torch.compile mode for both networks (default: eager)")
    args = parser.parse_args()
    global DEVICE, COMPILE
    DEVICE, COMPILE = torch.device(args.device), args.compile
    print(f"{describe(DEVICE)}, batch {args.batch}, {COMPILE or 'eager'}")
    # each ratio printed as soon as it is measured (a run stopped early keeps what it measured)
    train = training_ratio(args.batch, args.repeats)
    print(f"ratio training step  with_lora / baseline        {train:.3f}   (target <= 1.10)", flush=True)
    merged, batched = sampling_ratios(args.batch, args.repeats)
    print(f"ratio sampling step  merged LoRA / baseline      {merged:.3f}   (target <= 1.02)")
    print(f"ratio sampling step  batched LoRA / baseline     {batched:.3f}", flush=True)
    layer = layer_ratio(args.batch, args.repeats)
    print(f"ratio LoRA layer     batched / naive per-sample  {layer:.3f}", flush=True)
    if DEVICE.type == "cpu" and not COMPILE:
        train, merged = host_ratios(20 * args.repeats)
        print(f"ratio host-bound training step  with_lora / baseline  {train:.3f}")
        print(f"ratio host-bound sampling step  merged / baseline     {merged:.3f}")


if __name__ == "__main__":
    main()
