"""Front end ``export``: a module-level fx graph from ``torch.export``.

Non-strict ``torch.export.export`` runs the model's Python on fake tensors, so it gets
through the shape-dependent Python that defeats ``torch.fx`` symbolic tracing, and with
``Dim.AUTO`` on every input's first dim it keeps the batch symbolic wherever the model
allows.
Its result is one flat ATen graph, with every block inlined.  This module turns it into the
kind of graph the other front ends produce:

* one placeholder per forward parameter that carries a tensor (named like the parameter);
  tensors nested in lists, tuples or dicts are taken out with ``operator.getitem`` nodes;
* each block (a module whose call signature export was asked to preserve) is one
  ``call_module`` node with the block's FQN as target, called with the (args, kwargs)
  structure the model's forward used, so the user's own block module runs (hooks, LoRA,
  parameter identity); its outputs are read with ``getitem`` as in the model's code;
* everything outside the blocks stays as ATen ops; parameters and buffers are ``get_attr``
  nodes on the model's own FQNs; lifted tensor constants go to ``constants``.

The blocks are *outlined* straight from the flat graph (the nodes of one block call carry
that call in their ``nn_module_stack``; the preserved call signature names its input and
output nodes).  ``torch.export.unflatten`` is not used: in torch 2.13 it fails on dynamic
shapes with preserved signatures (``SyntaxError: duplicate argument``), and where it works
about 10% of the parameters outside the blocks are copies rather than the model's own.

Things export does that this module undoes or works around:

* export marks dynamic dims on the example input tensors (``_dynamo_dynamic_indices``) and
  leaves Python caches of the model filled with fake tensors; both are cleaned up.
* a block input that the block itself returned through a no-op alias (``x.to(x.dtype)``
  inside block i, read by block i+1) is traced as the alias; it is mapped back to the input.
* sizes computed inside a block and reused outside (``H * W + L``) are recomputed from
  the input placeholders' sizes.
* ``wrap_with_autocast`` / ``wrap_with_set_grad_enabled`` regions become call_function nodes
  that run the region's sub-graph under the same context.
* ``aten._assert_tensor_metadata`` checks (they pin the device) are dropped.  Other device
  arguments (``arange(..., device=cpu)``, ``.to(device=cpu)``) stay baked, as in the
  ``concrete`` front end.

Dims that ``Dim.AUTO`` leaves symbolic are not always sound: export may unroll a Python
loop whose trip count depends on a symbolic size without adding a guard (WanAnimate:
``torch.split(x, k)`` over ``batch * frames`` rows).  Check the graph against the eager model
at a second shape before relying on a dynamic dim.
"""

from __future__ import annotations

import builtins
import contextlib
import copy
import dataclasses
import functools
import inspect
import operator
import re
import time
import types
from typing import Any, Callable, Iterator

import torch
import torch.utils._pytree as pytree
from torch import fx, nn
from torch.export.graph_signature import (ConstantArgument, InputKind, OutputKind,
                                          TensorArgument)

from tread_fx.passes.trace import TraceError, forked_rng, preserved_modes

__all__ = ["ExportError", "ExportResult", "export_trace", "graph_module"]


_SYMBOL = re.compile(r"[a-z]\d+")


class ExportError(TraceError):
    """torch.export could not export the model, or its graph could not be outlined."""


