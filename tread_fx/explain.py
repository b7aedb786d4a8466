"""``explain(routed)``: what a routed model computes, block by block, measured on an example.

    report = tread_fx.explain(routed)          # uses the example given to route()
    print(report)                              # the table
    report.blocks[2].tokens, report.saving     # the numbers behind it
    print(report.graph_diff())                 # dense graph -> routed graph, unified diff
    report.draw("routes.svg")                  # tokens per block, the routes drawn over them

The numbers come from running the routed model itself, in ``train()`` mode, on the example
inputs: once with its routes switched off (the dense model) and once routed.  Forward
pre-hooks on the blocks read how many tokens each block receives and capture its real
arguments; each block's call is then replayed on its own, forward and backward, under
``torch.utils.flop_counter.FlopCounterMode``, and the whole model's forward and backward is
counted the same way for the totals.  The backward is taken with respect to the parameters
that require grad (and, for a replayed block, the inputs that did), through the block
outputs that received a gradient in the real step: the counts are those of a training step.
One replay serves every block of the same structure (classes, flags, parameter shapes) and
the same call (argument shapes and values).  Parameter ``.grad``, buffers, modes, selector
state and the random number streams are left as they were.
"""

from __future__ import annotations

import difflib
import inspect
import types
from collections import OrderedDict
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import fx, nn
from torch.utils.flop_counter import FlopCounterMode

from .module import TreadGraphModule
from .spec import Route

__all__ = ["BlockRow", "Explanation", "RouteInfo", "SideInput", "explain", "strip_routes"]

DRAW_FORMATS = (".svg", ".png", ".pdf")


@dataclass(frozen=True)
class BlockRow:
    """One block of the chain: where it is, what it sees and what it costs.

    FLOPs are those of one forward and backward of the block on the example batch;
    tokens are per sample, on the hidden state's token axis.
    """

    index: int
    path: str
    route: int | None          # the route covering this block, or None
    dense_tokens: int | None
    tokens: int | None         # in the routed train forward
    dense_flops: int
    routed_flops: int

    @property
    def saving(self) -> float:
        """Fraction of the block's dense FLOPs that routing saves."""
        return 1 - self.routed_flops / self.dense_flops if self.dense_flops else 0.0


@dataclass(frozen=True)
class SideInput:
    """A per-token value from outside a route that the route gathers with its indices."""

    node: str                   # the inserted node (``tread_side_<route>_<k>``)
    value: str                  # the graph value it gathers
    argument: str | int | None  # the block argument it feeds
    axes: tuple[int, ...]       # its token axes
    offset: int                 # rows of another stream in front (joint tables), all kept
    tail: int = 0               # rows of another stream behind the tokens, all kept


@dataclass(frozen=True)
class RouteInfo:
    """One route of the routed graph, with the nodes the rewrite inserted for it."""

    index: int
    route: Route
    blocks: tuple[str, ...]
    selection_ratio: float
    tokens: int | None          # tokens per sample entering the route
    kept: int | None            # tokens per sample its blocks see
    fixed: tuple[int, int]      # never-routed rows at the start and the end of the token axis
    shared: bool                # one draw for the whole batch (a side input has no batch axis)
    axes: tuple[int, int]       # batch and token axis of the hidden state
    selector: str               # the selector module (``_tread.select_<i>``)
    nodes: tuple[str, ...]      # every inserted node of the route, in graph order
    side_inputs: tuple[SideInput, ...]
    escapes: tuple[tuple[str, str], ...]   # (node, value): other values computed in the
    #                                         route and put back after it (U-ViT's skips)
    checks: tuple[str, ...]     # run-time token-axis checks (routed without example shapes)


