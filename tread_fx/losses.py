"""TREAD training losses on per-token values.

The routed model exposes, for each route, a boolean kept-token mask of shape
``[B, N]`` (True = the token went through the route's blocks, False = it was routed
around them). These functions take those masks as plain tensors.

Pipeline, for an image model with patch size ``p``::

    terms = EDM().loss(model, x0, y, reduction="none")      # tread_fx.diffusion
    per_token = patchify_loss(terms.loss_per_element, p)     # [B, N]
    loss = tread_loss(per_token, kept_masks, mode="adapted",
                      prediction=terms.prediction, noisy_input=terms.noisy_input,
                      patch_size=p)

Token order: token ``i`` is the ``p x p`` patch at grid row ``i // (W/p)``, column
``i % (W/p)`` (row-major, as DiT's / ViT's patch embedding produces). Models that
order tokens differently pass ``token_order``.
"""

from __future__ import annotations

from typing import Callable, Sequence, Union

import torch
from torch import Tensor

__all__ = [
    "patchify",
    "patchify_loss",
    "tokens_to_patches",
    "maskdit_term",
    "tread_loss",
]

TokenOrder = Union[Tensor, Sequence[int], Callable[[Tensor], Tensor], None]


def _patch_hw(patch_size) -> tuple[int, int]:
    if isinstance(patch_size, (tuple, list)):
        if len(patch_size) != 2:
            raise ValueError(f"patch_size must be an int or a pair (ph, pw); got {patch_size!r}")
        ph, pw = patch_size
    else:
        ph = pw = patch_size
    for v in (ph, pw):
        if isinstance(v, bool) or not isinstance(v, int) or v < 1:
            raise ValueError(f"patch_size must be a positive int or a pair of them; got {patch_size!r}")
    return ph, pw


def _grid(x: Tensor, patch_size, name: str) -> tuple[int, int, int, int]:
    if x.ndim != 4:
        raise ValueError(f"{name} must have shape [B, C, H, W]; got shape {tuple(x.shape)}")
    ph, pw = _patch_hw(patch_size)
    h, w = x.shape[-2:]
    if h % ph:
        raise ValueError(
            f"patch_size={patch_size!r} does not divide the height H={h} of {name} "
            f"(shape {tuple(x.shape)})"
        )
    if w % pw:
        raise ValueError(
            f"patch_size={patch_size!r} does not divide the width W={w} of {name} "
            f"(shape {tuple(x.shape)})"
        )
    return ph, pw, h // ph, w // pw


def _reorder(t: Tensor, token_order: TokenOrder) -> Tensor:
    """Apply ``token_order`` to the row-major token dim 1 of ``t``."""
    if token_order is None:
        return t
    n = t.shape[1]
    if callable(token_order) and not isinstance(token_order, Tensor):
        out = token_order(t)
        if not isinstance(out, Tensor) or out.shape[0] != t.shape[0] or out.shape[2:] != t.shape[2:]:
            raise ValueError(
                "token_order: the callable must return a tensor [B, N', ...] with the "
                f"batch and trailing dims of its input {tuple(t.shape)}; got "
                f"{tuple(out.shape) if isinstance(out, Tensor) else type(out).__name__}"
            )
        return out
    idx = torch.as_tensor(token_order)
    if idx.ndim != 1 or idx.dtype == torch.bool or idx.is_floating_point() or idx.is_complex():
        raise ValueError(
            f"token_order must be a 1-D integer index tensor (or a callable); got "
            f"dtype {idx.dtype}, shape {tuple(idx.shape)}"
        )
    # Range check only for CPU indices (no device sync on an accelerator).
    if idx.device.type == "cpu" and idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= n):
        raise ValueError(f"token_order holds indices outside [0, {n}) (the patch grid has {n} patches)")
    return t.index_select(1, idx.to(device=t.device, dtype=torch.long))


def patchify(x: Tensor, patch_size, *, token_order: TokenOrder = None) -> Tensor:
    """Cut ``x [B, C, H, W]`` into non-overlapping patches: ``[B, N, ph * pw * C]``.

    Token ``i`` is the patch at grid row ``i // (W/pw)``, column ``i % (W/pw)``
    (row-major), unless ``token_order`` says otherwise. Within a patch the features
    are ordered ``(row in patch, column in patch, channel)`` -- the MAE/DiT layout.

    Args:
        patch_size: an int or a pair ``(ph, pw)``; must divide ``H`` and ``W``.
        token_order: ``None`` (row-major); a 1-D index tensor/list -- output token
            ``i`` is row-major patch ``token_order[i]``; or a callable that receives the
            row-major ``[B, N, ...]`` tensor and returns it in the model's token order.
    """
    ph, pw, gh, gw = _grid(x, patch_size, "x")
    b, c = x.shape[:2]
    t = x.reshape(b, c, gh, ph, gw, pw).permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, ph * pw * c)
    return _reorder(t, token_order)


