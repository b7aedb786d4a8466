"""Independent references for a routed forward pass (no tread_fx gather/scatter code).

Given the ORIGINAL model, the blocks of its chain, the routes and the kept indices a routed
model drew (``routed.selectors[i].last_indices``), these compute what the routed model
must return, without any of tread_fx's graph passes or runtime nodes:

* :func:`masked_reference` runs the model densely and
  (a) inside the blocks of a route patches ``torch.nn.functional.scaled_dot_product_attention``
  so that no query attends to a dropped key.  Where the block's tokens sit in each
  attention's key sequence is measured (``joint="auto"``, the default): the block is run
  three more times (no grad, same random state, every attention call returning zeros so
  that attention mixes no tokens) with one token of its hidden input changed (the last and
  the first token the route drops: tokens whose keys are hidden), and the key
  rows that change locate the tokens (offset 0 for a self-attention
  over the tokens, ``T`` when another stream's ``T`` tokens come first, none for an
  attention whose keys do not come from the tokens); a key row that depends on several
  tokens (a convolution before the attention) makes the reference refuse.  Attention calls
  between the blocks of a route (a residual adapter running on the stream there) are masked
  when their keys are exactly the route's tokens.  ``joint=
  "text_first"`` / ``"image_first"`` instead read the position from the sequence lengths
  (a joint attention over ``N + T`` keys, cross-attentions of other lengths left alone);
  (b) after every block of a route resets the dropped tokens to the values they had when
  they entered the route (forward hooks on the user's blocks). Every block output made
  inside a route thereby follows the documented semantics of values leaving a route
  (routed tokens keep their pre-route values), which covers U-ViT's long skips.

  This is exact (up to float rounding) for blocks that mix tokens only through
  ``scaled_dot_product_attention``: the kept tokens see exactly the kept tokens, and the
  dropped tokens, computed but never seen, are put back. A routed block that calls no
  attention raises, since the reference would then be meaningless.

* :func:`ssm_reference` is a hand-written routed forward of
  :class:`tread_fx.models.ssm.SSMDiT`, whose scans mix tokens outside attention:
  ``x_kept = x[rows, idx]``, the route's blocks on it, ``x_in[rows, idx] = x_kept``.

* :func:`reference` picks one of the two.
"""

from __future__ import annotations

from typing import Any, Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["masked_reference", "reference", "ssm_reference", "kept_mask"]


def kept_mask(indices: torch.Tensor, num_tokens: int) -> torch.Tensor:
    """``[B, kept]`` indices -> ``[B, N]`` bool mask of the kept tokens."""
    mask = torch.zeros(indices.shape[0], num_tokens, dtype=torch.bool, device=indices.device)
    mask[torch.arange(indices.shape[0], device=indices.device)[:, None], indices] = True
    return mask


def _call(model: nn.Module, inputs: Any):
    return model(**inputs) if isinstance(inputs, dict) else model(*inputs)


_HIDDEN = ("x", "hidden_states", "hidden", "h", "img", "image", "tokens")


def _hidden_key(args: tuple, kwargs: dict):
    """Where a block takes its token stream: a conventional keyword, else argument 0 (the
    first keyword for a block called with keywords only)."""
    for key in _HIDDEN:
        if key in kwargs:
            return key
    return 0 if args or not kwargs else next(iter(kwargs))


def _stream_output(out: Any, shape: torch.Size, name: str) -> int | None:
    """Where a block's output holds its token stream: None for a tensor output, else the
    index of the one tuple element shaped like the block's input (RuntimeError if there is
    not exactly one)."""
    if torch.is_tensor(out):
        return None
    same = [k for k, o in enumerate(out) if torch.is_tensor(o) and o.shape == shape]
    if len(same) != 1:
        raise RuntimeError(f"{name} returns {len(same)} tensors shaped like its hidden input "
                           f"{tuple(shape)}; which one carries the tokens is ambiguous to the "
                           f"reference: cannot verify")
    return same[0]


def _with_stream(out: Any, at: int | None, value: torch.Tensor) -> Any:
    """``out`` with its token stream (``at``, from :func:`_stream_output`) replaced."""
    if at is None:
        return value
    items = list(out)
    items[at] = value
    return type(out)(items)


def _with_hidden(args: tuple, kwargs: dict, key, x: torch.Tensor) -> tuple[tuple, dict]:
    if isinstance(key, str):
        return args, {**kwargs, key: x}
    return (x, *args[1:]), kwargs


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    key = _hidden_key(args, kwargs)
    return kwargs[key] if isinstance(key, str) else args[key]