@dataclasses.dataclass
class ExportResult:
    """What :func:`export_trace` produced for one mode.

    Attributes:
        graph: the flat module-level graph (blocks as ``call_module`` on their FQNs).
        constants: lifted tensor constants; ``get_attr`` targets in ``graph`` are the keys.
        baked: forward parameters without tensors, with the value the graph is made for.
        input_dims: per input tensor (``"hidden_states"``, ``"xs[0]"``, ``"d['k']"``), one
            entry per dim: an ``int`` for a specialised dim, the symbol (``"s2"``) or
            expression for a symbolic one.  The same symbol in two places means the dims
            must be equal.
        range_constraints: ``{symbol: (lower, upper)}``; upper is None for unbounded.
        dynamic: True if the export with ``Dim.AUTO`` worked, False if it fell back to a
            fully static export (then ``dynamic_error`` says why).
        mode: "train" or "eval".
        export_seconds: time spent in ``torch.export.export``.
        blocks: the ``call_module`` targets in call order (one per block call).
    """

    graph: fx.Graph
    constants: dict[str, torch.Tensor]
    baked: dict[str, Any]
    input_dims: dict[str, tuple]
    range_constraints: dict[str, tuple[int, int | None]]
    dynamic: bool
    dynamic_error: str | None
    mode: str
    export_seconds: float
    blocks: list[str]
    front_end: str = "export"

    @property
    def dynamic_dims(self) -> dict[str, dict[int, str]]:
        """Per input tensor, its symbolic dims: ``{dim: symbol}``."""
        return {k: {i: d for i, d in enumerate(dims) if isinstance(d, str)}
                for k, dims in self.input_dims.items()}

    def check_inputs(self, inputs: dict[str, Any]) -> None:
        """Raise ValueError unless ``inputs`` (``{parameter: value}``) fit the graph:
        specialised dims and baked values equal, equal symbols equal, symbols in range."""
        for name, value in self.baked.items():
            if name in inputs and not _same_value(inputs[name], value):
                raise ValueError(f"{name}={inputs[name]!r}: the graph is made for "
                                 f"{name}={value!r}")
        if all("[" not in path for path in self.input_dims):   # no nested tensors: direct
            leaves = {k: v for k, v in inputs.items() if isinstance(v, torch.Tensor)}
        else:
            leaves = dict(_input_leaves(inputs))
        bound: dict[str, int] = {}
        for path, dims in self.input_dims.items():
            if path not in leaves:
                continue
            shape = tuple(leaves[path].shape)
            if len(shape) != len(dims):
                raise ValueError(f"{path}: expected {len(dims)} dims, got shape {shape}")
            for i, (want, got) in enumerate(zip(dims, shape)):
                if isinstance(want, int):
                    if want != got:
                        raise ValueError(f"{path}: dim {i} is specialised to {want}, got "
                                         f"shape {shape}")
                elif _SYMBOL.fullmatch(want):
                    if bound.setdefault(want, got) != got:
                        raise ValueError(f"{path}: dim {i} ({want}) must equal {bound[want]}"
                                         f" (the same symbol elsewhere), got {got}")
                    low, high = self.range_constraints.get(want, (0, None))
                    if got < low or (high is not None and got > high):
                        raise ValueError(f"{path}: dim {i} ({want}) must lie in "
                                         f"[{low}, {high}], got {got}")


def graph_module(model: nn.Module, result: ExportResult) -> fx.GraphModule:
    """Run ``result.graph`` over ``model``'s own modules, parameters and buffers."""
    root = nn.Module()
    root._modules = model._modules
    root._parameters = model._parameters
    root._buffers = model._buffers
    root.training = model.training
    for name, value in result.constants.items():
        object.__setattr__(root, name, value)
    return fx.GraphModule(root, result.graph, f"Exported{type(model).__name__}")


# -- helpers --------------------------------------------------------------------------------

def _same_value(a: Any, b: Any) -> bool:
    try:
        return bool(a == b)
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return a is b


def _contains_tensor(value: Any) -> bool:
    return any(isinstance(v, torch.Tensor) for v in pytree.tree_leaves(value))


def _input_leaves(inputs: dict[str, Any]) -> Iterator[tuple[str, torch.Tensor]]:
    for name, value in inputs.items():
        for path, leaf in pytree.tree_flatten_with_path(value)[0]:
            if isinstance(leaf, torch.Tensor):
                yield name + pytree.keystr(path), leaf


class _Slot:
    """Stands for one leaf while a TreeSpec is unflattened to find its key paths."""

    def __init__(self, index: int) -> None:
        self.index = index


def _spec_paths(spec: pytree.TreeSpec) -> list[tuple]:
    """The key path of each leaf of ``spec`` (None leaves included), in leaf order."""
    tree = pytree.tree_unflatten([_Slot(i) for i in range(spec.num_leaves)], spec)
    flat = pytree.tree_flatten_with_path(tree, is_leaf=lambda x: isinstance(x, _Slot))[0]
    paths: list[tuple] = [()] * spec.num_leaves
    for path, slot in flat:
        paths[slot.index] = tuple(path)
    return paths


def _named(fn: Callable, name: str) -> Callable:
    fn.__name__ = fn.__qualname__ = name
    fn.__module__ = __name__
    return fn


def _rebuilder(spec: pytree.TreeSpec) -> Callable:
    """A function that rebuilds a custom pytree value (a dataclass output...) from leaves."""
    def rebuild(*leaves):
        return pytree.tree_unflatten(list(leaves), spec)
    return _named(rebuild, f"build_{spec.type.__name__}")


