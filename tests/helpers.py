"""Fault injection shared by the tests: a run that dies mid-training, a loss that turns bad."""

from pathlib import Path

import pytest

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
