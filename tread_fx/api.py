"""``route()`` and ``unroute()``: the whole way from a model to its routed graph."""

from __future__ import annotations

import copy
from dataclasses import replace
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import fx, nn

from tread_fx.passes.find_blocks import (BlockChain, NoBlocksFound, find_block_chain,
                                         find_candidates, odd_siblings)
from tread_fx.passes.insert_routes import insert_routes
from tread_fx.passes.fp32_after_routes import fp32_after_routes
from tread_fx.passes.check_routes import check_routes
from tread_fx.passes.token_axes import plan_routes, probe_block_io, probe_shapes
from tread_fx.passes.guards import Guard, module_tensors, value_guards
from tread_fx.passes.trace import (Traced, _Bound, bind_inputs, frozen_state, mode_flags,
                                   preserved_attributes, trace_modes)

from .module import TreadGraphModule, _compile_graph
from . import replay
from .runtime import TokenSelector
from .spec import RouteSpec, parse_spec

__all__ = ["route", "unroute", "is_routed", "kept_masks", "routing"]


def is_routed(model: nn.Module) -> bool:
    """True for a module returned by :func:`route` that still has routes."""
    return isinstance(model, TreadGraphModule) and len(model._tread._modules) > 0


def _check_chain(chain: BlockChain, groups, graphs: dict[str, fx.Graph], hidden,
                 root: nn.Module) -> None:
    """Refuse chains whose indices would silently differ from the user's block indices."""
    in_chain = set(chain.targets)
    first = next(iter(graphs.values()))
    called = {n.target for n in first.nodes if n.op == "call_module"}
    # Same-class modules in another container (a refiner, a modulation list) are not
    # blocks of this chain and cannot shift its indices; in the chain's own container
    # they would (blocks.0 outside the chain makes route index 0 the user's blocks.1).
    containers = {_container(t) for t in chain.targets}
    # ... unless called between the chain's blocks (a block the chain goes around)
    order = [n.target for n in first.nodes if n.op == "call_module"]
    at = [i for i, t in enumerate(order) if t in in_chain]
    between = set(order[at[0]:at[-1] + 1]) if at else set()
    for group in groups:
        if not in_chain & set(group.names):
            continue
        missing = [n for n in group.names if n in called and n not in in_chain
                   and (_container(n) in containers or n in between)]
        if missing:
            raise NoBlocksFound(
                f"{', '.join(missing)} belong(s) with the block sequence "
                f"{chain.targets[0]}..{chain.targets[-1]} but not to its chain: the output "
                f"does not reach the next block directly (an operation sits in between), so "
                f"route indices would not match the blocks' own indices. Give blocks='<path>' "
                f"a container that holds only the chained blocks, or move the operation into "
                f"a block"
            )
    if "eval" in graphs and "train" in graphs:
        eval_chain = find_block_chain(graphs["eval"], groups, hidden, root)
        if eval_chain.targets != chain.targets:
            raise NoBlocksFound(
                f"the train-mode trace calls blocks {chain.targets} but the eval-mode trace "
                f"calls {eval_chain.targets}; Python-level randomness or mode checks around "
                f"the block calls (e.g. LayerDrop) cannot be routed. Move them into the blocks"
            )


class _SegmentError(ValueError):
    """A route spans the gap before block ``index`` (a ValueError with the gap's index)."""

    def __init__(self, index: int, message: str) -> None:
        super().__init__(message)
        self.index = index


def _check_segments(spec: RouteSpec, chain: BlockChain) -> None:
    """Refuse a route that spans two segments of the chain (the model works on the stream
    between them, e.g. concatenates text tokens to it)."""
    for i, r in enumerate(spec.routes):
        for b in chain.breaks:
            if r.start < b <= r.end:
                raise _SegmentError(b, 
                    f"route {i} ({r}) spans blocks {chain.targets[b - 1]!r} (index {b - 1}) "
                    f"and {chain.targets[b]!r} (index {b}), between which the model changes "
                    f"the token stream (the blocks from index {b} on take a stream that is "
                    f"built after block {b - 1}, e.g. with text tokens joined to it); a route "
                    f"must end by block {b - 1} or start at block {b} or later")


