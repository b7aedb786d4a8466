"""The rewrite: insert token selection, gather and scatter nodes around each route's blocks.

For route ``i`` over blocks ``start..end`` of the chain::

    x_in = <hidden state entering block start>
    tread_select_i  = _tread.select_i(x_in)                       # kept indices [B, kept]
    tread_gather_i  = gather_tokens(x_in, tread_select_i)         # [B, kept, D]
    ... blocks start..end run on tread_gather_i ...
    tread_scatter_i = scatter_tokens(x_in, <output of block end>, tread_select_i)
    ... every later use of block end's output now uses tread_scatter_i ...

Each inserted node carries ``node.meta["tread"]`` (route index, role, route, blocks).
Before returning, the pass checks with networkx that no value computed on the kept tokens
escapes the span except through the scatter; if one does, it raises naming the node.
"""

from __future__ import annotations

from typing import Sequence

import networkx as nx
from torch import fx

from tread_fx.runtime import (check_side_input, check_side_output, gather_side, gather_tokens,
                              scatter_tokens)
from tread_fx.spec import Route, kept_count

from .find_blocks import BlockChain
from .token_axes import (RoutePlan, block_nodes, hidden_input, hidden_output, data_flow,
                         plan_routes, side_outputs)

__all__ = ["RouteEscapeError", "insert_routes", "selector_target", "TREAD_META"]

TREAD_META = "tread"


class RouteEscapeError(ValueError):
    """A value computed on the kept tokens is used outside its route."""


def selector_target(index: int) -> str:
    return f"_tread.select_{index}"


def _set_hidden_input(node: fx.Node, key, value: fx.Node) -> None:
    if isinstance(key, int):
        args = list(node.args)
        args[key] = value
        node.args = tuple(args)
    else:
        node.kwargs = {**node.kwargs, key: value}


def _check_no_escape(graph: fx.Graph, gather: fx.Node, scatter: fx.Node, label: str,
                     side_outputs: set[fx.Node]) -> None:
    """No value computed from the kept hidden tokens may be used outside the route.

    The blocks' other outputs (e.g. the text stream of a joint-attention block) are allowed
    to leave: they are not on the routed token axis.
    """
    flow = data_flow(graph, side_outputs)
    inside = (nx.descendants(flow, gather) & nx.ancestors(flow, scatter)) | {gather}
    for node in inside:
        for user in flow.successors(node):
            role = user.meta.get(TREAD_META, {}).get("role")
            if user not in inside and user is not scatter and role != "scatter_escape":
                raise RouteEscapeError(
                    f"{label}: node {node.name!r} is computed on the kept tokens only, but "
                    f"{user.name!r} ({user.op} {getattr(user.target, '__name__', user.target)}) "
                    f"outside the route uses it. Values produced inside a route may only flow "
                    f"to the next block; end the route before the block whose output is "
                    f"reused, or start it after"
                )


def _guard_side_outputs(graph: fx.Graph, side: set[fx.Node], span: set[fx.Node],
                        x_in: fx.Node, select: fx.Node, label: str) -> None:
    """Side outputs used outside the route go through a run-time token-axis check."""
    for node in sorted(side, key=lambda n: list(graph.nodes).index(n)):
        outside = [u for u in node.users if u not in span]
        if not outside:
            continue
        with graph.inserting_after(node):
            guard = graph.create_node("call_function", check_side_output,
                                      (node, x_in, select, label), {},
                                      name=f"{node.name}_checked")
        guard.meta[TREAD_META] = {**select.meta[TREAD_META], "role": "check"}
        for user in outside:
            user.replace_input_with(node, guard)


def _replace_uses(node: fx.Node, new: fx.Node, users) -> None:
    for user in list(users):
        user.replace_input_with(node, new)


