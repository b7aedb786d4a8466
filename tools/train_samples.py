"""Samples of ``tread-fx train``: the guided Euler sampler, the labelled grid and PNG files."""

from __future__ import annotations

import math
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from PIL import Image, ImageDraw, ImageFont

from tread_fx.diffusion import euler_sample
from tread_fx.guidance import cfg as cfg_guidance
from tread_fx.guidance import routed_fn, sparse_cfg, sparse_guidance

from .train_checkpoint import atomic_write
from .train_model import T_SCALE, TimeScaled
from .train_progress import progress_bar

__all__ = ["image_grid", "label_rows", "sample_images", "write_png"]


@torch.no_grad()
def sample_images(model: torch.nn.Module, labels: torch.Tensor, shape: tuple[int, int, int], *,
                  steps: int = 40, seed: int = 0, guidance: str = "cfg", cfg_scale: float = 3.0,
                  null_class: int | None = None, routed: torch.nn.Module | None = None,
                  gamma_strong: float = 0.3, gamma_weak: float = 0.7,
                  sparse_scale: float = 1.5, progress: bool = False) -> torch.Tensor:
    """Euler-sample rectified flow from ``model`` (eval mode) for ``labels``; deterministic
    under ``seed`` (the noise comes from a seeded generator; the token draws of sparse
    guidance from torch's global generator, seeded inside ``fork_rng``).

    ``guidance``: ``"none"``, ``"cfg"`` (needs ``null_class``), ``"sparse"`` or
    ``"sparse-cfg"`` (need ``routed``, a ``tread_fx.route`` of ``model``).  ``progress``
    shows a bar over the Euler steps on stderr.
    """
    device = next(model.parameters()).device
    labels = labels.to(device)
    noise = torch.randn((labels.shape[0],) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    noise = noise.to(device)
    was = model.training
    model.eval()
    plain = TimeScaled(model)

    if routed is not None:
        at_ratio = routed_fn(routed)  # routing(routed, ratio) around each call; dense at 0

        def routed_at(x, t, y, ratio):
            return at_ratio(x, t * T_SCALE, y, ratio)

    if guidance in ("cfg", "sparse-cfg") and null_class is None:
        raise ValueError(f"guidance {guidance!r} needs a model trained with label dropout "
                         f"(null_class); use guidance='none' or 'sparse'")
    if guidance in ("sparse", "sparse-cfg") and routed is None:
        raise ValueError(f"guidance {guidance!r} needs the routed model (routed=...)")

    def guided(x, t):
        if guidance == "none":
            return plain(x, t, labels)
        if guidance == "cfg":
            return cfg_guidance(plain, x, t, labels, null_class, cfg_scale)
        if guidance == "sparse":
            return sparse_guidance(routed_at, x, t, labels, gamma_strong=gamma_strong,
                                   gamma_weak=gamma_weak, scale=sparse_scale)
        if guidance == "sparse-cfg":
            return sparse_cfg(routed_at, x, t, labels, null_class, gamma_strong=gamma_strong,
                              gamma_weak=gamma_weak, scale=sparse_scale, cfg_scale=cfg_scale)
        raise ValueError(f"unknown guidance {guidance!r}")

    bar = progress_bar(steps, desc="sampling", enabled=progress)

    def velocity(x, t):  # one call per Euler step
        v = guided(x, t)
        bar.update()
        return v

    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = euler_sample(velocity, noise, steps=steps)
    finally:
        bar.close()
        model.train(was)
    return out


def image_grid(images: torch.Tensor, rows: int, kind: str = "images", pad: int = 2,
               scale: int = 2) -> np.ndarray:
    """``[rows * cols, C, H, W]`` -> uint8 grid.  Images are mapped from [-1, 1]; latents are
    shown per image min-max normalised (first 3 channels, or the first one)."""
    x = images.detach().float().cpu()
    if kind == "latents" or x.shape[1] not in (1, 3):
        x = x[:, :3] if x.shape[1] >= 3 else x[:, :1]
        lo = x.amin(dim=(1, 2, 3), keepdim=True)
        hi = x.amax(dim=(1, 2, 3), keepdim=True)
        x = (x - lo) / (hi - lo).clamp(min=1e-8)
    else:
        x = (x.clamp(-1, 1) + 1) / 2
    x = (x * 255).round().to(torch.uint8)
    n, c, h, w = x.shape
    cols = math.ceil(n / rows)
    grid = torch.full((c, rows * (h + pad) + pad, cols * (w + pad) + pad), 255, dtype=torch.uint8)
    for i in range(n):
        r, col = divmod(i, cols)
        top, left = pad + r * (h + pad), pad + col * (w + pad)
        grid[:, top:top + h, left:left + w] = x[i]
    if scale > 1:
        grid = grid.repeat_interleave(scale, 1).repeat_interleave(scale, 2)
    arr = grid.permute(1, 2, 0).numpy()
    return arr[:, :, 0] if c == 1 else arr


def label_rows(grid: np.ndarray, labels: Sequence[str], pad: int = 2, scale: int = 2,
               margin: int = 4, max_chars: int = 20) -> np.ndarray:
    """``grid`` (from :func:`image_grid` with the same ``pad`` and ``scale``, one row per
    label) with a white strip on its left holding each row's label, black, centred on the
    row (Pillow's default font).  The grid's own pixels are unchanged."""
    if not labels:
        raise ValueError("label_rows: no labels")
    im = Image.fromarray(np.ascontiguousarray(grid, dtype=np.uint8))
    texts = [t if len(t) <= max_chars else t[:max_chars - 2] + ".." for t in map(str, labels)]
    font = ImageFont.load_default()
    boxes = [ImageDraw.Draw(im).textbbox((0, 0), t, font=font) for t in texts]
    strip = max(b[2] - b[0] for b in boxes) + 2 * margin
    white, black = (255, 0) if im.mode == "L" else ((255,) * 3, (0,) * 3)
    out = Image.new(im.mode, (strip + im.width, im.height), white)
    out.paste(im, (strip, 0))
    draw = ImageDraw.Draw(out)
    cell = (im.height / scale - pad) / len(texts)  # image side + pad, unscaled
    for i, (text, box) in enumerate(zip(texts, boxes)):
        centre = scale * (pad + i * cell + (cell - pad) / 2)
        draw.text((margin - box[0], centre - (box[1] + box[3]) / 2), text, fill=black, font=font)
    return np.asarray(out)


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB) array as a PNG, atomically."""
    a = np.ascontiguousarray(image, dtype=np.uint8)
    if not (a.ndim == 2 or (a.ndim == 3 and a.shape[2] == 3)):
        raise ValueError(f"write_png: expected [H, W] or [H, W, 3]; got {a.shape}")
    im = Image.fromarray(a)
    atomic_write(Path(path), lambda f: im.save(f, format="PNG"))
