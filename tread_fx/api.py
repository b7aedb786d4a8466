"""``route()`` and ``unroute()``: the whole way from a model to its routed graph."""

from __future__ import annotations

import copy
from contextlib import contextmanager
from typing import Any, Iterator, Mapping, Sequence

import torch
from torch import fx, nn

from tread_fx.passes.find_blocks import (BlockChain, NoBlocksFound, find_block_chain,
                                         find_candidates)
from tread_fx.passes.insert_routes import insert_routes
from tread_fx.passes.remove_routes import remove_routes
from tread_fx.passes.check_routes import check_routes
from tread_fx.passes.token_axes import plan_routes, probe_block_io, probe_shapes
from tread_fx.passes.trace import Traced, frozen_state, trace_modes

from .module import TreadGraphModule
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
    called = {n.target for n in graphs["train"].nodes if n.op == "call_module"}
    for group in groups:
        if not in_chain & set(group.names):
            continue
        missing = [n for n in group.names if n in called and n not in in_chain]
        if missing:
            raise NoBlocksFound(
                f"{', '.join(missing)} belong(s) with the block sequence "
                f"{chain.targets[0]}..{chain.targets[-1]} but not to its chain: the output "
                f"does not reach the next block directly (an operation sits in between), so "
                f"route indices would not match the blocks' own indices. Give blocks='<path>' "
                f"a container that holds only the chained blocks, or move the operation into "
                f"a block"
            )
    if "eval" in graphs:
        eval_chain = find_block_chain(graphs["eval"], groups, hidden, root)
        if eval_chain.targets != chain.targets:
            raise NoBlocksFound(
                f"the train-mode trace calls blocks {chain.targets} but the eval-mode trace "
                f"calls {eval_chain.targets}; Python-level randomness or mode checks around "
                f"the block calls (e.g. LayerDrop) cannot be routed. Move them into the blocks"
            )


def _dense_graphs(routed: TreadGraphModule) -> dict[str, fx.Graph]:
    """Copies of a routed module's graphs with the routes taken out."""
    graphs = {"train": copy.deepcopy(routed.graph)}
    if routed._eval_graph is not None:
        graphs["eval"] = copy.deepcopy(routed._eval_graph)
    for g in graphs.values():
        remove_routes(g)
    return graphs


def _require_routed(routed: nn.Module, caller: str) -> TreadGraphModule:
    if not isinstance(routed, TreadGraphModule):
        raise TypeError(f"{caller}() takes a module returned by tread_fx.route(), got "
                        f"{type(routed).__name__}; under torch.compile or DDP pass the routed "
                        f"module itself, not its wrapper")
    return routed


def _graphs_of(model: nn.Module, spec: RouteSpec, example_inputs: Any):
    """Trace (or take) the model's graphs and find its block chain."""
    if isinstance(model, TreadGraphModule):
        traced = Traced(_dense_graphs(model), model.__dict__.get("front_end", "fx"), {},
                        model.__dict__.get("input_shapes"))
        traced.baked = model.__dict__.get("baked_inputs") or {}
    elif isinstance(model, fx.GraphModule):
        traced = Traced({"train": copy.deepcopy(model.graph)}, "user", {}, None)
    else:
        traced = None
    groups = find_candidates(model, spec.blocks)
    if traced is None:
        leaves = [model.get_submodule(n) for g in groups for n in g.names]
        traced = trace_modes(model, leaves, example_inputs)
        for g in traced.graphs.values():   # constants live under _tread in the routed module
            for node in g.nodes:
                if node.op == "get_attr" and node.target in traced.constants:
                    node.target = f"_tread.{node.target}"
    chain = find_block_chain(traced.graphs["train"], groups, spec.hidden, model)
    _check_chain(chain, groups, traced.graphs, spec.hidden, model)
    return traced, chain


def _example_args(graph: fx.Graph, example_inputs: Any, baked: Mapping[str, Any]) -> tuple:
    if isinstance(example_inputs, Mapping):
        example_inputs = {k: v for k, v in example_inputs.items() if k not in baked}
        placeholders = [n for n in graph.nodes if n.op == "placeholder"]
        names = [p.target.lstrip("*") for p in placeholders]
        unknown = sorted(set(example_inputs) - set(names))
        if unknown:
            raise ValueError(f"example_inputs: unknown argument(s) {unknown}; "
                             f"forward takes {names}")
        args = []
        for p, name in zip(placeholders, names):
            if name in example_inputs:
                args.append(example_inputs[name])
            elif p.args:
                args.append(p.args[0])
            else:
                raise ValueError(f"example_inputs: missing argument {name!r}")
        return tuple(args)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if isinstance(example_inputs, Sequence):
        return tuple(example_inputs)
    raise TypeError("example_inputs must be a tuple of positional arguments or a dict of "
                    f"keyword arguments, got {type(example_inputs).__name__}")


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