class Explanation:
    """What :func:`explain` measured.  ``str()`` (and ``repr()``) is the table.

    Attributes:
        name: the model's name in the title.
        blocks: one :class:`BlockRow` per block of the chain, in order.
        routes: one :class:`RouteInfo` per route.
        dense_flops, routed_flops: the whole model's forward and backward FLOPs.
        batch: samples in the example.
        front_end: the tracer that made the graph (``fx``, ``export``, ``concrete``).
        backward: False when nothing in the model requires grad (forward FLOPs only).
    """

    def __init__(self, routed: TreadGraphModule, name: str, blocks: Sequence[BlockRow],
                 routes: Sequence[RouteInfo], dense_flops: int, routed_flops: int,
                 batch: int | None, backward: bool) -> None:
        self.routed = routed
        self.name = name
        self.blocks = tuple(blocks)
        self.routes = tuple(routes)
        self.dense_flops = dense_flops
        self.routed_flops = routed_flops
        self.batch = batch
        self.front_end = getattr(routed, "front_end", None)
        self.backward = backward

    # -- numbers ------------------------------------------------------------------------
    @property
    def spec(self) -> str:
        return ",".join(str(r.route) for r in self.routes) or "none"

    @property
    def blocks_dense_flops(self) -> int:
        return sum(b.dense_flops for b in self.blocks)

    @property
    def blocks_routed_flops(self) -> int:
        return sum(b.routed_flops for b in self.blocks)

    @property
    def flop_ratio(self) -> float:
        """Routed over dense FLOPs of the whole model."""
        return self.routed_flops / self.dense_flops if self.dense_flops else 1.0

    @property
    def saving(self) -> float:
        """Fraction of the whole model's FLOPs that routing saves."""
        return 1 - self.flop_ratio

    # -- text ---------------------------------------------------------------------------
    def table(self) -> str:
        unit, scale = _unit(max(self.dense_flops, 1))
        what = "forward+backward" if self.backward else "forward (nothing requires grad)"
        chain = f"{self.blocks[0].path}..{self.blocks[-1].path}" if self.blocks else "-"
        lines = [
            f"{type(self.routed).__name__} ({self.name}): {len(self.blocks)} blocks {chain}, "
            f"routes {self.spec}, batch {self.batch}, traced by {self.front_end}",
            f"{what} {unit} of one train step on the example (torch.utils.flop_counter)",
            "",
        ]
        width = max([len("module")] + [len(b.path) for b in self.blocks])
        lines.append(f"{'block':>5}  {'module':<{width}}  {'route':>5}  {'tokens':>9}  "
                     f"{'dense ' + unit:>12}  {'routed ' + unit:>13}  {'saved':>5}")

        def row(index: str, label: str, route: str, tokens: str, dense: int,
                routed: int) -> str:
            saved = f"{1 - routed / dense:>5.0%}" if dense else f"{'-':>5}"
            return (f"{index:>5}  {label:<{width}}  {route:>5}  {tokens:>9}  "
                    f"{dense / scale:>12.3f}  {routed / scale:>13.3f}  {saved}")

        for b in self.blocks:
            tokens = _count(b.tokens) if b.tokens == b.dense_tokens else \
                f"{_count(b.tokens)}/{_count(b.dense_tokens)}"
            lines.append(row(str(b.index), b.path, "-" if b.route is None else str(b.route),
                             tokens, b.dense_flops, b.routed_flops))
        lines.append(row("", "blocks", "", "", self.blocks_dense_flops,
                         self.blocks_routed_flops))
        lines.append(row("", "rest", "", "", self.dense_flops - self.blocks_dense_flops,
                         self.routed_flops - self.blocks_routed_flops))
        lines.append(row("", "total", "", "", self.dense_flops, self.routed_flops) +
                     f"  routed/dense {self.flop_ratio:.3f}"
                     + (f", ideal speed-up {1 / self.flop_ratio:.2f}x"
                        if self.flop_ratio > 0 else ""))
        lines.append("tokens: per sample, routed/dense where they differ; rest: everything "
                     "outside the blocks (embeddings, final layer, ...)")
        lines.append("")
        if not self.routes:
            lines.append("no routes: the graph is the dense model's")
        for r in self.routes:
            lines.extend(_route_lines(r))
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.table()

    def __repr__(self) -> str:
        return self.table()

    def _repr_pretty_(self, printer, cycle: bool) -> None:   # IPython / Jupyter
        printer.text("Explanation(...)" if cycle else self.table())

    # -- graphs -------------------------------------------------------------------------
    def dense_graph(self, mode: str = "train") -> fx.Graph:
        """The graph as it was before the rewrite (the routed one with the TREAD nodes taken
        out: the code ``tread_fx.unroute`` traces anew)."""
        return strip_routes(self._graph(mode))

    def graph_diff(self, mode: str = "train", context: int = 3) -> str:
        """Unified diff of the dense graph's code against the routed graph's code."""
        graph = self._graph(mode)
        dense = strip_routes(graph).python_code(root_module="self").src
        routed = graph.python_code(root_module="self").src
        return "\n".join(difflib.unified_diff(
            dense.splitlines(), routed.splitlines(), f"dense {mode} graph",
            f"routed {mode} graph", n=context, lineterm=""))

    def _graph(self, mode: str) -> fx.Graph:
        if mode not in ("train", "eval"):
            raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
        return self.routed.graph if mode == "train" else self.routed.eval_graph

    # -- drawing ------------------------------------------------------------------------
    def draw(self, path: str | Path) -> Path:
        """Draw the blocks as bars of their tokens per sample (the dense count behind, the
        routed count in front) with each route over the blocks it spans; ``.svg``, ``.png``
        or ``.pdf`` by the file's suffix.  Needs matplotlib (no display: its Agg canvas)."""
        path = Path(path)
        if path.suffix.lower() not in DRAW_FORMATS:
            raise ValueError(f"draw({str(path)!r}): the file must end in "
                             f"{', '.join(DRAW_FORMATS)} (the format follows the suffix)")
        try:
            from matplotlib.figure import Figure
            from matplotlib.patches import Patch
        except ImportError as err:
            raise ImportError("Explanation.draw needs matplotlib: pip install matplotlib "
                              "(or the project's test extra)") from err
        _draw(self, path, Figure, Patch)
        return path