def _token_axis(x: torch.Tensor, batch: int, name: str) -> int:
    """1 for a ``[B, N, ...]`` stream, 0 for a sequence-first ``[N, B, ...]`` one."""
    if x.dim() >= 2 and x.shape[0] == batch and x.shape[1] != batch:
        return 1
    if x.dim() >= 2 and x.shape[1] == batch and x.shape[0] != batch:
        return 0
    raise RuntimeError(f"{name}: which axis of its hidden input {tuple(x.shape)} holds the "
                       f"{batch} samples is ambiguous: cannot verify")


def _changed_rows(a: torch.Tensor, b: torch.Tensor) -> set[int]:
    diff = (a.float() - b.float()).abs().movedim(-2, 0).reshape(a.shape[-2], -1)
    return set(torch.nonzero(diff.amax(dim=1) > 0).flatten().tolist())


def _key_offsets(block: nn.Module, args: tuple, kwargs: dict, probe: list, name: str,
                 axis: int = 1, rows: tuple[int, int] | None = None) -> list[int | None]:
    """Per attention call of ``block``: where its input tokens sit among the keys.

    Runs the block on its real input and on two copies with one token changed (``rows``:
    a later, then an earlier token; default the last and the first), recording every
    attention call's keys (``probe`` collects them; the attention calls return zeros
    meanwhile, so attention mixes no tokens and the rows stay aligned), and reads which
    key rows changed.  ``None``: the call's keys do not come from the tokens.
    """
    key = _hidden_key(args, kwargs)
    x = _hidden_of(args, kwargs)
    n = x.shape[axis]
    late, early = rows if rows is not None else (n - 1, 0)
    runs = []
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad(), torch.random.fork_rng(devices=[x.device] if x.is_cuda else []):
        state = torch.random.get_rng_state()
        for j in (None, late, early):
            torch.random.set_rng_state(state)
            probe.clear()
            xj = x.detach().clone()
            if j is not None:   # noise, not a constant: a norm would remove a shift
                row = xj.select(axis, j)
                row.add_(torch.randn(row.shape, generator=gen, dtype=torch.float32)
                         .to(row.dtype) + 1.0)
            a, k = _with_hidden(args, kwargs, key, xj)
            block(*a, **k)
            runs.append(list(probe))
    probe.clear()
    base, last, first = runs
    if not len(base) == len(last) == len(first):
        raise RuntimeError(f"{name}: the number of attention calls depends on the input "
                           f"values; the reference cannot follow it")
    offsets: list[int | None] = []
    for c, (k0, k1, k2) in enumerate(zip(base, last, first)):
        rows1, rows2 = _changed_rows(k0, k1), _changed_rows(k0, k2)
        if not rows1 and not rows2:
            offsets.append(None)
            continue
        if len(rows1) == 1 and len(rows2) == 1 and \
                next(iter(rows1)) - late == next(iter(rows2)) - early:
            offsets.append(next(iter(rows2)) - early)
            continue
        raise RuntimeError(
            f"{name}: attention call {c}: changing token {late} of the block's input "
            f"changed key rows {sorted(rows1)[:8]}, token {early} changed "
            f"{sorted(rows2)[:8]}; the "
            f"block mixes tokens before this attention (a convolution over the grid?), so "
            f"masking keys cannot reproduce the routed computation: cannot verify")
    return offsets


def _probe_rows(keep: torch.Tensor) -> tuple[int, int] | None:
    """The tokens to change when probing a routed block's keys: the last and the first
    token the route drops in some sample (tokens whose keys the mask must hide; a padding
    row, never dropped, may have a zeroed key), or None (the last and the first token)
    when it drops fewer than two."""
    dropped = torch.nonzero((~keep).any(dim=0)).flatten().tolist()
    return (dropped[-1], dropped[0]) if len(dropped) >= 2 else None


def _check_routes(routes: Sequence[tuple[int, int]], indices: Sequence[torch.Tensor],
                  num_blocks: int) -> None:
    if len(routes) != len(indices):
        raise ValueError(f"{len(routes)} routes but {len(indices)} index tensors")
    last = -1
    for start, end in routes:
        if not last < start <= end < num_blocks:
            raise ValueError(f"route {start}:{end} is not sorted, disjoint and inside the "
                             f"{num_blocks} blocks")
        last = end


