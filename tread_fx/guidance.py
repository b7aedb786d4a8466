"""Inference-time guidance: classifier-free guidance and TREAD's sparse guidance.

* :func:`cfg` -- classifier-free guidance (Ho & Salimans), one batched model call on
  ``[cond; uncond]``.
* :func:`sparse_guidance` -- *TREAD guidance* / *Sparse Guidance* (arXiv 2601.01608):
  run the model twice with token routing at inference, a "strong" branch that routes
  few tokens (``gamma_strong``) and a "weak" branch that routes many
  (``gamma_weak``), BOTH conditional, and extrapolate
  ``v = v_weak + scale * (v_strong - v_weak)``. The official example uses
  ``gamma_strong=0.3, gamma_weak=0.7, scale=1.5``.
* :func:`sparse_cfg` -- both at once (formula in its docstring).

All functions work on whatever the model returns (the whole output tensor is guided;
a learn-sigma model whose extra channels should stay unguided can slice inside
``model_fn``). They are plain functions of tensors and run on any device/dtype.
"""

from __future__ import annotations

import math
from numbers import Real
from typing import Callable

import torch
from torch import Tensor

__all__ = ["cfg", "routed_fn", "sparse_guidance", "sparse_cfg"]


def routed_fn(routed: torch.nn.Module) -> Callable[..., Tensor]:
    """``model_fn(x, t, y, selection_ratio)`` for :func:`sparse_guidance` from a module
    returned by :func:`tread_fx.route`: runs it with every route at that ratio (in eval
    mode too), and densely at ratio 0."""
    from tread_fx.api import routing

    def model_fn(x: Tensor, t: Tensor, y: Tensor, selection_ratio: float) -> Tensor:
        if selection_ratio == 0:
            return routed(x, t, y)
        with routing(routed, selection_ratio):
            return routed(x, t, y)

    return model_fn


def _is_number(v, value: float) -> bool:
    return isinstance(v, Real) and not isinstance(v, bool) and float(v) == value


def _check_ratio(value, name: str) -> float:
    if isinstance(value, bool) or not isinstance(value, Real) or not math.isfinite(float(value)):
        raise ValueError(f"{name} must be a number in [0, 1); got {value!r}")
    if not 0.0 <= float(value) < 1.0:
        raise ValueError(f"{name} must be in [0, 1) (the fraction of tokens routed); got {value!r}")
    return float(value)


def _check_gammas(gamma_strong, gamma_weak) -> tuple[float, float]:
    gs = _check_ratio(gamma_strong, "gamma_strong")
    gw = _check_ratio(gamma_weak, "gamma_weak")
    if gs > gw:
        raise ValueError(
            f"gamma_strong must be <= gamma_weak (the strong branch routes fewer tokens); "
            f"got gamma_strong={gamma_strong!r}, gamma_weak={gamma_weak!r}"
        )
    return gs, gw


def _check_scale(scale, name: str) -> None:
    if isinstance(scale, bool) or not isinstance(scale, (Real, Tensor)):
        raise TypeError(f"{name} must be a number or a tensor; got {type(scale).__name__}")


def _batch_t(t, batch: int, like: Tensor) -> Tensor:
    """``t`` as a ``[B, ...]`` tensor (a number or 0-d tensor is expanded to ``[B]``)."""
    tt = torch.as_tensor(t, device=like.device)
    if tt.ndim == 0:
        return tt.expand(batch)
    if tt.shape[0] != batch:
        raise ValueError(f"t must be a number or have batch size {batch} in dim 0; got shape {tuple(tt.shape)}")
    return tt


def _null_like(null_y, y: Tensor) -> Tensor:
    n = torch.as_tensor(null_y, device=y.device, dtype=y.dtype)
    if n.shape == y.shape:
        return n
    try:
        return n.expand(y.shape)
    except RuntimeError:
        raise ValueError(
            f"null_y must be a number, have y's shape {tuple(y.shape)}, or broadcast to it; "
            f"got shape {tuple(n.shape)}"
        ) from None


def cfg(
    model_fn: Callable[[Tensor, Tensor, Tensor], Tensor],
    x: Tensor,
    t,
    y: Tensor,
    null_y,
    scale,
) -> Tensor:
    """Classifier-free guidance: ``uncond + scale * (cond - uncond)``.

    ``cond = model_fn(x, t, y)`` and ``uncond = model_fn(x, t, null_y)`` are computed by
    ONE batched call ``model_fn(cat[x, x], cat[t, t], cat[y, null])`` whose output is
    split in half along dim 0.

    Args:
        model_fn: ``model_fn(x, t, y) -> prediction`` (any prediction: velocity, ``D``,
            epsilon).
        x: ``[B, ...]`` current sample.
        t: a number, a 0-d tensor or ``[B, ...]`` (numbers are expanded to ``[B]``).
        y: ``[B, ...]`` condition (e.g. class labels).
        null_y: the null condition: a number (e.g. the null class index), a tensor of
            ``y``'s shape, or one broadcastable to it.
        scale: guidance scale ``w`` (number or broadcastable tensor).

    Shortcuts for Python numbers: ``scale == 1`` returns ``model_fn(x, t, y)`` from a
    single un-doubled call (exactly the conditional prediction); ``scale == 0``
    returns ``model_fn(x, t, null)``.
    """
    _check_scale(scale, "scale")
    b = x.shape[0]
    if y.shape[0] != b:
        raise ValueError(f"y must have batch size {b} (x's) in dim 0; got shape {tuple(y.shape)}")
    null = _null_like(null_y, y)
    tt = _batch_t(t, b, x)
    if _is_number(scale, 1.0):
        return model_fn(x, tt, y)
    if _is_number(scale, 0.0):
        return model_fn(x, tt, null)
    out = model_fn(torch.cat([x, x]), torch.cat([tt, tt]), torch.cat([y, null]))
    if out.shape[0] != 2 * b:
        raise ValueError(
            f"model_fn returned batch size {out.shape[0]} for a doubled batch of {2 * b}"
        )
    cond, uncond = out[:b], out[b:]
    return uncond + scale * (cond - uncond)


