"""Routers: the contract and the registry (``base``), and one module per router.

Every module in this package is imported here, so a router is one new file (its
class registered with :func:`register_router`) plus, optionally, its YAML in
``conf/router/``; a router defined elsewhere registers itself the same way when
its module is imported.
"""

import importlib
import pkgutil

from .base import ROUTERS, Router, Routing, build_router, register_router, renormalised_topk, router_class, router_config

for _module in pkgutil.iter_modules(__path__):
    importlib.import_module(f"{__name__}.{_module.name}")

__all__ = ["ROUTERS", "Router", "Routing", "build_router", "register_router", "renormalised_topk", "router_class",
           "router_config"]
