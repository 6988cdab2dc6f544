"""The training loop and its checkpoints."""

from .loop import TrainResult, run_training

__all__ = ["TrainResult", "run_training"]
