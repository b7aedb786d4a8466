"""Print and draw what the rewrite did to a model."""

from __future__ import annotations

from torch import fx

from tread_fx.module import TreadGraphModule
from tread_fx.passes.insert_routes import TREAD_META

__all__ = ["summary", "route_nodes", "to_dot"]


def route_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The TREAD nodes of a graph, in graph order."""
    return [n for n in graph.nodes if TREAD_META in n.meta]


def summary(routed: TreadGraphModule) -> str:
    """A table of the routes of ``routed``: blocks, ratio, token counts, inserted nodes."""
    chain = getattr(routed, "block_chain", ())
    lines = [f"{type(routed).__name__}: {len(chain)} blocks "
             f"({chain[0]}..{chain[-1]})" if chain else f"{type(routed).__name__}"]
    header = f"{'route':>5}  {'blocks':<30} {'ratio':>5}  {'tokens':>6}  {'kept':>5}  nodes"
    lines.append(header)
    by_route: dict[int, list[fx.Node]] = {}
    for node in route_nodes(routed.graph):
        by_route.setdefault(node.meta[TREAD_META]["route_index"], []).append(node)
    for selector in routed.selectors:
        nodes = by_route.get(selector.index, [])
        meta = nodes[0].meta[TREAD_META] if nodes else {}
        span = f"{selector.route.start}..{selector.route.end} " \
               f"({selector.blocks[0]}..{selector.blocks[-1]})"
        lines.append(f"{selector.index:>5}  {span:<30} {selector.selection_ratio:>5g}  "
                     f"{meta.get('tokens', '?'):>6}  {meta.get('kept', '?'):>5}  "
                     f"{', '.join(n.name for n in nodes)}")
    if not routed.selectors:
        lines.append("  (no routes: dense)")
    return "\n".join(lines)


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.name}\\n{node.target}"
    if node.op == "call_function":
        return f"{node.name}\\n{getattr(node.target, '__name__', node.target)}"
    return node.name


def to_dot(graph: fx.Graph, name: str = "routed") -> str:
    """Graphviz DOT text of ``graph``; TREAD nodes are filled, blocks are boxes.

    Render with ``dot -Tsvg routed.dot -o routed.svg`` (Graphviz is not a dependency).
    """
    lines = [f'digraph "{name}" {{', "  rankdir=TB; node [fontsize=10];"]
    for node in graph.nodes:
        attrs = {"label": _label(node), "shape": "ellipse"}
        if TREAD_META in node.meta:
            attrs.update(style="filled", fillcolor="orange", shape="box")
        elif node.op == "call_module":
            attrs["shape"] = "box"
        elif node.op in ("placeholder", "output"):
            attrs["shape"] = "plaintext"
        rendered = ", ".join(f'{k}="{v}"' for k, v in attrs.items())
        lines.append(f'  "{node.name}" [{rendered}];')
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"
