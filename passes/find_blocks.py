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

import inspect
import operator
from dataclasses import dataclass, field
from typing import Union

import networkx as nx
from torch import fx, nn

__all__ = ["BlockChain", "CandidateGroup", "NoBlocksFound", "find_block_chain", "find_candidates",
           "odd_siblings"]

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
    """The found block sequence: one ``call_module`` node per block, in execution order.

    ``hidden_in[i]`` is where block ``i`` receives the hidden state (positional index or
    keyword name); ``hidden_out[i]`` the element of its tuple output that is the hidden
    state (None for a tensor output).  Blocks of different classes may follow each other.
    """

    targets: list[str]
    hidden_in: list[ArgKey]
    hidden_out: list[int | None]
    rejected: list[str] = field(default_factory=list)
    #: Index of the first block of each segment after the first.  A segment is a run of
    #: blocks each feeding the next directly; between segments the model works on the
    #: stream (Flux-style models concatenate text to the image tokens before their
    #: single-stream blocks).  A route stays inside one segment.
    breaks: list[int] = field(default_factory=list)

    def __len__(self) -> int:
        return len(self.targets)

    def segment_start(self, index: int) -> int:
        """The index of the first block of the segment holding block ``index``."""
        return max([0] + [b for b in self.breaks if b <= index])


# Argument names that mark the token stream when a block passes several streams on.
HIDDEN_NAMES = ("hidden_states", "x", "hidden", "h", "img", "image", "tokens")


def _param_signature(m: nn.Module) -> tuple:
    return tuple((n, tuple(p.shape)) for n, p in m.named_parameters())


def _is_composite(m: nn.Module) -> bool:
    """A block is built of layers; a lone layer (the norms beside the blocks) is not one, and
    neither is a container without a forward of its own (two ModuleLists of equal blocks
    would otherwise form a group that hides the blocks inside them)."""
    if isinstance(m, (nn.ModuleList, nn.ModuleDict, nn.ParameterList, nn.ParameterDict)):
        return False
    return next(m.children(), None) is not None


