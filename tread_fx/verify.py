"""``tread_fx.verify``: proof, on the user's own model, that its routing computes TREAD.

Four checks, each against something that does not share the code it checks:

1. **eval**: the routed module in eval mode returns what the model returns (bit for bit).
2. **ratio 0**: the routed module with every ratio set to 0 (``tread_fx.routing``), a
   train step (forward and backward) gives the model's output and every parameter's
   gradient, bit for bit.
3. **reference**: at the spec's ratios, a train step's output and gradients equal (to
   float tolerance) those of :func:`tread_fx.reference.reference`: the unrouted model run
   densely with the dropped tokens hidden from every attention inside the routed blocks
   (where the tokens sit among the keys is measured, not taken from the pass) and reset
   to their pre-route values after each routed block.  It shares no code with the pass:
   a wrong gather of a side input (a RoPE table, a mask) makes the two differ.  Blocks
   that mix tokens other than through ``scaled_dot_product_attention`` cannot be checked
   this way: the result says "cannot verify" and why.  When dropping tokens does not
   change the output at all (zero-initialised output layers), the check proves nothing
   and says "inconclusive".
4. **rows**: no dropped row is one the output never reads (text, class or register tokens
   cut off after the blocks: the gradient of the output at the last block's token stream)
   or one the image input does not reach (text, time or register tokens beside the image
   tokens: the first block's stream, with noise added to the image input), for routes
   whose stream has that shape.

The report also lists, per route, the tokens kept, the rows never routed and the side
inputs gathered (what the pass decided, shown for the user to read).
"""

from __future__ import annotations

import copy
import inspect
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Iterator, Mapping

import torch
from torch import nn

from .passes.trace import forked_rng

__all__ = ["RouteReport", "VerifyReport", "verify"]

#: Routed vs reference: max abs difference relative to the reference's max abs value.
TOLERANCE = 1e-5


@dataclass
class RouteReport:
    """What one route does, as the pass planned it."""

    index: int
    route: str
    blocks: tuple[str, str]
    tokens: int | None
    kept: int | None
    never_routed: tuple[int, int]
    side_inputs: list[str] = field(default_factory=list)

    def __str__(self) -> str:
        head, tail = self.never_routed
        rows = f"{head} leading, {tail} trailing" if head or tail else "none"
        sides = ", ".join(self.side_inputs) or "none"
        return (f"route {self.index} ({self.route}, {self.blocks[0]}..{self.blocks[1]}): "
                f"keeps {self.kept} of {self.tokens} tokens; rows never routed: {rows}; "
                f"side inputs gathered: {sides}")


@dataclass
class VerifyReport:
    """The result of :func:`verify`; ``ok`` is True when every check passed."""

    model: str
    spec: str
    front_end: str
    chain: tuple[str, ...]
    eval_equal: bool
    ratio0_equal: bool
    ratio0_detail: str
    reference: str                       # "equal", "differs", "cannot verify", "inconclusive"
    reference_detail: str
    rows: str                            # "ok", "wrong", "not checked"
    rows_detail: str
    routes: list[RouteReport]

    @property
    def ok(self) -> bool:
        return (self.eval_equal and self.ratio0_equal and self.reference == "equal"
                and self.rows != "wrong")

    def __str__(self) -> str:
        yes = {True: "yes", False: "NO"}
        lines = [
            f"verify {self.model} with routes {self.spec} (traced by {self.front_end}, "
            f"{len(self.chain)} blocks {self.chain[0]}..{self.chain[-1]})",
            f"  eval output equal to the model's:          {yes[self.eval_equal]}",
            f"  ratio 0 train step equal (output, grads): {yes[self.ratio0_equal]}"
            + (f" ({self.ratio0_detail})" if self.ratio0_detail else ""),
            f"  routed step = independent reference:      {self.reference} "
            f"({self.reference_detail})",
            f"  no dropped row is a non-image row:       {self.rows}"
            + (f" ({self.rows_detail})" if self.rows_detail else ""),
        ]
        lines += [f"  {r}" for r in self.routes]
        lines.append("verified" if self.ok else "NOT verified")
        return "\n".join(lines)


def _call(model: nn.Module, inputs: Any) -> Any:
    return model(**inputs) if isinstance(inputs, Mapping) else model(*inputs)