def _unit(flops: int) -> tuple[str, float]:
    for unit, scale in (("GFLOP", 1e9), ("MFLOP", 1e6)):
        if flops >= scale:
            return unit, scale
    return "kFLOP", 1e3


def _count(value: int | None) -> str:
    return "?" if value is None else str(value)


def _route_lines(r: RouteInfo) -> list[str]:
    kept = (f"keeps {r.kept} of {r.tokens} tokens per sample" if r.kept is not None
            else "token counts unknown (routed without example inputs)")
    head, tail = r.fixed
    lines = [f"route {r.index}  {r.route}  {r.blocks[0]}..{r.blocks[-1]}  ratio "
             f"{r.selection_ratio:g}: {kept}",
             f"  never routed: {head} leading and {tail} trailing rows"
             + ("" if head or tail else " (every row is an image token)")
             + ("; one draw for the whole batch (a side input has no batch axis)"
                if r.shared else "")
             + ("" if r.axes == (0, 1) else f"; batch, token axes {r.axes}"),
             f"  inserted: {', '.join(r.nodes)} (selector {r.selector})"]
    if r.side_inputs:
        lines.append("  side inputs gathered:")
        for s in r.side_inputs:
            offset = f", {s.offset} leading rows of another stream kept" if s.offset else ""
            offset += f", {s.tail} trailing rows of another stream kept" if s.tail else ""
            lines.append(f"    {s.node}: {s.value} -> argument {s.argument!r} "
                         f"(token axes {s.axes}{offset})")
    else:
        lines.append("  side inputs gathered: none")
    if r.escapes:
        lines.append("  other values leaving the route, put back like the hidden state: " +
                     ", ".join(f"{value} ({node})" for node, value in r.escapes))
    if r.checks:
        lines.append(f"  run-time token-axis checks: {', '.join(r.checks)}")
    return lines


