"""The routed module: a GraphModule with one graph per mode over the user's own module tree."""

from __future__ import annotations

import copy
import warnings
from collections import OrderedDict
from typing import Any

import torch
from torch import fx, nn


__all__ = ["TreadGraphModule"]

_HOOK_DICTS = ("_forward_hooks", "_forward_hooks_with_kwargs", "_forward_hooks_always_called",
               "_forward_pre_hooks", "_forward_pre_hooks_with_kwargs", "_state_dict_hooks",
               "_state_dict_pre_hooks", "_load_state_dict_pre_hooks",
               "_load_state_dict_post_hooks")
# Attributes route() sets that copies must keep.
_EXTRA_ATTRS = ("block_chain", "route_spec", "front_end", "input_shapes", "baked_inputs",
                "_tread_example")
# Graphs traced for calls the first ones were not made for, per routed module, at most:
MAX_VARIANTS = 16
# Re-traces after which a warning says what keeps changing.
WARN_AFTER = 8
# Bumped whenever any module anywhere gets a submodule (setattr, add_module): a routed
# module then looks whether its own tree changed (adapters added after route(), say).
_STRUCTURE = [0]


def _structure_changed(module: nn.Module, name: str, submodule: Any) -> None:
    _STRUCTURE[0] += 1


torch.nn.modules.module.register_module_module_registration_hook(_structure_changed)


def _sync_if_changed(module: "TreadGraphModule") -> bool:
    """Re-sync ``module`` with its model when any module anywhere got a submodule since it
    last looked.  Under torch.compile (2.13 and later) this runs once per (re)compilation,
    at trace time, and leaves no guard behind: a guard on the counter would recompile
    whenever any module anywhere is created; a changed module tree fails dynamo's own
    guards and recompiles.  Older dynamo cannot run it at trace time: there a compiled call
    skips it (adapters added after torch.compile take effect after one eager call)."""
    if module.__dict__.get("_structure_version") != _STRUCTURE[0]:
        module._sync_structure()
    return True


_SYNC_WHILE_TRACING = tuple(int(p) for p in torch.__version__.split(".")[:2]) >= (2, 13)
if _SYNC_WHILE_TRACING:
    _sync_if_changed = torch._dynamo.assume_constant_result(_sync_if_changed)


class Variant:
    """One traced graph and what it was specialised on beyond its key."""

    def __init__(self, forward, names: list[str] | None, guards, graph: fx.Graph,
                 check=None) -> None:
        self.forward = forward      # compiled graph: (root, *placeholder values)
        self.names = names          # placeholder argument names; None: call as given
        self.guards = guards        # passes.guards.ValueGuards or None
        self.graph = graph
        self.check = check          # (call) -> None or ValueError: the input dims it serves

    def args(self, call: dict) -> list:
        return [call[n] for n in self.names]

    def accepts(self, root: nn.Module, call: dict) -> bool:
        if self.check is not None:
            try:
                self.check(call)
            except ValueError:
                return False
        return self.guards is None or self.guards.holds(root, self.args(call))


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