def sparse_guidance(
    model_fn: Callable[[Tensor, Tensor, Tensor, float], Tensor],
    x: Tensor,
    t,
    y: Tensor,
    *,
    gamma_strong: float,
    gamma_weak: float,
    scale,
) -> Tensor:
    """TREAD / Sparse Guidance: ``v = v_weak + scale * (v_strong - v_weak)``.

    ``v_strong = model_fn(x, t, y, gamma_strong)`` and
    ``v_weak = model_fn(x, t, y, gamma_weak)`` -- BOTH conditional on ``y`` (the
    official ``rf.py`` drops the label in both branches, a bug per the paper).

    Args:
        model_fn: ``model_fn(x, t, y, selection_ratio) -> prediction``; runs the model
            with that fraction of tokens routed (skipping the routed blocks) --
            ``selection_ratio = 0`` is the dense model.
        gamma_strong, gamma_weak: selection ratios in ``[0, 1)`` with
            ``gamma_strong <= gamma_weak`` (official example: 0.3 and 0.7).
        scale: guidance weight ``w`` (official example 1.5).

    Calls: when ``gamma_strong == gamma_weak`` the two branches coincide and
    ``model_fn`` is called ONCE, its output returned as is. Likewise, for Python
    numbers, ``scale == 1`` returns ``v_strong`` and ``scale == 0`` returns ``v_weak``
    from a single call. Otherwise two calls (strong first).

    Raises:
        ValueError: naming ``gamma_strong`` / ``gamma_weak`` when outside ``[0, 1)``
            or when ``gamma_strong > gamma_weak``.
    """
    gs, gw = _check_gammas(gamma_strong, gamma_weak)
    _check_scale(scale, "scale")
    if gs == gw or _is_number(scale, 1.0):
        return model_fn(x, t, y, gs)
    if _is_number(scale, 0.0):
        return model_fn(x, t, y, gw)
    v_strong = model_fn(x, t, y, gs)
    v_weak = model_fn(x, t, y, gw)
    return v_weak + scale * (v_strong - v_weak)


def sparse_cfg(
    model_fn: Callable[[Tensor, Tensor, Tensor, float], Tensor],
    x: Tensor,
    t,
    y: Tensor,
    null_y,
    *,
    gamma_strong: float,
    gamma_weak: float,
    scale,
    cfg_scale,
) -> Tensor:
    """Sparse guidance on top of classifier-free guidance.

    Our choice of formula (not taken from a paper): apply CFG inside each sparse
    branch, then sparse-guide between the two guided branches::

        g(gamma) = u_gamma + cfg_scale * (c_gamma - u_gamma)
        v        = g(gamma_weak) + scale * (g(gamma_strong) - g(gamma_weak))

    where ``c_gamma = model_fn(x, t, y, gamma)`` and ``u_gamma = model_fn(x, t, null_y,
    gamma)``. Each branch is one batched call on ``[cond; uncond]`` (see :func:`cfg`),
    so two calls in total. It reduces to :func:`cfg` when the gammas are equal (one
    call) and to :func:`sparse_guidance` when ``cfg_scale == 1``. Being linear, it
    equals ``u_w + cfg_scale (c_w - u_w) + scale [(u_s - u_w) + cfg_scale ((c_s - u_s) - (c_w - u_w))]``.

    Args:
        model_fn: ``model_fn(x, t, y, selection_ratio) -> prediction``.
        null_y: the null condition, as in :func:`cfg`.
        gamma_strong, gamma_weak, scale: as in :func:`sparse_guidance`.
        cfg_scale: the classifier-free guidance scale.
    """
    gs, gw = _check_gammas(gamma_strong, gamma_weak)
    _check_scale(scale, "scale")
    _check_scale(cfg_scale, "cfg_scale")

    def branch(gamma: float) -> Tensor:
        return cfg(lambda xx, tt, yy: model_fn(xx, tt, yy, gamma), x, t, y, null_y, cfg_scale)

    if gs == gw or _is_number(scale, 1.0):
        return branch(gs)
    if _is_number(scale, 0.0):
        return branch(gw)
    g_strong = branch(gs)
    g_weak = branch(gw)
    return g_weak + scale * (g_strong - g_weak)