# -- the dense graph ----------------------------------------------------------------------
def strip_routes(graph: fx.Graph) -> fx.Graph:
    """A copy of ``graph`` with every TREAD node taken out and its uses put back on the value
    it stood for (gather, side gathers and checks: their input; scatters: the processed
    value).  For a graph from :func:`tread_fx.route`, the graph before the rewrite."""
    from .passes.insert_routes import TREAD_META
    copy = fx.Graph()
    out, old_output = copy.graph_copy(graph, {}, return_output_node=True)
    copy.output(out, type_expr=old_output.type)
    for node in reversed(list(copy.nodes)):
        meta = node.meta.get(TREAD_META)
        if meta is None or meta["role"] == "select":
            continue
        node.replace_all_uses_with(
            node.args[1] if meta["role"] in ("scatter", "scatter_escape", "fp32_on")
            else node.args[0])
        copy.erase_node(node)
    for node in reversed(list(copy.nodes)):
        if TREAD_META in node.meta:
            if node.users:
                raise RuntimeError(f"strip_routes: {node.name} still has users "
                                   f"{list(node.users)}; the graph has a TREAD node of an "
                                   f"unknown role")
            copy.erase_node(node)
    copy.lint()
    return copy


# -- measuring ----------------------------------------------------------------------------
def _call_of(model: nn.Module, bound: Mapping[str, Any]) -> tuple[tuple, dict]:
    """A bound example (``{forward parameter: value}``) as positional and keyword arguments."""
    sig = inspect.signature(model.forward)
    arguments = OrderedDict((k, bound[k]) for k in sig.parameters if k in bound)
    call = inspect.BoundArguments(sig, arguments)
    return call.args, call.kwargs


def _tensors(value: Any) -> list[torch.Tensor]:
    """The tensors in a value (tuples, lists, dicts), in order."""
    if isinstance(value, torch.Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [t for v in value for t in _tensors(v)]
    if isinstance(value, Mapping):
        return [t for v in value.values() for t in _tensors(v)]
    return []


def _detached(value: Any) -> Any:
    """A copy of a block's arguments, cut from the model's autograd graph, each tensor
    requiring grad where the original did."""
    if isinstance(value, torch.Tensor):
        copy = value.detach().clone()
        return copy.requires_grad_() if value.requires_grad else copy
    if isinstance(value, tuple):
        items = [_detached(v) for v in value]
        return type(value)(*items) if hasattr(value, "_fields") else tuple(items)
    if isinstance(value, list):
        return [_detached(v) for v in value]
    if isinstance(value, dict):
        return type(value)((k, _detached(v)) for k, v in value.items())
    return value


_PLAIN = (bool, int, float, str, type(None), torch.dtype, torch.device)


def _plain(value: Any) -> bool:
    if isinstance(value, tuple):
        return all(_plain(v) for v in value)
    return isinstance(value, _PLAIN)


def _leaves(value: Any) -> list[Any]:
    """A call's non-tensor values that could change what a block computes."""
    if isinstance(value, (tuple, list)):
        return [type(value).__name__, *(x for v in value for x in _leaves(v))]
    if isinstance(value, Mapping):
        return [x for k, v in value.items() for x in (k, *_leaves(v))]
    if isinstance(value, torch.Tensor):
        return ["tensor"]
    return [value if _plain(value) else type(value).__qualname__]


def _signature(call: Any, out_grads: Sequence[bool]) -> tuple:
    """What a block's FLOP count depends on besides the block: its arguments' shapes, dtypes
    and grad flags, their other values, and which of its outputs got a gradient."""
    return (tuple((tuple(t.shape), t.dtype, t.requires_grad) for t in _tensors(call)),
            tuple(_leaves(call)), tuple(out_grads))


def _describe(value: Any) -> Any:
    if _plain(value):
        return value
    if isinstance(value, torch.Tensor):
        return (tuple(value.shape), value.dtype)
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType, type)):
        return f"{value.__module__}.{value.__qualname__}"
    return type(value).__qualname__


