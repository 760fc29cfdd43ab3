"""Training: the loop, checkpoints, evaluation and progress display."""

from tropd.train.loop import train

__all__ = ["train"]