def _compile_graph(graph: fx.Graph, filename: str, block_call=None, blocks=()):
    """The forward function of ``graph``; with ``block_call`` (``compile_blocks``) every
    call of a module in ``blocks`` goes through it."""
    if block_call is not None:
        from .compile import blocks_called_through
        graph = blocks_called_through(graph, blocks, block_call)
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
        call = self.__dict__.get("_block_call")
        if call is not None:
            cls._train_forward, _ = self._forward_of(self.graph, "train")
        if self._eval_graph is not None:
            cls._eval_forward, self._eval_code = _compile_graph(
                self._eval_graph, f"<tread_fx eval graph of {cls.__name__}>")
            if call is not None:
                cls._eval_forward, _ = self._forward_of(self._eval_graph, "eval")
        else:
            cls._eval_forward = cls._train_forward
        cls.forward = TreadGraphModule._dispatch
        return result

    def _forward_of(self, graph: fx.Graph, mode: str):
        return _compile_graph(graph, f"<tread_fx {mode} graph of {type(self).__name__}>",
                              self.__dict__.get("_block_call"), self._blocks_in(graph))

    def _blocks_in(self, graph: fx.Graph) -> list[str]:
        """The chain's blocks and every other module of their classes that ``graph`` calls
        (SD3's last block, outside the chain): ``compile_blocks`` compiles them all."""
        chain = list(self.__dict__.get("block_chain", ()))
        classes = self._block_classes()
        return chain + [n.target for n in graph.nodes
                        if n.op == "call_module" and n.target not in chain
                        and type(self.get_submodule(n.target)) in classes]

    def _block_classes(self) -> set[type]:
        """The classes of the chain's blocks (Flux: two)."""
        return {type(self.get_submodule(t)) for t in self.__dict__.get("block_chain", ())}

    def _call_blocks_through(self, call, options: dict) -> None:
        """Call every block of the chain through ``call`` from now on (``compile_blocks``):
        in the train and eval forward, in every cached graph and in those traced later."""
        self.__dict__["_block_call"] = call
        self.__dict__["_block_compile_options"] = dict(options)
        self.recompile()
        for key, variants in self._variants.items():
            self._variants[key] = [
                Variant(self._variant_forward(v.graph, "variant"), v.names, v.guards,
                        v.graph, v.check) for v in variants]

    def _variant_forward(self, graph: fx.Graph, mode: str):
        if graph is self.graph:
            return type(self)._train_forward
        if graph is self._eval_graph:
            return type(self)._eval_forward
        graph.owning_module = self
        return self._forward_of(graph, mode)[0]

    def _tread_init(self, model: nn.Module, guard, example: dict | None) -> None:
        """Remember the model (to trace it again) and what its graphs are specialised on."""
        self.__dict__["_tread_model"] = model
        self.__dict__["_guard"] = guard
        self.__dict__["_variants"] = OrderedDict()
        self.__dict__["retraces"] = 0
        self._remember_structure()
        if example is not None:
            self._tread_example = example

    # -- the module tree changing after route() -------------------------------------------
    def _tree(self) -> tuple:
        model = self.__dict__.get("_tread_model")
        return (tuple((n, id(m)) for n, m in self._modules.items() if n != "_tread"),
                () if model is None else tuple((n, id(m)) for n, m in model.named_modules()))

    def _remember_structure(self) -> None:
        self.__dict__["_structure"] = self._tree()
        self.__dict__["_structure_version"] = _STRUCTURE[0]

    def _sync_structure(self) -> None:
        """After a module of the tree was replaced (LoRA adapters injected into the routed
        module or into the model, a layer swapped): make the routed module and the model
        hold the same children again and drop the cached graphs, which baked the old
        modules' code in; the next call traces the model as it is now."""
        self.__dict__["_structure_version"] = _STRUCTURE[0]
        saved = self.__dict__.get("_structure")
        if saved is None or self._tree() == saved:
            return
        model = self._tread_model
        before = dict(saved[0])
        for name, child in list(self._modules.items()):   # replaced on the routed module
            if name != "_tread" and id(child) != before.get(name):
                model._modules[name] = child
        tread = self._modules["_tread"]                    # and those replaced on the model
        self._modules.clear()
        self._modules.update((k, v) for k, v in model._modules.items() if k != "_tread")
        self._modules["_tread"] = tread
        self._variants.clear()
        self._remember_structure()

    def _add_variant(self, graph: fx.Graph, mode: str, guards, key: tuple | None,
                     call: dict | None, check=None) -> Variant:
        guard = self._guard
        forward = self._variant_forward(graph, mode)
        names = None if not guard.inputs else [
            n.target for n in graph.nodes if n.op == "placeholder"]
        variant = Variant(forward, names, guards, graph, check)
        full = guard.key(call if guard.inputs else None)
        key = full if key is None else (key, *full[1:])
        self._variants.setdefault(key, []).append(variant)
        while sum(len(v) for v in self._variants.values()) > MAX_VARIANTS:
            oldest = next(iter(self._variants))
            self._variants[oldest].pop(0)
            if not self._variants[oldest]:
                del self._variants[oldest]
        return variant

    def _dispatch(self, *args: Any, **kwargs: Any) -> Any:
        guard = self.__dict__.get("_guard")
        if guard is not None and (_SYNC_WHILE_TRACING or not torch.compiler.is_compiling()):
            _sync_if_changed(self)
        if guard is None:   # a graph the user traced: one graph for every call
            if self.training:
                return self._train_forward(*args, **kwargs)
            return self._eval_forward(*args, **kwargs)
        if not guard.inputs:   # traced symbolically: valid for any input
            key = guard.key(None)
            for variant in self._variants.get(key, ()):
                return variant.forward(self, *args, **kwargs)
            return self._retrace(key, guard.bind(args, kwargs)).forward(self, *args, **kwargs)
        call = guard.bind(args, kwargs)
        key = guard.key(call)
        for variant in self._variants.get(key, ()):
            if variant.accepts(self, call):
                return variant.forward(self, *variant.args(call))
        variant = self._retrace(key, call)
        return variant.forward(self, *variant.args(call))

    @torch.compiler.disable
    def _retrace(self, key: tuple, call: dict) -> Variant:
        """Trace the model again for a call no graph was made for, and keep the graph."""
        from tread_fx.passes.guards import describe_difference
        from .api import _specialise
        self.__dict__["retraces"] = self.__dict__.get("retraces", 0) + 1
        if self.retraces == WARN_AFTER:
            warnings.warn(
                f"{type(self).__name__} has traced its model {self.retraces} times for new "
                f"calls (last change: {describe_difference(self._guard, key, list(self._variants))}"
                f"); each new input shape, dtype, device, autocast state, non-tensor argument "
                f"value or branch on tensor values costs a trace. Keep them fixed (e.g. bucket "
                f"resolutions, pass tensors instead of Python numbers)", stacklevel=3)
        return _specialise(self, call)

    # -- inspection ---------------------------------------------------------------------
    @property
    def specialisations(self) -> list[dict[str, Any]]:
        """What each cached graph was traced for, one dict per graph: the training flags
        (root first, then the modules traced through), and for graphs traced on examples
        each argument's (shape, dtype, device) or value (``None`` in a shape: a symbolic
        batch dim), the autocast state and the dtypes and devices of the parameters read."""
        guard = self.__dict__.get("_guard")
        if guard is None:
            return []
        return [guard.describe(key) for key, variants in self._variants.items()
                for _ in variants]


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
        if "_block_call" in self.__dict__:
            other._call_blocks_through(self._block_call, self._block_compile_options)
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
        self._copy_specialisation_to(res, memo)
        return self._copy_extras_to(res)

    def __copy__(self) -> "TreadGraphModule":
        res = TreadGraphModule(self, self.graph, self._eval_graph, dict(self._tread._modules),
                               type(self).__name__)
        self._copy_specialisation_to(res, None)
        return self._copy_extras_to(res)

    def _copy_specialisation_to(self, res: "TreadGraphModule", memo: dict | None) -> None:
        """The copy keeps the cached graphs and their guards, keyed on its own modules; a
        deep copy traces (when it must) a copy of the model made of its own modules."""
        model = self.__dict__.get("_tread_model")
        if model is None:
            return
        guard = self._guard
        if memo is not None:
            model, guard = copy.deepcopy(model, memo), copy.deepcopy(guard, memo)
        elif guard is not None:
            guard = copy.copy(guard)
            guard.modules = [res, *guard.modules[1:]]
        res.__dict__.update(_tread_model=model, _guard=guard, retraces=self.retraces,
                            _variants=OrderedDict((k, list(v))
                                                  for k, v in self._variants.items()))
        res._remember_structure()

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