def _fingerprint(block: nn.Module) -> tuple:
    """What a block computes with, besides its arguments: per submodule its class, its
    plain attributes (flags, sizes, modes), the classes of its other attributes (an
    attention processor), its hooks, and its parameters' and buffers' shapes, dtypes and
    grad flags.  Blocks with equal fingerprints and calls cost the same FLOPs."""
    parts = []
    for name, m in block.named_modules():
        attrs = tuple(sorted((k, _describe(v)) for k, v in vars(m).items()
                             if not k.startswith("_") and not isinstance(v, (dict, list, set))))
        hooks = tuple(len(getattr(m, h)) for h in ("_forward_pre_hooks", "_forward_hooks",
                                                    "_backward_hooks",
                                                    "_backward_pre_hooks"))
        tensors = tuple((k, tuple(t.shape), t.dtype, t.requires_grad)
                        for k, t in [*m._parameters.items(), *m._buffers.items()]
                        if t is not None)
        parts.append((name, type(m).__qualname__, attrs, hooks, tensors))
    return tuple(parts)


def _backward(outputs: Sequence[torch.Tensor], wrt: Sequence[torch.Tensor]) -> None:
    """Backward from ``outputs`` (gradient of ones) to ``wrt``; their ``.grad`` is as before.

    ``backward(inputs=...)``, not ``autograd.grad``: the flop counter's module tracker hooks
    the blocks' inputs, which ``autograd.grad`` does not support for leaves.
    """
    outputs = [t for t in outputs if t.requires_grad]
    wrt = list({id(t): t for t in wrt if t.requires_grad}.values())
    if not (outputs and wrt):
        return
    saved = [t.grad for t in wrt]
    for t in wrt:
        t.grad = None
    try:
        torch.autograd.backward(outputs, [torch.ones_like(t) for t in outputs], inputs=wrt)
    finally:
        for t, grad in zip(wrt, saved):
            t.grad = grad


@contextmanager
def _leave_no_trace(routed: TreadGraphModule) -> Iterator[None]:
    """Modes, buffers, selector state and random streams as they were, on exit; gradients
    on inside (a train step, also when called under ``torch.no_grad()``)."""
    from .passes.trace import preserved_modes
    buffers = [(b, b.detach().clone()) for b in routed.buffers()]
    selectors = [(s, s.force_active, s.last_indices, s.last_num_tokens,
                  {d: g.get_state() for d, g in s._generators.items()})
                 for s in routed.selectors]
    cuda = sorted({t.device.index or 0 for t in [*routed.parameters(), *routed.buffers()]
                   if t.device.type == "cuda"})
    try:
        with preserved_modes(routed), torch.random.fork_rng(devices=cuda), \
                torch.enable_grad():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for s, active, indices, tokens, generators in selectors:
            s.force_active, s.last_indices, s.last_num_tokens = active, indices, tokens
            for device, state in generators.items():
                s._generators[device].set_state(state)
            for device in [d for d in s._generators if d not in generators]:
                del s._generators[device]


@dataclass
class _Step:
    """One train-mode forward and backward of the whole model, seen from its blocks."""

    flops: int
    backward: bool
    tokens: dict[int, int | None]
    calls: dict[int, tuple[tuple, dict]]
    out_grads: dict[int, list[bool]]
    batch: int | None


def _hidden(args: tuple, kwargs: dict, key: int | str) -> Any:
    if isinstance(key, int):
        return args[key] if key < len(args) else None
    return kwargs.get(key)


