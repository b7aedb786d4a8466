"""Token-axis analysis: which values flowing into a route's blocks carry the token axis.

With the example inputs' shapes (a shape probe of the traced graph), every value that
enters the blocks of a route from outside is classified:

* the hidden-state stream (routed by the gather/scatter pair);
* per-token side inputs, gathered with the route's indices on their token axes: RoPE
  tables ``[N, d]`` / ``[B, N, d]`` (or tuples of them), per-token masks and timesteps
  ``[B, N]``, attention masks ``[B, N, N]`` / ``[B, 1, N, N]``, long skips ``[B, N, D]``
  from before the route, and joint tables ``[T + N, d]`` whose image rows follow another
  stream's ``T`` rows;
* everything else (per-sample conditioning, other token streams) passes untouched.

Values computed inside a route and used after it (long skips out of the route) are put
back like the hidden state when they have its shape; otherwise there is no correct answer
and the analysis raises, naming the node.  Ambiguous shapes (the token count equal to the
batch size or to the hidden width of a per-sample vector) raise with the annotation to add.

Without shapes nothing can be classified: side inputs then pass untouched and a run-time
check refuses any that turns out to have a dimension of the token count.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

import networkx as nx
import torch
from torch import fx

from tread_fx.spec import Route

from .find_blocks import BlockChain
from .trace import shape_tree

__all__ = ["RoutePlan", "SideInput", "TokenAxisError", "detect_prefix", "plan_routes",
           "probe_shapes", "side_outputs"]


class TokenAxisError(ValueError):
    """A value entering or leaving a route cannot be classified or put back correctly."""


@dataclass
class SideInput:
    """A value from outside a route that its blocks receive, and how to gather it."""

    node: fx.Node
    arg: str                 # "<block target>:<argument>" for messages
    axes: tuple[int, ...]    # token axes; empty = passes untouched
    offset: int = 0          # rows of another stream before the image tokens
    batched: bool = True     # dim 0 is the batch

    @property
    def routed(self) -> bool:
        return bool(self.axes)


@dataclass
class RoutePlan:
    inside: set[fx.Node]
    side: list[SideInput] = field(default_factory=list)
    escapes: list[fx.Node] = field(default_factory=list)   # scattered back after the route
    shared_indices: bool = False   # a batch-less table needs one index set for the batch
    prefix: int = 0                # leading tokens that are never routed
    shapes_known: bool = False
    tokens: int | None = None      # token count of the hidden state, when shapes are known


# -- shapes -----------------------------------------------------------------------------

def probe_shapes(module: torch.nn.Module, graph: fx.Graph, args: Sequence[Any],
                 constants: Mapping[str, torch.Tensor]) -> dict[fx.Node, Any]:
    """Shapes of every node of ``graph`` when ``module``'s modules run it on ``args``.

    The caller is responsible for freezing the model's state (modes, buffers, RNG).
    """
    shapes: dict[fx.Node, Any] = {}

    class _Probe(fx.Interpreter):
        def get_attr(self, target, args, kwargs):
            if target.startswith("_tread.") and target[7:] in constants:
                return constants[target[7:]]
            return super().get_attr(target, args, kwargs)

        def run_node(self, n):
            result = super().run_node(n)
            shapes[n] = shape_tree(result)
            return result

    with torch.no_grad():
        _Probe(module, graph=graph).run(*args)
    return shapes


# -- the span of a route ----------------------------------------------------------------

def data_flow(graph: fx.Graph, cut: set[fx.Node] = frozenset()) -> nx.DiGraph:
    """The graph's data flow as a networkx DiGraph, without the edges into ``cut``."""
    g = nx.DiGraph()
    for n in graph.nodes:
        g.add_node(n)
        if n in cut:
            continue
        for inp in n.all_input_nodes:
            g.add_edge(inp, n)
    return g


def hidden_input(node: fx.Node, key) -> fx.Node:
    return node.args[key] if isinstance(key, int) else node.kwargs[key]


def hidden_output(node: fx.Node, out_index: int | None) -> fx.Node:
    if out_index is None:
        return node
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem \
                and user.args[1] == out_index:
            return user
    raise ValueError(f"block {node.target!r}: its output element {out_index} is never used")


