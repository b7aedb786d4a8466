"""The model of ``tread-fx train``: the DiT, its timestep scale and the held-out loss."""

from __future__ import annotations

import torch

from tread_fx.diffusion import RectifiedFlow
from tread_fx.models import DiT

from .data import Dataset

__all__ = ["EVAL_T_GRID", "EvalSet", "T_SCALE", "TimeScaled", "build_model"]

#: Noise levels of the held-out loss (rectified-flow ``t``: 0 = data, 1 = noise).
EVAL_T_GRID = (0.1, 0.3, 0.5, 0.7, 0.9)
#: Timestep scale: the DiT's sinusoidal embedding is made for timesteps in 0..1000.
T_SCALE = 1000.0


class TimeScaled:
    """``fn(x, t, y) = net(x, 1000 t, y)``: rectified-flow ``t`` in [0, 1] to DiT timesteps."""

    def __init__(self, net: torch.nn.Module) -> None:
        self.net = net

    def __call__(self, x, t, y):
        return self.net(x, t * T_SCALE, y)


def build_model(config: dict, data: Dataset) -> DiT:
    """The DiT of ``config`` (the keys of ``train_config.DEFAULTS``) for ``data``'s shape."""
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
        averaged over the grid; also per ``t``.  Runs on the model's device, in fp32 (no
        autocast), whatever ``--dtype`` the model was trained in."""
        was = model.training
        model.eval()
        fn = TimeScaled(model)
        rf = RectifiedFlow()
        device = next(model.parameters()).device
        # the images, labels and fixed noise on the model's device, moved once per call
        xs, ys, noises = self.x.to(device), self.y.to(device), self.noise.to(device)
        per_t = []
        try:
            for k, t in enumerate(self.grid):
                total, count = 0.0, 0
                for i in range(0, xs.shape[0], self.batch):
                    x = xs[i:i + self.batch]
                    y = ys[i:i + self.batch]
                    noise = noises[k, i:i + self.batch]
                    terms = rf.loss(fn, x, y, t=t, noise=noise, reduction="none")
                    total += float(terms.loss_per_element.double().sum())
                    count += terms.loss_per_element.numel()
                per_t.append(total / count)
        finally:
            model.train(was)
        return sum(per_t) / len(per_t), per_t