def find_candidates(model: nn.Module, container: str | None = None) -> list[CandidateGroup]:
    """Groups of >= 2 sibling modules of the same class and parameter shapes.

    Only modules made of submodules qualify: same-class single layers beside the blocks
    (timm's ``norm_pre`` and ``norm``) would otherwise join the chain and shift the route
    indices away from the blocks' own.

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
            if not sig or not _is_composite(child):
                continue
            qual = f"{parent_name}.{name}" if parent_name else name
            group = by_sig.setdefault((type(child), sig), CandidateGroup(parent_name, type(child), []))
            group.names.append(qual)
        groups.extend(g for g in by_sig.values() if len(g.names) >= 2)
    # Modules elsewhere that match a group (a U-ViT's single mid block) join it.
    signatures = {(g.cls, _param_signature(model.get_submodule(g.names[0]))): g for g in groups}
    grouped = {n for g in groups for n in g.names}
    for name, module in model.named_modules():
        group = signatures.get((type(module), _param_signature(module))) if name else None
        if group is not None and name not in grouped:
            group.names.append(name)
            grouped.add(name)
    return [g for g in groups
            if not any(g.names[0].startswith(m + ".") for m in grouped)]


def odd_siblings(model: nn.Module, groups: list[CandidateGroup]) -> list[str]:
    """Modules of a group's class beside its members that are in no group, because their
    parameters differ (SD3's last block has no context feed-forward).  They are traced as
    leaves too, not inlined, so that ``compile_blocks`` can compile every block of the
    class, as diffusers' ``compile_repeated_blocks`` does.  They never join a chain."""
    grouped = {n for g in groups for n in g.names}
    odd = []
    for g in groups:
        parent = model.get_submodule(g.parent) if g.parent else model
        for name, child in parent.named_children():
            qual = f"{g.parent}.{name}" if g.parent else name
            if type(child) is g.cls and qual not in grouped and qual not in odd:
                odd.append(qual)
    return odd


def _arg_keys(node: fx.Node, value: fx.Node, names: list[str]) -> list[tuple[ArgKey, str]]:
    """(where, parameter name) of each argument of ``node`` that is ``value``."""
    keys = [(i, names[i] if i < len(names) else str(i))
            for i, a in enumerate(node.args) if a is value]
    keys += [(k, k) for k, a in node.kwargs.items() if a is value]
    return keys


def _param_names(module: nn.Module) -> list[str]:
    try:
        return list(inspect.signature(module.forward).parameters)
    except (TypeError, ValueError):
        return []


def _outputs(node: fx.Node) -> list[tuple[int | None, fx.Node]]:
    """The values a block call produces: itself, or its ``getitem`` users for tuple outputs."""
    outs: list[tuple[int | None, fx.Node]] = [(None, node)]
    for user in node.users:
        if user.op == "call_function" and user.target is operator.getitem \
                and isinstance(user.args[1], int):
            outs.append((user.args[1], user))
    return outs


# Operations through which a block's output still is the stream the next block takes, when
# applied to it as their first operand: a residual injection (x + hint), a gate (x * g),
# casts.  Anything else between two blocks (a concatenation, a reshape) ends the chain.
_STREAM_OPS = {"add", "sub", "mul", "to", "type_as", "float", "contiguous"}


_CASTS = {"to", "type_as", "float", "contiguous"}


def op_name(node: fx.Node) -> str:
    """``add`` for ``x.add(y)``, ``torch.add`` and ``aten.add.Tensor``; "" for other nodes."""
    if node.op == "call_method":
        return node.target
    if node.op == "call_function":
        return getattr(node.target, "__name__", "").split(".")[0]
    return ""


def _carries_stream(user: fx.Node, value: fx.Node) -> bool:
    """Whether ``user`` passes the stream ``value`` on: a cast of it, or an addition /
    product of it with a value that was not computed before it on its way here (a hint
    made elsewhere, or a branch computed from it); ``branch(x) + x`` passes ``x`` on, not
    ``branch(x)``, so a residual branch (WanAnimate's face adapter) is not a block of the
    chain."""
    if user.op not in ("call_function", "call_method") or value not in user.args:
        return False
    name = op_name(user).rstrip("_")
    if name in _CASTS:
        return user.args[0] is value
    if name not in _STREAM_OPS:
        return False
    others = [a for a in user.all_input_nodes if a is not value]
    return not any(_depends_on(value, other) for other in others)


def _is_branch(call: fx.Node) -> bool:
    """Whether a block's output is added to (or multiplied with) its own input:
    ``x + branch(x)``, the output a residual branch, not the stream.  (A long skip adding an
    older value, ``h + h0``, does not make the last block a branch.)"""
    inputs = set(call.all_input_nodes)
    todo = [value for _, value in _outputs(call)]
    while todo:
        value = todo.pop()
        for user in value.users:
            name = op_name(user).rstrip("_")
            if name in _CASTS and user.args and user.args[0] is value:
                todo.append(user)
            elif name in _STREAM_OPS and any(other in inputs for other in
                                             user.all_input_nodes if other is not value):
                return True
    return False


def _depends_on(node: fx.Node, other: fx.Node, limit: int = 20000) -> bool:
    """Whether ``node`` is computed from ``other``."""
    seen, todo = set(), [node]
    while todo and len(seen) < limit:
        n = todo.pop()
        if n is other:
            return True
        if n in seen:
            continue
        seen.add(n)
        todo.extend(n.all_input_nodes)
    return False


def _edge_key(keys: set, hidden: ArgKey | None) -> tuple | None | str:
    """The (output index, argument, name) that carries the hidden state along one edge."""
    if hidden is not None:
        keys = {k for k in keys if hidden in (k[1], k[2])}
    if len(keys) == 1:
        return next(iter(keys))
    named = {k for k in keys if k[2] in HIDDEN_NAMES}
    if len(named) == 1:
        return next(iter(named))
    return "ambiguous" if keys else None


def find_block_chain(graph: fx.Graph, groups: list[CandidateGroup],
                     hidden: ArgKey | None = None, root: nn.Module | None = None) -> BlockChain:
    """The longest chain of candidate blocks in which each block feeds the next.

    One networkx DAG holds every call of every candidate block; an edge links a block to a
    block that takes one of its outputs as an argument.  With several streams between two
    blocks (text and image), the one passed as ``hidden`` (or under a conventional name such
    as ``hidden_states``) is the token stream; otherwise the edge is ambiguous and refused.
    """
    member_of = {name: g for g in groups for name in g.names}
    calls = [n for n in graph.nodes if n.op == "call_module" and n.target in member_of]
    rejected: list[str] = []
    for g in groups:
        count = sum(1 for n in calls if member_of[n.target] is g)
        if count < 2 and len(g.names) >= 2:
            rejected.append(f"{g.describe()}: called {count} time(s) in forward")
    call_set = set(calls)
    dag = nx.DiGraph()
    dag.add_nodes_from(calls)
    ambiguous: list[str] = []
    for block in calls:
        edges: dict[fx.Node, set] = {}
        for out_index, value in _outputs(block):
            # the output reaches the next block directly, or through per-token operations
            # applied to it (WanVACE adds a control hint between blocks: x = x + hint * s)
            todo, seen = [value], set()
            while todo:
                v = todo.pop()
                for user in v.users:
                    if user in call_set:
                        names = _param_names(root.get_submodule(user.target)) if root else []
                        edges.setdefault(user, set()).update(
                            (out_index, key, name) for key, name in _arg_keys(user, v, names))
                    elif user not in seen and _carries_stream(user, v):
                        seen.add(user)
                        todo.append(user)
        for user, keys in edges.items():
            key = _edge_key(keys, hidden)
            if key == "ambiguous":
                streams = ", ".join(f"output {'' if o is None else f'[{o}] '}-> argument {n!r}"
                                    for o, k, n in sorted(keys, key=str))
                ambiguous.append(f"{block.target} -> {user.target} pass several streams "
                                 f"({streams})")
            elif key is not None:
                dag.add_edge(block, user, key=key)
    # A residual branch (x + face_adapter(x)) is not a block of the chain, even where its
    # input edge makes it the last one
    dag.remove_nodes_from([c for c in calls if _is_branch(c)])
    # A block of another kind joins a chain only through the argument the blocks of that
    # kind pass the stream on with (a text refiner's output entering the main blocks as
    # their encoder_hidden_states is not the stream the main blocks carry).
    internal: dict[type, set] = {}
    for a, b, key in dag.edges(data="key"):
        if member_of[a.target].cls is member_of[b.target].cls:
            internal.setdefault(member_of[b.target].cls, set()).add(key[2])
    dag.remove_edges_from([
        (a, b) for a, b, key in list(dag.edges(data="key"))
        if member_of[a.target].cls is not member_of[b.target].cls
        and internal.get(member_of[b.target].cls) and key[2] not in internal[
            member_of[b.target].cls]])
    components = sorted((nx.dag_longest_path(dag.subgraph(c))
                         for c in nx.weakly_connected_components(dag)), key=len, reverse=True)
    if not components or len(components[0]) < 2:
        if ambiguous:
            rejected.append(ambiguous[0] + "; which one is the token stream to route is "
                            "ambiguous, and tread_fx does not guess: pass "
                            "hidden='<argument name>'")
        relaid = _relaid_pairs(calls, member_of)
        for g in groups:
            if any(member_of[n.target] is g for n in calls):
                pair = next(((a, b) for a, b in relaid if member_of[a.target] is g), None)
                rejected.append(
                    f"{g.describe()}: no block's output is the input of another "
                    f"(the blocks do not form a sequence)" if pair is None else
                    f"{g.describe()}: {pair[0].target}'s output reaches {pair[1].target} only "
                    f"through reshapes or permutes, so the two groups work on different "
                    f"layouts of the stream (factorised attention, as in video models: one "
                    f"over the tokens of each frame, one over the frames of each token); "
                    f"routing them would need the same tokens kept in every frame, which "
                    f"tread_fx does not do")
        lines = "\n  - ".join(rejected) if rejected else (
            "no sibling modules of the same class with the same parameter shapes")
        raise NoBlocksFound(
            "found no repeated block sequence to route. Considered:\n  - " + lines +
            "\nIf the model has one, name its container with blocks='<path>' (e.g. "
            "blocks='blocks'); a block must take the previous block's output as an argument."
        )
    segments = _joined(components, dag, member_of, graph)
    segments[0] = _trimmed(segments[0], member_of, 0)
    segments[-1] = _trimmed(segments[-1], member_of, -1)
    path = [n for seg in segments for n in seg]
    longest = max(len(seg) for seg in segments)
    in_path = set(path)
    others = [c for c in components if not in_path & set(c)]
    if others and len(others[0]) >= longest:
        names = ", ".join(f"{c[0].target}..{c[-1].target}" for c in
                          [max(segments, key=len), others[0]])
        raise NoBlocksFound(
            f"found several block sequences of equal length {longest} ({names}); "
            f"say which to route with blocks='<path>'"
        )
    hidden_in: list[ArgKey] = []
    hidden_out: list[int | None] = []
    for seg in segments:
        seg_in, seg_out = _stream_keys(seg, dag, member_of)
        hidden_in += seg_in
        hidden_out += seg_out
    first = path[0]
    if (isinstance(hidden_in[0], int) and hidden_in[0] >= len(first.args)) or \
            (isinstance(hidden_in[0], str) and hidden_in[0] not in first.kwargs):
        raise NoBlocksFound(f"block {first.target!r} does not take the hidden state as "
                            f"argument {hidden_in[0]!r} like the blocks after it")
    rejected += [f"{len(c)}-block sequence {c[0].target}..{c[-1].target}: shorter"
                 for c in others if len(c) >= 2]
    breaks = [sum(len(seg) for seg in segments[:i]) for i in range(1, len(segments))]
    return BlockChain([n.target for n in path], hidden_in, hidden_out, rejected, breaks)


_RELAYOUTS = {"reshape", "view", "permute", "transpose", "flatten", "unflatten", "contiguous"}


def _relaid_pairs(calls: list[fx.Node], member_of: dict) -> list[tuple[fx.Node, fx.Node]]:
    """(block, block of another group) where the first's output reaches the second through
    reshapes and permutes, at least one of which changes the shape (Latte's spatial and
    temporal blocks, each group on its own layout of the same tokens)."""
    call_set, pairs = set(calls), []
    for block in calls:
        todo, seen = [(value, False) for _, value in _outputs(block)], set()
        while todo:
            value, moved = todo.pop()
            for user in value.users:
                if user in call_set and moved and member_of[user.target] is not \
                        member_of[block.target]:
                    pairs.append((block, user))
                elif user not in seen and op_name(user) in _RELAYOUTS and \
                        user.args and user.args[0] is value:
                    seen.add(user)
                    todo.append((user, moved or op_name(user) != "contiguous"))
    return pairs


def _trimmed(path: list[fx.Node], member_of: dict, end: int) -> list[fx.Node]:
    """``path`` without a block at its start (``end=0``) or end (``-1``) whose class occurs
    nowhere else in it: an embedder feeding the blocks (LongCat's input_embed, one of a
    same-class pair with the text embedder) is not one of the repeated blocks."""
    while len(path) > 2:
        cls = member_of[path[end].target].cls
        if sum(member_of[n.target].cls is cls for n in path) > 1:
            break
        path = path[1:] if end == 0 else path[:-1]
    return path


def _stream_keys(path: list[fx.Node], dag: nx.DiGraph, member_of: dict
                 ) -> tuple[list[ArgKey], list[int | None]]:
    """Where each block of a directly chained ``path`` takes and returns the stream."""
    keys = [dag.edges[a, b]["key"] for a, b in zip(path, path[1:])]
    cls_of = [member_of[n.target].cls for n in path]
    hidden_in: list[ArgKey] = [None] + [k[1] for k in keys]
    hidden_out: list[int | None] = [k[0] for k in keys] + [None]
    # The first block takes the stream like a later block of its kind; the last block
    # returns it like an earlier one of its kind.
    same_in = [i for i in range(1, len(path)) if cls_of[i] is cls_of[0]]
    hidden_in[0] = hidden_in[same_in[0]] if same_in else hidden_in[1]
    same_out = [i for i in range(len(path) - 1) if cls_of[i] is cls_of[-1]]
    hidden_out[-1] = hidden_out[same_out[-1]] if same_out else hidden_out[-2]
    return hidden_in, hidden_out


def _joined(components: list[list[fx.Node]], dag: nx.DiGraph, member_of: dict,
            graph: fx.Graph) -> list[list[fx.Node]]:
    """The longest sequence, with the sequences of other block kinds that continue it.

    Flux-style models run double-stream blocks, then work on the stream (concatenate the
    text tokens to it), then run single-stream blocks: two sequences of different block
    classes where the first one's stream output is the only block output the second one's
    stream input is computed from.  Their blocks are one sequence to the user (indices
    run over both); a route may not cross the gap.  Sequences of the same class (a refiner
    before the main blocks) stay apart: joining them would shift the main blocks' indices.
    """
    order = {n: i for i, n in enumerate(graph.nodes)}
    candidates = [c for c in components if len(c) >= 2]
    segments = [candidates[0]]
    calls = {n for c in components for n in c}

    def feeds(a: list[fx.Node], b: list[fx.Node]) -> bool:
        if {member_of[n.target].cls for n in a} & {member_of[n.target].cls for n in b}:
            return False
        if order[a[-1]] > order[b[0]]:
            return False
        a_out = _stream_keys(a, dag, member_of)[1][-1]
        b_in = _stream_keys(b, dag, member_of)[0][0]
        stream = b[0].args[b_in] if isinstance(b_in, int) and b_in < len(b[0].args) \
            else b[0].kwargs.get(b_in) if isinstance(b_in, str) else None
        if not isinstance(stream, fx.Node):
            return False
        reached, entries, seen, todo = set(), set(), set(), [stream]
        while todo:
            node = todo.pop()
            if node in seen:
                continue
            seen.add(node)
            if node in calls:
                reached.add(node)
                continue
            if node.op == "call_function" and node.target is operator.getitem and \
                    node.args[0] in calls:
                reached.add(node.args[0])
                entries.add(node.args[1])
                continue
            todo.extend(node.all_input_nodes)
        if stream in calls:
            entries.add(None)
        return reached == {a[-1]} and a_out in entries

    changed = True
    while changed:
        changed = False
        for c in candidates:
            if any(c is seg for seg in segments):
                continue
            if feeds(segments[-1], c) and not any(
                    d is not c and feeds(segments[-1], d) for d in candidates):
                segments.append(c)
                changed = True
            elif feeds(c, segments[0]) and not any(
                    d is not c and feeds(d, segments[0]) for d in candidates):
                segments.insert(0, c)
                changed = True
    return segments
