"""The routed module: a GraphModule with one graph per mode over the user's own module tree."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn

from tread_fx.passes.trace import shape_tree

__all__ = ["TreadGraphModule"]

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
# Attributes route() sets that copies must keep.
_EXTRA_ATTRS = ("block_chain", "route_spec", "front_end", "input_shapes", "baked_inputs")


def _same(a: Any, b: Any) -> bool:
    try:
        return bool(a == b) if not isinstance(a, torch.Tensor) else False
    except Exception:  # noqa: BLE001 - values that cannot be compared are not the same
        return a is b


def _get_path(obj, path: str):
    for part in path.split("."):
        obj = getattr(obj, part)
    return obj


def _has_path(obj, path: str) -> bool:
    try:
        _get_path(obj, path)
    except AttributeError:
        return False
    return True


def _compile_graph(graph: fx.Graph, filename: str):
    code = graph.python_code(root_module="self")
    namespace = dict(code.globals)
    exec(compile(code.src, filename, "exec"), namespace)  # noqa: S102 - fx's own codegen
    return namespace["forward"], code.src


class TreadGraphModule(fx.GraphModule):
    """A routed model: ``graph`` runs in ``train()`` mode, ``eval_graph`` in ``eval()`` mode.

    Both graphs are traced from the same model (each in its own mode, so code outside the
    blocks that branches on ``self.training`` keeps its meaning) and both carry the TREAD
    nodes; the selectors are active in train mode only, so eval runs the dense computation.

    The module tree is the original model's: the same child modules, parameters and buffers
    (so ``state_dict`` keys are identical and ``routed.blocks[0]`` works), plus the
    parameter-free selectors under ``_tread`` (one per route).
    """

    def __init__(self, root: nn.Module, graph: fx.Graph, eval_graph: fx.Graph | None = None,
                 selectors: dict[str, nn.Module] | None = None,
                 class_name: str | None = None,
                 constants: dict[str, torch.Tensor] | None = None) -> None:
        self._eval_graph = None
        super().__init__(nn.Module(), fx.Graph(), class_name or type(root).__name__)
        # Adopt the root's own state: the very same parameter and buffer dicts (so .to()
        # and load_state_dict act on both) and the same child modules, in the same order.
        self._parameters = root._parameters
        self._buffers = root._buffers
        self._non_persistent_buffers_set = root._non_persistent_buffers_set
        self._modules = OrderedDict((k, v) for k, v in root._modules.items() if k != "_tread")
        for name in _HOOK_DICTS:
            setattr(self, name, OrderedDict(getattr(root, name)))
        # What only the routed module has lives under _tread: the selectors (no state) and
        # tensors the tracer had to store (non-persistent buffers).
        tread = nn.Module()
        for name, module in (selectors or {}).items():
            tread.add_module(name, module)
        previous = root._modules.get("_tread")   # a routed root keeps its constants
        for name, value in {**(constants or {}),
                            **(previous._buffers if previous is not None else {})}.items():
            tread.register_buffer(name, value, persistent=False)
        self._modules["_tread"] = tread
        self.training = root.training
        tread.train(root.training)
        for g in (graph, eval_graph):
            for node in [] if g is None else g.nodes:
                if node.op == "get_attr" and not _has_path(self, node.target):
                    setattr(self, node.target, _get_path(root, node.target))
        self._eval_graph = eval_graph
        if eval_graph is not None:
            eval_graph.owning_module = self
        self.graph = graph  # compiles both forwards

    # -- graphs and forward -------------------------------------------------------------
    @property
    def eval_graph(self) -> fx.Graph:
        """The graph run in eval mode (the train graph when the model came with one graph)."""
        return self._eval_graph if self._eval_graph is not None else self.graph

    @property
    def eval_code(self) -> str:
        return self._eval_code if self._eval_graph is not None else self.code

    def recompile(self):
        result = super().recompile()
        cls = type(self)
        cls._train_forward = cls.forward
        if self._eval_graph is not None:
            cls._eval_forward, self._eval_code = _compile_graph(
                self._eval_graph, f"<tread_fx eval graph of {cls.__name__}>")
        else:
            cls._eval_forward = cls.forward
        cls.forward = TreadGraphModule._dispatch
        return result

    def _dispatch(self, *args: Any, **kwargs: Any) -> Any:
        if self.__dict__.get("baked_inputs"):
            kwargs = self._check_baked(kwargs)
        if self.__dict__.get("input_shapes"):
            self._check_input_shapes(args, kwargs)
        if self.training:
            return self._train_forward(*args, **kwargs)
        return self._eval_forward(*args, **kwargs)

    def _check_baked(self, kwargs: dict) -> dict:
        """Non-tensor arguments were fixed at tracing: accept them only with those values."""
        rest = {}
        for name, value in kwargs.items():
            if name not in self.baked_inputs:
                rest[name] = value
            elif not _same(value, self.baked_inputs[name]):
                raise ValueError(
                    f"{type(self).__name__} was traced with {name}={self.baked_inputs[name]!r} "
                    f"and computes only that case; got {name}={value!r}. Call "
                    f"tread_fx.route() again with example inputs that have this value")
        return rest

    def _check_input_shapes(self, args: tuple, kwargs: dict) -> None:
        names = [n.target for n in self.graph.nodes if n.op == "placeholder"]
        given = dict(zip(names, args), **kwargs)
        for name, expected in self.input_shapes.items():
            if name not in given:
                continue
            got = shape_tree(given[name])
            if got != expected:
                raise ValueError(
                    f"{type(self).__name__} was traced on example inputs (its forward branches "
                    f"on shapes, so torch.fx could not trace it symbolically) and its graph is "
                    f"specialised to them: argument {name!r} had shape {expected}, got {got}. "
                    f"Call tread_fx.route() again with example inputs of this shape, or keep "
                    f"the batch shape fixed (drop_last=True); sample with the original model")

    # -- inspection ---------------------------------------------------------------------
    @property
    def selectors(self) -> list[nn.Module]:
        """One :class:`~tread_fx.runtime.TokenSelector` per route, in route order."""
        return [self._tread.get_submodule(f"select_{i}") for i in range(len(self._tread._modules))]

    @property
    def routes(self):
        """The resolved routes, as :class:`~tread_fx.spec.Route` objects."""
        return tuple(s.route for s in self.selectors)

    def graphs(self) -> list[fx.Graph]:
        """The distinct graphs of this module (train first)."""
        return [self.graph] if self._eval_graph is None else [self.graph, self._eval_graph]

    # -- copying ------------------------------------------------------------------------
    def _copy_extras_to(self, other: "TreadGraphModule") -> "TreadGraphModule":
        for name in _EXTRA_ATTRS:
            if name in self.__dict__:
                setattr(other, name, copy.copy(self.__dict__[name]))
        return other

    def __deepcopy__(self, memo: dict[int, Any]) -> "TreadGraphModule":
        tree = nn.Module()
        tree._parameters = self._parameters
        tree._buffers = self._buffers
        tree._non_persistent_buffers_set = self._non_persistent_buffers_set
        tree._modules = self._modules
        tree.training = self.training
        tree_copy = copy.deepcopy(tree, memo)
        tread = tree_copy._modules["_tread"]
        res = TreadGraphModule(
            tree_copy, copy.deepcopy(self.graph, memo),
            None if self._eval_graph is None else copy.deepcopy(self._eval_graph, memo),
            dict(tread._modules), type(self).__name__)
        memo[id(self)] = res
        return self._copy_extras_to(res)

    def __copy__(self) -> "TreadGraphModule":
        res = TreadGraphModule(self, self.graph, self._eval_graph, dict(self._tread._modules),
                               type(self).__name__)
        return self._copy_extras_to(res)

    def _replicate_for_data_parallel(self) -> "TreadGraphModule":
        # Like nn.Module's: the replica gets its own dicts, which replicate() fills.
        replica = self.__copy__()
        replica._parameters = OrderedDict()
        replica._buffers = OrderedDict(self._buffers)
        replica._non_persistent_buffers_set = set(self._non_persistent_buffers_set)
        object.__setattr__(replica, "_is_replica", True)
        return replica

    def __reduce__(self):
        raise TypeError(
            f"{type(self).__name__} (a tread_fx routed module) cannot be pickled; save its "
            f"state_dict() (keys are the original model's) and call tread_fx.route() again "
            f"after loading it into the original model"
        )
