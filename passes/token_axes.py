"""Token-axis analysis: which values flowing into a route's blocks carry the token axis.

With the example inputs' shapes (a shape probe of the traced graph), every value that
enters the blocks of a route from outside is classified:

* the hidden-state stream (routed by the gather/scatter pair);
* per-token side inputs, gathered with the route's indices on their token axes: RoPE
  tables ``[N, d]`` / ``[B, N, d]`` (or tuples of them), per-token masks and timesteps
  ``[B, N]``, attention masks ``[B, N, N]`` / ``[B, 1, N, N]``, long skips ``[B, N, D]``
  from before the route, and joint tables ``[T + N, d]`` / ``[N + T, d]`` holding another
  stream's ``T`` rows before or after the image rows (the nearest concatenation upstream
  tells which; text first when none does);
* everything else (per-sample conditioning, other token streams) passes untouched.

Values computed inside a route and used after it (long skips out of the route) are put
back like the hidden state when they have its shape; otherwise there is no correct answer
and the analysis raises, naming the node.  Ambiguous shapes (the token count equal to the
batch size or to the hidden width of a per-sample vector) raise with the annotation to add.

Batch axes are never guessed from a size match: the user's blocks are observed once more
at another batch size (:func:`probe_block_io`), and the axes that changed are the batch
axes.  The hidden stream's token axis is its one axis that is neither the batch nor the
feature (last) axis; a stream with several (``[B, H, W, C]``) is refused.  Which of its rows
may be routed follows from where they come from (:func:`fixed_rows`): only rows computed
from the image input; class, time, text and padding rows stay, wherever they sit.

Without shapes nothing can be classified: side inputs then pass untouched and a run-time
check refuses any that turns out to have a dimension of the token count.
"""

from __future__ import annotations

import inspect
import math
import operator
from dataclasses import dataclass, field
from typing import Any, Iterator, Mapping, Sequence

import networkx as nx
import torch
from torch import fx

from tread_fx.spec import Route

from .find_blocks import BlockChain
from .find_blocks import op_name as _op_name
from .trace import assign_index
from .trace import shape_tree

__all__ = ["RoutePlan", "SideInput", "TokenAxisError", "fixed_rows", "plan_routes",
           "probe_block_io", "probe_shapes", "side_outputs"]


class TokenAxisError(ValueError):
    """A value entering or leaving a route cannot be classified or put back correctly."""


@dataclass
class SideInput:
    """A value from outside a route that its blocks receive, and how to gather it."""

    node: fx.Node
    arg: str                 # "<block target>:<argument>" for messages
    axes: tuple[int, ...]    # token axes; empty = passes untouched
    offset: int = 0          # rows of another stream before the image tokens
    batch_axis: int | None = 0   # None: no batch axis (a table shared by the batch)
    tail: int = 0            # rows of another stream after the image tokens

    @property
    def routed(self) -> bool:
        return bool(self.axes)

    @property
    def batched(self) -> bool:
        return self.batch_axis is not None


@dataclass
class RoutePlan:
    inside: set[fx.Node]
    side: list[SideInput] = field(default_factory=list)
    escapes: list[fx.Node] = field(default_factory=list)   # scattered back after the route
    shared_indices: bool = False   # a batch-less table needs one index set for the batch
    fixed: tuple[int, int] = (0, 0)   # never-routed rows at the start / end of the tokens
    axes: tuple[int, int] = (0, 1)    # batch and token axis of the hidden state
    shapes_known: bool = False
    tokens: int | None = None      # token count of the hidden state, when shapes are known


# -- shapes -----------------------------------------------------------------------------

def probed(value: Any) -> Any:
    """What :func:`probe_shapes` keeps of a value: a tensor's shape (nested like the value),
    and a number computed in the graph (a length, a slice bound) as itself."""
    if isinstance(value, int) and not isinstance(value, bool):
        return value
    return shape_tree(value)


def probe_shapes(module: torch.nn.Module, graph: fx.Graph, args: Sequence[Any],
                 constants: Mapping[str, torch.Tensor]) -> dict[fx.Node, Any]:
    """Shapes of every node of ``graph`` when ``module``'s modules run it on ``args``
    (for a node that computes a Python int: the int).

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
            shapes[n] = probed(result)
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
    return ((name, v) for name, v in _items(block.args, block.kwargs)
            if isinstance(v, fx.Node))


def span_nodes(flow: nx.DiGraph, blocks: list[fx.Node], out: fx.Node) -> set[fx.Node]:
    """Nodes computed from the route's tokens between its first block and its output."""
    first = blocks[0]
    return ({first} | nx.descendants(flow, first)) & (nx.ancestors(flow, out) | {out})


# -- batch axes: the blocks observed at another batch size --------------------------------

def _items(args: tuple, kwargs: dict):
    """(argument name, value) of a call, lists, tuples and dicts flattened (``"0"``,
    ``"rope[1]"``): the same names for a graph node's arguments and for run-time values."""
    def walk(name, value):
        if isinstance(value, (list, tuple)):
            for i, v in enumerate(value):
                yield from walk(f"{name}[{i}]", v)
        elif isinstance(value, dict):
            for k, v in value.items():
                yield from walk(f"{name}[{k!r}]", v)
        else:
            yield name, value
    for i, a in enumerate(args):
        yield from walk(str(i), a)
    for k, a in kwargs.items():
        yield from walk(k, a)


def _grow_batch(value: Any, batch: int) -> Any:
    """The example with one more sample: every tensor whose first axis is the batch grows."""
    if isinstance(value, torch.Tensor):
        if value.dim() and value.shape[0] == batch:
            return torch.cat([value, value[:1]])
        return value
    if isinstance(value, (list, tuple)) and not hasattr(value, "_fields"):
        return type(value)(_grow_batch(v, batch) for v in value)
    if isinstance(value, dict):
        return {k: _grow_batch(v, batch) for k, v in value.items()}
    return value


def probe_block_io(model: torch.nn.Module, args: tuple, kwargs: dict,
                   targets: Sequence[str]) -> tuple[dict[str, dict[str, Any]], str | None]:
    """Shapes of every argument and output of the blocks ``targets`` when the user's model
    runs at one more sample than the example (first tensor's first axis is the batch).

    Compared with the shapes at the example's batch size, the axes that changed are the
    batch axes; nothing is inferred from a size that happens to equal the batch size.
    Returns ``({target: {argument: shape, "out": shape}}, None)``, or ``({}, reason)`` when
    the model cannot run at the other batch size.  The caller freezes the model's state.
    """
    tensors = [v for _, v in _items(args, kwargs) if isinstance(v, torch.Tensor) and v.dim()]
    if not tensors:
        return {}, "no tensor input has a batch axis"
    batch = tensors[0].shape[0]
    seen: dict[str, dict[str, Any]] = {}
    handles = []
    for t in targets:
        def pre(mod, a, kw, t=t):
            seen.setdefault(t, {}).update((n, shape_tree(v)) for n, v in _items(a, kw))

        def post(mod, a, kw, out, t=t):
            seen.setdefault(t, {})["out"] = shape_tree(out)
        block = model.get_submodule(t)
        handles.append(block.register_forward_pre_hook(pre, with_kwargs=True))
        handles.append(block.register_forward_hook(post, with_kwargs=True))
    try:
        with torch.no_grad():
            model(*_grow_batch(args, batch), **_grow_batch(kwargs, batch))
    except Exception as err:  # noqa: BLE001 - reported by the caller where it matters
        return {}, f"{type(err).__name__}: {err}"
    finally:
        for h in handles:
            h.remove()
    return seen, None


