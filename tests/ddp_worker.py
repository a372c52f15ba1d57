"""Run by tests/test_distributed.py under `torchrun --nproc_per_node=2`: a tiny DDP run; each rank then
writes its final weights so the test can check that the ranks stayed in sync."""

import sys
from pathlib import Path

from safetensors.torch import save_file

from condlora.presets import build_config
from condlora.train import train
from condlora.train.distributed import init_distributed, shutdown_distributed

out = Path(sys.argv[1])
cfg = build_config(
    "digits-nano",
    {
        "nano": {"channels": 8, "channel_mult": "1,2", "attn_levels": "1", "num_heads": 2},
        "ddpm": {"num_timesteps": 100},
        "train": {
            "steps": 6,
            "batch_size": 16,
            "checkpoint_every": 3,
            "log_every": 2,
            "progress": False,
            "device": "cpu",
        },
    },
)
dist = init_distributed("cpu")
result = train(cfg, out)
weights = {k: v.contiguous() for k, v in result.net.state_dict().items()}
save_file(weights, str(out.parent / f"rank{dist.rank}-{dist.world_size}.safetensors"))
shutdown_distributed()
