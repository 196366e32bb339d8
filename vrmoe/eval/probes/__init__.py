"""The probes of ``vrmoe eval``: every module in this package is imported and registers its probe."""

import importlib
import pkgutil

from .base import PROBES, Probe, ordered_probes, register_probe

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["PROBES", "Probe", "ordered_probes", "register_probe"]