def _changed_axes(shape: Any, other: Any) -> tuple[int, ...] | None:
    if not (isinstance(shape, tuple) and isinstance(other, tuple)) or len(shape) != len(other) \
            or not all(isinstance(d, int) for d in shape + other):
        return None
    return tuple(i for i, (a, b) in enumerate(zip(shape, other)) if a != b)


def hidden_axes(shape: tuple, other: Any, where: str) -> tuple[int, int]:
    """Batch and token axis of the hidden state, from its shapes at two batch sizes."""
    changed = _changed_axes(shape, other)
    if changed is None:
        if len(shape) != 3:
            raise TokenAxisError(
                f"{where}: the hidden state has shape {shape}, and without observing the "
                f"blocks at another batch size its token axis cannot be decided; tread_fx "
                f"routes a [batch, tokens, features] stream")
        return 0, 1
    if len(changed) != 1:
        raise TokenAxisError(f"{where}: the hidden state's shape {shape} changes on axes "
                             f"{changed} with the batch size; cannot tell the batch axis")
    batch = changed[0]
    tokens = [i for i in range(len(shape)) if i != batch and i != len(shape) - 1]
    if len(tokens) != 1:
        raise TokenAxisError(
            f"{where}: the hidden state has shape {shape} with batch axis {batch}, so "
            f"{'several axes' if tokens else 'no axis'} ({tokens}) besides the feature axis "
            f"could be the token axis; tread_fx routes a stream with one token axis "
            f"([B, N, D] or [N, B, D]). Blocks that need a token grid ([B, H, W, C], window "
            f"attention) cannot be routed; leave them out of the routes")
    return batch, tokens[0]


# -- classification ---------------------------------------------------------------------

def _base_name(arg: str) -> str:
    return arg.split(":", 1)[1].split("[", 1)[0]


def _annotation(side: SideInput, annotations: Mapping[Any, Any], param_names: Sequence[str],
                used: set) -> tuple[bool, Any]:
    """The ``token_inputs`` entry for a side input, by argument name or position."""
    name = _base_name(side.arg)
    keys = [name]
    if name.isdigit():
        keys.append(int(name))
        if int(name) < len(param_names):
            keys.append(param_names[int(name)])
    elif name in param_names:
        keys.append(param_names.index(name))
    for key in keys:
        if key in annotations:
            used.add(key)
            return True, annotations[key]
    return False, None


def _annotated(side: SideInput, axis: Any, shape: Any, batch_axes: tuple[int, ...] | None,
               hidden_batch: int) -> SideInput:
    if axis is None:
        return side
    axes = (axis,) if isinstance(axis, int) else tuple(axis)
    if batch_axes is not None:
        side.batch_axis = batch_axes[0] if len(batch_axes) == 1 else None
    elif isinstance(shape, tuple):
        side.batch_axis = 0 if shape and shape[0] == hidden_batch and 0 not in axes else None
    else:   # no shapes: a table whose axis 0 is the token axis has no batch axis
        side.batch_axis = None if 0 in axes else 0
    side.axes = axes
    return side


def _classify(side: SideInput, shape: Any, batch_axes: tuple[int, ...] | None, batch: int,
              tokens: int, width: int | None, others: list[int], hint_key: Any) -> SideInput:
    if not (isinstance(shape, tuple) and all(isinstance(d, int) for d in shape)):
        return side  # not a tensor (tuples are flattened by the caller)
    if batch_axes is not None and len(batch_axes) > 1:
        raise TokenAxisError(f"{side.arg} ({side.node.name}, shape {shape}): several axes "
                             f"{batch_axes} change with the batch size")
    if batch_axes is None:   # not observed at another batch size: the first axis, by size
        batch_axis = 0 if shape and shape[0] == batch else None
    else:
        batch_axis = batch_axes[0] if batch_axes else None
    # The last axis of a [B, ..., width] tensor is its feature axis, even when the width
    # happens to equal the token count (a text stream [B, T, D] with D == N).
    features = len(shape) - 1 if len(shape) >= 3 and shape[-1] == width else None
    axes = tuple(i for i, d in enumerate(shape)
                 if d == tokens and i != features and i != batch_axis)
    offset = 0
    joint = [(i, d - tokens) for i, d in enumerate(shape)
             if i != batch_axis and i != features and d - tokens in others]
    hint = (f"tell route() with token_inputs={{{hint_key!r}: <token axis>}} or "
            f"token_inputs={{{hint_key!r}: None}} (not per-token)")
    if axes and len(joint) == 1:
        raise TokenAxisError(
            f"{side.arg} ({side.node.name}, shape {shape}): axis {axes[0]} has the token "
            f"count {tokens} and axis {joint[0][0]} the length of another stream plus the "
            f"token count (a joint table whose width equals N?); which one holds the tokens "
            f"is ambiguous; {hint}")
    if not axes and len(joint) == 1:
        axes, offset = (joint[0][0],), joint[0][1]
    if not axes:
        return side
    square = len(axes) == 2 and axes == (len(shape) - 2, len(shape) - 1) and len(shape) >= 3
    if len(axes) > 1 and not square:
        raise TokenAxisError(
            f"{side.arg} ({side.node.name}, shape {shape}): several axes have the token count "
            f"{tokens}, so which one holds the tokens is ambiguous (a [N, N] mask, or a "
            f"table whose width equals N?); {hint}")
    if batch_axes is None and batch == tokens and shape and shape[0] == batch:
        raise TokenAxisError(
            f"{side.arg} ({side.node.name}, shape {shape}): the example batch size equals "
            f"the token count {tokens}, so the batch and token axes cannot be told apart; "
            f"use example inputs with another batch size, or {hint}")
    if width == tokens and len(shape) == 2 and batch_axis == 0:
        return side  # [B, width]: taken as a per-sample vector; annotate a per-token one
    side.axes, side.offset, side.batch_axis = axes, offset, batch_axis
    return side


# -- which rows may be routed -----------------------------------------------------------

_META_ATTRS = {"shape", "dtype", "device", "ndim", "is_cuda", "layout", "requires_grad"}
_META_METHODS = {"size", "dim", "numel", "type", "get_device", "is_contiguous", "stride"}
IMAGE_NAMES = ("hidden_states", "x", "sample", "latents", "latent", "img", "image", "video",
               "audio", "z", "x_t")


# Ops that read only the shape, dtype or device of their first tensor argument.
_LIKE = {"new_zeros", "new_ones", "new_empty", "new_full", "zeros_like", "ones_like",
         "empty_like", "full_like", "rand_like", "randn_like", "randint_like"}