def _key_mask(keep: torch.Tensor, q_len: int, k_len: int, joint: str | None) -> torch.Tensor | None:
    """``[B, Lk]`` bool mask (True = may attend) for one attention call, or None.

    ``keep`` is the ``[B, N]`` kept mask of the block's hidden tokens.
    """
    n = keep.shape[1]
    if q_len != k_len or k_len < n:
        return None                       # cross-attention to another stream: untouched
    if k_len == n:
        full = keep
    else:
        if joint not in ("text_first", "image_first"):
            raise ValueError(
                f"an attention over {k_len} tokens in a block with {n} hidden tokens joins "
                f"another stream of {k_len - n} tokens; pass joint='text_first' or "
                f"'image_first' to say where the image tokens are")
        other = keep.new_ones(keep.shape[0], k_len - n)
        full = torch.cat([other, keep] if joint == "text_first" else [keep, other], dim=1)
    return full


def masked_reference(model: nn.Module, inputs: Any, blocks: Sequence[nn.Module],
                     routes: Sequence[tuple[int, int]], indices: Sequence[torch.Tensor],
                     joint: str | None = "auto"):
    """The routed forward computed densely on ``model`` with masked attention (see module doc).

    ``blocks``: the chain's blocks in call order; ``routes``: inclusive ``(start, end)``
    positions in ``blocks``; ``indices``: the ``[B, kept]`` kept indices of each route.
    ``joint``: ``"auto"`` measures where the tokens sit in each attention's keys;
    ``"text_first"`` / ``"image_first"`` / ``None`` read it from the sequence lengths.
    Returns whatever ``model`` returns; it runs in the model's current mode, with grad.
    """
    _check_routes(routes, indices, len(blocks))
    route_of = {}
    for r, (start, end) in enumerate(routes):
        for i in range(start, end + 1):
            route_of[i] = r
    # keep: [B, N] kept mask of the running routed block; calls: its attention calls so
    # far; masked: how many were masked; offsets: per call, where its tokens sit in the
    # keys (auto); probe: a list while a block is probed (records keys, masks nothing)
    state: dict[str, Any] = {"keep": None, "calls": 0, "masked": 0, "offsets": None,
                             "probe": None, "per_sample": 0, "in_block": False}
    entering: dict[int, torch.Tensor] = {}          # route -> tensor entering it
    masks: dict[int, torch.Tensor] = {}             # route -> [B, N] kept mask
    axes: dict[int, int] = {}                       # route -> token axis of the stream

    original_sdpa = F.scaled_dot_product_attention

    def allowed_keys(keep: torch.Tensor, q_len: int, k_len: int) -> torch.Tensor | None:
        if not state["in_block"]:
            # between the blocks of a route (an adapter that runs on the stream there):
            # an attention over exactly the tokens sees the kept ones only
            return keep if k_len == keep.shape[1] else None
        if state["offsets"] is None:
            return _key_mask(keep, q_len, k_len, joint)
        calls = state["offsets"]
        if state["calls"] >= len(calls):
            raise RuntimeError("a routed block made more attention calls than when it was "
                               "probed")
        at = calls[state["calls"]]
        if at is None:
            return None
        allowed = keep.new_ones(keep.shape[0], k_len)
        allowed[:, at:at + keep.shape[1]] = keep
        return allowed

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        keep = state["keep"]
        if state["probe"] is not None:
            # probing where the tokens sit in the keys: attention mixes no tokens then
            # (it returns zeros), so a key row that still depends on several tokens was
            # mixed by something else (a convolution)
            state["probe"].append(key.detach().clone())
            return query.new_zeros(*query.shape[:-1], value.shape[-1])
        if keep is not None:
            allowed = allowed_keys(keep, query.shape[-2], key.shape[-2])
            state["calls"] += 1
            if allowed is not None:
                if query.dim() >= 3 and query.shape[0] == 1 and allowed.shape[0] > 1:
                    # attention run sample by sample (a loop over the batch): the calls
                    # come in sample order
                    sample = state["per_sample"] % allowed.shape[0]
                    state["per_sample"] += 1
                    allowed = allowed[sample:sample + 1]
                # [B, Lk] -> [B, 1, ..., 1, Lk]: broadcast over heads and queries
                allowed = allowed.reshape(allowed.shape[0], *[1] * (query.dim() - 2),
                                          allowed.shape[-1])
                if is_causal:   # causal over the kept tokens = causal, dropped keys hidden
                    causal = torch.ones(query.shape[-2], key.shape[-2], dtype=torch.bool,
                                        device=query.device).tril()
                    allowed = allowed & causal
                    is_causal = False
                state["masked"] += 1
                if attn_mask is None:
                    attn_mask = allowed
                elif attn_mask.dtype == torch.bool:
                    attn_mask = attn_mask & allowed
                else:
                    attn_mask = attn_mask.masked_fill(~allowed, float("-inf"))
        return original_sdpa(query, key, value, attn_mask=attn_mask, dropout_p=dropout_p,
                             is_causal=is_causal, **kwargs)

    def pre_hook(i):
        r = route_of[i]

        def hook(module, args, kwargs):
            if state["probe"] is not None:
                return None
            x = _hidden_of(args, kwargs)
            if i == routes[r][0]:
                entering[r] = x
                axes[r] = _token_axis(x, indices[r].shape[0], f"block {i}")
                masks[r] = kept_mask(indices[r].to(x.device), x.shape[axes[r]])
            if x.shape != entering[r].shape:
                raise RuntimeError(f"block {i} gets hidden state {tuple(x.shape)}, the route "
                                   f"entered with {tuple(entering[r].shape)}")
            state["offsets"] = None
            if joint == "auto":
                state["probe"] = []
                try:
                    state["offsets"] = _key_offsets(module, args, kwargs, state["probe"],
                                                    f"block {i} ({type(module).__name__})",
                                                    axes[r], _probe_rows(masks[r]))
                finally:
                    state["probe"] = None
            state["keep"], state["calls"], state["masked"] = masks[r], 0, 0
            state["per_sample"], state["in_block"] = 0, True
        return hook

    def post_hook(i):
        r = route_of[i]

        def hook(module, args, kwargs, out):
            if state["probe"] is not None:
                return None
            state["in_block"] = False
            if i == routes[r][1]:
                state["keep"] = None   # the route ends; until then attention stays masked
            if state["masked"] == 0:
                raise RuntimeError(
                    f"block {i} ({type(module).__name__}) made no attention call over its "
                    f"tokens through torch.nn.functional.scaled_dot_product_attention; the "
                    f"masked reference is only exact for blocks that mix tokens through it: "
                    f"cannot verify")
            x_in, keep = entering[r], masks[r] if axes[r] == 1 else masks[r].T
            keep = keep.reshape(*keep.shape, *[1] * (x_in.dim() - 2))
            at = _stream_output(out, x_in.shape, f"block {i}")
            hidden = out if at is None else out[at]
            if hidden.shape != x_in.shape:
                raise RuntimeError(f"block {i} returns {tuple(hidden.shape)}, expected the "
                                   f"hidden state {tuple(x_in.shape)}")
            return _with_stream(out, at, torch.where(keep, hidden, x_in.to(hidden.dtype)))
        return hook

    handles = []
    try:
        for i in route_of:
            handles.append(blocks[i].register_forward_pre_hook(pre_hook(i), with_kwargs=True))
            handles.append(blocks[i].register_forward_hook(post_hook(i), with_kwargs=True))
        F.scaled_dot_product_attention = sdpa
        out = _call(model, inputs)
    finally:
        F.scaled_dot_product_attention = original_sdpa
        for h in handles:
            h.remove()
    missing = set(range(len(routes))) - set(entering)
    if missing:
        raise RuntimeError(f"the blocks of routes {sorted(missing)} never ran")
    return out


