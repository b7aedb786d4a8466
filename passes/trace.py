"""Front end: trace a model into a module-level fx graph with its blocks as leaves.

Blocks stay ``call_module`` nodes, so each block's own code runs unchanged and the rewrite
only has to work at the level of the block sequence.  The model is traced once per mode
(``train`` and ``eval``): code outside the blocks may branch on ``self.training`` (label
dropout in DiT, for instance), and each mode gets the graph of its own branch.
"""

from __future__ import annotations

from contextlib import contextmanager
from typing import Iterable, Iterator

import torch
from torch import fx, nn

__all__ = ["TraceError", "trace_modes", "preserved_modes"]


class TraceError(RuntimeError):
    """The model could not be traced into a graph."""


class _LeafTracer(fx.Tracer):
    def __init__(self, leaves: Iterable[nn.Module]) -> None:
        super().__init__()
        self._leaf_ids = {id(m) for m in leaves}

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return id(m) in self._leaf_ids or super().is_leaf_module(m, module_qualified_name)


@contextmanager
def preserved_modes(model: nn.Module) -> Iterator[None]:
    """Restore every submodule's ``training`` flag on exit."""
    flags = [(m, m.training) for m in model.modules()]
    try:
        yield
    finally:
        for m, flag in flags:
            m.training = flag


def trace_modes(model: nn.Module, leaves: Iterable[nn.Module]) -> dict[str, fx.Graph]:
    """``{"train": graph, "eval": graph}`` of ``model`` with ``leaves`` as leaf modules.

    The model's mode flags are restored afterwards; nothing else about it is touched.
    """
    leaves = list(leaves)
    graphs = {}
    with preserved_modes(model):
        for mode in ("train", "eval"):
            model.train(mode == "train")
            try:
                graphs[mode] = _LeafTracer(leaves).trace(model)
            except Exception as err:  # noqa: BLE001 - re-raised with context
                raise TraceError(
                    f"torch.fx could not trace {type(model).__name__} in {mode} mode: "
                    f"{type(err).__name__}: {err}. Code outside the blocks must not branch "
                    f"on tensor shapes or values (e.g. int(x.shape[1] ** 0.5), assert on "
                    f"shapes); trace the model yourself into a torch.fx.GraphModule with the "
                    f"blocks as leaf modules and pass that instead"
                ) from err
    return graphs