def _emit_tree(graph: fx.Graph, spec: pytree.TreeSpec, leaves: Iterator[Any]) -> Any:
    """The value ``spec`` describes, with ``leaves`` (nodes or constants) in it, as an fx
    argument: plain tuples, lists and dicts stay literals, other types are built by a
    call_function node."""
    if spec.is_leaf():
        return next(leaves)
    children = spec.children()
    if spec.type in (tuple, list):
        return spec.type(_emit_tree(graph, c, leaves) for c in children)
    if spec.type is dict:
        return {k: _emit_tree(graph, c, leaves) for k, c in zip(spec.context, children)}
    flat = [next(leaves) for _ in range(spec.num_leaves)]
    return graph.call_function(_rebuilder(spec), tuple(flat))


def _with_autocast(submod: nn.Module) -> Callable:
    def run_with_autocast(device_type, dtype, enabled, cache_enabled, *args):
        with torch.autocast(device_type, dtype, enabled, cache_enabled):
            return submod(*args)
    return run_with_autocast


def _with_grad_mode(submod: nn.Module) -> Callable:
    def run_with_grad_mode(enabled, *args):
        with torch.set_grad_enabled(enabled):
            return submod(*args)
    return run_with_grad_mode


def _bound_hop(hop: Any, position: int, submod: nn.Module) -> Callable:
    def run_hop(*args, **kwargs):
        return hop(*args[:position], submod, *args[position:], **kwargs)
    return run_hop


_HOP_RUNNERS = {
    "wrap_with_autocast": (4, _with_autocast),
    "wrap_with_set_grad_enabled": (1, _with_grad_mode),
}
_DROPPED = {torch.ops.aten._assert_tensor_metadata.default}


def _sanitize(name: str, taken: set[str]) -> str:
    base = re.sub(r"\W", "_", name) or "constant"
    if base[0].isdigit():
        base = "_" + base
    key, i = base, 1
    while key in taken:
        key, i = f"{base}_{i}", i + 1
    taken.add(key)
    return key


def _get_path(obj: Any, path: str) -> Any:
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _sym_str(d: Any) -> int | str:
    if isinstance(d, torch.SymInt):
        expr = d.node.expr
        return int(expr) if expr.is_number else str(expr)
    return int(d)


def _is_symbolic_only(node: fx.Node) -> bool:
    """Nodes that compute or assert on sizes only (no tensor result)."""
    val = node.meta.get("val")
    return not isinstance(val, torch.Tensor) and not (
        isinstance(val, (list, tuple)) and any(isinstance(v, torch.Tensor) for v in val))


# -- export ---------------------------------------------------------------------------------

def _first_line(err: BaseException) -> str:
    lines = str(err).strip().splitlines()
    return f"{type(err).__name__}: {lines[0] if lines else ''}"


def _bound(value: Any) -> int | None:
    try:
        return int(value)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None        # int_oo / -int_oo


def _call_layout(model: nn.Module, inputs: dict[str, Any]) -> tuple[tuple, dict, list]:
    """Positional args, keyword args and, per top-level position of the root in_spec, the
    forward parameter it belongs to."""
    params = inspect.signature(model.forward).parameters
    args, kwargs, owners = [], {}, []
    for name, value in inputs.items():
        kind = params[name].kind if name in params else inspect.Parameter.KEYWORD_ONLY
        if kind is inspect.Parameter.POSITIONAL_ONLY:
            args.append(value)
            owners.append(name)
        elif kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ExportError(f"export front end: *args/**kwargs inputs ({name}) are not "
                              f"supported")
        else:
            kwargs[name] = value
    return tuple(args), kwargs, owners


def _auto_dims(value: Any) -> Any:
    """``Dim.AUTO`` on the first dim of every input tensor: the batch, the only dim a routed
    graph is used at other sizes of (its key pins the others); export may still specialise
    it.  Every symbolic size slows export down: route() of SD3-S/2 went from 12.5 to 9.4 s
    (batch-8 examples, this CPU) when the other dims stopped being symbolic."""
    def spec(v):
        if isinstance(v, torch.Tensor) and v.dim() > 0:
            return {0: torch.export.Dim.AUTO}
        return None
    return pytree.tree_map(spec, value)


_MODULE_CORE = {"_parameters", "_buffers", "_modules", "_non_persistent_buffers_set",
                "training"}


