"""The inverse rewrite: take every inserted TREAD node out of a graph."""

from __future__ import annotations

from torch import fx

from .insert_routes import TREAD_META

__all__ = ["remove_routes"]


def remove_routes(graph: fx.Graph) -> int:
    """Reconnect the graph as it was before :func:`insert_routes`; returns routes removed."""
    nodes = [n for n in graph.nodes if TREAD_META in n.meta]
    for role in ("check", "side", "scatter_escape", "scatter", "gather", "select"):
        for node in nodes:
            if node.meta[TREAD_META]["role"] != role:
                continue
            if role in ("check", "side"):
                node.replace_all_uses_with(node.args[0])   # the side value itself
            elif role == "scatter_escape":
                node.replace_all_uses_with(node.args[1])   # the value computed in the route
            elif role == "scatter":
                node.replace_all_uses_with(node.args[1])   # the last block's own output
            elif role == "gather":
                node.replace_all_uses_with(node.args[0])   # the tensor that entered the route
            graph.erase_node(node)
    graph.lint()
    return sum(1 for n in nodes if n.meta[TREAD_META]["role"] == "select")
