"""Front ends: trace a model into a module-level fx graph with its blocks as leaves.

Blocks stay ``call_module`` nodes, so each block's own code runs unchanged and the rewrite
only has to work at the level of the block sequence.  The model is traced once per mode
(``train`` and ``eval``): code outside the blocks may branch on ``self.training`` (label
dropout in DiT, for instance), and each mode gets the graph of its own branch.

Two front ends produce the same kind of graph:

* ``fx``: ``torch.fx`` symbolic tracing.  Needs no inputs and gives a graph for any shape,
  but fails on Python that branches on shapes (``if x.ndim == 4``, ``int(n ** 0.5)``),
  which diffusers models are full of.
* ``concrete``: the same tracer, but every proxy also carries the real value computed on
  the example inputs, so ``len(x.shape)``, ``x.ndim``, ``int(...)``, ``bool(...)`` and
  ``if`` on shapes see plain Python values.  The graph is specialised to the example's
  input shapes (the routed module checks them at every call).
"""

from __future__ import annotations

import copy
import functools
import inspect
import linecache
import operator
import os
import sys
from collections import OrderedDict
from contextlib import contextmanager
from typing import Any, Iterable, Iterator, Mapping

import torch
from torch import fx, nn

__all__ = ["TraceError", "Traced", "bind_inputs", "frozen_state", "has_tensor", "mode_flags",
           "preserved_attributes", "preserved_modes", "shape_tree", "trace_modes"]

_VALUE = "tread_concrete_value"
# What the concrete tracer keeps of the values once it is done: a plain (non-tensor) value
# such as a size, and whether a tensor's shape came from its data (nonzero, mask indexing).
TRACED_PLAIN = "tread_traced_plain"
DATA_SHAPED = "tread_data_shaped"
_DATA_SHAPED_OPS = {"nonzero", "argwhere", "masked_select", "unique", "unique_consecutive",
                    "nonzero_static", "repeat_interleave"}
# Tensor metadata that is read as a plain value while tracing concretely.
_CONCRETE_ATTRS = {"dtype", "device", "layout", "ndim", "is_cuda", "requires_grad",
                   "is_sparse", "is_quantized", "is_meta"}


class TraceError(RuntimeError):
    """The model could not be traced into a graph."""


class Traced:
    """What a front end produced: one graph per mode, and what the graphs depend on."""

    def __init__(self, graphs: dict[str, fx.Graph], front_end: str,
                 constants: dict[str, torch.Tensor], input_shapes: dict | None) -> None:
        self.graphs = graphs
        self.front_end = front_end
        self.constants = constants
        self.input_shapes = input_shapes
        self.baked: dict[str, Any] = {}   # non-tensor example inputs the graph is made for
        # modules whose forward was traced through (their training flags are baked in)
        self.traced_modules: list[nn.Module] = []
        # per mode: (node, conversion, value, source line) of each Python conversion of a
        # value computed from tensor data (an `if` on tensor values, int(t.max()), ...)
        self.conversions: dict[str, list[tuple[fx.Node, str, Any, str]]] = {}
        self.failures: list[str] = []   # why the front ends tried before this one failed
        # export front end: per mode, the ExportResult (dims it is valid for, check_inputs)
        self.exports: dict[str, Any] = {}
        self.shape_dependent = False   # routes planned on the example's shapes


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Iterable[nn.Module]) -> None:
        super().__init__()
        self._leaf_ids = {id(m) for m in leaves}
        self.traced_through: dict[int, nn.Module] = {}
        self.conversions: list[tuple[fx.Node, str, Any, str]] = []

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        # A module with hooks stays a call, so its hooks keep firing at run time instead
        # of being baked into the graph.
        return (id(m) in self._leaf_ids or _has_hooks(m)
                or super().is_leaf_module(m, module_qualified_name))

    def create_arg(self, a: Any):
        # Dict subclasses (diffusers' ModelOutput) stay what they are: a node that builds
        # one, instead of the plain dict fx would make of it.
        if isinstance(a, dict) and type(a) not in (dict, OrderedDict) and \
                not isinstance(a, fx.Proxy):
            values = {k: self.create_arg(v) for k, v in a.items()}
            return self.create_node("call_function", type(a), (), values)
        return super().create_arg(a)

    def call_module(self, m, forward, args, kwargs):
        if id(m) in self._leaf_ids and _inside_checkpoint():
            raise TraceError(
                f"{type(m).__name__} is called through torch.utils.checkpoint in the model's "
                f"forward; tracing would silently drop the checkpointing. Checkpoint inside "
                f"the block's own forward instead, or turn it off before route()")
        if not self.is_leaf_module(m, ""):
            self.traced_through[id(m)] = m
        return super().call_module(m, forward, args, kwargs)