def _container(path: str) -> str:
    """``blocks`` for ``blocks.3``; a module that is not in a list is its own container."""
    head, _, last = path.rpartition(".")
    return head if last.isdigit() else path


def _require_routed(routed: nn.Module, caller: str) -> TreadGraphModule:
    if not isinstance(routed, TreadGraphModule):
        raise TypeError(f"{caller}() takes a module returned by tread_fx.route(), got "
                        f"{type(routed).__name__}; under torch.compile or DDP pass the routed "
                        f"module itself, not its wrapper")
    return routed


def _graphs_of(model: nn.Module, spec: RouteSpec, example_inputs: Any, modes=None,
               front_end: str | None = None, dynamic: bool = False):
    """Trace (or take) the model's graphs and find its block chain."""
    if isinstance(model, fx.GraphModule):
        traced = Traced({"train": copy.deepcopy(model.graph)}, "user", {}, None)
    else:
        traced = None
    groups = find_candidates(model, spec.blocks)
    if traced is None:
        names = [n for g in groups for n in g.names] + odd_siblings(model, groups)
        leaves = [model.get_submodule(n) for n in names]
        traced = trace_modes(model, leaves, example_inputs, modes, front_end, dynamic)
    chain = find_block_chain(next(iter(traced.graphs.values())), groups, spec.hidden, model)
    _check_chain(chain, groups, traced.graphs, spec.hidden, model)
    return traced, chain


def _wrapper_kind(model: nn.Module) -> str | None:
    """The name of a wrapper that route() must not see through silently."""
    from torch._dynamo.eval_frame import OptimizedModule
    if isinstance(model, OptimizedModule):
        return "torch.compile"
    if isinstance(model, (nn.parallel.DistributedDataParallel, nn.DataParallel)):
        return type(model).__name__
    for cls in type(model).__mro__:
        if cls.__name__ in ("FullyShardedDataParallel", "FSDPModule"):
            return cls.__name__
    return None


def _refuse_wrappers(model: nn.Module) -> None:
    kind = _wrapper_kind(model)
    if kind == "torch.compile":
        raise TypeError(
            "route() takes the model itself, not its torch.compile wrapper (which routes "
            "nothing and would have to be recompiled anyway): compile the routed module, "
            "routed = torch.compile(tread_fx.route(model, spec))")
    if kind is not None:
        raise TypeError(
            f"route() takes the model itself, not a {kind}-wrapped module: route first and "
            f"wrap the routed module, e.g. DistributedDataParallel(tread_fx.route(model, "
            f"spec)) or fully_shard on tread_fx.route(model, spec)")


def _graph_args(graph: fx.Graph, call: Mapping[str, Any]) -> tuple:
    """A bound call's values in the order of the graph's placeholders."""
    args = []
    for p in [n for n in graph.nodes if n.op == "placeholder"]:
        name = p.target.lstrip("*")
        if name in call:
            args.append(call[name])
        elif p.args:
            args.append(p.args[0])
        else:
            raise ValueError(f"example_inputs: missing argument {name!r}")
    return tuple(args)


def _bind_example(model: nn.Module, example_inputs: Any) -> dict[str, Any]:
    if not isinstance(example_inputs, (Mapping, Sequence, torch.Tensor)):
        raise TypeError("example_inputs must be a tuple of positional arguments or a dict of "
                        f"keyword arguments, got {type(example_inputs).__name__}")
    if isinstance(example_inputs, _Bound):   # bound already (a routed module's example)
        return example_inputs
    return bind_inputs(model, example_inputs)