def insert_routes(graph: fx.Graph, chain: BlockChain, routes: Sequence[Route],
                  plans: Sequence[RoutePlan] | None = None) -> list[dict]:
    """Rewrite ``graph`` in place; returns the metadata of each inserted route.

    ``plans`` come from :func:`~tread_fx.passes.token_axes.plan_routes` (computed on this
    graph before the rewrite); without them side inputs pass through a run-time check.
    """
    if plans is None:
        plans = plan_routes(graph, chain, routes, None, prefix=0)
    blocks = block_nodes(graph, chain.targets)
    inserted = []
    current: dict[fx.Node, fx.Node] = {}   # a value put back by an earlier route -> its node
    for i, (route, plan) in enumerate(zip(routes, plans)):
        first, last = blocks[route.start], blocks[route.end]
        covered = tuple(chain.targets[route.start:route.end + 1])
        label = f"route {i} ({route}, blocks {covered[0]}..{covered[-1]})"
        meta = {"route_index": i, "route": route, "blocks": covered, "label": label,
                "fixed": plan.fixed, "axes": plan.axes, "shared": plan.shared_indices}
        if plan.tokens is not None:
            fixed = sum(plan.fixed)
            meta.update(tokens=plan.tokens,
                        kept=fixed + kept_count(plan.tokens - fixed, route.selection_ratio,
                                                label))
        axes = () if plan.axes == (0, 1) else (plan.axes,)
        x_in = hidden_input(first, chain.hidden_in[route.start])
        with graph.inserting_before(first):
            # what this graph's analysis decided is an argument of the select node, so
            # graphs traced for other calls (other text lengths) share the selector safely
            select = graph.create_node(
                "call_module", selector_target(i), (x_in,),
                {"fixed": plan.fixed, "shared": plan.shared_indices, "axes": plan.axes},
                name=f"tread_select_{i}")
            gather = graph.create_node("call_function", gather_tokens, (x_in, select, *axes), {},
                                       name=f"tread_gather_{i}")
        order = {n: k for k, n in enumerate(graph.nodes)}
        for k, side in enumerate(plan.side):
            value = current.get(side.node, side.node)
            users = sorted((u for u in value.users if u in plan.inside), key=order.get)
            # before its first use in the route: after the selection and the value itself
            with graph.inserting_before(users[0] if users else first):
                if side.routed:
                    new = graph.create_node(
                        "call_function", gather_side,
                        (value, select, side.axes, side.offset, side.batch_axis,
                         *((side.tail,) if side.tail else ())), {},
                        name=f"tread_side_{i}_{k}")
                    new.meta[TREAD_META] = {**meta, "role": "side", "arg": side.arg,
                                            "axes": side.axes, "offset": side.offset,
                                            "tail": side.tail}
                elif not plan.shapes_known:
                    new = graph.create_node(
                        "call_function", check_side_input,
                        (value, x_in, select, label, side.arg), {},
                        name=f"tread_check_{i}_{k}")
                    new.meta[TREAD_META] = {**meta, "role": "check"}
                else:
                    continue
            _replace_uses(value, new, users)
        _set_hidden_input(first, chain.hidden_in[route.start], gather)
        out = hidden_output(last, chain.hidden_out[route.end])
        with graph.inserting_after(out):
            scatter = graph.create_node("call_function", scatter_tokens,
                                        (x_in, out, select, label, *axes), {},
                                        name=f"tread_scatter_{i}")
        out.replace_all_uses_with(scatter, delete_user_cb=lambda user: user is not scatter)
        current[out] = scatter
        for k, node in enumerate(plan.escapes):
            outside = [u for u in node.users if u not in plan.inside]
            with graph.inserting_after(node):
                back = graph.create_node("call_function", scatter_tokens,
                                         (x_in, node, select, label, *axes), {},
                                         name=f"tread_scatter_{i}_{node.name}")
            back.meta[TREAD_META] = {**meta, "role": "scatter_escape"}
            _replace_uses(node, back, outside)
            current[node] = back
        for node, role in ((select, "select"), (gather, "gather"), (scatter, "scatter")):
            node.meta[TREAD_META] = {**meta, "role": role}
        side = side_outputs(blocks[route.start:route.end + 1], chain)
        _check_no_escape(graph, gather, scatter, label, side)
        if not plan.shapes_known:   # with shapes, check_routes compares them instead
            _guard_side_outputs(graph, side, set(blocks[route.start:route.end + 1]),
                                x_in, select, label)
        inserted.append(meta)
    graph.lint()
    return inserted