def _tensors(out: Any) -> list[torch.Tensor]:
    """The floating-point tensors of a model output (tensor, tuple, dict, ModelOutput)."""
    if torch.is_tensor(out):
        return [out] if out.is_floating_point() else []
    if isinstance(out, Mapping):
        return [t for v in out.values() for t in _tensors(v)]
    if isinstance(out, (tuple, list)):
        return [t for v in out for t in _tensors(v)]
    return []


def _loss(outs: list[torch.Tensor]) -> torch.Tensor:
    """A loss that reads every output element with its own weight (a fixed draw)."""
    gen = torch.Generator().manual_seed(1234)
    total = 0.0
    for t in outs:
        w = torch.randn(t.shape, generator=gen).to(t.device, torch.float32)
        total = total + (t.float() * w).sum()
    return total


def _step(model: nn.Module, params: dict[str, nn.Parameter], inputs: Any, seed: int,
          forward=None) -> tuple[list[torch.Tensor], dict[str, torch.Tensor]]:
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    out = forward() if forward is not None else _call(model, inputs)
    outs = _tensors(out)
    if not outs:
        raise TypeError(f"{type(model).__name__} returned no floating-point tensor to compare")
    _loss(outs).backward()
    grads = {n: p.grad.clone() for n, p in params.items() if p.grad is not None}
    for p in params.values():
        p.grad = None
    return [o.detach() for o in outs], grads


def _max_rel(a: list[torch.Tensor], b: list[torch.Tensor]) -> float:
    scale = max((t.abs().max().item() for t in b if t.numel()), default=0.0) or 1.0
    if len(a) != len(b) or any(x.shape != y.shape for x, y in zip(a, b)):
        return float("inf")
    return max(((x.float() - y.float()).abs().max().item() for x, y in zip(a, b) if x.numel()),
               default=0.0) / scale


