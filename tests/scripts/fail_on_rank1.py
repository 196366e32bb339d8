"""`vrmoe train` whose rank 1 raises at the training step FAIL_AT_STEP (0-based; for the fault tests under torchrun)."""

import os
import sys

from vrmoe.cli import main
from vrmoe.train import step as step_module

original = step_module.TrainStep.__call__


def failing(self, step, forward):
    if os.environ.get("RANK") == "1" and step == int(os.environ.get("FAIL_AT_STEP", "1")):
        raise RuntimeError("rank 1 fails on purpose")
    return original(self, step, forward)


step_module.TrainStep.__call__ = failing
main(sys.argv[1:])
