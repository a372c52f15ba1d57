"""Shared by the tests: fault injection (a run that dies mid-training, a loss that turns bad), a network call
with the step in its conditions, tiny random diffusers UNets."""

from pathlib import Path

import pytest
import torch

from condlora.diffusion import DDPM
from condlora.train import EMA, train


def train_until_killed(cfg, out_dir: Path, monkeypatch, during_step: int = 10) -> None:
    """Run `train` and kill it (KeyboardInterrupt) during `during_step`, after its forward and backward."""
    original = EMA.update

    def killed(self, net, num_updates):
        if num_updates == during_step - 1:
            raise KeyboardInterrupt
        original(self, net, num_updates)

    monkeypatch.setattr(EMA, "update", killed)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, out_dir)
    monkeypatch.setattr(EMA, "update", original)


def poison_loss(monkeypatch, at_call: int, poison) -> None:
    """Replace the loss of the `at_call`-th training step (1-based) by `poison(loss)`."""
    original = DDPM.loss
    calls = {"n": 0}

    def poisoned(self, *args, **kwargs):
        calls["n"] += 1
        loss = original(self, *args, **kwargs)["loss"]
        return {"loss": poison(loss) if calls["n"] == at_call else loss}

    monkeypatch.setattr(DDPM, "loss", poisoned)


def predict(net, x, t, cond):
    """net(x, t, cond) as a DDPM process calls it: the step also in the conditions."""
    return net(x, t.float(), cond.replace(step=t))


def tiny_unet(kind: str):
    """A tiny random diffusers UNet2DModel, UNet2DConditionModel or Transformer2DModel (8x8, one channel),
    built offline."""
    diffusers = pytest.importorskip("diffusers")
    torch.manual_seed(0)
    common = {"sample_size": 8, "in_channels": 1, "out_channels": 1, "layers_per_block": 1,
              "block_out_channels": (16, 32), "norm_num_groups": 8}  # fmt: skip
    if kind == "Transformer2DModel":  # DiT-style: patches, adaLN-zero with 3 classes + the null class
        return diffusers.Transformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=1, out_channels=1,
                                            num_layers=1, sample_size=8, patch_size=2, norm_type="ada_norm_zero",
                                            num_embeds_ada_norm=4)  # fmt: skip
    if kind == "UNet2DModel":
        return diffusers.UNet2DModel(**common, attention_head_dim=8, up_block_types=("AttnUpBlock2D", "UpBlock2D"),
                                     down_block_types=("DownBlock2D", "AttnDownBlock2D"))  # fmt: skip
    return diffusers.UNet2DConditionModel(
        **common, cross_attention_dim=12, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip


def tiny_sd_pipeline(tmp_path: Path):
    """A tiny random Stable Diffusion pipeline (8x8 latents, a 1-layer CLIP text encoder, a character-level
    tokenizer written to `tmp_path`), built offline."""
    import json

    diffusers = pytest.importorskip("diffusers")
    transformers = pytest.importorskip("transformers")
    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz":
        vocab[c], vocab[c + "</w>"] = len(vocab), len(vocab) + 1
    (tmp_path / "vocab.json").write_text(json.dumps(vocab))
    (tmp_path / "merges.txt").write_text("#version: 0.2\n")
    files = str(tmp_path / "vocab.json"), str(tmp_path / "merges.txt")
    tokenizer = transformers.CLIPTokenizer(*files, model_max_length=8)
    torch.manual_seed(0)
    text = transformers.CLIPTextConfig(vocab_size=len(vocab), hidden_size=12, intermediate_size=16, num_hidden_layers=1,
                                       num_attention_heads=2, max_position_embeddings=8, bos_token_id=0, eos_token_id=1,
                                       pad_token_id=1)  # fmt: skip
    unet = diffusers.UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, cross_attention_dim=12, attention_head_dim=8,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"), up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"),
    )  # fmt: skip
    vae = diffusers.AutoencoderKL(in_channels=3, out_channels=3, latent_channels=4, block_out_channels=(8,),
                                  norm_num_groups=8, down_block_types=("DownEncoderBlock2D",),
                                  up_block_types=("UpDecoderBlock2D",), sample_size=8)  # fmt: skip
    scheduler = diffusers.DDIMScheduler(clip_sample=False, steps_offset=1)
    parts = {"vae": vae, "text_encoder": transformers.CLIPTextModel(text), "tokenizer": tokenizer, "unet": unet}
    return diffusers.StableDiffusionPipeline(**parts, scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                             requires_safety_checker=False)  # fmt: skip