def _stacked_rows(node: fx.Node, shapes: Mapping, image: set[fx.Node], token_axis: int,
                  rank: int) -> list[tuple[int, bool]] | None:
    """The layout of a batch stacked from per-sample sequences (``pad_sequence(seqs,
    batch_first=True)``, ``torch.stack(seqs)``: ZImage joins image and text per sample):
    each sample's rows along its own axis 0, the padding after them not image; None when
    ``node`` is not such a stack or the samples differ."""
    name = _op_name(node)
    if name not in ("pad_sequence", "stack") or token_axis != 1 or not node.args or \
            not isinstance(node.args[0], (list, tuple)):
        return None
    if name == "pad_sequence" and not node.kwargs.get(
            "batch_first", node.args[1] if len(node.args) > 1 else False):
        return None
    if name == "stack" and node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0):
        return None
    n = shapes[node][token_axis]
    layouts = []
    for seq in node.args[0]:
        shape = shapes.get(seq) if isinstance(seq, fx.Node) else None
        if not isinstance(shape, tuple) or len(shape) != rank - 1:
            return None
        flags = _value_rows(seq, shapes, image, 0, shape[0]) + [False] * (n - shape[0])
        layouts.append(flags)
    return _one_layout(node, layouts)


def _one_layout(node: fx.Node, per_sample: list[list[bool]]) -> list[tuple[int, bool]]:
    """The rows' layout all samples share (per row: image or not), or refused."""
    if any(f != per_sample[0] for f in per_sample[1:]):
        raise TokenAxisError(f"{node.name!r}: the samples' streams are laid out differently "
                             f"(text of different lengths?); which rows are image tokens "
                             f"differs per sample. Pass prefix_tokens=<count> to route()")
    return [(1, f) for f in per_sample[0]]


def _reads_values_of(user: fx.Node, node: fx.Node) -> bool:
    """Whether ``user`` reads ``node``'s values (not only its metadata): ``zeros_like(x)``,
    ``x.new_zeros(...)`` do not; ``t.type_as(x)`` and ``t.to(x)`` read only ``t``'s."""
    if _is_metadata(user):
        return False
    name = _op_name(user)
    if name in _LIKE:
        return False
    if name in ("type_as", "to") and user.args and user.args[0] is not node:
        return False
    return True


def _is_metadata(node: fx.Node) -> bool:
    """A node that reads a tensor's metadata, not its values."""
    if node.op == "call_function" and node.target is getattr:
        return node.args[1] in _META_ATTRS
    if node.op == "call_method":
        return node.target in _META_METHODS
    if node.op == "call_function" and getattr(node.target, "__name__", "").split(".")[0] in (
            "sym_size", "sym_numel", "sym_stride", "sym_storage_offset"):
        return True
    return False


def _walk(start: Sequence[fx.Node], step) -> Iterator[fx.Node]:
    """Each node reachable from ``start`` through ``step(node)`` (the nodes to go on to),
    once, depth first; ``step`` runs only for the nodes the caller takes."""
    todo, seen = list(start), set()
    while todo:
        node = todo.pop()
        if node not in seen:
            seen.add(node)
            yield node
            todo.extend(step(node))


def _value_descendants(sources: Sequence[fx.Node]) -> set[fx.Node]:
    """Nodes whose values are computed from ``sources``' values (metadata reads cut)."""
    seen, todo = set(sources), list(sources)
    while todo:
        for user in todo.pop().users:
            if user not in seen and not _is_metadata(user):
                seen.add(user)
                todo.append(user)
    return seen


_REDUCTIONS = {"mean", "sum", "amax", "amin", "max", "min", "std", "var", "norm", "prod",
               "logsumexp", "median", "nanmean", "nansum"}
_ATTENTION = {"scaled_dot_product_attention", "_scaled_dot_product_flash_attention_for_cpu",
              "_scaled_dot_product_efficient_attention", "_scaled_dot_product_flash_attention"}


# Ops that write rows at positions held in a tensor (index_copy(x, 1, idx, src)).
_ROW_PLACING = {"index_copy", "index_add", "index_put", "scatter", "scatter_add",
                "scatter_reduce", "masked_scatter", "index_fill", "put"}


def _places_rows(node: fx.Node, token_axis: int, rank: int) -> bool:
    """Whether a row-placing op may write along the token axis (it has no ``dim``, or
    its ``dim`` is the token axis)."""
    dim = node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else None)
    if _op_name(node).rstrip("_") in ("index_put", "masked_scatter", "put") or \
            not isinstance(dim, int):
        return True
    return dim % rank == token_axis




def _image_rows_of(sources: Sequence[fx.Node],
                   streams: Mapping[fx.Node, tuple[Any, Any]] | None = None) -> set[fx.Node]:
    """Values whose rows are computed from the image input's tokens.

    Like :func:`_value_descendants`, but a reduction (``img.mean(1)`` folded into a class
    token) makes a value of its own, and an attention output has the rows of its query
    (text refined by attending to the image is still text).  A block of the chain
    (``streams``: block call -> (stream argument, stream output index)) returns image rows
    only in its stream output, and only when the image came in through its stream
    argument (a double-stream block's text output is text)."""
    streams = streams or {}
    seen, todo = set(sources), list(sources)
    while todo:
        node = todo.pop()
        for user in node.users:
            if user in seen or not _reads_values_of(user, node) or \
                    _op_name(user) in _REDUCTIONS:
                continue
            if _op_name(user) in _ATTENTION and (user.args[:1] or [None])[0] is not node:
                continue
            if user in streams:
                key, out = streams[user]
                if hidden_input(user, key) is not node:
                    continue
                if out is not None:
                    outs = [u for u in user.users if u.op == "call_function"
                            and u.target is operator.getitem and u.args[1] == out]
                    seen.update(outs)
                    todo.extend(outs)
                    continue
            seen.add(user)
            todo.append(user)
    return seen


def _image_inputs(graph: fx.Graph, upstream: set[fx.Node]) -> tuple[list[fx.Node], bool]:
    """The forward's image input: the placeholder (of those the blocks' input is built
    from, ``upstream``) named like one, else the first; and whether it was found by its
    name (or is the only one)."""
    places = [n for n in graph.nodes if n.op == "placeholder" and n in upstream]
    named = [n for n in places if n.target.lstrip("*") in IMAGE_NAMES]
    return (named[:1] or places[:1]), bool(named) or len(places) <= 1


_CATS = (torch.cat, torch.concat, torch.ops.aten.cat.default)


def _cat_dim(node: fx.Node) -> Any:
    if node.op == "call_function" and node.target in _CATS:
        return node.kwargs.get("dim", node.args[1] if len(node.args) > 1 else 0)
    return None


