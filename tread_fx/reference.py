"""Independent references for a routed forward pass (no tread_fx gather/scatter code).

Given the ORIGINAL model, the blocks of its chain, the routes and the kept indices a routed
model drew (``routed.selectors[i].last_indices``), these compute what the routed model
must return, without any of tread_fx's graph passes or runtime nodes:

* :func:`masked_reference` runs the model densely and
  (a) inside the blocks of a route patches ``torch.nn.functional.scaled_dot_product_attention``
  so that no query attends to a dropped key. Which key positions are image tokens is read
  from the sequence lengths alone: a self-attention over the block's ``N`` hidden tokens
  masks the dropped ones; a joint attention over ``N + T`` tokens (another stream's ``T``
  tokens concatenated to the image tokens) masks the dropped image tokens at their
  positions, with the order given by ``joint`` (``"text_first"``: MMDiT, Flux;
  ``"image_first"``: diffusers' ``JointAttnProcessor2_0``); a cross-attention (queries and
  keys of different lengths) is left alone;
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


def _hidden_of(args: tuple, kwargs: dict) -> torch.Tensor:
    for key in ("x", "hidden_states"):
        if key in kwargs:
            return kwargs[key]
    return args[0]


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
    """``[B, 1, 1, Lk]`` bool mask (True = may attend) for one attention call, or None.

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
    return full[:, None, None, :]


def masked_reference(model: nn.Module, inputs: Any, blocks: Sequence[nn.Module],
                     routes: Sequence[tuple[int, int]], indices: Sequence[torch.Tensor],
                     joint: str | None = None):
    """The routed forward computed densely on ``model`` with masked attention (see module doc).

    ``blocks``: the chain's blocks in call order; ``routes``: inclusive ``(start, end)``
    positions in ``blocks``; ``indices``: the ``[B, kept]`` kept indices of each route.
    Returns whatever ``model`` returns; it runs in the model's current mode, with grad.
    """
    _check_routes(routes, indices, len(blocks))
    route_of = {}
    for r, (start, end) in enumerate(routes):
        for i in range(start, end + 1):
            route_of[i] = r
    state: dict[str, Any] = {"keep": None, "calls": 0}
    entering: dict[int, torch.Tensor] = {}          # route -> tensor entering it
    masks: dict[int, torch.Tensor] = {}

    original_sdpa = F.scaled_dot_product_attention

    def sdpa(query, key, value, attn_mask=None, dropout_p=0.0, is_causal=False, **kwargs):
        keep = state["keep"]
        if keep is not None:
            allowed = _key_mask(keep, query.shape[-2], key.shape[-2], joint)
            if allowed is not None:
                if is_causal:
                    raise NotImplementedError("causal attention inside a route")
                state["calls"] += 1
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
            x = _hidden_of(args, kwargs)
            if i == routes[r][0]:
                entering[r] = x
                masks[r] = kept_mask(indices[r].to(x.device), x.shape[1])
            if x.shape != entering[r].shape:
                raise RuntimeError(f"block {i} gets hidden state {tuple(x.shape)}, the route "
                                   f"entered with {tuple(entering[r].shape)}")
            state["keep"], state["calls"] = masks[r], 0
        return hook

    def post_hook(i):
        r = route_of[i]

        def hook(module, args, kwargs, out):
            state["keep"] = None
            if state["calls"] == 0:
                raise RuntimeError(
                    f"block {i} ({type(module).__name__}) made no self-attention call through "
                    f"torch.nn.functional.scaled_dot_product_attention; the masked reference "
                    f"is only exact for blocks that mix tokens through it")
            x_in, keep = entering[r], masks[r][..., None]
            hidden = out if torch.is_tensor(out) else out[-1]
            if hidden.shape != x_in.shape:
                raise RuntimeError(f"block {i} returns {tuple(hidden.shape)}, expected the "
                                   f"hidden state {tuple(x_in.shape)} last")
            hidden = torch.where(keep, hidden, x_in.to(hidden.dtype))
            if torch.is_tensor(out):
                return hidden
            return type(out)((*out[:-1], hidden))
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
              joint: str | None = None):
    """:func:`ssm_reference` for an ``SSMDiT``, :func:`masked_reference` for anything else."""
    from tread_fx.models.ssm import SSMDiT

    if isinstance(model, SSMDiT):
        if isinstance(inputs, dict):
            return ssm_reference(model, routes=routes, indices=indices, **inputs)
        return ssm_reference(model, *inputs, routes=routes, indices=indices)
    return masked_reference(model, inputs, blocks, routes, indices, joint=joint)
