"""Guards: what a traced graph was specialised on, checked at every call.

A graph traced on example inputs (the concrete front end) has Python decisions baked in:
input shapes, dtypes and devices, non-tensor arguments, the autocast state, the training
flags of the modules it traced through, and every Python conversion of a value computed
from tensor data (``if (t > 0.5).all():``).  :class:`Guard` computes, for a call, the key of
everything but the last; :func:`value_guards` extracts the computation of each converted
value into a small graph that runs before the forward, so a branch that would go the
other way is seen before anything runs.  A converted value that cannot be recomputed
cheaply and without side effects (it comes out of a module call, or from random numbers)
is refused with its source line.
"""

from __future__ import annotations

import inspect
from dataclasses import dataclass
from typing import Any, Sequence

import torch
from torch import fx, nn

from .find_blocks import op_name
from .token_axes import _is_metadata, _value_descendants, _walk
from .trace import DATA_SHAPED, TRACED_PLAIN, TraceError, _Bound

__all__ = ["Guard", "ValueGuards", "describe_difference", "freeze", "value_guards"]

_RANDOM = {"rand", "randn", "randint", "rand_like", "randn_like", "randint_like", "bernoulli",
           "multinomial", "normal", "dropout", "randperm", "uniform_", "normal_", "bernoulli_",
           "exponential_", "random_"}


def freeze(value: Any, free: tuple[int, ...] = ()) -> Any:
    """A hashable record of what a graph depends on in an argument: a tensor's shape (but
    the ``free`` dims, which a graph checks itself), dtype and device; a container's
    structure; any other value itself."""
    if isinstance(value, torch.Tensor):
        shape = tuple(None if i in free else d for i, d in enumerate(value.shape))
        return ("tensor", shape, value.dtype, value.device)
    if isinstance(value, (list, tuple)):
        return (type(value).__name__, tuple(freeze(v) for v in value))
    if isinstance(value, dict):
        return ("dict", tuple((k, freeze(v)) for k, v in value.items()))
    try:
        hash(value)
    except TypeError:
        raise TypeError(
            f"an argument of type {type(value).__name__} cannot be compared from one call to "
            f"the next (it is not hashable), and the traced graph depends on its value; pass "
            f"numbers, strings, tuples, dicts of them, or tensors") from None
    return value


def _plain(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain(v) for v in value)
    return value is None or isinstance(value, (bool, int, float, str, torch.dtype))


def _as_key(value: Any) -> Any:
    """A plain attribute as a hashable value (lists become tuples)."""
    if isinstance(value, (list, tuple)):
        return tuple(_as_key(v) for v in value)
    return value


def _autocast_state() -> tuple:
    return tuple((device, torch.get_autocast_dtype(device)) for device in ("cpu", "cuda")
                 if torch.is_autocast_enabled(device))