def patchify_loss(per_element: Tensor, patch_size, *, token_order: TokenOrder = None) -> Tensor:
    """Pool a per-element loss ``[B, C, H, W]`` to one value per token: ``[B, N]``.

    Each value is the mean over the ``C`` channels and the ``ph x pw`` pixels of one
    patch. Tokens are in row-major order over the ``(H/ph) x (W/pw)`` grid (token ``i``
    = row ``i // (W/pw)``, column ``i % (W/pw)``); ``token_order`` overrides this as in
    :func:`patchify`.

    Raises:
        ValueError: naming ``patch_size`` when it does not divide ``H`` or ``W``, or
            ``per_element`` when it is not 4-D.
    """
    ph, pw, gh, gw = _grid(per_element, patch_size, "per_element")
    b, c = per_element.shape[:2]
    t = per_element.reshape(b, c, gh, ph, gw, pw).mean(dim=(1, 3, 5)).reshape(b, gh * gw)
    return _reorder(t, token_order)


#: Alias of :func:`patchify_loss` (per-element loss map -> per-token loss).
tokens_to_patches = patchify_loss


def _check_mask(mask: Tensor, shape: torch.Size, name: str) -> None:
    if not isinstance(mask, Tensor) or mask.dtype != torch.bool:
        raise TypeError(
            f"{name} must be a bool tensor [B, N]; got "
            f"{mask.dtype if isinstance(mask, Tensor) else type(mask).__name__}"
        )
    if mask.shape != shape:
        raise ValueError(f"{name} must have shape {tuple(shape)}; got {tuple(mask.shape)}")


def _masked_mean(values: Tensor, mask: Tensor) -> Tensor:
    """Mean of ``values`` over the True entries of ``mask`` (all of them, batch and
    tokens together); 0 (still attached to the graph) when no entry is True."""
    m = mask.to(values.dtype)
    return (values * m).sum() / m.sum().clamp(min=1)


def maskdit_term(
    prediction: Tensor,
    noisy_input: Tensor,
    routed_mask: Tensor,
    patch_size,
    *,
    token_order: TokenOrder = None,
    eps: float = 1e-6,
) -> Tensor:
    """MaskDiT-style auxiliary term on the ROUTED tokens of one route (scalar).

    The target is the noisy input with each patch normalised like MAE's
    normalised-pixel target: for every ``ph x pw x C`` patch vector ``u`` of
    ``noisy_input``, ``(u - mean(u)) / sqrt(var(u) + eps)`` where ``var`` is the
    unbiased (Bessel-corrected, as ``torch.var`` by default and MAE) variance over the
    patch's ``ph*pw*C`` values (population variance when a patch has one value). The
    target is detached.

    The term is the squared error between the patchified ``prediction`` and that
    target, averaged over the ``ph*pw*C`` values of each patch, then over all
    ``(sample, token)`` entries where ``routed_mask`` is True (equivalently per sample
    then over the batch, since every sample routes the same number of tokens). If no
    token is routed the term is 0.

    Args:
        prediction: ``[B, C, H, W]`` model prediction (``terms.prediction``).
        noisy_input: ``[B, C, H, W]`` noisy model input (``terms.noisy_input``).
        routed_mask: ``[B, N]`` bool, True = routed around the route's blocks
            (``~kept_mask``).
        patch_size, token_order: as in :func:`patchify`.
    """
    if prediction.shape != noisy_input.shape:
        raise ValueError(
            f"prediction and noisy_input must have the same shape; got "
            f"{tuple(prediction.shape)} and {tuple(noisy_input.shape)}"
        )
    pred = patchify(prediction, patch_size, token_order=token_order)
    tgt = patchify(noisy_input.detach(), patch_size, token_order=token_order)
    correction = 1 if tgt.shape[-1] > 1 else 0
    mean = tgt.mean(dim=-1, keepdim=True)
    var = tgt.var(dim=-1, keepdim=True, correction=correction)
    tgt = (tgt - mean) / (var + eps).sqrt()
    err = ((pred - tgt.to(pred.dtype)) ** 2).mean(dim=-1)  # [B, N]
    _check_mask(routed_mask, err.shape, "routed_mask")
    return _masked_mean(err, routed_mask)


