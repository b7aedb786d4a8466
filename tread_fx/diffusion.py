"""Diffusion objectives, samplers and training helpers for TREAD training loops.

Small, pure-PyTorch pieces a user calls from their own training loop:

* :class:`EDM` -- the EDM objective of Karras et al. 2022 ("Elucidating the Design
  Space of Diffusion-Based Generative Models"): log-normal noise levels, the
  preconditioned denoiser ``D(x; sigma)``, the loss weight ``w(sigma)`` and a loss
  that also hands back what the TREAD auxiliary loss needs.
* :func:`edm_sample` -- Karras' deterministic 2nd-order (Heun) sampler, no churn.
* :class:`RectifiedFlow` -- ``x_t = (1 - t) x0 + t eps``, velocity target
  ``eps - x0``, logit-normal ``t``; :func:`euler_sample` integrates from ``t = 1``
  (noise) to ``t = 0`` (data).
* :func:`drop_labels` -- label dropout for classifier-free-guidance training.
* :class:`EMA` -- exponential moving average of a module's parameters.

Randomness: every function that draws random numbers takes an explicit
``generator: torch.Generator | None``. Numbers are drawn on the generator's own
device (``None``: on the target device) in float32 and then moved/cast to the
device and dtype of the inputs, so a CPU generator can seed a CUDA training run and
a given seed gives the same draw whatever the input dtype.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Mapping, NamedTuple, Sequence

import torch
from torch import Tensor, nn

__all__ = [
    "DiffusionLossTerms",
    "EDM",
    "RectifiedFlow",
    "edm_sigmas",
    "edm_sample",
    "euler_sample",
    "drop_labels",
    "EMA",
]

_REDUCTIONS = ("mean", "none")


# ---------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------


def _draw(
    kind: str,
    shape: Sequence[int],
    *,
    device: torch.device | str | None,
    dtype: torch.dtype,
    generator: torch.Generator | None,
) -> Tensor:
    """Draw ``randn``/``rand`` of ``shape`` in float32 on the generator's device,
    then move to ``device`` and cast to ``dtype``."""
    fn = torch.randn if kind == "randn" else torch.rand
    shape = tuple(int(s) for s in shape)
    if generator is None:
        out = fn(shape, device=device, dtype=torch.float32)
    else:
        out = fn(shape, generator=generator, device=generator.device, dtype=torch.float32)
    return out.to(device=device, dtype=dtype)


def _per_sample(value: Tensor | float, batch: int, *, device, dtype, name: str) -> Tensor:
    """Turn a noise level given as a Python number, a 0-d tensor, a ``[B]`` tensor or a
    ``[B, 1, ..., 1]`` tensor into a ``[B]`` tensor."""
    v = torch.as_tensor(value, device=device, dtype=dtype)
    if v.ndim == 0:
        return v.expand(batch)
    if v.shape[0] != batch or v.numel() != batch:
        raise ValueError(
            f"{name} must be a number, a 0-d tensor or hold one value per sample "
            f"(shape [{batch}] or [{batch}, 1, ...]); got shape {tuple(v.shape)}"
        )
    return v.reshape(batch)


def _bcast(v: Tensor, like: Tensor) -> Tensor:
    """``[B]`` -> ``[B, 1, ..., 1]`` so it broadcasts against ``like``."""
    return v.reshape(v.shape[0], *([1] * (like.ndim - 1)))


def _check_reduction(reduction: str) -> None:
    if reduction not in _REDUCTIONS:
        raise ValueError(f"reduction must be one of {_REDUCTIONS}; got {reduction!r}")


def _first_channels(out: Tensor, channels: int, what: str) -> Tensor:
    if out.ndim < 2 or out.shape[1] < channels:
        raise ValueError(
            f"{what}: the model output must have at least {channels} channels in dim 1 "
            f"(the input's); got output shape {tuple(out.shape)}"
        )
    return out[:, :channels] if out.shape[1] != channels else out


def _initial_noise(
    noise: Tensor | Sequence[int],
    *,
    generator: torch.Generator | None,
    device,
    dtype,
    name: str = "noise",
) -> Tensor:
    if isinstance(noise, Tensor):
        return noise
    try:
        shape = tuple(int(s) for s in noise)
    except TypeError:
        raise TypeError(
            f"{name} must be a Tensor of standard-normal noise or a shape; got {type(noise).__name__}"
        ) from None
    return _draw(
        "randn", shape, device=device, dtype=dtype or torch.float32, generator=generator
    )


class DiffusionLossTerms(NamedTuple):
    """What :meth:`EDM.loss` / :meth:`RectifiedFlow.loss` return.

    Attributes:
        loss: the scalar mean of ``loss_per_element`` for ``reduction="mean"``; the
            per-element tensor itself (same object as ``loss_per_element``) for
            ``reduction="none"``.
        loss_per_element: the weighted squared error, same shape as ``x0``. For EDM
            ``w(sigma) * (D - x0)**2``; for rectified flow ``(v_pred - (eps - x0))**2``.
            Feed it to :func:`tread_fx.losses.patchify_loss` for the TREAD loss.
        prediction: the model's prediction in target space: the denoised ``D(x)`` for
            EDM, the velocity for rectified flow (shape of ``x0``).
        noisy_input: the noisy sample the model saw: ``x0 + sigma * eps`` (EDM) or
            ``(1 - t) x0 + t eps`` (rectified flow).
        target: what ``prediction`` is regressed onto: ``x0`` (EDM) or ``eps - x0``
            (rectified flow).
        noise_level: the per-sample ``sigma`` (EDM) or ``t`` (rectified flow), shape
            ``[B]``, float32.
    """

    loss: Tensor
    loss_per_element: Tensor
    prediction: Tensor
    noisy_input: Tensor
    target: Tensor
    noise_level: Tensor


# ---------------------------------------------------------------------------
# EDM
# ---------------------------------------------------------------------------


@dataclass
class EDM:
    """EDM objective (Karras et al. 2022), defaults as in the paper and in TREAD.

    Attributes:
        sigma_data: standard deviation of the data, ``sigma_d``.
        P_mean, P_std: ``ln(sigma) ~ N(P_mean, P_std**2)`` during training.
        sigma_min, sigma_max, rho: the sampling schedule (see :func:`edm_sigmas`);
            :meth:`sample` passes them to :func:`edm_sample`.

    Noise levels and preconditioning coefficients are computed in float32 and cast to
    the dtype of ``x`` when applied.
    """

    sigma_data: float = 0.5
    P_mean: float = -1.2
    P_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0
    rho: float = 7.0

    # -- noise levels ------------------------------------------------------
    def sample_sigma(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``sigma = exp(P_mean + P_std * n)``, ``n ~ N(0, 1)``; shape ``[batch]``."""
        n = _draw("randn", (batch,), device=device, dtype=torch.float32, generator=generator)
        return torch.exp(self.P_mean + self.P_std * n).to(dtype)

    # -- preconditioning ---------------------------------------------------
    def coefficients(self, sigma: Tensor) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """``(c_skip, c_out, c_in, c_noise)`` for noise level(s) ``sigma``:

        ``c_skip = sd**2 / (sigma**2 + sd**2)``, ``c_out = sigma * sd / sqrt(sigma**2 + sd**2)``,
        ``c_in = 1 / sqrt(sigma**2 + sd**2)``, ``c_noise = ln(sigma) / 4``.
        """
        sd = self.sigma_data
        s2 = sigma * sigma + sd * sd
        c_skip = (sd * sd) / s2
        c_out = sigma * sd / s2.sqrt()
        c_in = s2.rsqrt()
        c_noise = sigma.log() / 4
        return c_skip, c_out, c_in, c_noise

    def precondition(self, model: Callable[..., Tensor], x_noisy: Tensor, sigma, *cond) -> Tensor:
        """The denoiser ``D(x; sigma) = c_skip x + c_out F(c_in x, c_noise, *cond)``.

        Args:
            model: the raw network ``F``; called as ``model(c_in * x, c_noise, *cond)``
                with ``c_noise`` of shape ``[B]`` (dtype of ``x``). Only the first
                ``x.shape[1]`` output channels are used, so a learn-sigma DiT with
                ``2C`` output channels works unchanged.
            x_noisy: ``[B, C, ...]`` noisy input ``x0 + sigma * eps``.
            sigma: a number, a 0-d tensor, ``[B]`` or ``[B, 1, ..., 1]``.
            *cond: passed through to ``model`` (e.g. class labels).

        Returns:
            ``D(x)``, same shape and dtype as ``x_noisy``.
        """
        b = x_noisy.shape[0]
        s = _per_sample(sigma, b, device=x_noisy.device, dtype=torch.float32, name="sigma")
        c_skip, c_out, c_in, c_noise = self.coefficients(s)
        dt = x_noisy.dtype
        c_skip, c_out, c_in = (_bcast(c, x_noisy).to(dt) for c in (c_skip, c_out, c_in))
        out = model(c_in * x_noisy, c_noise.to(dt), *cond)
        f = _first_channels(out, x_noisy.shape[1], "EDM.precondition")
        return c_skip * x_noisy + c_out * f.to(dt)

    def denoiser(self, model: Callable[..., Tensor], *cond) -> Callable[[Tensor, Tensor], Tensor]:
        """``denoise_fn(x, sigma) = precondition(model, x, sigma, *cond)``, for :func:`edm_sample`."""

        def denoise_fn(x: Tensor, sigma: Tensor) -> Tensor:
            return self.precondition(model, x, sigma, *cond)

        return denoise_fn

    def loss_weight(self, sigma: Tensor | float) -> Tensor:
        """``w(sigma) = (sigma**2 + sigma_d**2) / (sigma * sigma_d)**2`` (elementwise)."""
        sigma = torch.as_tensor(sigma)
        sd = self.sigma_data
        return (sigma * sigma + sd * sd) / (sigma * sd) ** 2

    # -- loss --------------------------------------------------------------
    def loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        *cond,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        sigma: Tensor | float | None = None,
        noise: Tensor | None = None,
    ) -> DiffusionLossTerms:
        """EDM training loss.

        Draws ``sigma ~ exp(N(P_mean, P_std**2))`` per sample and then ``eps ~ N(0, I)``
        (in that order, both from ``generator``), forms ``x = x0 + sigma * eps``, and
        computes ``loss_per_element = w(sigma) * (D(x; sigma) - x0)**2``.

        Args:
            model: raw network, see :meth:`precondition`.
            x0: clean data ``[B, C, ...]``.
            *cond: passed through to ``model``.
            generator: RNG for ``sigma`` and ``eps``.
            reduction: ``"mean"`` -> ``terms.loss`` is the mean over every element of
                ``loss_per_element`` (batch, channels, pixels); ``"none"`` ->
                ``terms.loss`` is ``loss_per_element`` itself.
            sigma, noise: optional fixed values instead of random draws (tests,
                evaluation at fixed noise levels); ``noise`` must have ``x0``'s shape.

        Returns:
            :class:`DiffusionLossTerms` (``prediction`` = ``D``, ``target`` = ``x0``).
        """
        _check_reduction(reduction)
        b = x0.shape[0]
        if sigma is None:
            s = self.sample_sigma(b, x0.device, generator)
        else:
            s = _per_sample(sigma, b, device=x0.device, dtype=torch.float32, name="sigma")
        if noise is None:
            noise = _draw("randn", x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}; got {tuple(noise.shape)}")
        sb = _bcast(s, x0)
        x_noisy = x0 + sb.to(x0.dtype) * noise
        d = self.precondition(model, x_noisy, s, *cond)
        w = self.loss_weight(sb).to(x0.dtype)
        per_el = w * (d - x0) ** 2
        total = per_el.mean() if reduction == "mean" else per_el
        return DiffusionLossTerms(total, per_el, d, x_noisy, x0, s)

    # -- sampling ----------------------------------------------------------
    def sample(
        self,
        model: Callable[..., Tensor],
        noise: Tensor | Sequence[int],
        *cond,
        steps: int = 40,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Heun-sample ``model`` (raw network) with this object's schedule; see :func:`edm_sample`."""
        return edm_sample(
            self.denoiser(model, *cond),
            noise,
            steps=steps,
            generator=generator,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            rho=self.rho,
        )


def edm_sigmas(
    steps: int,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float64,
) -> Tensor:
    """Karras' noise-level schedule: ``steps`` decreasing levels plus a final 0.

    ``sigma_i = (sigma_max**(1/rho) + i/(steps-1) (sigma_min**(1/rho) - sigma_max**(1/rho)))**rho``
    for ``i = 0 .. steps-1`` (``steps = 1`` gives just ``sigma_max``), then
    ``sigma_steps = 0``. Shape ``[steps + 1]``.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    if not 0 < sigma_min <= sigma_max:
        raise ValueError(
            f"sigma_min and sigma_max must satisfy 0 < sigma_min <= sigma_max; "
            f"got sigma_min={sigma_min}, sigma_max={sigma_max}"
        )
    if rho <= 0:
        raise ValueError(f"rho must be > 0; got {rho}")
    steps = int(steps)
    i = torch.arange(steps, dtype=torch.float64)
    frac = i / (steps - 1) if steps > 1 else i
    a, b = sigma_max ** (1.0 / rho), sigma_min ** (1.0 / rho)
    s = (a + frac * (b - a)) ** rho
    s = torch.cat([s, s.new_zeros(1)])
    return s.to(device=device, dtype=dtype)


@torch.no_grad()
def edm_sample(
    denoise_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor | Sequence[int],
    steps: int = 40,
    generator: torch.Generator | None = None,
    sigma_min: float = 0.002,
    sigma_max: float = 80.0,
    rho: float = 7.0,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Karras et al.'s deterministic 2nd-order (Heun) sampler, no churn (EDM Alg. 1).

    Integrates the probability-flow ODE ``dx/dsigma = (x - D(x; sigma)) / sigma`` from
    ``sigma_max`` to 0 over :func:`edm_sigmas` levels: an Euler step followed by a
    trapezoidal correction on every step except the last (which ends at ``sigma=0``).
    Uses ``2 * steps - 1`` evaluations of ``denoise_fn``.

    Args:
        denoise_fn: ``denoise_fn(x, sigma) -> D(x)``; ``sigma`` is a ``[B]`` tensor of
            ``x``'s dtype (e.g. :meth:`EDM.denoiser`).
        noise: standard-normal noise ``[B, ...]`` (it is multiplied by ``sigma_max``),
            or a shape, in which case it is drawn from ``generator`` on ``device`` with
            ``dtype`` (float32 by default). Computations run in the noise's dtype; pass
            float64 noise for a float64 ODE solve.
        steps: number of noise levels (>= 1).
        generator: only used when ``noise`` is a shape (the sampler is deterministic).

    Returns:
        The sample at ``sigma = 0``, same shape/dtype/device as the noise.
    """
    x = _initial_noise(noise, generator=generator, device=device, dtype=dtype)
    sig = edm_sigmas(steps, sigma_min, sigma_max, rho).tolist()
    b = x.shape[0]
    x = x * sig[0]

    def level(s: float) -> Tensor:
        return torch.full((b,), s, device=x.device, dtype=x.dtype)

    for i in range(len(sig) - 1):
        s_cur, s_next = sig[i], sig[i + 1]
        d_cur = (x - denoise_fn(x, level(s_cur))) / s_cur
        x_next = x + (s_next - s_cur) * d_cur
        if s_next > 0:
            d_next = (x_next - denoise_fn(x_next, level(s_next))) / s_next
            x_next = x + (s_next - s_cur) * (0.5 * d_cur + 0.5 * d_next)
        x = x_next
    return x


# ---------------------------------------------------------------------------
# Rectified flow
# ---------------------------------------------------------------------------


@dataclass
class RectifiedFlow:
    """Rectified flow / flow matching with a linear path.

    ``x_t = (1 - t) x0 + t eps`` (``t = 0``: data, ``t = 1``: noise), velocity target
    ``v = eps - x0``, ``t = sigmoid(n)`` with ``n ~ N(logit_mean, logit_std**2)``
    (logit-normal, ``m = 0, s = 1`` by default). The model is called as
    ``model(x_t, t, *cond)`` with ``t`` of shape ``[B]`` (dtype of ``x``); only its
    first ``x.shape[1]`` output channels are used.
    """

    logit_mean: float = 0.0
    logit_std: float = 1.0

    def sample_t(
        self,
        batch: int,
        device: torch.device | str | None = None,
        generator: torch.Generator | None = None,
        dtype: torch.dtype = torch.float32,
    ) -> Tensor:
        """``t = sigmoid(logit_mean + logit_std * n)``, ``n ~ N(0, 1)``; shape ``[batch]``."""
        n = _draw("randn", (batch,), device=device, dtype=torch.float32, generator=generator)
        return torch.sigmoid(self.logit_mean + self.logit_std * n).to(dtype)

    @staticmethod
    def interpolate(x0: Tensor, noise: Tensor, t) -> Tensor:
        """``x_t = (1 - t) x0 + t noise`` with per-sample ``t``."""
        tt = _bcast(_per_sample(t, x0.shape[0], device=x0.device, dtype=x0.dtype, name="t"), x0)
        return (1 - tt) * x0 + tt * noise

    def velocity(self, model: Callable[..., Tensor], x_t: Tensor, t, *cond) -> Tensor:
        """The model's velocity ``model(x_t, t, *cond)[:, :C]``; ``t`` is a number,
        0-d, ``[B]`` or ``[B, 1, ...]`` (passed to the model as ``[B]``)."""
        tt = _per_sample(t, x_t.shape[0], device=x_t.device, dtype=x_t.dtype, name="t")
        out = model(x_t, tt, *cond)
        return _first_channels(out, x_t.shape[1], "RectifiedFlow.velocity").to(x_t.dtype)

    def velocity_fn(self, model: Callable[..., Tensor], *cond) -> Callable[[Tensor, Tensor], Tensor]:
        """``velocity_fn(x, t) = velocity(model, x, t, *cond)``, for :func:`euler_sample`."""

        def fn(x: Tensor, t: Tensor) -> Tensor:
            return self.velocity(model, x, t, *cond)

        return fn

    def loss(
        self,
        model: Callable[..., Tensor],
        x0: Tensor,
        *cond,
        generator: torch.Generator | None = None,
        reduction: str = "mean",
        t: Tensor | float | None = None,
        noise: Tensor | None = None,
    ) -> DiffusionLossTerms:
        """Rectified-flow training loss.

        Draws ``t`` (logit-normal) per sample and then ``eps ~ N(0, I)`` (in that
        order, both from ``generator``), forms ``x_t``, and computes
        ``loss_per_element = (v_pred - (eps - x0))**2`` (unweighted).

        ``reduction``, ``t`` and ``noise`` behave as in :meth:`EDM.loss`. Returns
        :class:`DiffusionLossTerms` (``prediction`` = velocity, ``target`` = ``eps - x0``,
        ``noisy_input`` = ``x_t``, ``noise_level`` = ``t``).
        """
        _check_reduction(reduction)
        b = x0.shape[0]
        if t is None:
            tt = self.sample_t(b, x0.device, generator)
        else:
            tt = _per_sample(t, b, device=x0.device, dtype=torch.float32, name="t")
        if noise is None:
            noise = _draw("randn", x0.shape, device=x0.device, dtype=x0.dtype, generator=generator)
        elif noise.shape != x0.shape:
            raise ValueError(f"noise must have the shape of x0 {tuple(x0.shape)}; got {tuple(noise.shape)}")
        x_t = self.interpolate(x0, noise, tt)
        target = noise - x0
        v = self.velocity(model, x_t, tt, *cond)
        per_el = (v - target) ** 2
        total = per_el.mean() if reduction == "mean" else per_el
        return DiffusionLossTerms(total, per_el, v, x_t, target, tt)

    def sample(
        self,
        model: Callable[..., Tensor],
        noise: Tensor | Sequence[int],
        *cond,
        steps: int = 50,
        generator: torch.Generator | None = None,
    ) -> Tensor:
        """Euler-sample ``model`` (raw network); see :func:`euler_sample`."""
        return euler_sample(self.velocity_fn(model, *cond), noise, steps=steps, generator=generator)


@torch.no_grad()
def euler_sample(
    velocity_fn: Callable[[Tensor, Tensor], Tensor],
    noise: Tensor | Sequence[int],
    steps: int = 50,
    generator: torch.Generator | None = None,
    *,
    device: torch.device | str | None = None,
    dtype: torch.dtype | None = None,
) -> Tensor:
    """Euler integration of ``dx/dt = v(x, t)`` from ``t = 1`` (noise) to ``t = 0`` (data).

    Uniform grid ``t_i = 1 - i / steps``; ``x_{i+1} = x_i + (t_{i+1} - t_i) v(x_i, t_i)``;
    ``steps`` evaluations of ``velocity_fn`` (never at ``t = 0``).

    Args:
        velocity_fn: ``velocity_fn(x, t) -> v``; ``t`` is a ``[B]`` tensor of ``x``'s
            dtype (e.g. :meth:`RectifiedFlow.velocity_fn`).
        noise: standard-normal noise ``[B, ...]``, or a shape drawn from ``generator``
            on ``device`` with ``dtype`` (float32 by default).
        steps: number of Euler steps (>= 1).
        generator: only used when ``noise`` is a shape.
    """
    if int(steps) != steps or steps < 1:
        raise ValueError(f"steps must be a positive integer; got {steps!r}")
    steps = int(steps)
    x = _initial_noise(noise, generator=generator, device=device, dtype=dtype)
    b = x.shape[0]
    ts = [1.0 - i / steps for i in range(steps)] + [0.0]
    for i in range(steps):
        t_cur, t_next = ts[i], ts[i + 1]
        v = velocity_fn(x, torch.full((b,), t_cur, device=x.device, dtype=x.dtype))
        x = x + (t_next - t_cur) * v
    return x


# ---------------------------------------------------------------------------
# classifier-free-guidance label dropout
# ---------------------------------------------------------------------------


def drop_labels(
    y: Tensor,
    p: float,
    null_class: int | Tensor,
    generator: torch.Generator | None = None,
) -> Tensor:
    """Replace each sample's condition by the null condition with probability ``p``.

    One uniform number is drawn per sample (``y.shape[0]`` of them, always, whatever
    ``p``); sample ``i`` is dropped when it is ``< p``. ``y`` is typically ``[B]``
    integer class labels and ``null_class`` an int (e.g. ``num_classes``); ``y`` may
    also be ``[B, ...]`` (e.g. embeddings) with ``null_class`` a tensor broadcastable
    to ``y[0]``. Returns a new tensor; ``y`` is not modified.
    """
    if isinstance(p, bool) or not isinstance(p, (int, float)) or not 0.0 <= float(p) <= 1.0:
        raise ValueError(f"p must be a probability in [0, 1]; got {p!r}")
    if y.ndim == 0:
        raise ValueError("y must have a batch dimension; got a 0-d tensor")
    b = y.shape[0]
    u = _draw("rand", (b,), device=y.device, dtype=torch.float32, generator=generator)
    drop = (u < float(p)).reshape(b, *([1] * (y.ndim - 1)))
    null = torch.as_tensor(null_class, device=y.device, dtype=y.dtype)
    return torch.where(drop, null, y)


# ---------------------------------------------------------------------------
# EMA
# ---------------------------------------------------------------------------


class EMA:
    """Exponential moving average of a module's parameters (and a copy of its buffers).

    ``shadow[name] <- decay * shadow[name] + (1 - decay) * param`` on every
    :meth:`update`. Shadow tensors are stored by name (``model.named_parameters()``),
    created as detached clones on the parameters' own device and dtype -- no
    ``copy.deepcopy`` of the module, so it works for GraphModules, compiled or
    wrapped models alike as long as the parameter names match.

    Buffers (``model.named_buffers()``, e.g. BatchNorm statistics) are copied as-is on
    each update by default; ``ema_buffers=True`` averages floating-point buffers too
    (integer buffers are always copied).

    Typical use: ``ema = EMA(model)``; after each optimizer step ``ema.update(model)``;
    to sample, ``ema.copy_to(eval_model)``; checkpoint with :meth:`state_dict`.
    """

    def __init__(self, model: nn.Module, decay: float = 0.9999, *, ema_buffers: bool = False):
        self.decay = self._check_decay(decay, "decay")
        self.ema_buffers = bool(ema_buffers)
        self.num_updates = 0
        self.shadow: dict[str, Tensor] = {
            n: p.detach().clone() for n, p in model.named_parameters()
        }
        self.buffers: dict[str, Tensor] = {
            n: b.detach().clone() for n, b in model.named_buffers()
        }

    @staticmethod
    def _check_decay(decay: float, name: str) -> float:
        if isinstance(decay, bool) or not isinstance(decay, (int, float)) or not 0.0 <= float(decay) <= 1.0:
            raise ValueError(f"{name} must be in [0, 1]; got {decay!r}")
        return float(decay)

    def _match(self, store: Mapping[str, Tensor], named, what: str) -> list[tuple[Tensor, Tensor]]:
        named = dict(named)
        if named.keys() != store.keys():
            missing = sorted(store.keys() - named.keys())
            extra = sorted(named.keys() - store.keys())
            raise KeyError(
                f"EMA: the model's {what} names differ from the EMA's "
                f"(missing from model: {missing[:5]}, unknown to EMA: {extra[:5]}); "
                f"use a model with the same structure (same wrapper / prefix)"
            )
        return [(store[n], t) for n, t in named.items()]

    @torch.no_grad()
    def update(self, model: nn.Module, decay: float | None = None) -> None:
        """One EMA step from ``model``'s current parameters (``decay`` overrides
        ``self.decay`` for this step, e.g. for a warm-up schedule)."""
        d = self.decay if decay is None else self._check_decay(decay, "decay")
        for s, p in self._match(self.shadow, model.named_parameters(), "parameter"):
            s.lerp_(p.detach().to(device=s.device, dtype=s.dtype), 1.0 - d)
        for s, b in self._match(self.buffers, model.named_buffers(), "buffer"):
            b = b.detach().to(device=s.device, dtype=s.dtype)
            if self.ema_buffers and s.is_floating_point():
                s.lerp_(b, 1.0 - d)
            else:
                s.copy_(b)
        self.num_updates += 1

    @torch.no_grad()
    def copy_to(self, model: nn.Module) -> None:
        """Write the shadow parameters and buffers into ``model`` (in place)."""
        for s, p in self._match(self.shadow, model.named_parameters(), "parameter"):
            p.copy_(s)
        for s, b in self._match(self.buffers, model.named_buffers(), "buffer"):
            b.copy_(s)

    def to(self, device: torch.device | str | None = None, dtype: torch.dtype | None = None) -> "EMA":
        """Move the shadow tensors (``dtype`` applies to floating-point ones only)."""
        for store in (self.shadow, self.buffers):
            for n, t in store.items():
                store[n] = t.to(device=device, dtype=dtype if t.is_floating_point() else None)
        return self

    def state_dict(self) -> dict:
        """``{"decay", "num_updates", "ema_buffers", "shadow": {name: tensor}, "buffers": {...}}``
        (tensors are the live shadow tensors, as in ``nn.Module.state_dict``)."""
        return {
            "decay": self.decay,
            "num_updates": self.num_updates,
            "ema_buffers": self.ema_buffers,
            "shadow": dict(self.shadow),
            "buffers": dict(self.buffers),
        }

    @torch.no_grad()
    def load_state_dict(self, state: Mapping) -> None:
        """Load a :meth:`state_dict`; names must match exactly. Values are copied
        into the existing shadow tensors (keeping their device and dtype)."""
        for key in ("shadow", "buffers"):
            src = state[key]
            dst = getattr(self, key)
            if src.keys() != dst.keys():
                raise KeyError(
                    f"EMA.load_state_dict: state[{key!r}] names differ "
                    f"(missing: {sorted(dst.keys() - src.keys())[:5]}, "
                    f"unexpected: {sorted(src.keys() - dst.keys())[:5]})"
                )
            for n, t in src.items():
                if t.shape != dst[n].shape:
                    raise ValueError(
                        f"EMA.load_state_dict: state[{key!r}][{n!r}] has shape "
                        f"{tuple(t.shape)}, expected {tuple(dst[n].shape)}"
                    )
                dst[n].copy_(t)
        self.decay = self._check_decay(state.get("decay", self.decay), "state['decay']")
        self.num_updates = int(state.get("num_updates", 0))
        self.ema_buffers = bool(state.get("ema_buffers", self.ema_buffers))