def _route_graphs(model: nn.Module, spec: RouteSpec, traced: Traced, chain: BlockChain,
                  call: Mapping[str, Any] | None, selectors: dict, prefix: str = ""):
    """Insert the spec's routes into each traced graph; per mode (graph, args, inside,
    dense shapes, value guards).  Constants get ``prefix`` in their names.  Also returns
    the train-mode run of the model at one more sample that probed the blocks, recorded
    for the batch check when it will run (see :func:`tread_fx.replay.model_run`), else None."""
    graphs = traced.graphs
    for g in graphs.values():   # constants live under _tread in the routed module
        for node in g.nodes:
            if node.op == "get_attr" and node.target in traced.constants:
                node.target = f"_tread.{prefix}{node.target}"
    constants = {f"{prefix}{k}": v for k, v in traced.constants.items()}
    other_batch, run = {}, None
    if call is not None and spec.routes:
        record = ["", *_called_modules(next(iter(graphs.values())), model)] \
            if _batch_dims(traced) else []
        with frozen_state(model):
            model.train(True)
            torch.manual_seed(0)   # as the batch check seeds its run of the model
            with replay.recorded_calls(model, record) as calls:
                other_batch, _ = probe_block_io(model, (), dict(call), chain.targets)
            run = (replay.flags(model), calls) if record else None
    built = {}
    for mode, g in graphs.items():
        args = None if call is None else _graph_args(g, call)
        shapes, inside = None, set()
        if args is not None and spec.routes:
            with frozen_state(model):
                if mode in ("train", "eval"):   # else: traced in the flags as they are
                    model.train(mode == "train")
                shapes = probe_shapes(model, g, args, constants)
        if spec.routes:
            plans = plan_routes(g, chain, spec.routes, shapes, spec.token_inputs,
                                spec.prefix_tokens, model, other_batch)
            inside = set().union(*(p.inside for p in plans))
            for meta in insert_routes(g, chain, spec.routes, plans):
                i = meta["route_index"]
                if f"select_{i}" not in selectors:   # the first graph's decisions, to show
                    selector = selectors[f"select_{i}"] = TokenSelector(
                        i, meta["route"], meta["blocks"], spec.keep_order, spec.seed)
                    selector.fixed, selector.axes = meta["fixed"], meta["axes"]
                    selector.shared = meta["shared"]
            if spec.fp32_after_route:
                fp32_after_routes(g, chain, spec.routes)
            traced.shape_dependent |= any(p.fixed != (0, 0) or any(s.offset or s.tail for s in p.side)
                                          for p in plans)
        guards = value_guards(g, traced.conversions.get(mode, ()))
        built[mode] = (g, args, inside, shapes, guards)
    return built, constants, run


def _guard_for(model: nn.Module, routed: TreadGraphModule, traced: Traced) -> Guard | None:
    if traced.front_end == "user":
        return None
    tensors = module_tensors(next(iter(traced.graphs.values())), model)
    first = next(iter(model.named_parameters()), None)   # what `self.dtype` reads
    if first is not None:
        owner, _, name = first[0].rpartition(".")
        tensors.append((model.get_submodule(owner), name))
    # an fx graph serves any input unless its routes were planned on the example's shapes
    # (never-routed rows, joint-table offsets: counts of another stream's tokens)
    return Guard(model, routed, traced.traced_modules, tensors,
                 inputs=traced.front_end != "fx" or traced.shape_dependent)


def _modes_key(guard: Guard, flags: list[tuple[nn.Module, bool]], root_flag: bool) -> tuple:
    by_module = {id(m): f for m, f in flags}
    return (root_flag, *(by_module.get(id(m), m.training) for m in guard.modules[1:]))


