"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: a tiny DDP run of one family (argv[2]:
"ddpm", "iddpm" or "edm"); each rank then writes its final weights so the test can check that the ranks
stayed in sync."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from condlora.presets import build_config
from condlora.train import train
from condlora.train.distributed import init_distributed, shutdown_distributed

TRAIN = {"steps": 6, "batch_size": 16, "checkpoint_every": 3, "log_every": 2, "progress": False, "device": "cpu"}
RUNS = {
    "ddpm": (
        "digits-nano",
        {
            "nano": {"channels": 8, "channel_mult": "1,2", "attn_levels": "1", "num_heads": 2},
            "ddpm": {"num_timesteps": 100},
        },
    ),
    "iddpm": (  # IDDPM's U-Net with TimeLoRA + ClassLoRA, learned variance, importance-sampled steps
        "mnist-iddpm",
        {
            "ddpm": {"num_timesteps": 50, "timestep_sampler": "loss-second-moment"},
            "lora": {"time_bases": 5},
            "sample": {"steps": 10},
        },
    ),
    "edm": (  # DDPM++ with UC-LoRA, augmentation labels in the embedding, bf16 autocast
        "mnist-edm",
        {
            "ddpmpp": {"model_channels": 8},
            "edm": {"augment": 0.5},
            "train": {"precision": "bf16"},
        },
    ),
}

out, family = Path(sys.argv[1]), sys.argv[2]
preset, overrides = RUNS[family]
overrides["train"] = {**TRAIN, **overrides.get("train", {})}
cfg = build_config(preset, overrides)
dist = init_distributed("cpu")
result = train(cfg, out)
weights = {k: v.contiguous() for k, v in result.net.state_dict().items()}
if hasattr(result.process, "state_dict"):  # IDDPM's importance sampler: every rank keeps the same histories
    weights.update({f"process.{k}": v.contiguous() for k, v in result.process.state_dict().items()})
save_file(weights, str(out.parent / f"rank{dist.rank}-{dist.world_size}.safetensors"))
shutdown_distributed()