def ssm_reference(model: nn.Module, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor,
                  routes: Sequence[tuple[int, int]], indices: Sequence[torch.Tensor]) -> torch.Tensor:
    """Routed forward of :class:`tread_fx.models.ssm.SSMDiT`, written by hand.

    The same computation as ``SSMDiT.forward``, with each route's blocks run on the kept
    tokens only (in the order of ``indices``), which are then written back into the tensor
    that entered the route.
    """
    _check_routes(routes, indices, len(model.blocks))
    starts = {start: r for r, (start, _) in enumerate(routes)}
    ends = {end: r for r, (_, end) in enumerate(routes)}
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    rows = torch.arange(x.shape[0], device=x.device)[:, None]
    x_in = None
    for i, block in enumerate(model.blocks):
        if i in starts:
            x_in, idx = x, indices[starts[i]].to(x.device)
            x = x[rows, idx]
        x = block(x, c)
        if i in ends:
            merged = x_in.clone()
            merged[rows, idx] = x
            x = merged
    x = model.final_layer(x, c)
    return model.unpatchify(x)


def reference(model: nn.Module, inputs: Any, blocks: Sequence[nn.Module],
              routes: Sequence[tuple[int, int]], indices: Sequence[torch.Tensor],
              joint: str | None = "auto"):
    """:func:`ssm_reference` for an ``SSMDiT``, :func:`masked_reference` for anything else."""
    from tread_fx.models.ssm import SSMDiT

    if isinstance(model, SSMDiT):
        if isinstance(inputs, dict):
            return ssm_reference(model, routes=routes, indices=indices, **inputs)
        return ssm_reference(model, *inputs, routes=routes, indices=indices)
    return masked_reference(model, inputs, blocks, routes, indices, joint=joint)
