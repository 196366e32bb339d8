"""Training tasks behind one contract (``base``); every module here is imported and registers its task."""

import importlib
import pkgutil

from .base import TASKS, Task, build_task, register_task

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["TASKS", "Task", "build_task", "register_task"]
