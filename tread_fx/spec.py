"""Route specifications: what to route, where, and how much.

A :class:`Route` says that the blocks ``start..end`` (inclusive, indices into the block
sequence that :func:`tread_fx.route` finds) see only a random subset of the tokens; the
fraction ``selection_ratio`` of tokens skips them and is put back, unchanged, after block
``end``.  A :class:`RouteSpec` is an ordered tuple of non-overlapping routes plus options.

Accepted user forms (all go through :func:`parse_spec`):

* ``"2:8@0.5"`` or several, comma separated: ``"2:4@0.5,6:8@0.25"``
* a :class:`Route`, a :class:`RouteSpec`, or a list of :class:`Route`
* a list of dicts in the shape other trainers use:
  ``{"selection_ratio": 0.5, "start_layer_idx": 2, "end_layer_idx": 8}``
  (``start``/``end`` are accepted as well)
* a dict ``{"routes": [...], "keep_order": True, "seed": 0, "blocks": "blocks"}``
"""

from __future__ import annotations

import math
import numbers
import re
from dataclasses import dataclass, replace
from typing import Any, Iterable, Mapping, Sequence

__all__ = ["Route", "RouteSpec", "check_ratio", "kept_count", "parse_spec"]


@dataclass(frozen=True)
class Route:
    """Blocks ``start..end`` (inclusive) see ``N - floor(N * selection_ratio)`` tokens."""

    start: int
    end: int
    selection_ratio: float

    def __str__(self) -> str:
        return f"{self.start}:{self.end}@{self.selection_ratio:g}"


@dataclass(frozen=True)
class RouteSpec:
    """Routes plus the options that apply to all of them.

    Attributes:
        routes: the routes, sorted and non-overlapping once resolved.
        keep_order: kept tokens stay in their original order (needed for scan-based blocks
            such as Mamba; makes ratio 0 bit-identical to the dense model).  ``False``
            leaves them in the random order of the draw, as the official code does.
        seed: seed of a dedicated random generator for the token selection; ``None`` uses
            torch's global generator (reproducible with ``torch.manual_seed``).
        blocks: dotted path of the module that holds the block sequence (e.g. ``"blocks"``)
            to override automatic discovery.
        hidden: the block argument (keyword name or position) that carries the token
            stream, for blocks that pass several streams on (text and image).
        token_inputs: overrides of the token-axis analysis, by block argument name or
            position: the token axis (or axes) of a per-token side input, or ``None`` for
            an input that is not per-token.
        prefix_tokens: leading tokens that are never routed (a ViT's class token, U-ViT's
            time and label tokens); detected from the example inputs when not given.
        fp32_after_route: run the block right after each route with autocast off and its
            half-precision inputs in float32 while the route is active, as the official
            code does under mixed precision.
    """

    routes: tuple[Route, ...]
    keep_order: bool = True
    seed: int | None = None
    blocks: str | None = None
    hidden: str | int | None = None
    token_inputs: Mapping[str | int, Any] | None = None
    prefix_tokens: int | None = None
    fp32_after_route: bool = False

    def __str__(self) -> str:
        return ",".join(str(r) for r in self.routes)

    def resolve(self, depth: int, where: str = "the block sequence") -> "RouteSpec":
        """Return the spec with negative indices resolved against ``depth`` blocks.

        Raises ``ValueError`` naming the route and the field for an index outside the
        block sequence, ``start > end``, and overlapping or unsorted routes.
        """
        resolved = []
        for i, r in enumerate(self.routes):
            idx = {}
            for name in ("start", "end"):
                value = getattr(r, name)
                pos = value + depth if value < 0 else value
                if not 0 <= pos < depth:
                    raise ValueError(
                        f"route {i} ({r}): {name}={value} is outside {where}, which has "
                        f"{depth} blocks (valid: {-depth}..{depth - 1}; negative indices "
                        f"count from the end)"
                    )
                idx[name] = pos
            if idx["start"] > idx["end"]:
                raise ValueError(
                    f"route {i} ({r}): start={r.start} comes after end={r.end} "
                    f"(resolved {idx['start']} > {idx['end']}); a route covers blocks "
                    f"start..end inclusive, so start must be <= end"
                )
            resolved.append(Route(idx["start"], idx["end"], r.selection_ratio))
        for i in range(1, len(resolved)):
            prev, cur = resolved[i - 1], resolved[i]
            if cur.start <= prev.end:
                raise ValueError(
                    f"route {i} ({self.routes[i]}) starts at block {cur.start}, which is not "
                    f"after the end of route {i - 1} ({self.routes[i - 1]}, ends at block "
                    f"{prev.end}); routes must be sorted and must not overlap"
                )
        return replace(self, routes=tuple(resolved))


