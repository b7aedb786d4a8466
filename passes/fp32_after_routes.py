"""Run the block right after each route in float32, with autocast off (``fp32_after_route``).

The official TREAD code runs the first block that sees the reinjected tokens in full
precision: under bf16/fp16 autocast the tokens that skipped the route and those that went
through it meet there.  For route ``i`` ending at block ``end`` (and a block ``end + 1``)::

    tread_fp32_off_i  = autocast_off(tread_select_i)        # autocast off (cpu and cuda)
    tread_fp32_in_i_k = float32_input(<argument k>, tread_select_i)   # bf16/fp16 -> fp32
    <block end+1>(... tread_fp32_in_i_k ...)
    tread_fp32_on_i   = autocast_restore(tread_fp32_off_i, <block end+1>)

Every node passes its value through when the selector is inactive (``None``: eval mode,
or ratio 0), so the model's own computation is untouched then.  Runs after
:func:`~tread_fx.passes.insert_routes.insert_routes`, on the graph it rewrote.
"""

from __future__ import annotations

from typing import Sequence

from torch import fx

from tread_fx.runtime import autocast_off, autocast_restore, float32_input
from tread_fx.spec import Route

from .find_blocks import BlockChain
from .insert_routes import TREAD_META
from .token_axes import block_nodes

__all__ = ["fp32_after_routes"]


def fp32_after_routes(graph: fx.Graph, chain: BlockChain, routes: Sequence[Route]) -> list[str]:
    """Rewrite ``graph`` in place; returns the targets of the blocks now run in float32."""
    selects = {n.meta[TREAD_META]["route_index"]: n for n in graph.nodes
               if n.meta.get(TREAD_META, {}).get("role") == "select"}
    blocks = block_nodes(graph, chain.targets)
    done = []
    for i, route in enumerate(routes):
        if route.end + 1 >= len(blocks):
            continue            # the route ends at the last block: no block after it
        block, select = blocks[route.end + 1], selects[i]
        meta = {**select.meta[TREAD_META], "block": chain.targets[route.end + 1]}
        with graph.inserting_before(block):
            off = graph.create_node("call_function", autocast_off, (select,), {},
                                    name=f"tread_fp32_off_{i}")
            off.meta[TREAD_META] = {**meta, "role": "fp32_off"}
            cast = {}
            for k, arg in enumerate(block.all_input_nodes):
                cast[arg] = graph.create_node("call_function", float32_input, (arg, select),
                                              {}, name=f"tread_fp32_in_{i}_{k}")
                cast[arg].meta[TREAD_META] = {**meta, "role": "fp32_in"}
        block.args = fx.map_arg(block.args, lambda a: cast.get(a, a))
        block.kwargs = fx.map_arg(block.kwargs, lambda a: cast.get(a, a))
        with graph.inserting_after(block):
            on = graph.create_node("call_function", autocast_restore, (off, block), {},
                                   name=f"tread_fp32_on_{i}")
            on.meta[TREAD_META] = {**meta, "role": "fp32_on"}
        block.replace_all_uses_with(on, delete_user_cb=lambda user: user is not on)
        done.append(chain.targets[route.end + 1])
    graph.lint()
    return done
