"""tread_fx: TREAD token routing for diffusion transformers, as a torch.fx graph pass.

    routed = tread_fx.route(model, "2:8@0.5")   # train `routed`; `model` is unchanged

See README.md for the semantics and the API.
"""

from .api import is_routed, kept_masks, route, routing, unroute
from .compile import compile_blocks
from .explain import explain
from .module import TreadGraphModule
from .passes.find_blocks import NoBlocksFound
from .passes.insert_routes import RouteEscapeError
from .passes.check_routes import RoutingSafetyError
from .passes.token_axes import TokenAxisError
from .passes.trace import TraceError
from .runtime import TokenSelector
from .spec import Route, RouteSpec, parse_spec
from .verify import VerifyReport, verify

__version__ = "0.1.0"

__all__ = [
    "NoBlocksFound",
    "Route",
    "RouteEscapeError",
    "RouteSpec",
    "RoutingSafetyError",
    "TokenAxisError",
    "TokenSelector",
    "TraceError",
    "TreadGraphModule",
    "VerifyReport",
    "compile_blocks",
    "explain",
    "is_routed",
    "kept_masks",
    "parse_spec",
    "route",
    "routing",
    "unroute",
    "verify",
]