def _has_hooks(m: nn.Module) -> bool:
    return bool(m._forward_hooks or m._forward_pre_hooks)


def _inside_checkpoint() -> bool:
    frame = sys._getframe(2)
    for _ in range(40):
        if frame is None:
            return False
        if frame.f_code.co_filename.endswith(("utils/checkpoint.py", "utils\\checkpoint.py")):
            return True
        frame = frame.f_back
    return False


def _source_line() -> str:
    """``file:line: code`` of the user's code that is being traced right now."""
    frame = sys._getframe(2)
    here = __file__
    while frame is not None:
        name = frame.f_code.co_filename
        if name != here and f"{os.sep}torch{os.sep}" not in name:
            line = linecache.getline(name, frame.f_lineno).strip()
            return f"{name}:{frame.f_lineno}: {line}"
        frame = frame.f_back
    return "<unknown source>"


class _Concrete:
    """Python conversions answered from the real value instead of failing.

    Each conversion is recorded: one of a value computed from tensor data is a branch the
    graph is specialised on, which the routed module guards (or route() refuses).
    """

    @property
    def concrete(self) -> Any:
        return self.node.meta[_VALUE]

    def _converted(self, kind: str, value: Any) -> Any:
        node = getattr(self, "node", None)
        if node is not None:
            self.tracer.conversions.append((node, kind, value, _source_line()))
        return value

    def __bool__(self) -> bool:
        return self._converted("bool", bool(self.concrete))

    def __int__(self) -> int:
        return self._converted("int", int(self.concrete))

    def __index__(self) -> int:
        return self._converted("int", operator.index(self.concrete))

    def __float__(self) -> float:
        return self._converted("float", float(self.concrete))

    def __len__(self) -> int:
        return len(self.concrete)

    def __iter__(self):
        return (self[i] for i in range(len(self.concrete)))

    def __contains__(self, item) -> bool:
        return item in self.concrete

    def keys(self):
        return self.concrete.keys()

    def __getattr__(self, name: str):
        if name in _CONCRETE_ATTRS:
            return getattr(self.concrete, name)
        if name.startswith("__") and name.endswith("__"):
            # protocol probes (``__cuda_array_interface__``, ``__array__``) are not
            # attributes of the traced value
            raise AttributeError(name)
        return _ConcreteAttribute(self, name)


def assign_index(tensor: torch.Tensor, index: Any, value: Any) -> torch.Tensor:
    """``tensor[index] = value`` as a function: a new tensor, ``tensor`` left as it is.

    The concrete tracer records item assignment (``x[i] = y``, which fx cannot record) as
    this call and lets later code read the result; it checks that nothing else could see
    the in-place write (no view of ``x`` and nothing ``x`` is a view of is used after it)."""
    out = tensor.clone()
    out[index] = value
    return out


def _storage(value: Any) -> int | None:
    if isinstance(value, torch.Tensor) and value.layout is torch.strided and \
            value.untyped_storage().nbytes():
        return value.untyped_storage().data_ptr()
    return None


class _ConcreteProxy(_Concrete, fx.Proxy):
    def __setitem__(self, index: Any, value: Any) -> None:
        old = self.node
        storage = _storage(self.concrete)
        if storage is None:
            raise TypeError(f"item assignment on {type(self.concrete).__name__} "
                            f"({old.name}) cannot be traced")
        aliases = [n for n in old.graph.nodes if n is not old and _VALUE in n.meta
                   and _storage(n.meta[_VALUE]) == storage]
        for n in [old] + aliases:
            if n.op in ("placeholder", "get_attr"):
                raise TypeError(
                    f"{_source_line()}: writes into {'an input' if n.op == 'placeholder' else 'a parameter or buffer'} "
                    f"({n.target}) in place; a traced graph cannot reproduce that")
        new = self.tracer.create_proxy("call_function", assign_index, (self, index, value), {})
        self.tracer.assignments.append((new.node, old, aliases, _source_line()))
        self.node = new.node   # the variable now holds the written tensor


class _ConcreteAttribute(_Concrete, fx.proxy.Attribute):
    @property
    def concrete(self) -> Any:
        return getattr(self.root.concrete, self.attr)

    def _converted(self, kind: str, value: Any) -> Any:
        return value   # an attribute (x.shape): metadata, fixed by the shape guards