def route(model: nn.Module, spec: Any, example_inputs: Any = None, *,
          keep_order: bool | None = None, seed: int | None = None,
          blocks: str | None = None, hidden: str | int | None = None,
          token_inputs: Mapping[str | int, Any] | None = None,
          prefix_tokens: int | None = None, fp32_after_route: bool | None = None,
          front_end: str | None = None) -> TreadGraphModule:
    """Return a routed copy of ``model`` that trains with TREAD token routing.

    Args:
        model: an unmodified ``nn.Module``, a ``torch.fx.GraphModule`` traced with its
            blocks as leaf modules, or a module returned by ``route`` (its routes are
            replaced by the new ones).
        spec: ``"2:8@0.5"``, ``"2:4@0.5,6:8@0.25"``, a :class:`Route`, a
            :class:`RouteSpec`, a list of them, or a list of dicts
            ``{"selection_ratio": .5, "start_layer_idx": 2, "end_layer_idx": 8}``.
            Block indices refer to the found block sequence; negative ones count from its
            end.
        example_inputs: optional tuple of positional or dict of keyword arguments.  When
            given: models that torch.fx cannot trace are traced on them; the shapes of
            every value are probed, so per-token side inputs of the routed blocks (RoPE
            tables, masks, skips) are found and gathered with the same indices and
            never-routed rows are kept; kept counts are validated; and the routed graph
            runs once in train mode as a safety check.
        keep_order, seed, blocks, hidden, token_inputs, prefix_tokens, fp32_after_route:
            override the spec's options (see :class:`RouteSpec`).
        front_end: ``"fx"``, ``"export"`` or ``"concrete"`` to use that tracer only; by
            default torch.fx, then (with example inputs) torch.export, then the concrete
            tracer, the first that traces the model.

    The result shares the model's parameters and buffers (identical ``state_dict`` keys)
    and leaves the model itself as it was.  It routes in ``train()`` mode only; in
    ``eval()`` mode it computes exactly what the model computes.  A graph traced on
    example inputs is specialised to them; a call that differs (shapes, dtypes, device,
    autocast, non-tensor arguments, training flags, a value branch) is traced anew.
    """
    _refuse_wrappers(model)
    spec = parse_spec(spec, keep_order=keep_order, seed=seed, blocks=blocks, hidden=hidden,
                      token_inputs=token_inputs, prefix_tokens=prefix_tokens,
                      fp32_after_route=fp32_after_route)
    if front_end not in (None, "fx", "export", "concrete"):
        raise ValueError(f"front_end must be 'fx', 'export', 'concrete' or None, got "
                         f"{front_end!r}")
    target = model._tread_model if isinstance(model, TreadGraphModule) and \
        "_tread_model" in model.__dict__ else model
    # route() runs the model (tracing, probes, the safety check): caches its modules fill
    # on the way are put back as they were
    with preserved_attributes(target):
        return _route(model, spec, example_inputs, front_end)


def _route(model: nn.Module, spec: RouteSpec, example_inputs: Any,
           front_end: str | None = None) -> TreadGraphModule:
    if isinstance(model, TreadGraphModule):
        if example_inputs is None:
            example_inputs = model.__dict__.get("_tread_example")
        model = model._tread_model
    call = None if example_inputs is None else _bind_example(model, example_inputs)
    traced, chain = _graphs_of(model, spec, call, front_end=front_end, dynamic=True)
    where = f"the block sequence {chain.targets[0]}..{chain.targets[-1]}"
    spec = spec.resolve(len(chain), where)
    _check_segments(spec, chain)
    selectors: dict = {}
    built, constants, run = _route_graphs(model, spec, traced, chain, call, selectors)
    routed = TreadGraphModule(model, built["train"][0], built.get("eval", (None,))[0],
                              selectors, class_name=f"Routed{type(model).__name__}",
                              constants=constants)
    routed.block_chain = tuple(chain.targets)
    routed.route_spec = spec
    routed.front_end = traced.front_end
    routed.input_shapes = traced.input_shapes
    routed.baked_inputs = traced.baked
    routed._tread_init(model, _guard_for(model, routed, traced), call)
    if routed._guard is not None:
        free = _batch_dims(traced)
        for attempt in (free, {}) if free else ({},):
            routed._guard.free_dims = attempt
            routed._variants.clear()
            flags = {"train": mode_flags(model, True), "eval": mode_flags(model, False)}
            for mode, (g, *_rest, guards) in built.items():
                check = traced.exports[mode].check_inputs if traced.exports else None
                routed._add_variant(g, mode, guards, _modes_key(routed._guard, flags[mode],
                                                                 mode == "train"), call, check)
            variants = [(vs[-1], mode == "train") for mode in built for vs in
                        [[v for vl in routed._variants.values() for v in vl
                          if v.graph is built[mode][0]]]]
            if not attempt or _serves_another_batch(routed, model, call, variants, run):
                break
    args, inside, shapes = built["train"][1:4]
    if args is not None and spec.routes:
        check_routes(routed, args, shapes, inside)
    return routed