def _stateful_objects(model: nn.Module) -> list[Any]:
    """The model's modules and the plain Python objects they hold (a RoPE helper object
    with a lazily filled table...), a few levels deep."""
    seen: set[int] = set()
    found: list[Any] = []

    def visit(obj: Any, depth: int) -> None:
        if id(obj) in seen or depth > 3 or isinstance(obj, (torch.Tensor, type)):
            return
        if isinstance(obj, (list, tuple)) or type(obj) is dict:
            seen.add(id(obj))
            for item in (obj.values() if isinstance(obj, dict) else obj):
                visit(item, depth + 1)
            return
        if not hasattr(obj, "__dict__") or isinstance(obj, (
                types.FunctionType, types.MethodType, types.BuiltinFunctionType,
                types.ModuleType, functools.partial)):
            return
        if not isinstance(obj, nn.Module) and type(obj).__module__.split(".")[0] in (
                "torch", "builtins", "functools", "typing", "enum"):
            return
        seen.add(id(obj))
        found.append(obj)
        for key, value in vars(obj).items():
            if not (isinstance(obj, nn.Module) and key in _MODULE_CORE):
                visit(value, depth + 1)

    for m in model.modules():
        visit(m, 0)
    return found


@contextlib.contextmanager
def _python_state_kept(model: nn.Module) -> Iterator[None]:
    """Undo what export's run of the model's Python leaves behind.

    Export runs ``forward`` on fake tensors: caches the model fills then hold fake tensors
    and silently break the next eager call (ZImage's ``rope_embedder.freqs_cis``, a
    ``functools.lru_cache`` on a RoPE method in NucleusMoE).  The attributes of the modules
    and of the plain objects they hold (and the contents of dict/list/set attributes) are
    restored, new attributes removed, and the lru_caches of the modules' methods cleared."""
    saved = []
    for obj in _stateful_objects(model):
        core = _MODULE_CORE if isinstance(obj, nn.Module) else set()
        attrs = {k: v for k, v in vars(obj).items() if k not in core}
        contents = {k: copy.copy(v) for k, v in attrs.items() if type(v) in (dict, list, set)}
        saved.append((obj, core, attrs, contents))
    try:
        yield
    finally:
        for obj, core, attrs, contents in saved:
            state = vars(obj)
            for k in [k for k in state if k not in core and k not in attrs]:
                del state[k]
            for k, v in attrs.items():
                if state.get(k, _Slot) is not v:
                    state[k] = v
            for k, v in contents.items():
                now = state[k]
                if isinstance(v, dict) and (now.keys() != v.keys() or any(
                        now[x] is not v[x] for x in v)):
                    now.clear()
                    now.update(v)
                elif isinstance(v, list) and (len(now) != len(v) or any(
                        a is not b for a, b in zip(now, v))):
                    now[:] = v
                elif isinstance(v, set) and now != v:
                    now.clear()
                    now.update(v)
        for cls in {c for m in model.modules() for c in type(m).__mro__}:
            for value in vars(cls).values():
                if callable(getattr(value, "cache_clear", None)) and \
                        hasattr(value, "cache_info"):
                    value.cache_clear()


@contextlib.contextmanager
def _no_stack_traces() -> Iterator[None]:
    """Export without recording the Python stack of every node (about a fifth of the
    export's time on a diffusers model): tread_fx never reads ``node.meta["stack_trace"]``."""
    import torch.fx.config as config
    saved = getattr(config, "do_not_emit_stack_traces", False)
    config.do_not_emit_stack_traces = True
    try:
        yield
    finally:
        config.do_not_emit_stack_traces = saved


def _export(model, args, kwargs, leaves, dynamic: bool):
    shapes = None
    if dynamic:
        names = list(inspect.signature(model.forward).parameters)
        shapes = {names[i]: _auto_dims(v) for i, v in enumerate(args)}
        shapes.update({k: _auto_dims(v) for k, v in kwargs.items()})
    tensors = [t for t in pytree.tree_leaves((args, kwargs)) if isinstance(t, torch.Tensor)]
    before = [set(vars(t)) for t in tensors]
    try:
        with _python_state_kept(model), _no_stack_traces():
            return torch.export.export(model, args, kwargs, strict=False,
                                       dynamic_shapes=shapes,
                                       preserve_module_call_signature=tuple(leaves))
    finally:
        # export marks dynamic dims on the input tensors themselves (_dynamo_dynamic_indices
        # ...) and leaves the marks there: they would make a later export (or torch.compile)
        # of the same tensors dynamic.
        for t, keys in zip(tensors, before):
            for key in set(vars(t)) - keys:
                delattr(t, key)