# Functions and methods that take sizes as separate arguments (``torch.zeros(b, n)``,
# ``t.expand(b, -1)``): torch's argument parser rejects a proxy as the first of them, so
# while tracing they are called with the sizes packed into one tuple (which it dispatches).
_SIZE_FUNCTIONS = ("zeros", "ones", "empty", "rand", "randn")
_SIZE_METHODS = ("expand", "view", "reshape", "repeat", "permute", "new_zeros", "new_ones",
                 "new_empty")


def _packing(fn: Any, first: int) -> Any:
    @functools.wraps(fn)
    def call(*args, **kwargs):
        sizes = args[first:]
        if len(sizes) > 1 and any(isinstance(a, fx.Proxy) for a in sizes) and \
                all(isinstance(a, (int, fx.Proxy)) for a in sizes):
            return fn(*args[:first], tuple(sizes), **kwargs)
        return fn(*args, **kwargs)
    return call


def _recording_tensor(fn: Any) -> Any:
    """``torch.tensor([n, m])`` with traced numbers in it: a node that builds the tensor."""
    @functools.wraps(fn)
    def call(data, *args, **kwargs):
        proxies = [a for a in _leaves(data) if isinstance(a, fx.Proxy)]
        if proxies:
            return proxies[0].tracer.create_proxy("call_function", fn, (data,) + args, kwargs)
        return fn(data, *args, **kwargs)
    return call


def _leaves(data: Any) -> Iterator[Any]:
    if isinstance(data, (list, tuple)) and not isinstance(data, fx.Proxy):
        for item in data:
            yield from _leaves(item)
    else:
        yield data


@contextmanager
def _sizes_packed() -> Iterator[None]:
    saved = [(torch, name, getattr(torch, name)) for name in _SIZE_FUNCTIONS] + \
        [(torch.Tensor, name, getattr(torch.Tensor, name)) for name in _SIZE_METHODS]
    tensor = torch.tensor
    try:
        for owner, name, fn in saved:
            setattr(owner, name, _packing(fn, 1 if owner is torch.Tensor else 0))
        torch.tensor = _recording_tensor(tensor)
        yield
    finally:
        for owner, name, fn in saved:
            setattr(owner, name, fn)
        torch.tensor = tensor


