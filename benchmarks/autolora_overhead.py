"""Cost of AutoLoRA guidance against classifier-free guidance of one LoRA model, measured in one run.

    python benchmarks/autolora_overhead.py [--device cpu|cuda] [--preset mnist-nano-baseline] [--batch 64]

The network is the preset's with plain LoRA adapters on its attention (a fine-tuned LoRA model, adapters
non-zero). One guided denoiser call at a step shared by the batch:
1. time: AutoLoRA with CFG on both models (four branches: base and LoRA, conditional and null; one batched
   network call) / CFG on the LoRA model (two branches; one call). Four branches are twice the samples of
   two, so 2.0 is the floor wherever a network call's cost grows linearly with its batch; where it grows
   faster (a CPU whose caches a larger batch overflows), the second ratio separates that from AutoLoRA's
   own cost: AutoLoRA / CFG at twice the batch, the same number of samples per call;
2. the same with `branches_per_call=2`: AutoLoRA's four branches in two calls, each the size of CFG's;
3. memory, on a GPU: the peak memory allocated by one guided call (the weights, resident once for both,
   since the base model is the same module at LoRA scale 0, plus the call's activations), AutoLoRA / CFG,
   in one call (four branches hold twice CFG's activations) and in two. A CPU run prints only the weights'
   size.
Timings are medians over interleaved repeats; on a GPU each timing waits for the device to finish.
"""

from __future__ import annotations

import argparse
import functools

import torch
from _timing import describe, median_pair

from condlora.conditions import Conditions
from condlora.diffusion import autolora, classifier_free, guided, process_for
from condlora.lora import conditioned_layers
from condlora.nets import build_network
from condlora.presets import build_config


def _resident_bytes(net: torch.nn.Module) -> int:
    """Bytes of the network's parameters and buffers."""
    return sum(t.numel() * t.element_size() for t in [*net.parameters(), *net.buffers()])


def _peak(fn, device: torch.device) -> int:
    torch.cuda.synchronize(device)
    torch.cuda.reset_peak_memory_stats(device)
    fn()
    torch.cuda.synchronize(device)
    return torch.cuda.max_memory_allocated(device)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--preset", default="mnist-nano-baseline")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    args = parser.parse_args()
    device = torch.device(args.device)
    cfg = build_config(args.preset, {"lora": {"plain": True}})
    torch.manual_seed(0)
    net = build_network(cfg).to(device).eval()
    for _, layer in conditioned_layers(net):
        torch.nn.init.normal_(layer.lora_up, std=0.01)  # a trained adapter is non-zero
    m, process = cfg.model, process_for(cfg)
    predict = functools.partial(process.predict, net)

    def run(batch: int, guidance, per_call: int = 0):
        x = torch.randn(batch, m.in_channels, m.image_size, m.image_size, device=device)
        t = torch.full((batch,), 1.0 if cfg.diffusion.family == "edm" else 500, device=device)
        cond = Conditions(labels=torch.full((batch,), 3, device=device), shared=True)
        call = guided(predict, guidance(cond), per_call)

        def go():
            with torch.no_grad():
                call(x, t)

        return go

    def cfg_call(batch):
        return run(batch, lambda cond: classifier_free(cond, 3.0))

    def auto(cond):
        return autolora(cond, 1.5, 0.8, 3.0, 3.0)

    auto_call, auto_split = run(args.batch, auto), run(args.batch, auto, per_call=2)
    print(f"{describe(device)}, {args.preset} + plain LoRA, batch {args.batch}")
    auto_s, cfg_s = median_pair(auto_call, cfg_call(args.batch), args.repeats, device)
    print(f"ratio time    AutoLoRA with CFG / CFG on one model     {auto_s / cfg_s:.3f}   (target <= 2.05)")
    auto_s, cfg_s = median_pair(auto_call, cfg_call(2 * args.batch), args.repeats, device)
    print(f"ratio time    the same, CFG at batch {2 * args.batch} (equal samples)   {auto_s / cfg_s:.3f}")
    split_s, cfg_s = median_pair(auto_split, cfg_call(args.batch), args.repeats, device)
    print(f"ratio time    AutoLoRA in two calls (branches_per_call 2) / CFG   {split_s / cfg_s:.3f}")
    print(f"weights (one network for both): {_resident_bytes(net) / 2**20:.2f} MiB")
    if device.type == "cuda":
        cfg_peak = _peak(cfg_call(args.batch), device)
        print(f"ratio peak memory AutoLoRA with CFG / CFG on one model {_peak(auto_call, device) / cfg_peak:.3f}")
        split = _peak(auto_split, device) / cfg_peak
        print(f"ratio peak memory the same in two calls (branches_per_call 2) / CFG {split:.3f}   (target <= 1.05)")


if __name__ == "__main__":
    main()