def export_trace(model: nn.Module, leaves: list[nn.Module], inputs: dict[str, Any],
                 mode: str, flags: list[tuple[nn.Module, bool]] | None = None,
                 dynamic: bool = True) -> ExportResult:
    """Export ``model`` in ``mode`` ("train"/"eval") and build its module-level graph with
    ``leaves`` as ``call_module`` nodes.  ``inputs`` is ``{forward parameter: value}``
    (as :func:`tread_fx.passes.trace.bind_inputs` returns).  ``flags`` sets each module's
    training flag instead of ``model.train(mode == "train")``; ``dynamic=False`` exports
    with static shapes only."""
    if flags is None and mode not in ("train", "eval"):
        raise ValueError(f"mode must be 'train' or 'eval', got {mode!r}")
    names: dict[int, str] = {}
    for name, module in model.named_modules(remove_duplicate=False):
        names.setdefault(id(module), name)
    missing = [type(m).__name__ for m in leaves if id(m) not in names]
    if missing:
        raise ValueError(f"leaves not in the model: {missing}")
    leaf_fqns = list(dict.fromkeys(names[id(m)] for m in leaves))
    # A leaf inside another leaf is never reached: the outer block runs as a whole.
    leaf_fqns = [f for f in leaf_fqns
                 if not any(f.startswith(o + ".") for o in leaf_fqns if o)]
    args, kwargs, owners = _call_layout(model, inputs)
    dynamic_error, seconds = None, 0.0
    for dynamic in (True, False) if dynamic else (False,):
        with preserved_modes(model), forked_rng():
            if flags is None:
                model.train(mode == "train")
            else:
                for module, flag in flags:
                    module.training = flag
            start = time.perf_counter()
            try:
                ep = _export(model, args, kwargs, leaf_fqns, dynamic=dynamic)
            except Exception as err:  # noqa: BLE001 - retried static, then re-raised
                if dynamic:
                    dynamic_error = _first_line(err)
                    continue
                raise ExportError(f"torch.export could not export {type(model).__name__} in "
                                  f"{mode} mode: {_first_line(err)}") from err
            finally:
                seconds += time.perf_counter() - start
        try:
            graph, constants, blocks = _Outliner(model, ep, inputs, owners, leaf_fqns).run()
            break
        except ExportError as err:
            if not dynamic:
                raise
            dynamic_error = f"outlining the dynamic export failed: {err}"
    dims = {}
    user = [s for s in ep.graph_signature.input_specs if s.kind == InputKind.USER_INPUT]
    placeholders = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    paths = _root_paths(ep, owners)
    for spec, (param, rest) in zip(user, paths):
        val = placeholders[spec.arg.name].meta.get("val") if isinstance(
            spec.arg, TensorArgument) else None
        if isinstance(val, torch.Tensor):
            dims[param + pytree.keystr(rest)] = tuple(_sym_str(d) for d in val.shape)
    ranges = {}
    for sym, vr in ep.range_constraints.items():
        ranges[str(sym)] = (_bound(vr.lower), _bound(vr.upper))
    baked = {k: v for k, v in inputs.items() if not _contains_tensor(v)}
    return ExportResult(graph, constants, baked, dims, ranges, dynamic,
                        dynamic_error, mode, seconds, blocks)


def _root_paths(ep, owners: list[str]) -> list[tuple[str, tuple]]:
    """Per leaf of the root call's in_spec: (forward parameter, key path inside it)."""
    spec = ep.call_spec.in_spec
    out = []
    for path in _spec_paths(spec):
        if path[0].idx == 0:                    # positional args
            out.append((owners[path[1].idx], path[2:]))
        else:                                   # kwargs
            out.append((path[1].key, path[2:]))
    return out


