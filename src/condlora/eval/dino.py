"""DINOv2 image features from a local model folder, for the AutoLoRA paper's diversity metric.

The AutoLoRA paper measures diversity as 1 - mean pairwise cosine similarity of DINOv2 features. Its
weights are not downloaded here: `DinoFeatures` loads a local Hugging Face folder (`config.json` and the
weights, e.g. a copy of facebook/dinov2-base) through transformers' `Dinov2Model`, with no network access.
Without one, condlora's in-domain digit features stand in (`condlora.eval.fid.DigitFeatures`).
"""

from __future__ import annotations

from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


class DinoFeatures(nn.Module):
    """(B, C, H, W) images in [-1, 1] (grey or RGB) -> (B, D) DINOv2 CLS features (the pooled output).

    Images are resized to the model's `image_size` (bicubic), grey ones repeated to RGB, and normalised
    with ImageNet's mean and std, as DINOv2's image processor does."""

    batch_size = 64

    def __init__(self, folder: str | Path):
        super().__init__()
        folder = Path(folder)
        if not (folder / "config.json").is_file():
            raise FileNotFoundError(f"DINOv2: {folder} is not a model folder (no config.json)")
        from transformers import Dinov2Model

        self.model = Dinov2Model.from_pretrained(folder, local_files_only=True).eval()
        self.size = self.model.config.image_size
        self.num_features = self.model.config.hidden_size
        self.register_buffer("mean", torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1), persistent=False)
        self.register_buffer("std", torch.tensor(IMAGENET_STD).view(1, 3, 1, 1), persistent=False)

    @torch.no_grad()
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[1] == 1:
            x = x.repeat(1, 3, 1, 1)
        x = F.interpolate((x + 1) / 2, size=(self.size, self.size), mode="bicubic", align_corners=False)
        x = (x.clamp(0, 1) - self.mean) / self.std
        return self.model(pixel_values=x).pooler_output
