"""Training: the loop, EMA, checkpoints and distributed set-up."""

from condlora.train.checkpoint import CheckpointError, load_checkpoint, load_latest, resolve_checkpoint
from condlora.train.ema import EMA
from condlora.train.loop import StepBatchSampler, TrainingDiverged, TrainResult, lr_at, train, train_step
from condlora.train.rundir import RunDirectoryError

__all__ = [
    "EMA",
    "CheckpointError",
    "RunDirectoryError",
    "StepBatchSampler",
    "TrainResult",
    "TrainingDiverged",
    "load_checkpoint",
    "load_latest",
    "lr_at",
    "resolve_checkpoint",
    "train",
    "train_step",
]