class _ConcreteTracer(_LeafTracer):
    """Leaf tracer whose nodes carry the values computed on the example inputs."""

    def __init__(self, leaves: Iterable[nn.Module], inputs: Mapping[str, Any]) -> None:
        super().__init__(leaves)
        self._inputs = inputs
        self._computing = 0  # > 0 while real values are computed: record nothing then
        self.assignments: list[tuple[fx.Node, fx.Node, list[fx.Node], str]] = []
        # buffers are values too (``self.freqs[None].expand(x.shape[0], -1)`` must record
        # the expand instead of handing a proxy size to a real tensor's method)
        self.proxy_buffer_attributes = True

    def trace(self, root, concrete_args=None) -> fx.Graph:
        with _sizes_packed():
            graph = super().trace(root, concrete_args)
        order = {n: i for i, n in enumerate(graph.nodes)}
        for written, old, aliases, line in self.assignments:
            for n in [old] + aliases:
                late = [u for u in n.users if order[u] > order[written]]
                if late:
                    raise TypeError(
                        f"{line}: writes in place into a tensor that {late[0].name} reads "
                        f"afterwards through {'a view' if n is not old else 'another reference'} "
                        f"({n.name}); the traced graph would miss the write")
        return graph

    def call_module(self, m, forward, args, kwargs):
        if self._computing:
            return forward(*args, **kwargs)
        return super().call_module(m, forward, args, kwargs)

    def getattr(self, attr, attr_val, parameter_proxy_cache):
        if self._computing:
            return attr_val
        return super().getattr(attr, attr_val, parameter_proxy_cache)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return _ConcreteProxy(node, self)

    def create_args_for_root(self, root_fn, is_module, concrete_args=None):
        # Tensors, also inside lists, tuples and dicts, are inputs: their argument becomes
        # a placeholder (the tensors in a container are taken out of it in the graph).
        # Every other example value (None, flags, options) is passed as itself and baked
        # into the graph (the routed module guards it).
        proxies = {k: self._proxy_tree(self.create_proxy("placeholder", k, (), {}), v)
                   for k, v in self._inputs.items() if has_tensor(v)}
        params = inspect.signature(root_fn).parameters
        var_kw = next((n for n, p in params.items() if p.kind is p.VAR_KEYWORD), None)
        if any(p.kind is p.VAR_POSITIONAL for p in params.values()):
            raise TraceError(f"{type(self.root).__name__}.forward takes *args; tracing on "
                             f"example inputs binds arguments by name: give the model a "
                             f"forward with named parameters")

        def forward(*root):
            kwargs = {k: proxies.get(k, v) for k, v in self._inputs.items()}
            if var_kw in kwargs:   # **kwargs arrive as keywords, not as one dict
                kwargs.update(kwargs.pop(var_kw))
            return root_fn(*root, **kwargs)

        return forward, [self.root] if is_module else []

    def _proxy_tree(self, proxy, value):
        if isinstance(value, torch.Tensor):
            return proxy
        if isinstance(value, (list, tuple)):
            items = [self._proxy_tree(proxy[i], v) if has_tensor(v) else v
                     for i, v in enumerate(value)]
            return type(value)(*items) if hasattr(value, "_fields") else type(value)(items)
        if isinstance(value, dict):
            return {k: self._proxy_tree(proxy[k], v) if has_tensor(v) else v
                    for k, v in value.items()}
        return proxy

    def create_node(self, kind, target, args, kwargs, name=None, type_expr=None):
        node = super().create_node(kind, target, args, kwargs, name, type_expr)
        if kind == "placeholder":
            node.meta[_VALUE] = self._inputs[target]
        elif kind != "output":
            node.meta[_VALUE] = self._run(node)
        return node

    def _run(self, node: fx.Node) -> Any:
        def value(n: fx.Node) -> Any:
            return n.meta[_VALUE]

        args = fx.node.map_arg(node.args, value)
        kwargs = fx.node.map_arg(node.kwargs, value)
        self._computing += 1
        try:
            return self._call(node, args, kwargs)
        finally:
            self._computing -= 1

    def _call(self, node: fx.Node, args, kwargs) -> Any:
        with torch.no_grad():
            if node.op == "get_attr":
                obj = self.root
                for part in str(node.target).split("."):
                    obj = getattr(obj, part)
                return obj
            if node.op == "call_function":
                return node.target(*args, **kwargs)
            if node.op == "call_method":
                return getattr(args[0], node.target)(*args[1:], **kwargs)
            return self.root.get_submodule(node.target)(*args, **kwargs)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


@contextmanager
def frozen_state(model: nn.Module) -> Iterator[None]:
    """Run the model without leaving a trace: modes, buffers (BatchNorm statistics) and the
    random state are restored on exit, and no autograd graph is built."""
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with preserved_modes(model), forked_rng(), torch.no_grad():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)


