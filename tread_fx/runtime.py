"""What the inserted graph nodes run.

``tread_select_<i>`` calls a :class:`TokenSelector` (a parameter-free module, so it follows
``train()``/``eval()``); ``tread_gather_<i>`` and ``tread_scatter_<i>`` call
:func:`gather_tokens` and :func:`scatter_tokens`.  When a selector is inactive (eval mode by
default) it returns ``None`` and gather/scatter pass their tensor through untouched, so the
eval forward is the original computation, bit for bit.

Everything here is compiler-friendly: the kept count follows from the static token count,
there is no ``.item()`` and no data-dependent shape.
"""

from __future__ import annotations

import torch
from torch import nn
from torch.amp.autocast_mode import _enter_autocast, _exit_autocast

from .spec import Route, check_ratio, kept_count

__all__ = ["TokenSelector", "autocast_off", "autocast_restore", "check_side_input",
           "check_side_output", "float32_input", "gather_side", "gather_tokens",
           "scatter_tokens", "select_tokens"]


def select_tokens(
    x: torch.Tensor,
    selection_ratio: float,
    keep_order: bool = True,
    generator: torch.Generator | None = None,
    label: str = "route",
    fixed: tuple[int, int] = (0, 0),
    shared: bool = False,
    axes: tuple[int, int] = (0, 1),
    shard: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Indices ``[B, kept]`` of the tokens that stay in the route, drawn uniformly per sample.

    ``axes`` are the batch and token axes of ``x`` (``[B, N, ...]`` by default).  ``fixed``
    counts the rows at the start and at the end of the token axis that are never routed
    (class, time or text tokens, padding): they are always kept, and the ratio applies to
    the ``N - head - tail`` rows between them (the image tokens).  With ``shared`` one draw
    serves the whole batch (needed when a per-token side input, such as a RoPE table, has
    no batch axis).  With ``keep_order`` the indices are sorted, so kept tokens keep their
    original order; when every token is kept the draw is skipped and the indices are
    ``0..N-1``, which leaves the random number stream untouched.

    ``shard`` is ``(rank, world_size)`` under data parallelism: the noise is drawn for the
    batch of all ``world_size`` ranks and this rank keeps its own rows, so ranks that share
    a random state (the same seed) draw different tokens, and together exactly the tokens
    one process draws for the concatenated batch.
    """
    batch_axis, token_axis = axes
    batch, num_tokens = x.shape[batch_axis], x.shape[token_axis]
    head, tail = fixed
    routable = num_tokens - head - tail
    kept = kept_count(routable, selection_ratio, label)
    if kept == routable and keep_order:
        return torch.arange(num_tokens, device=x.device).expand(batch, num_tokens)
    rows = 1 if shared else batch
    rank, world = shard
    if world > 1:
        dtype = torch.float32 if generator is None else torch.get_default_dtype()
        noise = torch.rand(rows * world, routable, device=x.device, dtype=dtype,
                           generator=generator)[rank * rows:(rank + 1) * rows]
    elif generator is None:
        # rand_like of a [rows, routable] view: exports to ONNX (RandomUniformLike)
        view = x.movedim(axes, (0, 1)) if axes != (0, 1) else x
        base = (view.flatten(2)[..., 0] if view.dim() > 2 else view)[:rows, head:head + routable]
        noise = torch.rand_like(base, dtype=torch.float32)
    else:
        noise = torch.rand(rows, routable, device=x.device, generator=generator)
    indices = noise.topk(kept, dim=1, sorted=False).indices
    if keep_order:
        indices = indices.sort(dim=1).values
    parts = [indices + head] if head else [indices]
    if head:
        parts.insert(0, torch.arange(head, device=x.device).expand(indices.shape[0], head))
    if tail:
        parts.append(torch.arange(num_tokens - tail, num_tokens, device=x.device)
                     .expand(indices.shape[0], tail))
    indices = torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]
    return indices.expand(batch, -1) if shared else indices


def _data_parallel_shard() -> tuple[int, int]:
    """``(rank, world_size)`` of the default process group; ``(0, 1)`` outside one.

    Constant under torch.compile and export (Dynamo folds these calls).
    """
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        return torch.distributed.get_rank(), torch.distributed.get_world_size()
    return 0, 1


def _expand_index(indices: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    trailing = like.shape[2:]
    view = indices.reshape(indices.shape + (1,) * len(trailing))
    return view.expand(indices.shape + trailing)


def _stride_order(t: torch.Tensor) -> list[int]:
    """Dimensions from outermost to innermost in memory.

    Under torch.compile the natural order: strides may be symbolic there (after a ratio
    change makes the kept count dynamic), and compiled kernels choose their own layouts.
    """
    if torch.compiler.is_compiling():
        return list(range(t.dim()))
    return sorted(range(t.dim()), key=lambda d: (-t.stride(d), d))


def _inverse(perm: list[int]) -> list[int]:
    inv = [0] * len(perm)
    for i, p in enumerate(perm):
        inv[p] = i
    return inv


def _gather(x: torch.Tensor, dim: int, index: torch.Tensor) -> torch.Tensor:
    """``x.gather(dim, index)`` laid out in memory like ``x`` (for side inputs: a table's
    layout is what the blocks were written against)."""
    perm = _stride_order(x)
    out = x.permute(perm).gather(perm.index(dim), index.permute(perm))
    return out.permute(_inverse(perm))


def _batch_first(x: torch.Tensor, axes: tuple[int, int]) -> torch.Tensor:
    return x if tuple(axes) == (0, 1) else x.movedim(tuple(axes), (0, 1))


def _restore(x: torch.Tensor, axes: tuple[int, int]) -> torch.Tensor:
    return x if tuple(axes) == (0, 1) else x.movedim((0, 1), tuple(axes))


def gather_tokens(x: torch.Tensor, indices: torch.Tensor | None,
                  axes: tuple[int, int] = (0, 1)) -> torch.Tensor:
    """The kept tokens of ``x`` (``[B, N, ...]`` -> ``[B, kept, ...]``, or the same on the
    batch and token ``axes``); ``x`` itself when inactive."""
    if indices is None:
        return x
    x = _batch_first(x, axes)
    # a fresh, contiguous tensor, as a hand-written gather gives the routed blocks: a
    # stream in another layout (DiT's is [B, D, N]-major after its patch embedding) would
    # make every routed block's backward copy its gradients to contiguous first
    return _restore(x.gather(1, _expand_index(indices, x)), axes)


def scatter_tokens(
    full: torch.Tensor,
    kept: torch.Tensor,
    indices: torch.Tensor | None,
    label: str = "route",
    axes: tuple[int, int] = (0, 1),
) -> torch.Tensor:
    """Put the processed kept tokens back into the tensor that entered the route.

    Routed tokens come back at their own positions with their pre-route values (and receive
    gradient through that identity path).  The result has the processed tensor's dtype, as
    the dense block output would.  Inactive: returns ``kept`` itself.
    """
    if indices is None:
        return kept
    full, kept = _batch_first(full, axes), _batch_first(kept, axes)
    if kept.shape[:1] + kept.shape[2:] != full.shape[:1] + full.shape[2:] or (
        kept.shape[1] != indices.shape[1]
    ):
        raise RuntimeError(
            f"{label}: the last block of the route returned shape {tuple(kept.shape)}, but "
            f"{indices.shape[1]} tokens of a {tuple(full.shape)} input went in; a routed block "
            f"must keep the token count and the feature shape"
        )
    if full.dtype != kept.dtype:
        full = full.to(kept.dtype)
    # laid out like the tensor the route skipped, as the dense model's stream is there
    return _restore(full.scatter(1, _expand_index(indices, kept), kept), axes)


def _joint_indices(indices: torch.Tensor, offset: int, tail: int, length) -> torch.Tensor:
    """The route's ``[B, kept]`` token indices as rows of a joint table of ``length`` rows:
    its first ``offset`` and last ``tail`` rows (another stream's) kept, the token rows
    between them shifted by ``offset``."""
    batch, parts = indices.shape[0], []
    if offset:
        parts.append(torch.arange(offset, device=indices.device).expand(batch, offset))
    parts.append(indices + offset if offset else indices)
    if tail:
        parts.append(torch.arange(length - tail, length, device=indices.device)
                     .expand(batch, tail))
    return torch.cat(parts, dim=1)


def gather_side(value: torch.Tensor, indices: torch.Tensor | None, axes: tuple[int, ...],
                offset: int = 0, batch_axis: int | None = 0, tail: int = 0) -> torch.Tensor:
    """Gather a per-token side input on each of its token ``axes`` with the route's indices.

    A joint table holds the rows of another stream beside the token rows, all kept:
    ``offset`` of them before the token rows (``[text, image]``: Flux's RoPE table) and
    ``tail`` after them (``[image, text]``: HiDream's RoPE ids, NucleusMoE's attention
    mask).  A table without batch axis (``batch_axis=None``) uses the first sample's
    indices (the selector draws one index set for the whole batch in that case).
    """
    if indices is None:
        return value
    if offset or tail:
        indices = _joint_indices(indices, offset, tail, value.shape[axes[0]])
    for axis in axes:
        if batch_axis is None:
            value = value.index_select(axis, indices[0])
            continue
        shape = [1] * value.dim()
        shape[batch_axis], shape[axis] = indices.shape[0], indices.shape[1]
        target = list(value.shape)
        target[axis] = indices.shape[1]
        value = _gather(value, axis, indices.reshape(shape).expand(target))
    return value


def check_side_input(value, full: torch.Tensor, indices: torch.Tensor | None,
                     label: str = "route", arg: str = "argument"):
    """Without example inputs side inputs pass untouched; refuse any that looks per-token."""
    if indices is None or not isinstance(value, torch.Tensor):
        return value
    if value.dim() == 2 and value.shape[0] == full.shape[0] and value.shape[1] == full.shape[-1]:
        return value  # [B, width]: a per-sample conditioning vector
    if full.shape[1] in tuple(value.shape[1:]) or (value.dim() >= 2 and value.shape[0] ==
                                                   full.shape[1] != full.shape[0]):
        raise RuntimeError(
            f"{label}: {arg} has shape {tuple(value.shape)}, with a dimension of the token "
            f"count {full.shape[1]}; it may be per-token and would then need the route's "
            f"indices. Pass example_inputs=... to tread_fx.route() so the side inputs are "
            f"classified from their shapes, or token_inputs={{name: axis or None}}")
    return value


def check_side_output(value, full: torch.Tensor, indices: torch.Tensor | None,
                      label: str = "route"):
    """Pass a block's side output out of a route, unless it is on the kept-token axis.

    A block's other outputs (a text stream, a gate) may leave the route; a tensor with the
    kept tokens on axis 1 may not, since it would silently carry only the kept tokens.
    """
    if indices is None or not isinstance(value, torch.Tensor) or value.dim() < 2:
        return value
    kept, total = indices.shape[1], full.shape[1]
    if kept != total and value.shape[1] == kept and value.shape[0] == full.shape[0]:
        raise RuntimeError(
            f"{label}: a block output of shape {tuple(value.shape)} leaves the route with the "
            f"{kept} kept tokens on axis 1 (of {total}); it cannot be used outside the route. "
            f"End the route before that block, or use only its hidden-state output")
    return value


# Device types whose autocast the block after a route turns off (``fp32_after_route``):
# turning off one that is not in use costs nothing, and the graph need not know the device.
_AUTOCAST_DEVICES = ("cpu", "cuda")


def autocast_off(indices: torch.Tensor | None):
    """Enter autocast-off for the block after a route (``None``: the route is inactive and
    the block runs as the model has it).  Returns what :func:`autocast_restore` exits."""
    if indices is None:
        return None
    return tuple(_enter_autocast(device, None, False, None) for device in _AUTOCAST_DEVICES)


def autocast_restore(contexts, value):
    """Leave the autocast-off of :func:`autocast_off`; returns the block's output."""
    if contexts is not None:
        for context in reversed(contexts):
            _exit_autocast(context)
    return value


def float32_input(value, indices: torch.Tensor | None):
    """A half-precision tensor argument of the block after an active route, in float32."""
    if indices is None or not isinstance(value, torch.Tensor) or value.dtype not in (
            torch.float16, torch.bfloat16):
        return value
    return value.float()


class TokenSelector(nn.Module):
    """Draws the kept-token indices of one route.

    Active in ``train()`` mode; inactive (returns ``None``) in ``eval()`` mode unless
    ``force_active`` is set, which inference-time routing (sparse guidance) uses.  Has no
    parameters or buffers: it adds nothing to the state dict.

    After every forward, :attr:`last_indices` holds the indices it drew (``None`` when
    inactive), so losses can see which tokens each route kept.
    """

    def __init__(self, index: int, route: Route, blocks: tuple[str, ...], keep_order: bool,
                 seed: int | None) -> None:
        super().__init__()
        self.index = index
        self.route = route
        self.blocks = blocks
        self.selection_ratio = route.selection_ratio
        self.keep_order = keep_order
        self.seed = seed
        self.fixed = (0, 0)       # never-routed rows at the start and end of the token axis
        self.axes = (0, 1)        # batch and token axis of the hidden state
        self.shared = False
        self.force_active: bool | None = None
        self.last_indices: torch.Tensor | None = None
        self.last_num_tokens = 0
        self._generators: dict[torch.device, torch.Generator] = {}

    @property
    def prefix(self) -> int:
        """Never-routed rows in front of the routed ones (class, time, text tokens)."""
        return self.fixed[0]

    @property
    def label(self) -> str:
        return f"route {self.index} ({self.route}, blocks {self.blocks[0]}..{self.blocks[-1]})"

    def extra_repr(self) -> str:
        return (f"route={self.route}, blocks={self.blocks[0]}..{self.blocks[-1]}, "
                f"keep_order={self.keep_order}, seed={self.seed}, fixed={self.fixed}, "
                f"shared={self.shared}")

    def check_ratio(self, selection_ratio: float) -> None:
        check_ratio(selection_ratio, self.label, "selection_ratio")

    def _generator(self, device: torch.device) -> torch.Generator | None:
        if self.seed is None:
            return None
        if torch.compiler.is_compiling():
            raise RuntimeError(
                f"{self.label}: seed={self.seed} draws from a torch.Generator, which "
                f"torch.compile cannot trace; under torch.compile route without seed= and "
                f"make the selection reproducible with torch.manual_seed()")
        gen = self._generators.get(device)
        if gen is None:
            gen = torch.Generator(device=device)
            gen.manual_seed(self.seed + self.index)
            self._generators[device] = gen
        return gen

    def forward(self, x: torch.Tensor, fixed: tuple[int, int] | None = None,
                shared: bool | None = None,
                axes: tuple[int, int] | None = None) -> torch.Tensor | None:
        """Kept indices for ``x``; ``fixed``, ``shared`` and ``axes`` are what the calling
        graph's analysis decided (default: the selector's own, from ``route()``)."""
        active = self.training if self.force_active is None else self.force_active
        if not active:
            self.last_indices = None
            return None
        fixed = self.fixed if fixed is None else fixed
        shared = self.shared if shared is None else shared
        axes = self.axes if axes is None else axes
        indices = select_tokens(x, self.selection_ratio, self.keep_order,
                                self._generator(x.device), self.label, fixed, shared, axes,
                                _data_parallel_shard())
        num_tokens = x.shape[axes[1]]
        if not torch.compiler.is_exporting():   # export keeps no module state
            self.last_indices, self.last_num_tokens = indices, num_tokens
        if indices.shape[1] == num_tokens and self.keep_order:
            # Every token kept, in order: the route is the identity, and gathering would
            # only change memory layouts (and with them the last bits of later kernels).
            return None
        return indices