def _written_rows(node: fx.Node, before: list[list[bool]], shapes: Mapping,
                  image: set[fx.Node], token_axis: int, rank: int, rows) -> list[list[bool]]:
    """Per sample, per row, image or not, after ``x[index] = value`` (the concrete
    tracer's ``assign_index``): the rows the index selects on the token axis take the
    value's layout (models that build a joint stream sample by sample write
    ``x[i, :t] = text[i]``, ``x[i, t:] = image[i]``).  An index tread_fx cannot read (a
    tensor index) is refused."""
    _, index, value = node.args[:3]
    n = shapes[node][token_axis]
    batch_axis = 1 - token_axis if token_axis in (0, 1) else 0
    batch = shapes[node][batch_axis]
    index = index if isinstance(index, tuple) else (index,)
    if any(i is Ellipsis for i in index) or len(index) > rank:
        raise TokenAxisError(f"{node.name!r} writes into the blocks' stream with index "
                             f"{index}, whose rows tread_fx cannot read; pass "
                             f"prefix_tokens=<count> to route()")

    def known(v):   # a bound computed in the graph: its value on the example
        got = shapes.get(v) if isinstance(v, fx.Node) else v
        return got if isinstance(got, int) and not isinstance(got, bool) else v

    def select(i, size):
        if isinstance(i, slice):
            i = slice(known(i.start), known(i.stop), known(i.step))
        else:
            i = known(i)
        if i is None or (isinstance(i, slice) and i == slice(None)):
            return list(range(size)), True
        if isinstance(i, int) and not isinstance(i, bool):
            return [i % size], False
        if isinstance(i, slice) and all(v is None or (isinstance(v, int) and not isinstance(
                v, bool)) for v in (i.start, i.stop, i.step)):
            return list(range(size))[i], True
        raise TokenAxisError(f"{node.name!r} writes into the blocks' stream with index "
                             f"{index}, whose rows tread_fx cannot read; pass "
                             f"prefix_tokens=<count> to route()")

    full = index + (slice(None),) * (rank - len(index))
    samples, _ = select(full[batch_axis], batch)
    written, kept_axis = select(full[token_axis], n)
    # the value's own token axis: the dims the index keeps, before the token axis
    kept_before = sum(1 for d, i in enumerate(full[:token_axis]) if not isinstance(i, int))
    flags = [list(f) for f in before]
    value_flags = None
    value_shape = shapes.get(value) if isinstance(value, fx.Node) else None
    if kept_axis and kept_before == token_axis and isinstance(value_shape, tuple) and \
            len(value_shape) == rank and value_shape[token_axis] == len(written):
        layout = rows(value)   # the value is laid out like the stream: follow it back
        if layout:
            value_flags = [f for length, f in layout for _ in range(length)]
    if value_flags is None:
        value_flags = _value_rows(value, shapes, image, kept_before if kept_axis else None,
                                  len(written))
    for b in samples:
        for row, flag in zip(written, value_flags):
            flags[b][row] = flag
    return flags


def _value_rows(value: Any, shapes: Mapping, image: set[fx.Node], axis: int | None,
                length: int) -> list[bool]:
    """Per row of ``value`` along ``axis``: computed from the image input or not."""
    if not isinstance(value, fx.Node):
        return [False] * length
    dim = _cat_dim(value)
    shape = shapes.get(value)
    if axis is not None and dim is not None and isinstance(shape, tuple) and \
            dim % len(shape) == axis:
        out: list[bool] = []
        for part in value.args[0]:
            part_shape = shapes.get(part)
            size = part_shape[axis] if isinstance(part_shape, tuple) else 0
            out += _value_rows(part, shapes, image, axis, size)
        if len(out) == length:
            return out
    if axis is not None and _op_name(value) in ("repeat", "expand", "repeat_interleave") \
            and isinstance(value.args[0], fx.Node) and isinstance(shapes.get(value.args[0]),
                                                                  tuple) \
            and len(shapes[value.args[0]]) > axis and shapes[value.args[0]][axis] == 1 \
            and length > 1:
        return [False] * length   # one row copied to fill the sequence: padding
    return [value in image] * length


# Ops that return a view of their first argument (a write into the view writes into it).
_VIEWS = {"slice", "select", "view", "reshape", "unsqueeze", "squeeze", "transpose",
          "permute", "expand", "narrow", "as_strided", "unflatten", "flatten", "t",
          "movedim", "diagonal", "alias", "split", "chunk", "unbind", "getitem"}


# In-place ops that write rows (another tensor's values, or constants into some rows);
# elementwise arithmetic in place (x.div_(d)) moves no rows and is not among them.
_ROW_WRITES = {f"{name}_" for name in _ROW_PLACING} | {"copy_", "masked_fill_", "fill_",
                                                        "zero_"}
# Where each of them takes the values it writes (None: a constant).
_WRITTEN_AT = {"copy_": (1, "src"), "index_put_": (2, "values"), "index_copy_": (3, "source"),
               "index_add_": (3, "source"), "index_fill_": (3, "value"),
               "scatter_": (3, "src"), "scatter_add_": (3, "src"),
               "scatter_reduce_": (3, "src"), "masked_scatter_": (2, "source"),
               "put_": (2, "source"), "masked_fill_": (2, "value"), "fill_": (1, "value"),
               "zero_": None}


def _written_value(write: fx.Node) -> Any:
    """The values an in-place write writes (a node, or a constant)."""
    at = _WRITTEN_AT.get(_op_name(write))
    if at is None:
        return None
    position, keyword = at
    return write.args[position] if len(write.args) > position else write.kwargs.get(keyword)


def _refuse_in_place_writes(graph: fx.Graph, upstream: set[fx.Node], image: set[fx.Node],
                            kind=None, mixed=None) -> None:
    """An in-place write (``copy_``, ``index_put_``, ``fill_``: what an exported graph keeps
    of ``buf[:, :t] = text``) into a tensor the blocks' input is built from (``upstream``),
    or into a view of it, changes rows the row analysis follows by data flow alone.

    It is allowed when it cannot change which rows are image rows: every row of the
    tensor is of one kind (``kind(node)``: True image, False other, None mixed or unknown)
    and the values written are of that kind too (GlmImage zeroes dropped prior rows,
    ``prior[drop] *= 0``; WanAnimate adds the pose to the frames after the first,
    ``x[:, :, 1:] = x[:, :, 1:] + pose``); ``mixed(sum_node, operands)`` refuses a written
    value that adds another input's rows to image rows.  Anything else is refused."""
    kind = kind or (lambda n: None)

    def uses(n: fx.Node) -> list[fx.Node]:   # the users that take ``n`` as their tensor
        return [u for u in n.users if u.args and u.args[0] is n]

    def views(n: fx.Node) -> list[fx.Node]:
        return [u for u in uses(n) if _op_name(u) in _VIEWS or (
            u.op == "call_function" and u.target is operator.getitem)]

    for node in [n for n in graph.nodes if n in upstream]:
        for n in _walk([node], views):
            for user in uses(n):
                name = _op_name(user)
                if name in _ROW_WRITES:
                    target = kind(node)
                    value = _written_value(user)
                    written = kind(value) if isinstance(value, fx.Node) else False
                    if target is not None and written == target and (
                            mixed is None or not written or mixed(value)):
                        continue   # rows of one kind written with values of that kind
                    what = "a constant" if not isinstance(value, fx.Node) else value.name
                    why = ("its rows are not all of one kind (image rows beside others)"
                           if target is None else
                           f"the values written ({what}) mix image and other rows"
                           if written is None else
                           f"it holds {'image' if target else 'non-image'} rows and the "
                           f"write puts {'image' if written else 'non-image'} values "
                           f"({what}) into some of them")
                    raise TokenAxisError(
                        f"{user.name!r} ({name}) writes in place into {node.name!r}, from "
                        f"which the blocks' input is built, and {why}; which of its rows "
                        f"are image tokens cannot be followed through the write. Pass "
                        f"prefix_tokens=<count of leading rows to keep> to route(), or use "
                        f"front_end='concrete'")