def kept_count(num_tokens: int, selection_ratio: float, label: str = "route") -> int:
    """Tokens a route keeps: ``N - floor(N * r)``; raises when that routes nothing or keeps nothing."""
    routed = math.floor(num_tokens * selection_ratio)
    kept = num_tokens - routed
    if kept < 1:
        raise ValueError(
            f"{label}: selection_ratio={selection_ratio} keeps {kept} of {num_tokens} "
            f"tokens; at least one token must be kept"
        )
    if selection_ratio > 0 and routed == 0:
        raise ValueError(
            f"{label}: selection_ratio={selection_ratio} routes no token of {num_tokens} "
            f"(floor({num_tokens} * {selection_ratio}) = 0), so routing would silently do "
            f"nothing; " + (f"use a ratio of at least {1 / num_tokens:.4g} or 0"
                            if num_tokens > 1 else
                            "a single routable token cannot be routed: route other blocks, "
                            "or use ratio 0")
        )
    return kept


_ROUTE_RE = re.compile(r"^\s*(-?\d+)\s*:\s*(-?\d+)\s*@\s*([0-9.eE+-]+)\s*$")


def check_ratio(value: Any, label: str, field_name: str = "selection_ratio") -> float:
    """``value`` as a float in [0, 1); ``ValueError`` naming ``label`` and the field otherwise."""
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise ValueError(f"{label}: {field_name} must be a number in [0, 1), got {value!r}")
    value = float(value)
    if not (0.0 <= value < 1.0):
        raise ValueError(
            f"{label}: {field_name}={value} is outside [0, 1); it is the fraction of tokens "
            f"that skip the route's blocks (0.5 in the paper)"
        )
    return value


def _check_index(value: Any, label: str, field_name: str) -> int:
    if isinstance(value, bool) or not isinstance(value, numbers.Integral):
        raise ValueError(f"{label}: {field_name} must be an integer block index, got {value!r}")
    return int(value)


def _route_from_string(text: str, i: int) -> Route:
    m = _ROUTE_RE.match(text)
    if not m:
        raise ValueError(
            f"route {i} ({text!r}): expected 'start:end@selection_ratio', e.g. '2:8@0.5'"
        )
    label = f"route {i} ({text.strip()!r})"
    try:
        ratio = float(m.group(3))
    except ValueError:
        raise ValueError(f"{label}: selection_ratio {m.group(3)!r} is not a number") from None
    return Route(int(m.group(1)), int(m.group(2)), check_ratio(ratio, label, "selection_ratio"))


_DICT_FIELDS = {
    "start": ("start_layer_idx", "start"),
    "end": ("end_layer_idx", "end"),
    "selection_ratio": ("selection_ratio",),
}


def _route_from_mapping(d: Mapping[str, Any], i: int) -> Route:
    label = f"route {i} ({dict(d)!r})"
    known = {k for names in _DICT_FIELDS.values() for k in names}
    unknown = sorted(set(d) - known)
    if unknown:
        raise ValueError(
            f"{label}: unknown field(s) {unknown}; expected selection_ratio, "
            f"start_layer_idx, end_layer_idx"
        )
    values = {}
    for name, keys in _DICT_FIELDS.items():
        present = [k for k in keys if k in d]
        if not present:
            raise ValueError(f"{label}: missing field {keys[0]!r}")
        if len(present) > 1:
            raise ValueError(f"{label}: give only one of {present}")
        values[name] = (present[0], d[present[0]])
    return Route(
        _check_index(values["start"][1], label, values["start"][0]),
        _check_index(values["end"][1], label, values["end"][0]),
        check_ratio(values["selection_ratio"][1], label, "selection_ratio"),
    )