def _step(routed: TreadGraphModule, args: tuple, kwargs: dict, blocks: Sequence[nn.Module],
          keys: Sequence[int | str], axes: Sequence[tuple[int, int]]) -> _Step:
    tokens: dict[int, int | None] = {}
    calls: dict[int, tuple[tuple, dict]] = {}
    out_grads: dict[int, list[bool]] = {}
    batch: list[int] = []

    def before(i: int, module: nn.Module, a: tuple, kw: dict) -> None:
        if i in calls:
            raise RuntimeError(f"explain(): block {i} ran twice in one forward; tread_fx "
                               f"routes blocks that are called once")
        calls[i] = _detached((a, kw))
        hidden = _hidden(a, kw, keys[i])
        if isinstance(hidden, torch.Tensor) and hidden.dim() > max(axes[i]):
            tokens[i] = hidden.shape[axes[i][1]]
            batch.append(hidden.shape[axes[i][0]])
        else:
            tokens[i] = None

    def after(i: int, module: nn.Module, a: tuple, kw: dict, out: Any) -> None:
        flat = _tensors(out)
        flags = out_grads[i] = [False] * len(flat)
        for k, t in enumerate(flat):
            if t.requires_grad:
                t.register_hook(lambda grad, k=k: flags.__setitem__(k, True))

    handles = []
    try:
        for i, block in enumerate(blocks):
            handles.append(block.register_forward_pre_hook(
                lambda m, a, kw, i=i: before(i, m, a, kw), with_kwargs=True, prepend=True))
            handles.append(block.register_forward_hook(
                lambda m, a, kw, out, i=i: after(i, m, a, kw, out), with_kwargs=True))
        params = [p for p in routed.parameters() if p.requires_grad]
        with FlopCounterMode(display=False) as counter:
            outputs = [t for t in _tensors(routed(*args, **kwargs)) if t.requires_grad]
            _backward(outputs, params)
    finally:
        for h in handles:
            h.remove()
    return _Step(counter.get_total_flops(), bool(outputs and params), tokens, calls,
                 out_grads, batch[0] if batch else None)


def _block_flops(block: nn.Module, call: tuple[tuple, dict], out_grads: Sequence[bool]) -> int:
    """FLOPs of one forward and backward of ``block`` on a captured call."""
    args, kwargs = _detached(call)
    with FlopCounterMode(display=False) as counter:
        flat = _tensors(block(*args, **kwargs))
        if len(flat) != len(out_grads):
            raise RuntimeError(f"explain(): replaying {type(block).__name__} gave "
                               f"{len(flat)} output tensors, the model's step {len(out_grads)}")
        outputs = [t for t, got in zip(flat, out_grads) if got]
        _backward(outputs, [*block.parameters(), *_tensors((args, kwargs))])
    return counter.get_total_flops()


def _hidden_keys(routed: TreadGraphModule) -> list[int | str]:
    """Where each block of the chain takes the token stream (the chain route() found,
    found again on the graph before the rewrite)."""
    from .passes.find_blocks import find_block_chain, find_candidates
    model = routed._tread_model
    spec = routed.route_spec
    chain = find_block_chain(strip_routes(routed.graph), find_candidates(model, spec.blocks),
                             spec.hidden, model)
    if tuple(chain.targets) != tuple(routed.block_chain):
        raise RuntimeError(f"explain(): the graph's block chain {chain.targets} is not the "
                           f"routed module's {list(routed.block_chain)}")
    return list(chain.hidden_in)