# Ops that rearrange axes without moving rows along the token axis (a reshape that keeps
# the token axis and the axes before it).
_RESHAPES = {"reshape", "view", "_unsafe_view", "flatten", "unflatten", "unsqueeze", "squeeze"}


def _source_axis(node: fx.Node, axis: int, shapes: Mapping) -> tuple[fx.Node, int] | None:
    """``(input, its axis)`` whose rows are ``node``'s rows along ``axis``, when ``node``
    only permutes or reshapes its input (HiDream pads its tokens in a ``[B, C, N, p*p]``
    buffer, then permutes and reshapes it into the stream); None otherwise."""
    source = node.args[0] if node.args else None
    shape = shapes.get(node)
    before = shapes.get(source) if isinstance(source, fx.Node) else None
    if not (isinstance(before, tuple) and all(isinstance(d, int) for d in before)):
        return None
    name = _op_name(node)
    if name == "permute":
        dims = node.kwargs.get("dims", node.args[1:])
        dims = dims[0] if len(dims) == 1 and isinstance(dims[0], (list, tuple)) else dims
        if len(dims) == len(before) and all(isinstance(d, int) for d in dims):
            return source, dims[axis] % len(before)
    elif name in ("transpose", "swapaxes", "swapdims") and len(node.args) == 3 and \
            all(isinstance(d, int) for d in node.args[1:]):
        d0, d1 = (d % len(before) for d in node.args[1:])
        return source, {d0: d1, d1: d0}.get(axis, axis)
    elif name in _RESHAPES:
        for j, d in enumerate(before):
            if d == shape[axis] and math.prod(before[:j]) == math.prod(shape[:axis]):
                return source, j
    return None


# Elementwise ops that add one value's rows to another's (where: refused on its own).
_SUMS = {"add", "sub", "rsub"}


def _value_sources(node: fx.Node) -> list[fx.Node]:
    """The forward arguments whose values (not only metadata) ``node`` is computed from."""
    return [n for n in _walk([node], lambda n: [
        i for i in n.all_input_nodes if not _is_metadata(i) and _reads_values_of(n, i)])
        if n.op == "placeholder"]


# Elementwise ops by which a per-row factor can zero an operand's rows (a mask).
_GATES = {"mul", "div", "where", "masked_fill"}


def _row_gate(value: fx.Node, image_inputs: Sequence[fx.Node], image: set[fx.Node],
              shapes: Mapping, tokens: Sequence[int]) -> tuple[fx.Node, list] | None:
    """Where the image rows of ``value`` are multiplied (or replaced) by a factor computed
    from another forward argument with one of the ``tokens`` row counts (Ideogram4's
    ``x * image_mask``: a
    mask that chooses which rows hold the image), as ``(node, argument names)``; None when
    no such gate is on the way from the image input."""
    todo, seen = [value], set()
    while todo:
        n = todo.pop()
        if n in seen or n not in image:
            continue
        seen.add(n)
        inputs = [i for i in n.all_input_nodes if _reads_values_of(n, i)]
        if _op_name(n).rstrip("_") in _GATES:
            for i in inputs:
                if i in image or not isinstance(shapes.get(i), tuple):
                    continue
                others = _other_arguments(i, image_inputs, shapes, tokens)
                if others:
                    return n, others
        todo.extend(inputs)
    return None


def _other_arguments(value: fx.Node, image_inputs: Sequence[fx.Node], shapes: Mapping,
                     tokens: Sequence[int]) -> list[str]:
    """The forward arguments other than the image input that ``value`` is computed from
    and that have one of the ``tokens`` row counts on some axis."""
    return [p.target for p in _value_sources(value) if p not in image_inputs
            and isinstance(shapes.get(p), tuple) and any(t in shapes[p] for t in tokens)]


def _refuse_mixed_rows(node: fx.Node, layouts: Mapping[fx.Node, list[tuple[int, bool]]],
                       image_inputs: Sequence[fx.Node], shapes: Mapping,
                       tokens: Sequence[int], image: set[fx.Node] | None = None) -> None:
    """A sum of token-aligned values, one with image rows and one whose rows are all
    computed from another forward argument with as many rows as the sum or the stream
    (``tokens``: a write into some rows of the stream adds slices; Ideogram4 packs image and
    text tokens in one sequence: ``x * image_mask + text * text_mask``): each row is an
    image or another token depending on values tread_fx does not read; refused.

    With ``image`` (the values computed from the image input), only when the image rows
    are gated by a factor from another forward argument (:func:`_row_gate`): without one,
    every row keeps its image values and the other input conditions it row by row
    (GlmImage adds embedded prior tokens to the image tokens)."""
    imaged = [v for v, layout in layouts.items() if any(f for _, f in layout)]
    if not imaged:
        return
    gate = next((g for g in (_row_gate(v, image_inputs, image, shapes, tokens)
                             for v in imaged) if g), None) if image is not None else None
    if image is not None and gate is None:
        return
    gated = f" ({gate[0].name!r} multiplies the image rows by values from {gate[1]})" \
        if gate else ""
    for value, layout in layouts.items():
        if any(f for _, f in layout):
            continue
        others = _other_arguments(value, image_inputs, shapes, tokens)
        if others:
            raise TokenAxisError(
                f"{node.name!r} ({_op_name(node)}) adds {value.name!r}, computed from the "
                f"forward argument(s) {others} (as many rows), to rows computed from "
                f"the image input, row for row: the blocks' stream mixes the image with "
                f"another input on the same rows{gated} (image and text tokens "
                f"packed in one sequence and chosen by masks, x * image_mask + text * "
                f"text_mask?), so "
                f"which rows are image tokens depends on input values tread_fx does not "
                f"read. Routing could drop text rows. Pass prefix_tokens=<count of leading "
                f"rows to keep> to route() if the image rows always come after that many "
                f"other rows (prefix_tokens=0 if every row is an image token and "
                f"{value.name!r} only conditions it)")