def _route_from_any(item: Any, i: int) -> Route:
    if isinstance(item, Route):
        label = f"route {i} ({item})"
        return Route(
            _check_index(item.start, label, "start"),
            _check_index(item.end, label, "end"),
            check_ratio(item.selection_ratio, label, "selection_ratio"),
        )
    if isinstance(item, str):
        return _route_from_string(item, i)
    if isinstance(item, Mapping):
        return _route_from_mapping(item, i)
    raise TypeError(
        f"route {i}: expected a Route, a 'start:end@ratio' string or a dict with "
        f"selection_ratio/start_layer_idx/end_layer_idx, got {type(item).__name__}"
    )


_OPTIONS = ("keep_order", "seed", "blocks", "hidden", "token_inputs", "prefix_tokens",
            "fp32_after_route")


def parse_spec(spec: Any, **options: Any) -> RouteSpec:
    """Turn any accepted form of a route spec into a validated :class:`RouteSpec`.

    ``options`` (``keep_order``, ``seed``, ``blocks``) override the spec's own when not None.
    Indices are checked against the block count later, by :meth:`RouteSpec.resolve`.
    """
    if isinstance(spec, RouteSpec):
        base = spec
        routes: Iterable[Any] = spec.routes
    elif isinstance(spec, Mapping) and "routes" in spec:
        extra = sorted(set(spec) - {"routes", *_OPTIONS})
        if extra:
            raise ValueError(
                f"route spec: unknown field(s) {extra}; expected routes, {', '.join(_OPTIONS)}"
            )
        base = RouteSpec(
            routes=(),
            **{k: spec[k] for k in _OPTIONS if k in spec},
        )
        routes = spec["routes"]
        if isinstance(routes, (str, Mapping, Route)):
            routes = [routes]
    elif isinstance(spec, str):
        base = RouteSpec(routes=())
        routes = [part for part in spec.split(",") if part.strip()]
    elif isinstance(spec, (Route, Mapping)):
        base = RouteSpec(routes=())
        routes = [spec]
    elif isinstance(spec, Sequence):
        base = RouteSpec(routes=())
        routes = spec
    else:
        raise TypeError(
            f"route spec: expected a string like '2:8@0.5', a Route, a RouteSpec or a list "
            f"of route dicts, got {type(spec).__name__}"
        )
    parsed = tuple(
        _route_from_string(r, i) if isinstance(r, str) else _route_from_any(r, i)
        for i, r in enumerate(routes)
    )
    if not parsed:
        raise ValueError(
            f"route spec {spec!r} has no routes; give at least one, e.g. '2:8@0.5' "
            f"(for dense training use the model itself)"
        )
    overrides = {k: v for k, v in options.items() if v is not None}
    unknown = sorted(set(overrides) - set(_OPTIONS))
    if unknown:
        raise TypeError(f"route spec: unknown option(s) {unknown}")
    out = replace(base, routes=parsed, **overrides)
    for flag in ("keep_order", "fp32_after_route"):
        if not isinstance(getattr(out, flag), bool):
            raise ValueError(f"route spec: {flag} must be True or False, got "
                             f"{getattr(out, flag)!r}")
    if out.seed is not None and (isinstance(out.seed, bool) or not isinstance(out.seed, int)):
        raise ValueError(f"route spec: seed must be an int or None, got {out.seed!r}")
    if out.prefix_tokens is not None and (isinstance(out.prefix_tokens, bool) or not isinstance(
            out.prefix_tokens, int) or out.prefix_tokens < 0):
        raise ValueError(f"route spec: prefix_tokens must be an int >= 0, got "
                         f"{out.prefix_tokens!r}")
    if out.token_inputs is not None and not isinstance(out.token_inputs, Mapping):
        raise ValueError(f"route spec: token_inputs must be a dict of argument -> axis or "
                         f"None, got {out.token_inputs!r}")
    if out.blocks is not None and (not isinstance(out.blocks, str) or not out.blocks):
        raise ValueError(f"route spec: blocks must be a dotted module path, got {out.blocks!r}")
    return out