class _Outliner:
    """Copy the exported graph into a new one, with block calls outlined."""

    def __init__(self, model, ep, inputs, owners, leaf_fqns):
        self.model, self.ep, self.inputs = model, ep, inputs
        self.owners, self.leaf_fqns = owners, set(leaf_fqns)
        self.graph = fx.Graph()
        self.env: dict[fx.Node, Any] = {}
        self.constants: dict[str, torch.Tensor] = {}
        self.removable: set[fx.Node] = set()

    # ---- inputs --------------------------------------------------------------------
    def _placeholders(self) -> None:
        g, ep = self.graph, self.ep
        holders = {name: g.placeholder(name) for name, v in self.inputs.items()
                   if _contains_tensor(v)}
        src = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
        own = {id(t) for t in self.model.parameters()} | {id(t) for t in self.model.buffers()}
        taken: set[str] = set()
        cache: dict[tuple, fx.Node] = {}
        paths = iter(_root_paths(ep, self.owners))
        for spec in ep.graph_signature.input_specs:
            node = src[spec.arg.name]
            if spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
                try:
                    obj = _get_path(self.model, spec.target)
                except AttributeError:
                    obj = None
                if obj is None or id(obj) not in own:
                    raise ExportError(f"exported {spec.kind.name.lower()} {spec.target!r} is "
                                      f"not one of the model's own tensors")
                self.env[node] = g.get_attr(spec.target)
                self.removable.add(self.env[node])
            elif spec.kind == InputKind.CONSTANT_TENSOR:
                key = _sanitize(spec.target, taken)
                self.constants[key] = self.ep.constants[spec.target]
                self.env[node] = g.get_attr(key)
                self.removable.add(self.env[node])
            elif spec.kind == InputKind.USER_INPUT:
                param, rest = next(paths)
                if isinstance(spec.arg, ConstantArgument) or param not in holders:
                    self.env[node] = (spec.arg.value if isinstance(spec.arg, ConstantArgument)
                                      else _value_at(self.inputs[param], rest))
                    continue
                value = holders[param]
                for i in range(len(rest)):
                    key = (param, rest[:i + 1])
                    if key not in cache:
                        cache[key] = _emit_key(g, value, rest[i])
                        self.removable.add(cache[key])
                    value = cache[key]
                self.env[node] = value
            else:
                raise ExportError(f"export front end: {spec.kind.name} inputs are not "
                                  f"supported ({spec.arg})")

    # ---- blocks --------------------------------------------------------------------
    def _block_calls(self) -> tuple[dict[int, list], set[fx.Node]]:
        nodes = list(self.ep.graph.nodes)
        index = {n: i for i, n in enumerate(nodes)}
        stacks = {}
        for n in nodes:
            calls = set()
            for key, (path, _) in (n.meta.get("nn_module_stack") or {}).items():
                if path in self.leaf_fqns:
                    k = key.rsplit("@", 1)[1] if "@" in key else "0"
                    calls.add(path if k == "0" else f"{path}@{k}")
            stacks[n] = calls
        at: dict[int, list] = {}
        skipped: set[fx.Node] = set()
        by_name = {n.name: n for n in nodes}
        for entry in self.ep.module_call_graph:
            base = entry.fqn.split("@")[0]
            if base not in self.leaf_fqns:
                continue
            sig = entry.signature
            region = [n for n in nodes if entry.fqn in stacks[n]]
            if sig is None:
                if not region:
                    continue            # never called (a ModuleDict, or a leaf not run)
                raise ExportError(f"no call signature was preserved for {entry.fqn}")
            def nodes_of(specs, what):
                """The top-level nodes of a call's inputs or outputs (None: a constant)."""
                found = [None if isinstance(a, ConstantArgument) else by_name.get(a.name)
                         for a in specs]
                if any(n is None and not isinstance(a, ConstantArgument)
                       for n, a in zip(found, specs)):
                    raise ExportError(f"{entry.fqn}: an {what} of its call is not in the "
                                      f"top-level graph (called inside an autocast/no_grad "
                                      f"region?)")
                return found
            ins = nodes_of(sig.inputs, "input")
            outs = nodes_of(sig.outputs, "output")
            if region:
                pos = index[region[0]]
            else:
                pos = max([index[a] for a in ins if a is not None], default=-1) + 1
            at.setdefault(pos, []).append((entry, sig, ins, outs, base))
            skipped.update(region)
        return at, skipped

    def _emit_block(self, entry, sig, ins, outs, target: str) -> None:
        g = self.graph
        try:
            values = [s.value if isinstance(s, ConstantArgument) else self._value(a)
                      for s, a in zip(sig.inputs, ins)]
        except _Missing as missing:
            raise ExportError(f"{entry.fqn}: its input {missing.node.name} is computed inside "
                              f"another block call but not among that block's outputs") from None
        it = iter(values)
        call_args, call_kwargs = (), {}
        spec = sig.in_spec
        if spec.type is tuple and spec.num_children == 2:
            a_spec, k_spec = spec.children()
            call_args = tuple(_emit_tree(g, c, it) for c in a_spec.children())
            call_kwargs = _emit_tree(g, k_spec, it)
        else:
            raise ExportError(f"{entry.fqn}: unexpected call structure {spec}")
        call = g.create_node("call_module", target, call_args, call_kwargs,
                             name=re.sub(r"\W", "_", entry.fqn))
        paths = _spec_paths(sig.out_spec)
        cache: dict[tuple, fx.Node] = {(): call}
        seen: set[fx.Node] = set()
        for path, node in zip(paths, outs):
            if node is None or node in seen:
                continue
            seen.add(node)
            value = call
            for i in range(len(path)):
                if path[:i + 1] not in cache:
                    cache[path[:i + 1]] = _emit_key(g, value, path[i])
                value = cache[path[:i + 1]]
            # Region nodes are replaced; a value the block passes through unchanged is read
            # from the block's output by everything after the call, as in the model's code.
            self.env[node] = value

    # ---- body ----------------------------------------------------------------------
    def run(self) -> tuple[fx.Graph, dict[str, torch.Tensor], list[str]]:
        self._placeholders()
        at, skipped = self._block_calls()
        blocks = []
        g, gm = self.graph, self.ep.graph_module
        output = None
        for i, node in enumerate(self.ep.graph.nodes):
            for entry, sig, ins, outs, base in at.get(i, []):
                self._emit_block(entry, sig, ins, outs, base)
                blocks.append(base)
            if node.op == "placeholder":
                continue
            if node in skipped:
                continue
            if node.op == "output":
                output = node
                break
            if node.op == "call_function" and node.target in _DROPPED:
                continue
            if node.op == "get_attr":
                obj = _get_path(gm, node.target)
                if isinstance(obj, nn.Module):
                    self.env[node] = obj
                    continue
                raise ExportError(f"unexpected get_attr {node.target} in the exported graph")
            try:
                for a in node.all_input_nodes:
                    self._value(a)
            except _Missing as missing:
                if _is_symbolic_only(node):
                    skipped.add(node)       # a size check on a value inside a block
                    continue
                raise ExportError(
                    f"{node.format_node()} uses {missing.node.name}, computed inside a block "
                    f"call but not among the block's outputs") from None
            self.env[node] = self._copy(node)
        self._output(output)
        for node in reversed(list(g.nodes)):
            if node in self.removable and not node.users:
                g.erase_node(node)
        g.lint()
        return g, self.constants, blocks

    # ---- values -------------------------------------------------------------------
    def _value(self, node: fx.Node) -> Any:
        """The new graph's value for ``node``.  A node inside an outlined block that is
        not among the block's outputs is still usable when it is the block's input
        returned as itself (``x.to(x.dtype)``: export then names the alias, not the input)
        or a size (re-computed from the input sizes)."""
        if node in self.env:
            return self.env[node]
        source = _alias_source(node)
        if source is not None:
            return self._value(source)
        val = node.meta.get("val")
        if isinstance(val, (torch.SymInt, torch.SymFloat)):
            try:
                value = self._emit_expr(val.node.expr)
            except _Missing:
                raise _Missing(node) from None
            self.env[node] = value
            return value
        raise _Missing(node)

    def _symbol(self, symbol) -> fx.Node:
        if not hasattr(self, "_symbols"):
            self._symbols: dict[Any, fx.Node] = {}
            self._symbol_sources = {}
            for ph in self.ep.graph.nodes:
                val = ph.meta.get("val")
                if ph.op != "placeholder" or not isinstance(val, torch.Tensor):
                    continue
                if not isinstance(self.env.get(ph), fx.Node):
                    continue
                for dim, size in enumerate(val.shape):
                    if isinstance(size, torch.SymInt) and size.node.expr.is_Symbol:
                        self._symbol_sources.setdefault(size.node.expr, (ph, dim))
        if symbol not in self._symbols:
            if symbol not in self._symbol_sources:
                raise _Missing(None)
            ph, dim = self._symbol_sources[symbol]
            node = self.graph.call_function(torch.ops.aten.sym_size.int, (self.env[ph], dim))
            self.removable.add(node)
            self._symbols[symbol] = node
        return self._symbols[symbol]

    def _emit_expr(self, expr) -> Any:
        import sympy
        from torch.utils._sympy import functions as F
        if expr.is_Integer:
            return int(expr)
        if expr.is_Symbol:
            return self._symbol(expr)
        binary = {sympy.Add: operator.add, sympy.Mul: operator.mul,
                  F.FloorDiv: operator.floordiv, F.CleanDiv: operator.floordiv,
                  F.Mod: operator.mod, F.PythonMod: operator.mod,
                  sympy.Max: builtins.max, sympy.Min: builtins.min, F.Max: builtins.max,
                  F.Min: builtins.min}
        fn = next((f for t, f in binary.items() if isinstance(expr, t)), None)
        if isinstance(expr, sympy.Pow) and expr.exp.is_Integer and expr.exp >= 0:
            fn, args = operator.pow, [expr.base, expr.exp]
        elif fn is None:
            raise _Missing(None)
        else:
            args = list(expr.args)
        values = [self._emit_expr(a) for a in args]
        result = values[0]
        for v in values[1:]:
            result = self.graph.call_function(fn, (result, v))
            self.removable.add(result)
        return result

    def _copy(self, node: fx.Node) -> fx.Node:
        g = self.graph
        subs = [a for a in pytree.tree_leaves((node.args, node.kwargs))
                if isinstance(a, fx.Node) and isinstance(self.env.get(a), nn.Module)]
        if not subs:
            return g.node_copy(node, self._value)
        if len(subs) != 1 or node.op != "call_function" or node.args.count(subs[0]) != 1:
            raise ExportError(f"unsupported higher-order op {node.format_node()}")
        position = node.args.index(subs[0])
        submod = self.env[subs[0]]
        hop_name = getattr(node.target, "__name__", str(node.target))
        runner = _HOP_RUNNERS.get(hop_name)
        if runner is not None and runner[0] == position:
            fn = runner[1](submod)
        else:
            fn = _bound_hop(node.target, position, submod)
        fn = _named(fn, f"{hop_name}_{node.name}")
        args = fx.node.map_arg(node.args[:position] + node.args[position + 1:], self._value)
        kwargs = fx.node.map_arg(node.kwargs, self._value)
        new = g.call_function(fn, args, kwargs)
        new.meta = dict(node.meta)
        return new

    def _output(self, output: fx.Node) -> None:
        g, ep = self.graph, self.ep
        flat = list(output.args[0])
        user = []
        mutations = []
        for spec, value in zip(ep.graph_signature.output_specs, flat):
            if spec.kind == OutputKind.USER_OUTPUT:
                user.append(value)
            elif spec.kind in (OutputKind.BUFFER_MUTATION, OutputKind.USER_INPUT_MUTATION,
                               OutputKind.PARAMETER_MUTATION):
                mutations.append((spec, value))
            else:
                raise ExportError(f"export front end: {spec.kind.name} outputs are not "
                                  f"supported")
        for spec, value in mutations:
            try:
                value = fx.node.map_arg(value, self._value)
            except _Missing:
                continue            # mutated inside a block: the block does it itself
            if spec.kind == OutputKind.USER_INPUT_MUTATION:
                dest = self.env[next(n for n in ep.graph.nodes
                                     if n.op == "placeholder" and n.name == spec.target)]
            else:
                dest = g.get_attr(spec.target)
            g.call_function(torch.ops.aten.copy_.default, (dest, value))
        values = iter(fx.node.map_arg(v, self._value) for v in user)
        g.output(_emit_tree(g, ep.call_spec.out_spec, values))