def _batch_dims(traced: Traced) -> dict[str, tuple[int, ...]]:
    """Per forward argument, the dims that are the batch in every exported graph: the
    symbolic first dim of the first tensor argument, wherever it recurs."""
    free = None
    for result in traced.exports.values():
        dims = {k: v for k, v in result.input_dims.items() if "[" not in k}
        first = next(iter(dims.values()), ())
        symbol = first[0] if first and isinstance(first[0], str) else None
        if symbol is None or not result.dynamic:
            return {}
        found = {k: tuple(i for i, d in enumerate(v) if d == symbol) for k, v in dims.items()}
        found = {k: v for k, v in found.items() if v}
        if free is not None and found != free:
            return {}
        free = found
    return free or {}


def _outputs_equal(a: Any, b: Any) -> bool:
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return isinstance(a, torch.Tensor) and isinstance(b, torch.Tensor) and \
            a.shape == b.shape and torch.equal(a, b)
    if isinstance(a, dict) and isinstance(b, dict):
        return a.keys() == b.keys() and all(_outputs_equal(a[k], b[k]) for k in a)
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return len(a) == len(b) and all(_outputs_equal(x, y) for x, y in zip(a, b))
    return type(a) is type(b)


def _serves_another_batch(routed: TreadGraphModule, model: nn.Module, call: dict[str, Any],
                          variants: Sequence[tuple[Any, bool]], earlier=None) -> bool:
    """Do graphs exported with a symbolic batch compute what the model computes at one more
    sample?  (Export may unroll a loop over the batch without a guard.)  Each of
    ``variants`` (variant, train mode) is run with the routes off and compared with the
    model in the same mode, before it is trusted for other batch sizes.  The modules the
    graph calls (the blocks) are the model's own: a call of one with the model's arguments
    and random state gets the model's output back instead of computing it again.
    ``earlier``: a run of the model recorded before (:func:`tread_fx.replay.model_run`)."""
    from tread_fx.passes.token_axes import _grow_batch
    first = next(v for v in call.values() if isinstance(v, torch.Tensor))
    grown = {k: _grow_batch(v, first.shape[0]) for k, v in call.items()}
    selectors = routed.selectors
    flags = [(m, m.training) for m in model.modules()]
    try:
        for variant, train in variants:
            with frozen_state(model):
                for m, flag in flags:     # the variant's own flags, the root's mode
                    m.training = flag
                model.training = routed.training = train
                for s in selectors:
                    s.force_active = False
                if not variant.accepts(routed, grown):
                    return False
                modules = _called_modules(variant.graph, model)
                torch.manual_seed(0)
                ref, calls = replay.model_run(model, grown, modules, earlier)
                forward, _ = _compile_graph(variant.graph, "<tread_fx batch check>",
                                           replay.replaying(calls), modules)
                torch.manual_seed(0)
                out = forward(routed, *variant.args(grown))
                if not _outputs_equal(out, ref):
                    return False
        return True
    except Exception:  # noqa: BLE001 - any failure: the graphs serve one batch size only
        return False
    finally:
        for m, flag in flags:
            m.training = flag
        for s in selectors:
            s.force_active = None
            s.last_indices = None


def _called_modules(graph: fx.Graph, model: nn.Module) -> list[str]:
    """The model's modules ``graph`` calls (the blocks), not the selectors, whose calls
    the batch check records to replay them: none for a model with parameters off the CPU,
    where the copies of every block's inputs and outputs could take gigabytes and the runs
    they save are fast."""
    if any(p.device.type != "cpu" for p in model.parameters()):
        return []
    return sorted({n.target for n in graph.nodes
                   if n.op == "call_module" and not n.target.startswith("_tread.")})


def _exact_shapes(call: dict[str, Any], check):
    """A variant check that also pins every input shape to ``call``'s."""
    from tread_fx.passes.guards import freeze
    want = {k: freeze(v) for k, v in call.items()}

    def exact(other: dict[str, Any]) -> None:
        if check is not None:
            check(other)
        if any(freeze(other[k]) != v for k, v in want.items() if k in other):
            raise ValueError("input shapes differ")
    return exact


