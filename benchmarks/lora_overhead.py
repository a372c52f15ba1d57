"""Cost of LoRA conditioning on the nano U-Net, as ratios measured in one run on this machine.

    python benchmarks/lora_overhead.py [--batch 128] [--repeats 15]

1. training step (forward + backward + AdamW) with_lora (TimeLoRA + ClassLoRA) / baseline;
2. sampling step (one network call, one timestep and one class for the whole batch, so every LoRA layer
   takes its merged path) with_lora / baseline, and the same call forced onto the batched path;
3. one conditioned layer: batched rank-(r*M) product / naive per-sample W_t = W + sum_i omega_i B_i A_i.
Timings are medians over interleaved repeats, so slow drifts of the machine hit both sides alike.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from condlora.lora import ConditionedLoRA, Conditions, conditioned_layers
from condlora.nets import build_network
from condlora.presets import build_config

LORA = {"conditioning": "with_lora", "time_lora": "compositional", "class_lora": "select"}


def _median_pair(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    for fn in (fn_a, fn_b):  # warm-up
        fn()
    a, b = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, a), (fn_b, b)):
            start = time.perf_counter()
            fn()
            out.append(time.perf_counter() - start)
    return statistics.median(a), statistics.median(b)


def _train_step(net, opt, x, t, y):
    def step():
        loss = (net(x, t, y) - x).square().mean()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step


def _nets():
    torch.manual_seed(0)
    base = build_network(build_config("mnist-nano").model)
    lora = build_network(build_config("mnist-nano", {"model": LORA}).model)
    for _, layer in conditioned_layers(lora):
        torch.nn.init.normal_(layer.lora_up, std=0.01)  # a trained adapter is non-zero
    return base, lora


def training_ratio(batch: int, repeats: int) -> float:
    base, lora = _nets()
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 1, 28, 28, generator=g)
    t = torch.randint(0, 1000, (batch,), generator=g).float()
    y = torch.randint(0, 10, (batch,), generator=g)
    steps = [_train_step(net, torch.optim.AdamW(net.parameters(), lr=1e-4), x, t, y) for net in (lora, base)]
    with_lora, baseline = _median_pair(*steps, repeats)
    print(f"training step      baseline {baseline * 1e3:8.1f} ms   with_lora {with_lora * 1e3:8.1f} ms")
    return with_lora / baseline


@torch.no_grad()
def sampling_ratios(batch: int, repeats: int) -> tuple[float, float]:
    base, lora = _nets()
    base.eval(), lora.eval()
    x = torch.randn(batch, 1, 28, 28)
    t, y = torch.full((batch,), 500.0), torch.full((batch,), 3)
    merged, baseline = _median_pair(lambda: lora(x, t, y), lambda: base(x, t, y), repeats)
    for _, layer in conditioned_layers(lora):
        layer.merge_shared = False
    batched, baseline2 = _median_pair(lambda: lora(x, t, y), lambda: base(x, t, y), repeats)
    print(f"sampling step      baseline {baseline * 1e3:8.1f} ms   merged LoRA {merged * 1e3:8.1f} ms   "
          f"batched LoRA {batched * 1e3:8.1f} ms")  # fmt: skip
    return merged / baseline, batched / baseline2


def _naive(layer: ConditionedLoRA, x: torch.Tensor) -> torch.Tensor:
    omega = layer.omega(layer.conditions)
    w0 = layer.base_layer.weight
    outs = []
    for i in range(x.shape[0]):
        w = w0 + layer.delta_weight(omega[i])  # W_t = W + sum_i omega_i B_i A_i, built per sample
        outs.append(torch.nn.functional.linear(x[i], w, layer.base_layer.bias))
    return torch.stack(outs)


@torch.no_grad()
def layer_ratio(batch: int, repeats: int) -> float:
    _, lora = _nets()
    layer = next(layer for name, layer in conditioned_layers(lora) if name.endswith("qkv"))
    g = torch.Generator().manual_seed(0)
    x = torch.randn(batch, 49, layer.c_in, generator=g)  # the 7x7 tokens of the lowest level
    layer.conditions = Conditions(
        timestep=torch.randint(0, 1000, (batch,), generator=g), labels=torch.randint(0, 10, (batch,), generator=g)
    )
    assert torch.allclose(layer(x), _naive(layer, x), atol=1e-4)
    batched, naive = _median_pair(lambda: layer(x), lambda: _naive(layer, x), repeats)
    print(f"one LoRA layer     naive per-sample {naive * 1e3:8.2f} ms   batched {batched * 1e3:8.2f} ms")
    return batched / naive


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--repeats", type=int, default=15)
    args = parser.parse_args()
    torch.set_num_threads(torch.get_num_threads())
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, batch {args.batch}")
    train = training_ratio(args.batch, args.repeats)
    merged, batched = sampling_ratios(args.batch, args.repeats)
    layer = layer_ratio(args.batch, args.repeats)
    print(f"ratio training step  with_lora / baseline        {train:.3f}   (target <= 1.15)")
    print(f"ratio sampling step  merged LoRA / baseline      {merged:.3f}   (target <= 1.05)")
    print(f"ratio sampling step  batched LoRA / baseline     {batched:.3f}")
    print(f"ratio LoRA layer     batched / naive per-sample  {layer:.3f}")


if __name__ == "__main__":
    main()
