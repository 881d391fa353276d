"""Training: one loop (loop.py), pluggable objectives, schedules, checkpoints, monitor, plots."""
from velocis.train.config import TrainConfig
from velocis.train.loop import Trainer, TrainingDiverged, TrainResult, train
from velocis.train.objectives import NextTokenObjective, Objective

__all__ = ["TrainConfig", "Trainer", "TrainResult", "TrainingDiverged", "train", "NextTokenObjective", "Objective"]