def _specialise(routed: TreadGraphModule, call: dict[str, Any]) -> fx.Graph:
    """A graph of ``routed``'s model for a call its graphs were not made for: traced in the
    current training flags on the call's own values, routed like the others."""
    with preserved_attributes(routed._tread_model):
        return _specialise_traced(routed, call)


def _specialise_traced(routed: TreadGraphModule, call: dict[str, Any]) -> fx.Graph:
    model = routed._tread_model
    flags = [(m, m.training) for m in model.modules()]
    flags[0] = (model, routed.training)
    dynamic = bool(routed._guard.free_dims) and routed.front_end == "export"
    traced, chain = _graphs_of(model, routed.route_spec, call, {"now": flags},
                               routed.front_end, dynamic)
    if tuple(chain.targets) != routed.block_chain:
        raise NoBlocksFound(
            f"traced again for a new call, {type(model).__name__} calls the blocks "
            f"{chain.targets}, not {list(routed.block_chain)} as when it was routed; the "
            f"route indices would change meaning. Route it again for these inputs")
    prefix = f"v{len(routed._tread._buffers)}_"
    built, constants, run = _route_graphs(model, routed.route_spec, traced, chain, call,
                                     dict(routed._tread._modules), prefix)
    for name, value in constants.items():
        routed._tread.register_buffer(name, value, persistent=False)
    graph, args, inside, shapes, guards = built["now"]
    check = traced.exports["now"].check_inputs if traced.exports else None
    variant = routed._add_variant(graph, "train" if routed.training else "eval", guards,
                                  None, call, check)
    if dynamic and not (_batch_dims(traced) and _serves_another_batch(
            routed, model, call, [(variant, routed.training)], run)):
        variant.check = _exact_shapes(call, check)
    if args is not None and routed.route_spec.routes and routed.training:
        check_routes(routed, args, shapes, inside, graph)
    return variant


def unroute(routed: nn.Module) -> TreadGraphModule:
    """A dense module with the routes of ``routed`` taken out (parameters still shared).

    It keeps what the routed module was specialised on and traces anew for other calls,
    like the routed module does.
    """
    routed = _require_routed(routed, "unroute")
    front_end = routed.front_end if routed.front_end in ("fx", "export", "concrete") else None
    dense = _route(routed, replace(routed.route_spec, routes=()), None, front_end)
    type(dense).__name__ = type(routed._tread_model).__name__
    return dense


def kept_masks(routed: nn.Module) -> list[torch.Tensor]:
    """Per route, the ``[B, N]`` boolean mask of the tokens its blocks saw in the last forward.

    True marks a token kept through the route; False one that skipped it.  Empty when the
    last forward did not route (eval mode), so a loss that uses the masks falls back to the
    plain loss.  Reading the masks costs nothing when unused: the selectors only keep a
    reference to the indices they drew.
    """
    masks = []
    for selector in _require_routed(routed, "kept_masks").selectors:
        indices = selector.last_indices
        if indices is None:
            return []
        mask = torch.zeros(indices.shape[0], selector.last_num_tokens, dtype=torch.bool,
                           device=indices.device)
        masks.append(mask.scatter(1, indices, True))
    return masks


@contextmanager
def routing(routed: nn.Module, selection_ratio: float | None = None) -> Iterator[nn.Module]:
    """Route in any mode (also ``eval()``), optionally with another ratio for every route.

    For inference-time routing such as TREAD / sparse guidance::

        with tread_fx.routing(routed, 0.3):
            v_strong = routed(x, t, y)
    """
    selectors = _require_routed(routed, "routing").selectors
    if selection_ratio is not None:
        for s in selectors:
            s.check_ratio(selection_ratio)
    saved = [(s, s.force_active, s.selection_ratio) for s in selectors]
    try:
        for s in selectors:
            s.force_active = True
            if selection_ratio is not None:
                s.selection_ratio = float(selection_ratio)
        yield routed
    finally:
        for s, active, ratio in saved:
            s.force_active, s.selection_ratio = active, ratio