def fixed_rows(graph: fx.Graph, chain_input: fx.Node, shapes: Mapping | None,
               token_axis: int = 1, streams: Mapping[fx.Node, tuple[Any, Any]] | None = None
               ) -> tuple[int, int] | None:
    """Rows of the blocks' input that must never be routed: ``(head, tail)``.

    Follows the chain's input back to the concatenations on the token axis that built it;
    each concatenated part is image rows (computed from the image input) or not (class,
    register, time, text tokens, padding).  The image rows must be one contiguous run;
    everything before it is ``head``, after it ``tail``.  Without shapes the sizes are
    unknown: returns ``None`` when a concatenation on the token axis may build the input
    (the caller refuses), ``(0, 0)`` otherwise.
    """
    if shapes is None:
        upward = _walk([chain_input], lambda n: [i for i in n.all_input_nodes
                                                 if not _is_metadata(i)])
        return None if any(_cat_dim(n) in (1, -2) for n in upward) else (0, 0)
    upstream = nx.ancestors(data_flow(graph), chain_input) | {chain_input}
    stream_tokens = shapes[chain_input][token_axis]
    image_inputs, sure = _image_inputs(graph, upstream)
    image = _image_rows_of(image_inputs, streams)
    memo: dict[tuple[fx.Node, int], Any] = {}

    def rows(node: fx.Node, axis: int = token_axis) -> list[tuple[int, bool]] | None:
        """[(length, is image)] along ``axis`` of ``node``, or None if not a tensor."""
        if (node, axis) in memo:
            return memo[node, axis]
        memo[node, axis] = None
        shape = shapes.get(node)
        if not (isinstance(shape, tuple) and len(shape) > axis
                and all(isinstance(d, int) for d in shape)):
            return None
        rank = len(shape)
        whole = [(shape[axis], node in image)]
        dim = _cat_dim(node)
        source = _source_axis(node, axis, shapes)
        if dim is not None and dim % rank == axis:
            parts = []
            for p in node.args[0]:
                got = rows(p, axis) or [(shapes[p][axis], p in image)]
                parts += got
            result = parts
        elif node.op in ("placeholder", "get_attr"):
            result = whole
        elif _op_name(node).rstrip("_") in _ROW_PLACING and node in image and \
                _places_rows(node, axis, rank):
            raise TokenAxisError(
                f"{node.name!r} ({_op_name(node)}) places rows of the blocks' stream at "
                f"positions given by an index tensor, so which rows are image tokens depends "
                f"on input values that tread_fx does not read. Pass prefix_tokens=<count> to "
                f"route() if the image rows always come after that many other rows")
        elif node.op == "call_function" and node.target is assign_index:
            try:
                result = _one_layout(node, per_sample(node, axis))
            except TokenAxisError:
                # at rows it cannot read (a mask, an index tensor): harmless when the
                # rows written and the values written are all of one kind
                base, value = node.args[0], node.args[2]
                target = kind(base) if isinstance(base, fx.Node) else None
                written = kind(value) if isinstance(value, fx.Node) else False
                if target is None or written != target or (written and not mixed(value)):
                    raise
                result = [(shape[axis], target)]
        elif source is not None:
            result = rows(*source) or whole
        else:
            aligned = [i for i in node.all_input_nodes if isinstance(shapes.get(i), tuple)
                       and len(shapes[i]) == rank and shapes[i][axis] == shape[axis]]
            if _op_name(node).rstrip("_") in _SUMS:
                _refuse_mixed_rows(node, {i: rows(i, axis) or [] for i in aligned},
                                   image_inputs, shapes, (shape[axis], stream_tokens), image)
            layouts = {tuple(r) for r in (rows(i, axis) for i in aligned) if r and len(r) > 1}
            stacked = _stacked_rows(node, shapes, image, axis, rank) \
                if not aligned else None
            if stacked is not None:
                layouts = {tuple(stacked)}
            elif not aligned and node in image and sum(
                    1 for i in node.all_input_nodes if _reads_values_of(node, i) and
                    isinstance(shapes.get(i), tuple) and len(shapes[i]) >= 2 and
                    _value_sources(i)) > 1:
                # the token axis is made here (pad_sequence, stack, a reshape) from image
                # values and other inputs' (a weight, as of a strided convolution that
                # patchifies, is none): which rows are which cannot be followed
                raise TokenAxisError(
                    f"{node.name!r} ({_op_name(node) or node.op}) builds the token axis of "
                    f"the blocks' input from the image and from other values (text?), in a "
                    f"way tread_fx cannot follow row by row. Pass prefix_tokens=<count> to "
                    f"route() if the image rows always come after that many other rows")
            if len(layouts) > 1:
                raise TokenAxisError(
                    f"{node.name!r} combines token sequences laid out differently "
                    f"({sorted(layouts)}); which rows are image tokens cannot be decided. "
                    f"Pass prefix_tokens=<count> to route()")
            result = list(layouts.pop()) if layouts else whole
        merged: list[tuple[int, bool]] = []
        for length, is_image in result:
            if merged and merged[-1][1] == is_image:
                merged[-1] = (merged[-1][0] + length, is_image)
            else:
                merged.append((length, is_image))
        memo[node, axis] = merged
        return merged

    def per_sample(node: fx.Node, axis: int) -> list[list[bool]]:
        """Per sample, per row: image or not, for a tensor written into by assign_index."""
        base = node.args[0]
        if isinstance(base, fx.Node) and base.op == "call_function" and \
                base.target is assign_index:
            before = per_sample(base, axis)
        else:
            layout = rows(base, axis) or [(shapes[node][axis], base in image)]
            batch = shapes[node][1 - axis if axis in (0, 1) else 0]
            before = [[f for length, f in layout for _ in range(length)]] * batch
        return _written_rows(node, before, shapes, image, axis, len(shapes[node]),
                             lambda value: rows(value, axis))

    def kind(node: fx.Node) -> bool | None:
        """True when every row of ``node`` is computed from the image input, False when
        none is; None when an op upstream lays out rows of both kinds side by side (a
        concatenation, a stack, an indexed write, a ``where``)."""
        if not isinstance(shapes.get(node), tuple):
            return None
        todo, seen = [node], set()
        while todo:
            n = todo.pop()
            if n in seen:
                continue
            seen.add(n)
            sources = [i for i in n.all_input_nodes if _reads_values_of(n, i)
                       and isinstance(shapes.get(i), tuple) and shapes[i]]
            name = _op_name(n)
            lays_out = _cat_dim(n) is not None or name in ("stack", "pad_sequence", "where") \
                or (n.op == "call_function" and n.target is assign_index) \
                or name.rstrip("_") in _ROW_PLACING
            if lays_out and len({i in image for i in sources}) > 1:
                return None
            todo.extend(sources)
        return node in image

    def mixed(value: fx.Node) -> bool:
        """Refuses a written value that sums another input's rows into image rows (as
        :func:`_refuse_mixed_rows` does for the stream); True otherwise."""
        imaged = [value] if value in image else []
        for n in _walk(imaged, lambda n: [i for i in n.all_input_nodes if i in image]):
            if _op_name(n).rstrip("_") in _SUMS:
                _refuse_mixed_rows(n, {i: [(1, i in image)] for i in n.all_input_nodes},
                                   image_inputs, shapes, (stream_tokens,), image)
        return True

    _refuse_in_place_writes(graph, upstream, image, kind, mixed)
    for node in upstream:
        cond = node.args[0] if _op_name(node) == "where" and len(node.args) == 3 else None
        values = [v for v in node.args[1:] if isinstance(v, fx.Node)] if cond is not None \
            else []
        if isinstance(cond, fx.Node) and isinstance(shapes.get(cond), tuple) and \
                sum(d > 1 for d in shapes[cond]) >= 1 and any(v in image for v in values) \
                and any(v not in image for v in values):
            raise TokenAxisError(
                f"{node.name!r} (where) replaces rows of values the blocks' input is built "
                f"from by another value (a pad token?) at positions a mask chooses, so which "
                f"rows are image tokens depends on the mask's values. Pass "
                f"prefix_tokens=<count> to route() if the image rows always come after that "
                f"many other rows")
    layout = rows(chain_input) or [(shapes[chain_input][token_axis], True)]
    if not any(is_image for _, is_image in layout):
        raise TokenAxisError(
            f"no row of the blocks' input {chain_input.name!r} is computed from the image "
            f"input as far as tread_fx can follow, so which rows may be routed is unknown; "
            f"pass prefix_tokens=<count of leading rows to keep> to route()")
    if len(layout) == 1:
        return (0, 0)
    if not sure:
        names = [n.target for n in graph.nodes if n.op == "placeholder" and n in upstream]
        raise TokenAxisError(
            f"the blocks' input {chain_input.name!r} concatenates rows computed from several "
            f"forward arguments ({names}) and none is named like the image input "
            f"({', '.join(IMAGE_NAMES[:4])}, ...), so which rows may be routed is unknown; "
            f"pass prefix_tokens=<count of leading rows to keep> to route()")
    runs = [i for i, (_, is_image) in enumerate(layout) if is_image]
    if len(runs) != 1:
        parts = " + ".join(f"{n} {'image' if im else 'other'}" for n, im in layout)
        raise TokenAxisError(
            f"the blocks' input {chain_input.name!r} concatenates {parts} rows; "
            f"tread_fx routes one contiguous run of image rows and keeps the others. Pass "
            f"prefix_tokens=<count> to route() if the leading rows are the only ones to keep")
    head = sum(n for n, _ in layout[:runs[0]])
    tail = sum(n for n, _ in layout[runs[0] + 1:])
    return head, tail