class Guard:
    """Binds a call to the model's forward signature and computes its specialisation key.

    ``inputs=False`` (a graph traced symbolically, valid for any input) keys on the
    training flags alone.
    """

    def __init__(self, model: nn.Module, routed: nn.Module, modules: Sequence[nn.Module],
                 tensors: Sequence[tuple[nn.Module, str]], inputs: bool) -> None:
        sig = inspect.signature(model.forward)
        self.params = [p for p in sig.parameters.values()
                       if p.kind is not inspect.Parameter.VAR_POSITIONAL]
        self.positional = [p.name for p in self.params if p.kind in (
            inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
        self.var_keyword = next((p.name for p in self.params
                                 if p.kind is inspect.Parameter.VAR_KEYWORD), None)
        self.defaults = {p.name: p.default for p in self.params
                         if p.default is not inspect.Parameter.empty}
        if self.var_keyword:
            self.defaults[self.var_keyword] = {}
        self.names = [p.name for p in self.params]
        self.modules = [routed, *modules]      # the routed root, then traced-through modules
        # plain attributes the traced code may have read (self.scale, self.use_skip)
        self.attrs = [(m, name) for m in (model, *modules) for name, v in vars(m).items()
                      if not name.startswith("_") and name != "training" and _plain(v)]
        self.tensors = list(tensors)           # (module, name) of tensors the graph reads
        self.inputs = inputs
        self.class_name = type(model).__name__
        # dims left out of the key, per argument: the batch dims of graphs that serve any
        # batch size (each such graph checks them itself)
        self.free_dims: dict[str, tuple[int, ...]] = {}

    def bind(self, args: tuple, kwargs: dict) -> dict[str, Any]:
        """``{parameter: value}`` like :func:`~tread_fx.passes.trace.bind_inputs`, fast."""
        if len(args) > len(self.positional):
            raise TypeError(f"{self.class_name}.forward takes {len(self.positional)} positional "
                            f"arguments but {len(args)} were given")
        call = _Bound(zip(self.positional, args))
        for name, value in kwargs.items():
            if name in call:
                raise TypeError(f"{self.class_name}.forward got multiple values for argument "
                                f"{name!r}")
            if name in self.names and name != self.var_keyword:
                call[name] = value
            elif self.var_keyword:
                call.setdefault(self.var_keyword, {})[name] = value
            else:
                raise TypeError(f"{self.class_name}.forward got an unexpected keyword argument "
                                f"{name!r}")
        for name in self.names:
            if name not in call:
                if name not in self.defaults:
                    raise TypeError(f"{self.class_name}.forward missing required argument "
                                    f"{name!r}")
                call[name] = self.defaults[name]
        return call

    def key(self, call: dict[str, Any] | None) -> tuple:
        modes = tuple(m.training for m in self.modules)
        attrs = tuple(_as_key(m.__dict__.get(name)) for m, name in self.attrs)
        if not self.inputs:
            return (modes, attrs)
        tensors = []
        for module, name in self.tensors:
            t = module._parameters.get(name)
            if t is None:
                t = module._buffers.get(name)
            if t is not None:
                tensors.append((t.dtype, t.device))
        free = self.free_dims
        try:
            inputs = tuple(freeze(call[n], free.get(n, ())) for n in self.names)
        except TypeError as err:
            raise TypeError(f"{self.class_name}: {err}") from None
        return (modes, attrs, inputs, _autocast_state(), tuple(tensors))

    def describe(self, key: tuple) -> dict[str, Any]:
        """The parts of a key, named (for warnings and messages)."""
        parts = {"training flags": key[0]}
        parts.update((f"attribute {type(m).__name__}.{n}", v)
                     for (m, n), v in zip(self.attrs, key[1]))
        if len(key) > 2:
            parts.update((f"argument {n!r}", v) for n, v in zip(self.names, key[2]))
            parts.update({"autocast": key[3], "parameter dtypes": key[4]})
        return parts


def describe_difference(guard: Guard, new: tuple, old: Sequence[tuple]) -> str:
    """What differs between a key and the closest of the known ones."""
    if not old:
        return "first call"
    mine = guard.describe(new)
    best = min(old, key=lambda k: sum(mine[n] != v for n, v in guard.describe(k).items()))
    theirs = guard.describe(best)
    diff = [f"{n}: {theirs[n]!r} -> {mine[n]!r}" for n in mine if mine[n] != theirs.get(n)]
    return "; ".join(diff) or "value guards"


def module_tensors(graph: fx.Graph, root: nn.Module) -> list[tuple[nn.Module, str]]:
    """(owning module, name) of every parameter and buffer a graph reads by get_attr."""
    found = []
    for node in graph.nodes:
        if node.op != "get_attr" or node.target.startswith("_tread."):
            continue
        owner, _, name = node.target.rpartition(".")
        try:
            module = root.get_submodule(owner) if owner else root
        except AttributeError:
            continue
        if name in module._parameters or name in module._buffers:
            found.append((module, name))
    return found


def _fixed_size(node: fx.Node) -> bool:
    """A read of a tensor's metadata (``h.size(1)``) whose traced value holds for every call
    of this graph: the graph is keyed on the input shapes, so a size is fixed unless the
    tensor's shape came from its data (checked where it is used)."""
    if TRACED_PLAIN not in node.meta or not _is_metadata(node):
        return False
    name = node.args[1] if node.target is getattr else op_name(node)
    return name in _FIXED_BY_KEY


# metadata the guard key fixes (shapes, dtypes, devices); not strides or requires_grad
_FIXED_BY_KEY = {"size", "shape", "dim", "ndim", "numel", "dtype", "device", "sym_size",
                 "sym_numel"}


def _needed(node: fx.Node) -> set[fx.Node]:
    """The nodes a guard must run to recompute ``node``: its inputs, back to the graph's
    inputs, but not the tensors whose fixed sizes it reads."""
    return set(_walk([node], lambda n: [] if _fixed_size(n) else n.all_input_nodes))


@dataclass
class ValueGuards:
    """Recomputes the converted values from the graph's inputs and compares them."""

    fn: Any                     # compiled guard graph: (root, *placeholders) -> tuple
    kinds: list[str]
    values: list[Any]
    sources: list[str]

    def holds(self, root: nn.Module, args: Sequence[Any]) -> bool:
        with torch.no_grad():
            got = self.fn(root, *args)
        convert = {"bool": bool, "int": int, "float": float}
        return all(convert[k](g) == v for k, g, v in zip(self.kinds, got, self.values))


def value_guards(graph: fx.Graph, conversions: Sequence[tuple[fx.Node, str, Any, str]]
                 ) -> ValueGuards | None:
    """Guards for the conversions of tensor *values* recorded while tracing ``graph``.

    Conversions of shapes (``int(x.shape[1] ** 0.5)``) need none: the input shapes are
    part of the key.  Raises :class:`TraceError` with the source line for a value that
    cannot be recomputed before the forward.
    """
    nodes = set(graph.nodes)
    sources = [n for n in graph.nodes if n.op in ("placeholder", "get_attr")]
    data = _value_descendants(sources)
    picked = []
    for node, kind, value, source in conversions:
        if node not in nodes or node not in data or any(p[0] is node for p in picked):
            continue
        needed = _needed(node)
        bad = [n for n in graph.nodes if n in needed and (
            n.op == "call_module" or getattr(n.target, "__name__", str(n.target)) in _RANDOM
            or _fixed_size(n) and n.all_input_nodes[0].meta.get(DATA_SHAPED))]
        if bad:
            raise TraceError(
                f"{source}\n  the forward converts a tensor value to a Python {kind} "
                f"({value!r}) and branches on it; that value comes from {bad[0].op} "
                f"{getattr(bad[0].target, '__name__', bad[0].target)!s}, so it cannot be "
                f"checked before each call, and a graph fixed to this branch could compute the "
                f"wrong thing for other inputs. Make the branch depend on shapes or arguments, "
                f"or move it into a block")
        picked.append((node, kind, value, source))
    if not picked:
        return None
    needed = set().union(*(_needed(n) for n, *_ in picked))
    guard_graph = fx.Graph()
    env: dict[fx.Node, Any] = {}
    for node in graph.nodes:
        if node in needed and _fixed_size(node):
            env[node] = node.meta[TRACED_PLAIN]
        elif node.op == "placeholder" or node in needed:
            env[node] = guard_graph.node_copy(node, lambda n: env[n])
    guard_graph.output(tuple(env[n] for n, *_ in picked))
    code = guard_graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, "<tread_fx value guards>", "exec"), namespace)  # noqa: S102
    return ValueGuards(namespace["forward"], [p[1] for p in picked], [p[2] for p in picked],
                       [p[3] for p in picked])