def block_nodes(graph: fx.Graph, targets: Sequence[str]) -> list[fx.Node]:
    by_target: dict[str, list[fx.Node]] = {}
    for n in graph.nodes:
        if n.op == "call_module":
            by_target.setdefault(n.target, []).append(n)
    nodes = []
    for t in targets:
        found = by_target.get(t, [])
        if len(found) != 1:
            raise ValueError(f"block {t!r} is called {len(found)} times in the graph; "
                             f"tread_fx routes blocks that are called exactly once")
        nodes.append(found[0])
    return nodes


def _argument_items(block: fx.Node):
    """(argument name, node) for every node a block receives, tuples flattened."""
    def walk(name, value):
        if isinstance(value, fx.Node):
            yield name, value
        elif isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(f"{name}[{i}]", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(f"{name}[{k!r}]", v)
    for i, a in enumerate(block.args):
        yield from walk(str(i), a)
    for k, a in block.kwargs.items():
        yield from walk(k, a)


def span_nodes(flow: nx.DiGraph, blocks: list[fx.Node], out: fx.Node) -> set[fx.Node]:
    """Nodes computed from the route's tokens between its first block and its output."""
    first = blocks[0]
    return ({first} | nx.descendants(flow, first)) & (nx.ancestors(flow, out) | {out})


# -- classification ---------------------------------------------------------------------

def _base_name(arg: str) -> str:
    return arg.split(":", 1)[1].split("[", 1)[0]


def _classify(side: SideInput, shape: Any, hidden: tuple, others: list[int],
              annotations: Mapping[Any, Any]) -> SideInput:
    name = _base_name(side.arg)
    key = int(name) if name.isdigit() else name
    if key in annotations:
        axis = annotations[key]
        if axis is None:
            return side
        axes = (axis,) if isinstance(axis, int) else tuple(axis)
        batched = isinstance(shape, tuple) and bool(shape) and isinstance(shape[0], int) \
            and shape[0] == hidden[0] and 0 not in axes
        side.axes, side.batched = axes, batched
        return side
    if not (isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)):
        return side  # not a tensor (tuples are flattened by the caller)
    batch, tokens = hidden[0], hidden[1]
    width = hidden[-1] if len(hidden) > 2 else None
    # The last axis of a [B, ..., width] tensor is its feature axis, even when the width
    # happens to equal the token count (a text stream [B, T, D] with D == N).
    features = len(shape) - 1 if len(shape) >= 3 and shape[-1] == width else None
    axes = tuple(i for i, d in enumerate(shape) if d == tokens and i != features)
    offset = 0
    if not axes:
        joint = [(i, d - tokens) for i, d in enumerate(shape) if d - tokens in others]
        if len(joint) == 1:
            axes, offset = (joint[0][0],), joint[0][1]
    if not axes:
        return side
    hint = (f"tell route() with token_inputs={{{key!r}: <token axis>}} or "
            f"token_inputs={{{key!r}: None}} (not per-token)")
    square = len(axes) == 2 and axes == (len(shape) - 2, len(shape) - 1) and len(shape) >= 3
    if len(axes) > 1 and not square:
        raise TokenAxisError(
            f"{side.arg} ({side.node.name}, shape {shape}): several axes have the token count "
            f"{tokens}, so which one holds the tokens is ambiguous (a [N, N] mask, or a "
            f"table whose width equals N?); {hint}")
    if batch == tokens and shape and shape[0] == batch:
        raise TokenAxisError(
            f"{side.arg} ({side.node.name}, shape {shape}): the example batch size equals "
            f"the token count {tokens}, so the batch and token axes cannot be told apart; "
            f"use example inputs with another batch size, or {hint}")
    if width == tokens and len(shape) == 2 and shape[0] == batch:
        return side  # [B, width]: taken as a per-sample vector; annotate a per-token one
    batched = shape[0] == batch and 0 not in axes
    side.axes, side.offset, side.batched = axes, offset, batched
    return side