def _grad_rel(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> float:
    if a.keys() != b.keys():
        return float("inf")
    # relative to the largest gradient entry of any parameter: some gradients are zero up
    # to rounding (a key bias does not change a softmax), a per-parameter scale is noise
    scale = max((g.abs().max().item() for g in b.values()), default=0.0) or 1.0
    return max(((a[k] - b[k]).abs().max().item() for k in a), default=0.0) / scale


@contextmanager
def _untouched(model: nn.Module) -> Iterator[None]:
    """Modes, buffers, gradients and the random state of ``model`` as they were on exit."""
    from .passes.trace import preserved_modes
    buffers = [(b, b.detach().clone()) for b in model.buffers()]
    grads = [(p, p.grad) for p in model.parameters()]
    try:
        with preserved_modes(model), forked_rng():
            yield
    finally:
        with torch.no_grad():
            for b, saved in buffers:
                b.copy_(saved)
        for p, g in grads:
            p.grad = g


def _clone(inputs: Any) -> Any:
    return copy.deepcopy(inputs)


def _route_reports(routed: nn.Module) -> list[RouteReport]:
    from .passes.insert_routes import TREAD_META
    side: dict[int, list[str]] = {}
    for node in routed.graph.nodes:
        meta = node.meta.get(TREAD_META, {})
        if meta.get("role") == "side":
            side.setdefault(meta["route_index"], []).append(str(meta.get("arg", node.name)))
    reports = []
    for sel in routed.selectors:
        tokens = getattr(sel, "last_num_tokens", None)
        kept = None if sel.last_indices is None else int(sel.last_indices.shape[1])
        reports.append(RouteReport(sel.index, str(sel.route), (sel.blocks[0], sel.blocks[-1]),
                                   tokens, kept, tuple(sel.fixed), side.get(sel.index, [])))
    return reports


def _unread_rows(model: nn.Module, inputs: Any, last: nn.Module, seed: int, batch: int
                 ) -> tuple[int, set[int]] | None:
    """The token count of the stream at the last block's output and the rows the output
    does not read (zero gradient in every sample and feature), or None if that stream is
    not found."""
    from .reference import _hidden_of, _stream_output, _with_stream
    found: dict[str, Any] = {}

    def hook(module, args, kwargs, out):
        x = _hidden_of(args, kwargs)
        try:
            at = _stream_output(out, x.shape, "the last block")
        except RuntimeError:
            return None
        hidden = out if at is None else out[at]
        if hidden.shape != x.shape:
            return None
        found["leaf"] = leaf = hidden.detach().requires_grad_(True)
        return _with_stream(out, at, leaf)

    handle = last.register_forward_hook(hook, with_kwargs=True)
    try:
        torch.manual_seed(seed)
        outs = _tensors(_call(model, inputs))
    finally:
        handle.remove()
    leaf = found.get("leaf")
    if leaf is None or leaf.dim() < 2 or batch not in leaf.shape[:2] or \
            leaf.shape[0] == leaf.shape[1]:
        return None
    axis = 1 if leaf.shape[0] == batch else 0   # [B, N, ...] or sequence-first [N, B, ...]
    grad, = torch.autograd.grad(_loss(outs), leaf, allow_unused=True)
    if grad is None:
        return None
    read = grad.abs().movedim(axis, 0).reshape(leaf.shape[axis], -1).amax(dim=1) > 0
    return leaf.shape[axis], set(torch.nonzero(~read).flatten().tolist())


_IMAGE_NAMES = ("hidden_states", "x", "sample", "latents", "latent", "img", "image",
                "noisy_latents", "z")


def _image_free_rows(model: nn.Module, inputs: Any, first: nn.Module, batch: int
                     ) -> tuple[int, set[int]] | None:
    """The token count of the first block's stream and its rows that do not change when
    the image input changes (text, class, register, time tokens), measured on the dense
    model: the forward argument named like the image (else the first tensor) gets noise."""
    from .reference import _hidden_of, _token_axis
    signature = inspect.signature(model.forward)
    bound = signature.bind(**inputs) if isinstance(inputs, Mapping) else \
        signature.bind(*inputs)
    tensors = [k for k, v in bound.arguments.items() if torch.is_tensor(v)
               and v.is_floating_point()]
    names = [k for k in tensors if k in _IMAGE_NAMES] or tensors[:1]
    if not names:
        return None
    seen: list[torch.Tensor] = []

    def hook(module, args, kwargs):
        seen.append(_hidden_of(args, kwargs).detach().clone())

    handle = first.register_forward_pre_hook(hook, with_kwargs=True)
    try:
        with torch.no_grad():
            for noise in (False, True):
                call = dict(bound.arguments)
                if noise:
                    image = call[names[0]]
                    gen = torch.Generator().manual_seed(7)
                    call[names[0]] = image + torch.randn(image.shape, generator=gen).to(image)
                torch.manual_seed(0)
                again = bound.signature.bind(**call)
                model(*again.args, **again.kwargs)
    finally:
        handle.remove()
    if len(seen) < 2 or seen[0].shape != seen[-1].shape:
        return None
    try:
        axis = _token_axis(seen[0], batch, "the first block")
    except RuntimeError:
        return None
    diff = (seen[0].float() - seen[-1].float()).abs().movedim(axis, 0)
    changed = diff.reshape(diff.shape[0], -1).amax(dim=1) > 0
    return seen[0].shape[axis], set(torch.nonzero(~changed).flatten().tolist())


def _row_checks(model, example_inputs, routed, reports, blocks, seed) -> tuple[str, str]:
    """No dropped row may be one the output never reads (gradient at the last block's
    stream) or one the image input does not reach (at the first block's stream)."""
    batch = next((s.last_indices.shape[0] for s in routed.selectors
                  if s.last_indices is not None), None)
    if batch is None:
        return "not checked", "no route drew tokens"
    checks = []
    with forked_rng():
        unread = _unread_rows(model, _clone(example_inputs), blocks[-1], seed, batch)
        if unread is not None:
            checks.append(("the output never reads", unread))
        mode = model.training
        model.eval()
        try:
            free = _image_free_rows(model, _clone(example_inputs), blocks[0], batch)
        finally:
            model.train(mode)
        if free is not None:
            checks.append(("the image input does not reach", free))
    checked, counts = set(), []
    for what, (tokens, rows) in checks:
        counts.append(f"{len(rows)} row(s) {what}")
        for sel, rep in zip(routed.selectors, reports):
            idx = sel.last_indices
            if idx is None or rep.tokens != tokens:
                continue
            dropped = set().union(*(set(range(tokens)) - set(row.tolist())
                                    for row in idx))   # in any sample
            checked.add(rep.index)
            bad = sorted(dropped & rows)
            if bad:
                return "wrong", (f"route {rep.index} dropped rows {bad[:8]} of the stream, "
                                 f"which {what} (text, class or register tokens?): they "
                                 f"must not be routed")
    if not checked:
        return "not checked", "no route's stream has the first or last block's shape"
    return "ok", f"routes {sorted(checked)}; {', '.join(counts)}; none dropped"


def verify(model: nn.Module, spec: Any, example_inputs: Any, *, seed: int = 0,
           tolerance: float = TOLERANCE, **route_options: Any) -> VerifyReport:
    """Route ``model`` with ``spec`` and prove on ``example_inputs`` that it computes TREAD.

    ``route_options`` go to :func:`tread_fx.route` (``blocks=``, ``hidden=``,
    ``token_inputs=``, ``front_end=`` ...).  The model's parameters, buffers, modes and
    random state are as they were afterwards.  Returns a :class:`VerifyReport` (print it;
    ``report.ok``); raises what ``route()`` raises for a model it refuses.
    """
    from .api import route, routing
    from .reference import reference
    from .spec import parse_spec

    parsed = parse_spec(spec)
    params = dict(model.named_parameters())
    with _untouched(model):
        routed = route(model, replace(parsed, seed=seed + 1), _clone(example_inputs),
                       **route_options)

        model.eval(), routed.eval()
        with torch.no_grad():
            dense = _tensors(_call(model, _clone(example_inputs)))
            mine = _tensors(_call(routed, _clone(example_inputs)))
        eval_equal = len(dense) == len(mine) and all(torch.equal(a, b) for a, b in zip(dense, mine))

        model.train(), routed.train()
        d_out, d_grads = _step(model, params, _clone(example_inputs), seed)
        with routing(routed, 0.0):   # the same routed graph, every token kept
            z_out, z_grads = _step(routed, params, _clone(example_inputs), seed)
        ratio0_equal = (len(d_out) == len(z_out) and all(torch.equal(a, b) for a, b in
                                                        zip(d_out, z_out))
                        and d_grads.keys() == z_grads.keys()
                        and all(torch.equal(d_grads[k], z_grads[k]) for k in d_grads))
        ratio0_detail = "" if ratio0_equal else (
            f"output max rel diff {_max_rel(z_out, d_out):.1e}, "
            f"gradient max rel diff {_grad_rel(z_grads, d_grads):.1e}")

        r_out, r_grads = _step(routed, params, _clone(example_inputs), seed)
        reports = _route_reports(routed)
        indices = [s.last_indices for s in routed.selectors]
        blocks = [model.get_submodule(t) for t in routed.block_chain]
        spans = [(r.start, r.end) for r in routed.route_spec.routes]
        inputs = _clone(example_inputs)
        try:
            ref_out, ref_grads = _step(model, params, inputs, seed, lambda: reference(
                model, inputs, blocks, spans, indices))
        except (RuntimeError, NotImplementedError) as err:
            verdict, detail = "cannot verify", str(err).split("\n")[0]
        else:
            out_rel, grad_rel = _max_rel(r_out, ref_out), _grad_rel(r_grads, ref_grads)
            detail = f"output max rel diff {out_rel:.1e}, gradient max rel diff {grad_rel:.1e}"
            if out_rel <= tolerance and grad_rel <= tolerance:
                verdict = "equal"
                if _max_rel(ref_out, d_out) == 0.0 and _grad_rel(ref_grads, d_grads) == 0.0:
                    verdict = "inconclusive"
                    detail = ("dropping tokens does not change the output or any gradient "
                              "(zero-initialised output layers?); re-draw those weights and "
                              "verify again")
            else:
                verdict = "differs"

        rows, rows_detail = _row_checks(model, example_inputs, routed, reports, blocks, seed)
    return VerifyReport(
        model=type(model).__name__, spec=str(routed.route_spec), front_end=routed.front_end,
        chain=tuple(routed.block_chain), eval_equal=eval_equal, ratio0_equal=ratio0_equal,
        ratio0_detail=ratio0_detail, reference=verdict, reference_detail=detail, rows=rows,
        rows_detail=rows_detail, routes=reports)