def _route_infos(routed: TreadGraphModule) -> list[RouteInfo]:
    from .passes.insert_routes import TREAD_META
    by_route: dict[int, list[fx.Node]] = {}
    for node in routed.graph.nodes:
        if TREAD_META in node.meta:
            by_route.setdefault(node.meta[TREAD_META]["route_index"], []).append(node)
    infos = []
    for selector in routed.selectors:
        nodes = by_route.get(selector.index, [])
        role = {n: n.meta[TREAD_META]["role"] for n in nodes}
        select = next((n for n in nodes if role[n] == "select"), None)
        meta = select.meta[TREAD_META] if select is not None else {}
        kw = select.kwargs if select is not None else {}
        side = tuple(SideInput(n.name, getattr(n.args[0], "name", str(n.args[0])),
                               n.meta[TREAD_META].get("arg"),
                               tuple(n.meta[TREAD_META].get("axes", ())),
                               n.meta[TREAD_META].get("offset", 0),
                               n.meta[TREAD_META].get("tail", 0))
                     for n in nodes if role[n] == "side")
        infos.append(RouteInfo(
            index=selector.index, route=selector.route, blocks=tuple(selector.blocks),
            selection_ratio=selector.selection_ratio, tokens=meta.get("tokens"),
            kept=meta.get("kept"), fixed=tuple(kw.get("fixed", selector.fixed)),
            shared=bool(kw.get("shared", selector.shared)),
            axes=tuple(kw.get("axes", selector.axes)),
            selector=f"_tread.select_{selector.index}",
            nodes=tuple(n.name for n in nodes), side_inputs=side,
            escapes=tuple((n.name, n.args[1].name) for n in nodes
                          if role[n] == "scatter_escape"),
            checks=tuple(n.name for n in nodes if role[n] == "check")))
    return infos


def explain(routed: nn.Module, example_inputs: Any = None, *,
            name: str | None = None) -> Explanation:
    """Measure what routing does to each block of ``routed`` on an example.

    Args:
        routed: a module returned by :func:`tread_fx.route` (or :func:`tread_fx.unroute`).
        example_inputs: a tuple of positional or a dict of keyword arguments of the
            model's forward; by default the example given to ``route()``.  Token counts
            and FLOPs are those of this batch.
        name: the model's name in the title (default: its class name).

    Returns an :class:`Explanation`: printed, the per-block table (tokens per sample,
    forward+backward FLOPs dense vs routed, the total saving) and each route's inserted
    nodes, gathered side inputs and never-routed rows; ``.graph_diff()`` and
    ``.draw(path)`` show the rewrite.  The model's state (``.grad``, buffers, modes,
    random streams, the selectors' last indices) is left as it was.
    """
    from .api import _bind_example, _require_routed
    routed = _require_routed(routed, "explain")
    model = routed.__dict__.get("_tread_model", routed)
    if example_inputs is None:
        bound = routed.__dict__.get("_tread_example")
        if bound is None:
            raise ValueError(
                f"explain() runs a train step of the model on an example to count tokens and "
                f"FLOPs, and this {type(routed).__name__} was routed without example_inputs: "
                f"pass them, explain(routed, example_inputs=(x, t, y)) (a tuple of positional "
                f"or a dict of keyword arguments of {type(model).__name__}.forward), or give "
                f"them to tread_fx.route()")
    else:
        bound = _bind_example(model, example_inputs)
    args, kwargs = _call_of(model, bound)
    paths = list(routed.block_chain)
    blocks = [routed.get_submodule(p) for p in paths]
    routes = _route_infos(routed)
    route_of = {i: r for r in routes for i in range(r.route.start, r.route.end + 1)}
    stream_axes = routes[0].axes if routes else (0, 1)
    axes = [route_of[i].axes if i in route_of else stream_axes for i in range(len(paths))]
    keys = _hidden_keys(routed)
    steps = {}
    with _leave_no_trace(routed):
        routed.train()
        for mode in ("dense", "routed"):
            for s in routed.selectors:
                s.force_active = False if mode == "dense" else None
            steps[mode] = _step(routed, args, kwargs, blocks, keys, axes)
        missing = [paths[i] for i in range(len(paths)) if i not in steps["routed"].calls]
        if missing:
            raise RuntimeError(f"explain(): blocks {missing} did not run in the train forward")
        counted: dict[tuple, int] = {}
        flops = {}
        prints = [_fingerprint(block) for block in blocks]
        for mode, step in steps.items():
            for i, block in enumerate(blocks):
                key = (prints[i], _signature(step.calls[i], step.out_grads[i]))
                if key not in counted:
                    counted[key] = _block_flops(block, step.calls[i], step.out_grads[i])
                flops[mode, i] = counted[key]
    rows = [BlockRow(i, paths[i], route_of[i].index if i in route_of else None,
                     steps["dense"].tokens.get(i), steps["routed"].tokens.get(i),
                     flops["dense", i], flops["routed", i]) for i in range(len(paths))]
    return Explanation(routed, name or type(model).__name__, rows, routes,
                       steps["dense"].flops, steps["routed"].flops, steps["routed"].batch,
                       steps["routed"].backward)