def detect_prefix(graph: fx.Graph, chain_input: fx.Node, shapes: Mapping | None) -> int | None:
    """Leading tokens concatenated in front of the patch tokens (class, time, label tokens).

    Walks back from the chain's input through shape-preserving operations to a
    ``torch.cat`` on the token axis; everything before its last (largest) operand is a
    prefix.  Returns None when a concatenation is found but its sizes are unknown.
    """
    node = chain_input
    for _ in range(8):
        if node.op == "call_function" and node.target is torch.cat:
            parts = node.args[0]
            dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
            if shapes is None:
                return None if dim in (1, -2) else 0
            shape = shapes.get(node)
            if not shape or dim not in (1, 1 - len(shape)):
                return 0
            sizes = [shapes[p][1] for p in parts]
            return sum(sizes[:-1]) if sizes[-1] == max(sizes) else 0
        same = [i for i in node.all_input_nodes
                if shapes is None or shapes.get(i) == shapes.get(node)]
        if node.op in ("placeholder", "get_attr", "call_module") or not same:
            return 0
        node = same[0]
    return 0


def plan_routes(graph: fx.Graph, chain: BlockChain, routes: Sequence[Route],
                shapes: Mapping[fx.Node, Any] | None,
                annotations: Mapping[Any, Any] | None = None,
                prefix: int | None = None) -> list[RoutePlan]:
    """One :class:`RoutePlan` per route, from the graph before the rewrite."""
    annotations = dict(annotations or {})
    blocks = block_nodes(graph, chain.targets)
    flow = data_flow(graph)
    chain_input = hidden_input(blocks[0], chain.hidden_in[0])
    if prefix is None:
        prefix = detect_prefix(graph, chain_input, shapes)
        if prefix is None:
            raise TokenAxisError(
                f"the blocks' input {chain_input.name!r} is built by concatenating tokens "
                f"(class, time or text tokens in front of the image tokens?) and without "
                f"example inputs their count is unknown; pass example_inputs=... to route(), "
                f"or prefix_tokens=<count> (0 routes them like every other token)")
    plans = []
    for route in routes:
        span = blocks[route.start:route.end + 1]
        x_in = hidden_input(span[0], chain.hidden_in[route.start])
        out = hidden_output(span[-1], chain.hidden_out[route.end])
        inside = span_nodes(flow, span, out)
        plan = RoutePlan(inside=inside, prefix=prefix, shapes_known=shapes is not None)
        hidden = shapes.get(x_in) if shapes else None
        if hidden is not None:
            plan.tokens = hidden[1]
        seen: dict[fx.Node, SideInput] = {}
        for block in [n for n in graph.nodes if n in inside]:
            items = list(_argument_items(block)) if block in span else \
                [(f"{i}", a) for i, a in enumerate(block.all_input_nodes)]
            where = block.target if block in span else block.name
            for arg, value in items:
                if value in inside or value is x_in or value in seen:
                    continue
                side = SideInput(value, f"{where}:{arg}", ())
                if hidden is not None:
                    stream_lengths = [shapes[v][1] for a, v in items
                                      if v is not value and v is not x_in and v not in inside
                                      and isinstance(shapes.get(v), tuple)
                                      and len(shapes[v]) >= 3 and shapes[v][0] == hidden[0]
                                      and isinstance(shapes[v][1], int)]
                    side = _classify(side, shapes.get(value), hidden, stream_lengths,
                                     annotations)
                seen[value] = side
        plan.side = list(seen.values())
        plan.shared_indices = any(s.routed and not s.batched for s in plan.side)
        # values computed on the kept tokens and used after the route
        side = side_outputs(span, chain)
        for node in [n for n in graph.nodes if n in inside and n is not out]:
            if node in side:
                continue   # checked at run time
            outside = [u for u in node.users if u not in inside and u is not out
                       and u not in side]
            if outside:
                if shapes is not None and shapes.get(node) == hidden:
                    plan.escapes.append(node)
                elif shapes is not None:
                    user = outside[0]
                    raise TokenAxisError(
                        f"route {routes.index(route)} ({route}): {node.name!r} (shape "
                        f"{shapes.get(node)}) is computed on the kept tokens and used after "
                        f"the route by {user.name!r}; only values shaped like the hidden "
                        f"state {hidden} can be put back. End the route before it is made")
        plans.append(plan)
    return plans


def side_outputs(span: Sequence[fx.Node], chain: BlockChain) -> set[fx.Node]:
    """Tuple elements of the span blocks' outputs other than the hidden state (another
    token stream, a gate): they may leave a route, checked at run time instead."""
    side = set()
    for block in span:
        out = chain.hidden_out[chain.targets.index(block.target)]
        if out is None:
            continue
        side |= {u for u in block.users if u.op == "call_function"
                 and u.target is operator.getitem and u.args[1] != out}
    return side