def plan_routes(graph: fx.Graph, chain: BlockChain, routes: Sequence[Route],
                shapes: Mapping[fx.Node, Any] | None,
                annotations: Mapping[Any, Any] | None = None,
                prefix: int | None = None, root: torch.nn.Module | None = None,
                other_batch: Mapping[str, Mapping[str, Any]] | None = None
                ) -> list[RoutePlan]:
    """One :class:`RoutePlan` per route, from the graph before the rewrite.

    ``shapes`` come from :func:`probe_shapes` and ``other_batch`` from
    :func:`probe_block_io` (the blocks' argument shapes at another batch size).
    """
    from .find_blocks import _param_names
    annotations = dict(annotations or {})
    used: set = set()
    other_batch = other_batch or {}
    blocks = block_nodes(graph, chain.targets)
    flow = data_flow(graph)
    streams = {b: (chain.hidden_in[i], chain.hidden_out[i]) for i, b in enumerate(blocks)}
    route_axes = []
    for i, route in enumerate(routes):
        first = blocks[route.start]
        x_in = hidden_input(first, chain.hidden_in[route.start])
        route_axes.append((0, 1) if shapes is None else hidden_axes(
            shapes[x_in], other_batch.get(first.target, {}).get(str(chain.hidden_in[route.start])),
            f"route {i} ({route}): block {first.target!r}"))
    fixed_of: dict[int, tuple[int, int]] = {}

    def segment_fixed(index: int, axes: tuple[int, int]) -> tuple[int, int]:
        """Never-routed rows of the stream the segment holding block ``index`` takes."""
        start = chain.segment_start(index)
        if start not in fixed_of:
            stream = hidden_input(blocks[start], chain.hidden_in[start])
            found = (prefix, 0) if prefix is not None else \
                fixed_rows(graph, stream, shapes, axes[1], streams)
            if found is None:
                raise TokenAxisError(
                    f"the blocks' input {stream.name!r} may be built by concatenating "
                    f"tokens (class, time or text tokens beside the image tokens?) and "
                    f"without example inputs their count is unknown; pass "
                    f"example_inputs=... to route(), or prefix_tokens=<count> (0 routes "
                    f"them like every other token)")
            fixed_of[start] = found
        return fixed_of[start]

    plans = []
    for route, axes in zip(routes, route_axes):
        try:
            fixed = segment_fixed(route.start, axes)
        except TokenAxisError as err:
            first = blocks[chain.segment_start(route.start)].target
            raise TokenAxisError(f"route {routes.index(route)} ({route}), the stream block "
                                 f"{first!r} takes: {err}") from None
        span = blocks[route.start:route.end + 1]
        x_in = hidden_input(span[0], chain.hidden_in[route.start])
        x_key = str(chain.hidden_in[route.start])
        out = hidden_output(span[-1], chain.hidden_out[route.end])
        inside = span_nodes(flow, span, out)
        plan = RoutePlan(inside=inside, fixed=fixed, axes=axes,
                         shapes_known=shapes is not None)
        hidden = shapes.get(x_in) if shapes else None
        if hidden is not None:
            plan.tokens = hidden[axes[1]]
            if shapes.get(out) != hidden:
                raise TokenAxisError(
                    f"route {routes.index(route)} ({route}): the stream enters block "
                    f"{span[0].target!r} with shape {hidden} but leaves block "
                    f"{span[-1].target!r} with shape {shapes.get(out)}: the blocks of the "
                    f"route do not carry one token stream (the chain joins two kinds of "
                    f"blocks). Route blocks on one side of {span[0].target!r}.."
                    f"{span[-1].target!r}, or name the container with blocks='<path>'")
        if hidden is not None:
            _refuse_token_counts(span, shapes, root, annotations, used, routes.index(route),
                                 route, plan.tokens, plan.tokens - fixed[0] - fixed[1])
        seen: dict[fx.Node, SideInput] = {}
        for block in [n for n in graph.nodes if n in inside]:
            is_block = block in span
            items = list(_argument_items(block)) if is_block else \
                [(f"{i}", a) for i, a in enumerate(block.all_input_nodes)]
            where = block.target if is_block else block.name
            names = _param_names(root.get_submodule(block.target)) if is_block and root else []
            observed = other_batch.get(block.target, {}) if is_block else {}
            for arg, value in items:
                if value in inside or value in seen:
                    continue
                if block is span[0] and arg == x_key:
                    continue   # the stream itself, gathered by the route
                side = SideInput(value, f"{where}:{arg}", ())
                found, axis = _annotation(side, annotations, names, used) if is_block \
                    else (False, None)
                layout = axis if found and axis in JOINT_LAYOUTS else None
                if layout is not None:   # a joint table's row order, said by the user
                    found, axis = False, None
                shape = shapes.get(value) if shapes else None
                batch_axes = _changed_axes(shape, observed.get(arg)) if shape else None
                if found:
                    side = _annotated(side, axis, shape, batch_axes,
                                      hidden[axes[0]] if hidden else None)
                elif hidden is not None and _other_stream(value, chain) and \
                        isinstance(shape, tuple) and len(shape) >= 3 and \
                        hidden[axes[1]] in shape[1:-1]:   # not the feature axis
                    raise TokenAxisError(
                        f"{side.arg} ({value.name}, shape {shape}) is the other stream a "
                        f"chain block returns (text?), and it has as many rows as the "
                        f"routed tokens ({hidden[axes[1]]}): whether it is per-token is "
                        f"ambiguous; say so with token_inputs={{{_base_name(side.arg)!r}: "
                        f"None}} (another stream) or an axis")
                elif hidden is not None:
                    stream_lengths = [shapes[v][1] for a, v in items
                                      if v is not value and v is not x_in and v not in inside
                                      and isinstance(shapes.get(v), tuple)
                                      and len(shapes[v]) >= 3 and shapes[v][0] == hidden[0]
                                      and isinstance(shapes[v][1], int)
                                      and shapes[v][1] > 1]   # a broadcast axis: no stream
                    name = _base_name(side.arg)
                    key = names[int(name)] if name.isdigit() and int(name) < len(names) \
                        else name
                    side = _classify(side, shape, batch_axes, hidden[axes[0]],
                                     hidden[axes[1]], hidden[-1] if len(hidden) > 2 else None,
                                     stream_lengths, key)
                    if side.offset:
                        first = _image_rows_first(value, shapes, hidden[axes[1]], side.offset)
                        if layout is not None:
                            first = layout == "tokens_first"
                        if first is None:
                            raise TokenAxisError(
                                f"route {routes.index(route)} ({route}): {side.arg} "
                                f"({value.name}, shape {shape}) is a joint table of "
                                f"{side.offset} rows of another stream and {hidden[axes[1]]} "
                                f"token rows, and no concatenation upstream shows which come "
                                f"first (it is built another way: a mask filled by position?); "
                                f"gathering the wrong rows would be silently wrong. Say so "
                                f"with token_inputs={{{_base_name(side.arg)!r}: "
                                f"'tokens_first'}} ([image, other]) or 'tokens_last' "
                                f"([other, image])")
                        if first:   # [image, other]: the other stream's rows follow
                            side.offset, side.tail = 0, side.offset
                seen[value] = side
        plan.side = list(seen.values())
        plan.shared_indices = any(s.routed and not s.batched for s in plan.side)
        # values computed on the kept tokens and used after the route
        side = side_outputs(span, chain)
        for node in [n for n in graph.nodes if n in inside and n is not out]:
            if node in side:
                continue   # checked when the routed graph first runs
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
    unknown = [k for k in annotations if k not in used]
    if unknown:
        takes = sorted({f"{n.target}:{a}" for p in plans for n in graph.nodes
                        if n in p.inside and n.op == "call_module" for a, _ in
                        _argument_items(n)})
        raise ValueError(
            f"token_inputs: {', '.join(repr(k) for k in unknown)} is not an argument that the "
            f"routed blocks receive from outside their route; they take: {takes}. Name an "
            f"argument by its name in the block's forward or its position")
    return plans