# -- drawing ------------------------------------------------------------------------------
_COLOURS = ("#d1495b", "#2e86ab", "#edae49", "#66a182", "#8d6a9f", "#00798c")
_DENSE, _OUTSIDE = "#e6e6e6", "#5b6770"


def _draw(report: Explanation, path: Path, Figure, Patch) -> None:
    """Bars of tokens per sample (dense behind, routed in front), each route as the path its
    skipped tokens take: up before its first block, over its blocks, down after its last."""
    rows = report.blocks
    n = len(rows)
    top = max([r.dense_tokens or 0 for r in rows] + [1])
    fig = Figure(figsize=(max(7.0, 0.45 * n + 4.0), 4.4), dpi=100)
    ax = fig.add_subplot(1, 1, 1)
    xs = list(range(n))
    ax.bar(xs, [r.dense_tokens or 0 for r in rows], width=0.7, color=_DENSE,
           edgecolor="#9a9a9a", linewidth=0.8)
    colours = [_COLOURS[r.route % len(_COLOURS)] if r.route is not None else _OUTSIDE
               for r in rows]
    ax.bar(xs, [r.tokens or 0 for r in rows], width=0.7, color=colours)
    for x, r in zip(xs, rows):
        if r.tokens is not None:
            ax.text(x, r.tokens + top * 0.012, str(r.tokens), ha="center", va="bottom",
                    fontsize=7)
    handles = [Patch(facecolor=_DENSE, edgecolor="#9a9a9a", label="dense"),
               Patch(facecolor=_OUTSIDE, label="not routed")]
    for k, info in enumerate(report.routes):
        colour = _COLOURS[info.index % len(_COLOURS)]
        left, right = info.route.start - 0.5, info.route.end + 0.5
        y = top * (1.12 + 0.16 * (k % 2))
        ax.axvspan(left, right, color=colour, alpha=0.07, linewidth=0)
        ax.plot([left - 0.04, left - 0.04, right + 0.04], [top * 1.02, y, y], color=colour,
                linewidth=1.5, solid_joinstyle="miter")
        ax.annotate("", xy=(right + 0.04, top * 1.02), xytext=(right + 0.04, y),
                    arrowprops=dict(arrowstyle="-|>", color=colour, linewidth=1.5,
                                    shrinkA=0, shrinkB=0))
        skipped = info.tokens - info.kept if info.kept is not None else None
        ax.text((left + right) / 2, y + top * 0.015,
                f"{skipped} of {info.tokens} tokens skip" if skipped is not None else "skip",
                ha="center", va="bottom", fontsize=8, color=colour)
        handles.append(Patch(facecolor=colour, label=f"route {info.index}: {info.route}"))
    ax.set_xticks(xs)
    ax.set_xticklabels([str(i) for i in xs], fontsize=8)
    ax.set_xlim(-0.8, n - 0.2)
    ax.set_ylim(0, top * 1.42)
    ax.set_xlabel(f"block ({rows[0].path} .. {rows[-1].path})" if rows else "block")
    ax.set_ylabel("tokens per sample")
    saving = (f"{'forward+backward' if report.backward else 'forward'} FLOPs "
              f"{report.saving:.1%} lower" if report.routes else "dense")
    fig.suptitle(f"{report.name}: routes {report.spec}, {saving}", fontsize=10)
    ax.spines[["top", "right"]].set_visible(False)
    ax.legend(handles=handles, loc="upper left", bbox_to_anchor=(1.0, 1.0), fontsize=8,
              frameon=False)
    fig.tight_layout()
    fig.savefig(path, format=path.suffix.lower().lstrip("."))
