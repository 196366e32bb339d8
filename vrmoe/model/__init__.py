from .moe import MoELayer, MoEOutput
from .routers import Router, Routing, build_router
from .transformer import MoETransformer, ModelOutput

__all__ = ["MoELayer", "MoEOutput", "Router", "Routing", "build_router", "MoETransformer", "ModelOutput"]