#: ``token_inputs`` values that give a joint table's row order instead of an axis.
JOINT_LAYOUTS = ("tokens_first", "tokens_last")


def _image_rows_first(table: fx.Node, shapes: Mapping, tokens: int,
                      other: int) -> bool | None:
    """Whether a joint table of ``other + tokens`` rows is built by a concatenation with the
    ``tokens`` rows first (HiDream: ``cat([img_ids, txt_ids])``) or last (Flux), the nearest
    such concatenation upstream deciding; None when none says (the caller refuses)."""
    todo, seen = [table], set()
    while todo:
        node = todo.pop(0)
        if node in seen:
            continue
        seen.add(node)
        dim = _cat_dim(node)
        if dim is not None and tokens != other:
            try:
                sizes = [shapes[p][dim] for p in node.args[0]]
            except (KeyError, IndexError, TypeError):
                sizes = []
            if sizes in ([tokens, other], [other, tokens]):
                return sizes[0] == tokens
        pads = _last_axis_pads(node, shapes)
        if pads is not None and tokens != other:
            before, after = pads
            size = shapes.get(node.args[0]) if isinstance(node.args[0], fx.Node) else None
            if isinstance(size, tuple) and size and size[-1] == other and \
                    sorted((before, after)) == [0, tokens]:
                return before == tokens   # rows padded in front of the other stream's
        todo.extend(node.all_input_nodes)
    return None


def _last_axis_pads(node: fx.Node, shapes: Mapping) -> tuple[int, int] | None:
    """``(before, after)`` rows a constant pad adds on the last axis (``F.pad(mask,
    (n, 0), value=True)``: a concatenation with a constant block); None for other nodes.
    Traced sizes (``h.shape[1]``) are read from ``shapes``."""
    if _op_name(node) not in ("pad", "constant_pad_nd") or len(node.args) < 2 or \
            not isinstance(node.args[1], (list, tuple)):
        return None
    pads = [shapes.get(p) if isinstance(p, fx.Node) else p for p in node.args[1]]
    if not (isinstance(pads, (list, tuple)) and len(pads) >= 2 and
            all(isinstance(p, int) for p in pads[:2]) and not any(pads[2:])):
        return None
    mode = node.kwargs.get("mode", node.args[2] if len(node.args) > 2 else "constant")
    return (pads[0], pads[1]) if mode == "constant" else None


def _refuse_token_counts(span: Sequence[fx.Node], shapes: Mapping, root, annotations: Mapping,
                         used: set, index: int, route: Route, tokens: int,
                         routable: int) -> None:
    """A routed block told the token count as a number (``original_context_length=N``)
    would compute with the dense count on the kept tokens: refused, unless ``token_inputs``
    says the argument is not per-token."""
    for block in span:
        params = list(inspect.signature(root.get_submodule(block.target).forward)
                      .parameters.values()) if root else []
        named = [p.name for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
        takes_any = {p.name for p in params if p.kind is p.VAR_KEYWORD}
        for arg, value in _items(block.args, block.kwargs):
            number = shapes.get(value) if isinstance(value, fx.Node) else value
            if isinstance(number, bool) or not isinstance(number, int) or \
                    number not in {tokens, routable} or number < 2:
                continue
            top = arg.split("[")[0]
            if top.isdigit() and int(top) >= len(named) or (
                    not top.isdigit() and top not in named and takes_any):
                continue   # swallowed by *args / **kwargs (diffusers' deprecated arguments)
            key = named[int(arg)] if arg.isdigit() else arg
            if key in annotations or arg in annotations:
                used.add(key if key in annotations else arg)
                continue
            raise TokenAxisError(
                f"route {index} ({route}): block {block.target!r} gets the number {number} "
                f"as argument {key!r}, the count of its {'' if number == tokens else 'image '}"
                f"tokens; inside the route it sees {'fewer' if routable else 'other'} tokens "
                f"and would compute with the dense count (e.g. split the stream at the wrong "
                f"row). Route other blocks, or if the number does not count tokens, say so "
                f"with token_inputs={{{key!r}: None}}")


def _other_stream(value: Any, chain: BlockChain) -> bool:
    """Whether ``value`` is an output of a chain block other than its token stream."""
    if not (isinstance(value, fx.Node) and value.op == "call_function"
            and value.target is operator.getitem and isinstance(value.args[0], fx.Node)
            and value.args[0].op == "call_module" and value.args[0].target in chain.targets):
        return False
    return value.args[1] != chain.hidden_out[chain.targets.index(value.args[0].target)]


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
