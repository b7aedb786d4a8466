"""Safety check: run the routed graph once on the example inputs, in train mode.

A block that cannot run on a token subset (it reshapes its tokens into the image grid,
say) fails here, at ``route()`` time, with an error naming the block, instead of at the
first training step or, worse, never.
"""

from __future__ import annotations

from typing import Any, Collection, Mapping, Sequence

from torch import fx, nn

from .insert_routes import TREAD_META
from .token_axes import TokenAxisError, probed
from .trace import frozen_state

__all__ = ["RoutingSafetyError", "check_routes"]


class RoutingSafetyError(RuntimeError):
    """A routed block failed on the kept tokens of the example inputs."""


def _route_of(graph: fx.Graph) -> dict[str, str]:
    """Block target -> label of the route that covers it."""
    covered = {}
    for node in graph.nodes:
        meta = node.meta.get(TREAD_META)
        if meta and meta["role"] == "select":
            for block in meta["blocks"]:
                covered[block] = meta["label"]
    return covered


def check_routes(routed: nn.Module, args: Sequence[Any],
                 dense_shapes: Mapping[fx.Node, Any] | None = None,
                 inside: Collection[fx.Node] = (), graph: fx.Graph | None = None) -> None:
    """Run ``routed``'s train graph on ``args`` with routing on; raise naming the block.

    With the shapes of the dense graph's nodes (``dense_shapes``, probed before the
    rewrite), every node outside the routes (``inside``) must have its dense shape: one
    that changed carries kept tokens out of a route (a block's second output, say).
    """
    graph = routed.graph if graph is None else graph
    covered = _route_of(graph)
    dense_shapes = dense_shapes or {}

    class _Check(fx.Interpreter):
        def run_node(self, n):
            try:
                result = super().run_node(n)
                if n in dense_shapes and n not in inside and \
                        probed(result) != dense_shapes[n]:
                    source = [a for a in n.all_input_nodes if a in inside]
                    raise TokenAxisError(
                        f"{n.name!r} has shape {probed(result)} when the model is routed "
                        f"but {dense_shapes[n]} dense: it is computed outside the routes "
                        f"from a value that carries only the kept tokens"
                        f"{f' ({source[0].name!r})' if source else ''}. A block output other "
                        f"than the hidden state cannot leave a route on the token axis; end "
                        f"the route before that block, or use only its hidden-state output")
                return result
            except Exception as err:  # noqa: BLE001 - re-raised with the block's name
                if n.op == "call_module" and n.target in covered:
                    raise RoutingSafetyError(
                        f"{covered[n.target]}: block {n.target!r} "
                        f"({type(routed.get_submodule(n.target)).__name__}) cannot run on "
                        f"the kept tokens of the example inputs: {type(err).__name__}: {err}. "
                        f"A block that needs all tokens (e.g. one that reshapes them into the "
                        f"height x width grid) cannot be inside a route; end the route before "
                        f"it or start it after") from err
                raise

    selectors = list(routed._tread.children())
    generators = [(s, {d: g.get_state() for d, g in s._generators.items()}) for s in selectors]
    with frozen_state(routed):
        routed.train()
        try:
            _Check(routed, graph=graph).run(*args)
        finally:
            for s, states in generators:   # a seeded selection goes on where it was
                s.last_indices = None
                for device in list(s._generators):
                    if device in states:
                        s._generators[device].set_state(states[device])
                    else:
                        del s._generators[device]
