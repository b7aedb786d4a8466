"""Regional compilation of a routed model: every block through one ``torch.compile``.

    routed = tread_fx.route(model, "2:8@0.5")
    tread_fx.compile_blocks(routed)             # like diffusers' compile_repeated_blocks

The blocks of a chain share their code, so one compiled function serves all blocks of a
class (the parameters are inputs of the compiled graph, not constants): a chain compiles
once per block class, token count (full, kept) and input layout, however deep it is, in
seconds where ``torch.compile(routed)`` compiles the whole model.  Modules of a chain
block's class outside the chain (SD3's last block, which has no context feed-forward) go
through the same function.  What runs between the blocks (the selection, gathers and
scatters, embedders, the final layer) stays eager.

The model's own modules are not compiled in place (``block.compile()`` would change the
user's model too): the routed module's generated code calls each block through the
compiled function instead, in every graph it has and every one it traces later.
"""

from __future__ import annotations

import types
from typing import Any, Callable, Sequence

import torch
from torch import fx, nn

__all__ = ["call_block", "blocks_called_through", "compile_blocks"]


def call_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
    """What the compiled function runs: the block, called as the graph calls it."""
    return block(*args, **kwargs)


def _call_block_of(cls: type) -> Callable:
    """:func:`call_block` with a code object of its own for blocks of class ``cls``.
    Dynamo keeps its compiled graphs, and counts them against its recompile limit (8), per
    code object: Flux's two block classes, each at two token counts and a few input
    layouts, train and eval, would share one limit and run the last blocks eagerly."""
    code = call_block.__code__.replace(co_name=f"call_{cls.__name__}",
                                       co_qualname=f"call_{cls.__name__}")
    return types.FunctionType(code, call_block.__globals__, code.co_name)


def blocks_called_through(graph: fx.Graph, targets: Sequence[str],
                          caller: Callable) -> fx.Graph:
    """A copy of ``graph`` in which each call of a module in ``targets`` becomes
    ``caller(<that module>, *args, **kwargs)``."""
    copy = fx.Graph()
    out, old_output = copy.graph_copy(graph, {}, return_output_node=True)
    copy.output(out, type_expr=old_output.type)
    wanted = set(targets)
    for node in list(copy.nodes):
        if node.op != "call_module" or node.target not in wanted:
            continue
        with copy.inserting_before(node):
            module = copy.get_attr(node.target)
            call = copy.call_function(caller, (module, *node.args), dict(node.kwargs))
        call.meta = dict(node.meta)
        node.replace_all_uses_with(call)
        copy.erase_node(node)
    copy.lint()
    return copy


def compile_blocks(routed: nn.Module, **compile_options: Any) -> nn.Module:
    """Compile the blocks of a routed model with ``torch.compile(**compile_options)``, one
    compiled function per block class (Flux: two); returns ``routed`` (changed in place;
    the model it was routed from is not).

    ``compile_options`` go to :func:`torch.compile` (``backend``, ``mode``, ``dynamic``,
    ``fullgraph``, ``options``).  ``dynamic`` defaults to ``False``: each token count gets a
    graph of static shapes, as each block of the dense model would.  Under torch's default
    (``dynamic=None``) the second token count, the kept one, would be compiled with a
    symbolic token axis, so the routed blocks would run generic kernels the dense blocks do
    not.  Pass ``dynamic=None`` or ``True`` when the blocks see many shapes (resolutions,
    batch sizes): past dynamo's recompile limit, 8 graphs per block class, they run
    uncompiled.
    Copies of ``routed`` (``copy.deepcopy``, data-parallel replicas) keep calling their
    blocks through a compiled function.
    """
    from .api import _require_routed
    routed = _require_routed(routed, "compile_blocks")
    compile_options = {"dynamic": False, **compile_options}
    compiled: dict[type, Callable] = {}
    for cls in routed._block_classes():
        compiled[cls] = torch.compile(_call_block_of(cls), **compile_options)

    def call_compiled_block(block: nn.Module, *args: Any, **kwargs: Any) -> Any:
        fn = compiled.get(type(block))
        if fn is None:   # a block replaced by one of another class after compile_blocks
            fn = compiled[type(block)] = torch.compile(_call_block_of(type(block)),
                                                       **compile_options)
        return fn(block, *args, **kwargs)

    routed._call_blocks_through(call_compiled_block, compile_options)
    return routed