def _call_inputs(example_inputs: Any) -> tuple[tuple, dict]:
    """Example inputs as the (args, kwargs) of a call of the model."""
    if isinstance(example_inputs, Mapping):
        return (), dict(example_inputs)
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,), {}
    return tuple(example_inputs), {}


def route(model: nn.Module, spec: Any, example_inputs: Any = None, *,
          keep_order: bool | None = None, seed: int | None = None,
          blocks: str | None = None, hidden: str | int | None = None,
          token_inputs: Mapping[str | int, Any] | None = None,
          prefix_tokens: int | None = None) -> TreadGraphModule:
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
            tables, masks, skips) are found and gathered with the same indices and prefix
            tokens are kept; kept counts are validated; and the routed graph runs once in
            train mode as a safety check.
        keep_order, seed, blocks, hidden, token_inputs, prefix_tokens: override the
            spec's options (see :class:`RouteSpec`).

    The result shares the model's parameters and buffers (identical ``state_dict`` keys)
    and leaves the model itself as it was.  It routes in ``train()`` mode only; in
    ``eval()`` mode it computes exactly what the model computes.
    """
    _refuse_wrappers(model)
    spec = parse_spec(spec, keep_order=keep_order, seed=seed, blocks=blocks, hidden=hidden,
                      token_inputs=token_inputs, prefix_tokens=prefix_tokens)
    traced, chain = _graphs_of(model, spec, example_inputs)
    graphs = traced.graphs
    where = f"the block sequence {chain.targets[0]}..{chain.targets[-1]}"
    spec = spec.resolve(len(chain), where)
    args = None if example_inputs is None else _example_args(graphs["train"], example_inputs,
                                                              traced.baked)
    selectors = {}
    other_batch, dense_shapes, inside = {}, {}, set()
    if args is not None:
        call_args, call_kwargs = _call_inputs(example_inputs)
        with frozen_state(model):
            model.train()
            other_batch, _ = probe_block_io(model, call_args, call_kwargs, chain.targets)
    for mode, g in {id(g): (m, g) for m, g in graphs.items()}.values():
        shapes = None
        if args is not None:
            with frozen_state(model):
                model.train(mode == "train")
                shapes = probe_shapes(model, g, args, traced.constants)
            dense_shapes[mode] = shapes
        plans = plan_routes(g, chain, spec.routes, shapes, spec.token_inputs,
                            spec.prefix_tokens, model, other_batch)
        if mode == "train":
            inside = set().union(*(p.inside for p in plans))
        for meta in insert_routes(g, chain, spec.routes, plans):
            i = meta["route_index"]
            selector = selectors.setdefault(f"select_{i}", TokenSelector(
                i, meta["route"], meta["blocks"], spec.keep_order, spec.seed))
            selector.fixed, selector.axes = meta["fixed"], meta["axes"]
            selector.shared = meta["shared"]
    routed = TreadGraphModule(model, graphs["train"], graphs.get("eval"), selectors,
                              class_name=f"Routed{type(model).__name__}".replace(
                                  "RoutedRouted", "Routed"),
                              constants=traced.constants)
    routed.block_chain = tuple(chain.targets)
    routed.route_spec = spec
    routed.front_end = traced.front_end
    routed.input_shapes = traced.input_shapes
    routed.baked_inputs = traced.baked
    if args is not None:
        check_routes(routed, args, dense_shapes.get("train"), inside)
    return routed


def unroute(routed: nn.Module) -> TreadGraphModule:
    """A dense module with the routes of ``routed`` taken out (parameters still shared)."""
    graphs = _dense_graphs(_require_routed(routed, "unroute"))
    name = type(routed).__name__
    dense = TreadGraphModule(routed, graphs["train"], graphs.get("eval"), {},
                             class_name=name[len("Routed"):] if name.startswith("Routed") else name)
    dense.block_chain = getattr(routed, "block_chain", ())
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