def tread_loss(
    per_token: Tensor,
    kept_masks: Sequence[Tensor],
    *,
    mode: str = "adapted",
    aux_weight: float = 0.1,
    prediction: Tensor | None = None,
    noisy_input: Tensor | None = None,
    patch_size=None,
    token_order: TokenOrder = None,
    aux_fn: Callable[[Tensor], Tensor] | None = None,
) -> Tensor:
    """TREAD training loss from a per-token loss and the routes' kept-token masks.

    Main term (``per_token`` is ``[B, N]``, e.g. from :func:`patchify_loss`):

    * ``mode="plain"`` -- mean of ``per_token`` over all ``B * N`` entries (later paper
      versions / today's official code).
    * ``mode="adapted"`` -- paper v1's "adapted loss": for each route ``r``,
      ``L_r`` = mean of ``per_token`` over all ``(sample, token)`` entries that route
      KEPT (``kept_masks[r]`` True), i.e. ``sum(per_token * kept) / sum(kept)``; the
      main term is the mean of ``L_r`` over routes. Since every sample keeps the same
      number of tokens this equals the per-sample mean averaged over the batch. With
      no routes (empty ``kept_masks``) it is the plain mean. A route whose mask keeps
      nothing contributes 0.

    Auxiliary term (both modes; only when its inputs are given and there is at least
    one route): ``aux_weight * mean over routes r of A_r`` where ``A_r`` is
    :func:`maskdit_term` ``(prediction, noisy_input, ~kept_masks[r], patch_size)`` --
    the MaskDiT-style error on the tokens route ``r`` ROUTED -- or, if ``aux_fn`` is
    given, ``aux_fn(~kept_masks[r])`` (a scalar). ``aux_weight=0`` turns it off.
    Without ``prediction``/``noisy_input``/``patch_size`` and without ``aux_fn`` no
    auxiliary term is added (λ = 0.1 is the value in the paper-v1 code's inner loss
    function; its released config effectively used 0).

    Args:
        per_token: ``[B, N]`` per-token loss.
        kept_masks: one ``[B, N]`` bool tensor per route, True = token kept (processed
            by the route's blocks).
        mode: ``"adapted"`` or ``"plain"``.
        aux_weight: λ.
        prediction, noisy_input: ``[B, C, H, W]``, e.g. ``terms.prediction`` and
            ``terms.noisy_input`` of :meth:`tread_fx.diffusion.EDM.loss`.
        patch_size, token_order: as in :func:`patchify`; must match how ``per_token``
            was made.
        aux_fn: alternative auxiliary term, called once per route with its routed mask.

    Returns:
        A scalar tensor.
    """
    if mode not in ("adapted", "plain"):
        raise ValueError(f"mode must be 'adapted' or 'plain'; got {mode!r}")
    if not isinstance(per_token, Tensor) or per_token.ndim != 2:
        raise ValueError(
            f"per_token must be a [B, N] tensor; got "
            f"{tuple(per_token.shape) if isinstance(per_token, Tensor) else type(per_token).__name__}"
        )
    if isinstance(kept_masks, Tensor):
        raise TypeError("kept_masks must be a sequence of [B, N] bool tensors (one per route), not a tensor")
    masks = list(kept_masks)
    for i, m in enumerate(masks):
        _check_mask(m, per_token.shape, f"kept_masks[{i}]")
    if isinstance(aux_weight, bool) or not isinstance(aux_weight, (int, float)):
        raise TypeError(f"aux_weight must be a number; got {type(aux_weight).__name__}")

    if mode == "plain" or not masks:
        loss = per_token.mean()
    else:
        loss = torch.stack([_masked_mean(per_token, m) for m in masks]).mean()

    if aux_weight == 0 or not masks:
        return loss
    given = [n for n, v in (("prediction", prediction), ("noisy_input", noisy_input), ("patch_size", patch_size)) if v is not None]
    if aux_fn is not None:
        if given and given != ["patch_size"]:
            raise ValueError("pass either aux_fn or prediction/noisy_input, not both")
        terms = [aux_fn(~m) for m in masks]
    elif len(given) == 3:
        terms = [
            maskdit_term(prediction, noisy_input, ~m, patch_size, token_order=token_order)
            for m in masks
        ]
    elif given:
        missing = [n for n in ("prediction", "noisy_input", "patch_size") if n not in given]
        raise ValueError(
            f"the auxiliary term needs prediction, noisy_input and patch_size; missing: {', '.join(missing)}"
        )
    else:
        return loss
    aux = torch.stack([torch.as_tensor(t, device=loss.device, dtype=loss.dtype).reshape(()) for t in terms]).mean()
    return loss + aux_weight * aux
