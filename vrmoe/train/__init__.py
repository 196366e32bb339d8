"""Training: the loop (``loop``), one optimisation step (``step``) and the interval meter (``meter``)."""

from .loop import TrainingRun, run_name_from, train
from .step import TrainStep, lr_at, make_optimizer

__all__ = ["train", "TrainingRun", "run_name_from", "TrainStep", "lr_at", "make_optimizer"]