def has_tensor(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    if isinstance(value, (list, tuple)):
        return any(has_tensor(v) for v in value)
    if isinstance(value, dict):
        return any(has_tensor(v) for v in value.values())
    return False


def shape_tree(value: Any) -> Any:
    """The shapes in a value: a tensor's shape tuple, nested like the value; None otherwise."""
    if isinstance(value, torch.Tensor):
        return tuple(value.shape)
    if isinstance(value, (list, tuple)):
        return tuple(shape_tree(v) for v in value)
    if isinstance(value, dict):
        return {k: shape_tree(v) for k, v in value.items()}
    return None


def bind_inputs(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    """Example inputs (tuple, dict or tensor) as ``{forward parameter name: value}``."""
    sig = inspect.signature(model.forward)
    if isinstance(example_inputs, Mapping):
        args, kwargs = (), dict(example_inputs)
    elif isinstance(example_inputs, torch.Tensor):
        args, kwargs = (example_inputs,), {}
    else:
        args, kwargs = tuple(example_inputs), {}
    names = [p.name for p in sig.parameters.values()
             if p.kind is not inspect.Parameter.VAR_KEYWORD]
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in sig.parameters.values())
    unknown = sorted(set(kwargs) - set(names))
    if unknown and not takes_any:
        raise ValueError(f"example_inputs: unknown argument(s) {unknown}; "
                         f"{type(model).__name__}.forward takes {names}")
    try:
        bound = sig.bind(*args, **kwargs)
    except TypeError as err:
        raise ValueError(f"example_inputs do not fit {type(model).__name__}.forward"
                         f"{sig}: {err}") from None
    bound.apply_defaults()   # defaults are inputs too: the graph is made for their values
    return _Bound(bound.arguments)


class _Bound(dict):
    """``{forward parameter: value}`` with defaults applied and ``**kwargs`` collected."""




def mode_flags(model: nn.Module, train: bool) -> list[tuple[nn.Module, bool]]:
    """Every module's training flag in a mode: the flags as they are when the model is in
    that mode already (a submodule the user left in eval() stays so), else what
    ``model.train(train)`` would set."""
    keep = model.training == train
    return [(m, m.training if keep else train) for m in model.modules()]


def trace_modes(model: nn.Module, leaves: Iterable[nn.Module], example_inputs: Any = None,
                modes: Mapping[str, list[tuple[nn.Module, bool]]] | None = None,
                front_end: str | None = None, dynamic: bool = False) -> Traced:
    """Trace ``model`` once per mode with ``leaves`` as leaf modules.

    ``modes`` maps a mode name to the training flag of each module while it is traced
    (default: :func:`mode_flags` for ``train`` and ``eval``).  Tries torch.fx first (unless
    ``front_end="concrete"``); if it fails and ``example_inputs`` are given, traces
    concretely on them.  The model's mode flags and random state are restored afterwards,
    and any constant the tracer had to store on the model is taken off it again; so are
    the attributes its modules' code set while it ran (each mode is traced from the model
    as it was: :func:`preserved_attributes`).
    """
    leaves = list(leaves)
    if modes is None:
        modes = {"train": mode_flags(model, True), "eval": mode_flags(model, False)}
    failures = []
    if front_end in (None, "fx"):
        try:
            return _trace(model, lambda: _LeafTracer(leaves), modes, "fx")
        except TraceError as fx_error:
            if example_inputs is None or front_end == "fx":
                raise TraceError(
                    f"{fx_error} -- or pass example_inputs=(...) to route(), so the model is "
                    f"traced on real values (a graph specialised to those input shapes)"
                ) from fx_error.__cause__
            failures.append(str(fx_error))
    if example_inputs is None:
        raise TraceError(f"{type(model).__name__} is traced on example inputs; none given")
    # a dict bound by bind_inputs already (route() binds once) is taken as it is
    inputs = example_inputs if isinstance(example_inputs, _Bound) else \
        bind_inputs(model, example_inputs)
    shapes = {k: shape_tree(v) for k, v in inputs.items() if has_tensor(v)}
    if front_end in (None, "export"):
        try:
            return _export_modes(model, leaves, inputs, modes, shapes, dynamic)
        except TraceError as err:
            if front_end == "export":
                raise
            failures.append(str(err).split("\n")[0])
    try:
        traced = _trace(model, lambda: _ConcreteTracer(leaves, inputs), modes, "concrete",
                        shapes)
    except TraceError as err:
        if failures:
            raise TraceError("; ".join(failures + [str(err)])) from err
        raise
    traced.baked = {k: v for k, v in inputs.items() if not has_tensor(v)}
    traced.failures = failures
    return traced


@contextmanager
def preserved_attributes(model: nn.Module, keep_root_new: bool = False) -> Iterator[None]:
    """Every module's plain attributes as they were: a tracer runs the model's Python, and
    a cache it fills (``self._freqs_cache = (key, proxy)``) would break the user's model.
    ``keep_root_new``: attributes added to the root stay (a tracer's tensor constants,
    which the caller takes off)."""
    kept = ("_parameters", "_buffers", "_modules")
    saved = [(m, {k: v for k, v in vars(m).items() if k not in kept}) for m in model.modules()]
    # a plain dict, list or set attribute keeps its identity and gets its contents back (a
    # cache filled in place: self._cache[n] = table); hook registries are OrderedDicts
    contents = [(v, copy.copy(v)) for _, attrs in saved for v in attrs.values()
                if type(v) in (dict, list, set)]
    try:
        yield
    finally:
        for container, before in contents:
            container.clear()
            if isinstance(container, list):
                container.extend(before)
            else:
                container.update(before)
        for m, attrs in saved:
            if m is model and keep_root_new:
                added = set()
            else:
                added = {k for k in vars(m) if k not in kept and k not in attrs}
            for k in added:
                del m.__dict__[k]
            for k, v in attrs.items():
                if m.__dict__.get(k, attrs) is not v:
                    m.__dict__[k] = v


def _export_modes(model: nn.Module, leaves: list[nn.Module], inputs: dict[str, Any],
                  modes: Mapping[str, list[tuple[nn.Module, bool]]], shapes: dict,
                  dynamic: bool) -> Traced:
    """The ``export`` front end: torch.export per mode, outlined into a graph whose blocks
    are the user's own modules (passes/export_trace.py).  ``dynamic``: let export keep the
    dims it can symbolic (``Dim.AUTO``)."""
    from .export_trace import export_trace
    graphs, constants, exports = {}, {}, {}
    for mode, flags in modes.items():
        with preserved_attributes(model):
            result = export_trace(model, leaves, inputs, mode, flags, dynamic=dynamic)
        exports[mode] = result
        renamed = {}
        for name, value in result.constants.items():
            renamed[name] = f"export_{mode}_{name}"
            constants[renamed[name]] = value
        for node in result.graph.nodes:
            if node.op == "get_attr" and node.target in renamed:
                node.target = renamed[node.target]
        graphs[mode] = result.graph
    traced = Traced(graphs, "export", constants, shapes)
    traced.exports = exports
    traced.baked = {k: v for k, v in inputs.items() if not has_tensor(v)}
    inside = {id(m) for leaf in leaves for m in leaf.modules()}
    traced.traced_modules = [m for m in model.modules() if id(m) not in inside and m is not model]
    return traced


def forked_rng():
    """``torch.random.fork_rng`` over the CPU and every CUDA device in use: what route()
    and verify() run on the user's model (dropout, seeded checks) leaves every global
    random state as it was."""
    cuda = list(range(torch.cuda.device_count())) if torch.cuda.is_initialized() else []
    return torch.random.fork_rng(devices=cuda)


def _plain_value(value: Any) -> bool:
    if isinstance(value, (tuple, list)):
        return all(_plain_value(v) for v in value)
    return isinstance(value, (bool, int, float, torch.dtype, torch.device))


def _keep_plain(node: fx.Node) -> None:
    """Record what value guards may need once the traced values are dropped: the value of
    a node that computed a plain value (a size), and whether a tensor's shape depends on
    tensor data (nonzero, boolean-mask indexing), itself or through its inputs."""
    value = node.meta.get(_VALUE)
    if node.op != "placeholder" and _plain_value(value):
        node.meta[TRACED_PLAIN] = tuple(value) if isinstance(value, torch.Size) else value
    name = getattr(node.target, "__name__", str(node.target))
    bool_index = name in ("getitem", "__getitem__", "index") and any(
        isinstance(a.meta.get(_VALUE), torch.Tensor) and a.meta[_VALUE].dtype == torch.bool
        for a in node.all_input_nodes[1:])
    if name in _DATA_SHAPED_OPS or bool_index or any(
            a.meta.get(DATA_SHAPED) for a in node.all_input_nodes):
        node.meta[DATA_SHAPED] = True


def _trace(model: nn.Module, make_tracer, modes: Mapping[str, list[tuple[nn.Module, bool]]],
           front_end: str, input_shapes: dict | None = None) -> Traced:
    before = set(vars(model))
    graphs, conversions, traced_through = {}, {}, {}
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    try:
        with preserved_modes(model), forked_rng():
            for mode, flags in modes.items():
                for module, flag in flags:
                    module.training = flag
                tracer = make_tracer()
                try:
                    # no cache carried between modes; the constants stay for _trace
                    with preserved_attributes(model, keep_root_new=True):
                        graphs[mode] = tracer.trace(model)
                except Exception as err:  # noqa: BLE001 - re-raised with context
                    raise TraceError(
                        f"{'torch.fx' if front_end == 'fx' else 'concrete tracing'} could not "
                        f"trace {type(model).__name__} in {mode} mode: "
                        f"{type(err).__name__}: {err}"
                    ) from err
                conversions[mode] = tracer.conversions
                traced_through.update(tracer.traced_through)
    finally:
        added = {k: model.__dict__.pop(k) for k in set(vars(model)) - before}
        with torch.no_grad():   # tracing on real values ran BatchNorm & co in train mode
            for b, saved in buffers:
                b.copy_(saved)
    for graph in graphs.values():
        for node in graph.nodes:
            _keep_plain(node)
        for node in graph.nodes:
            node.meta.pop(_VALUE, None)
    constants = {k: v for k, v in added.items() if isinstance(v, torch.Tensor)}
    traced = Traced(graphs, front_end, constants, input_shapes)
    traced.conversions = conversions
    traced.traced_modules = [m for m in traced_through.values() if m is not model]
    return traced
