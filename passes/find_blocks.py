"""Find the repeated block sequence of a model without being told.

Two steps:

1. :func:`find_candidates` (module tree): groups of sibling modules of the same class with
   the same parameter shapes.  These become leaf modules when tracing.
2. :func:`find_block_chain` (data-flow graph): in the traced graph, build a networkx graph
   whose edges link a block to the next block that consumes its output, and take the
   longest chain.  The argument through which each block receives its predecessor's
   output is the hidden-state stream; it must be the same for every block of the chain.
"""

from __future__ import annotations

import operator
from dataclasses import dataclass, field
from typing import Any, Union

import networkx as nx
from torch import fx, nn

__all__ = ["BlockChain", "CandidateGroup", "NoBlocksFound", "find_block_chain", "find_candidates"]

# Where a block receives the hidden state: a positional index or a keyword name.
ArgKey = Union[int, str]


class NoBlocksFound(ValueError):
    """No repeated block sequence could be found; the message lists what was considered."""


@dataclass
class CandidateGroup:
    """Sibling modules of one class with identical parameter shapes."""

    parent: str
    cls: type
    names: list[str]

    def describe(self) -> str:
        where = self.parent or "<root>"
        return f"{len(self.names)} x {self.cls.__name__} under {where!r}"


@dataclass
class BlockChain:
    """The found block sequence: one ``call_module`` node per block, in execution order."""

    group: CandidateGroup
    targets: list[str]
    hidden_in: ArgKey
    hidden_out: int | None  # index into a tuple output, None for a tensor output
    rejected: list[str] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)


def _param_signature(m: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in m.named_parameters())


def find_candidates(model: nn.Module, container: str | None = None) -> list[CandidateGroup]:
    """Groups of >= 2 sibling modules of the same class and parameter shapes.

    Only the outermost groups are returned (a group nested inside a member of another group
    is invisible once that member is a leaf).  With ``container``, only the children of
    that module are considered, whatever their number.
    """
    if container is not None:
        try:
            parent = model.get_submodule(container)
        except AttributeError:
            names = [n for n, c in model.named_modules() if n and len(list(c.children())) > 1]
            raise NoBlocksFound(
                f"blocks={container!r}: {type(model).__name__} has no submodule of that name; "
                f"modules with several children: {names[:20]}"
            ) from None
        children = [(f"{container}.{n}", c) for n, c in parent.named_children()]
        if not children:
            raise NoBlocksFound(f"blocks={container!r}: {type(parent).__name__} has no children")
        by_sig: dict[tuple, CandidateGroup] = {}
        for name, child in children:
            key = (type(child), _param_signature(child))
            by_sig.setdefault(key, CandidateGroup(container, type(child), [])).names.append(name)
        return list(by_sig.values())

    groups: list[CandidateGroup] = []
    for parent_name, parent in model.named_modules():
        by_sig = {}
        for name, child in parent.named_children():
            sig = _param_signature(child)
            if not sig:
                continue
            qual = f"{parent_name}.{name}" if parent_name else name
            group = by_sig.setdefault((type(child), sig), CandidateGroup(parent_name, type(child), []))
            group.names.append(qual)
        groups.extend(g for g in by_sig.values() if len(g.names) >= 2)
    members = [n for g in groups for n in g.names]
    return [g for g in groups
            if not any(g.names[0].startswith(m + ".") for m in members)]


def _arg_keys(node: fx.Node, value: fx.Node) -> list[ArgKey]:
    keys: list[ArgKey] = [i for i, a in enumerate(node.args) if a is value]
    keys += [k for k, a in node.kwargs.items() if a is value]
    return keys


def _outputs(node: fx.Node) -> list[tuple[int | None, fx.Node]]:
    """The values a block call produces: itself, or its ``getitem`` users for tuple outputs."""
    outs: list[tuple[int | None, fx.Node]] = [(None, node)]
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem \
                and isinstance(user.args[1], int):
            outs.append((user.args[1], user))
    return outs


def find_block_chain(graph: fx.Graph, groups: list[CandidateGroup]) -> BlockChain:
    """The longest chain of blocks of one group in which each block feeds the next."""
    results: list[BlockChain] = []
    rejected: list[str] = []
    for group in groups:
        members = set(group.names)
        calls = [n for n in graph.nodes if n.op == "call_module" and n.target in members]
        if len(calls) < 2:
            rejected.append(f"{group.describe()}: called {len(calls)} time(s) in forward, "
                            f"need at least 2 consecutive calls")
            continue
        call_set = set(calls)
        dag = nx.DiGraph()
        dag.add_nodes_from(calls)
        for block in calls:
            for out_index, value in _outputs(block):
                for user in value.users:
                    if user in call_set:
                        keys = {(out_index, key) for key in _arg_keys(user, value)}
                        if dag.has_edge(block, user):
                            dag.edges[block, user]["keys"] |= keys
                        else:
                            dag.add_edge(block, user, keys=keys)
        path = nx.dag_longest_path(dag)
        if len(path) < 2:
            rejected.append(f"{group.describe()}: no block's output is the input of another "
                            f"(the blocks do not form a sequence)")
            continue
        common = set.intersection(*(dag.edges[a, b]["keys"] for a, b in zip(path, path[1:])))
        if not common:
            rejected.append(f"{group.describe()}: consecutive blocks pass the hidden state "
                            f"through different arguments")
            continue
        if len(common) > 1:
            streams = ", ".join(f"output {'' if o is None else f'[{o}] '}-> argument {k!r}"
                                for o, k in sorted(common, key=str))
            rejected.append(f"{group.describe()}: the blocks pass several streams to each "
                            f"other ({streams}); which one is the token stream to route is "
                            f"ambiguous, and tread_fx does not guess")
            continue
        ((out_index, in_key),) = common
        results.append(BlockChain(group, [n.target for n in path], in_key, out_index))
    if not results:
        lines = "\n  - ".join(rejected) if rejected else (
            "no sibling modules of the same class with the same parameter shapes")
        raise NoBlocksFound(
            "found no repeated block sequence to route. Considered:\n  - " + lines +
            "\nIf the model has one, name its container with blocks='<path>' (e.g. "
            "blocks='blocks'); a block must take the previous block's output as an argument."
        )
    results.sort(key=len, reverse=True)
    best = results[0]
    ties = [r for r in results[1:] if len(r) == len(best)]
    if ties:
        names = ", ".join(repr(r.group.parent) for r in [best, *ties])
        raise NoBlocksFound(
            f"found several block sequences of equal length {len(best)} ({names}); "
            f"say which to route with blocks='<path>'"
        )
    best.rejected = rejected + [f"{r.group.describe()}: shorter chain ({len(r)} blocks)"
                                for r in results[1:]]
    return best