class _Missing(Exception):
    def __init__(self, node):
        super().__init__(node)
        self.node = node


_ALIAS_OPS = {torch.ops.aten.to.dtype, torch.ops.aten.to.dtype_layout, torch.ops.aten.to.device,
              torch.ops.aten.to.other, torch.ops.aten.type_as.default,
              torch.ops.aten.contiguous.default}


def _alias_source(node: fx.Node) -> fx.Node | None:
    """The input of ``node`` if ``node`` returns it as itself (a no-op ``.to``)."""
    if node.op != "call_function" or node.target not in _ALIAS_OPS or node.kwargs.get("copy"):
        return None
    src = node.args[0] if node.args else None
    a = src.meta.get("val") if isinstance(src, fx.Node) else None
    b = node.meta.get("val")
    if not (isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor)):
        return None
    if (a.dtype, a.device, a.layout) != (b.dtype, b.device, b.layout):
        return None
    if node.target is torch.ops.aten.contiguous.default or node.kwargs.get("memory_format") \
            not in (None, torch.preserve_format):
        if not a.is_contiguous():
            return None
    return src


def _emit_key(graph: fx.Graph, value: Any, key: Any) -> fx.Node:
    if isinstance(key, pytree.SequenceKey):
        return graph.call_function(operator.getitem, (value, key.idx))
    if isinstance(key, pytree.MappingKey):
        return graph.call_function(operator.getitem, (value, key.key))
    if isinstance(key, pytree.GetAttrKey):
        return graph.call_function(builtins.getattr, (value, key.name))
    raise ExportError(f"cannot express key {key!r} in a graph")


def _value_at(value: Any, path: tuple) -> Any:
    for key in path:
        if isinstance(key, pytree.SequenceKey):
            value = value[key.idx]
        elif isinstance(key, pytree.MappingKey):
            value = value[key.key]
        else:
            value = getattr(value, key.name)
    return value
