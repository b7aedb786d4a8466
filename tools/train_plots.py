"""Plots of ``tread-fx train`` and ``convergence``, drawn with matplotlib's Agg canvas."""

from __future__ import annotations

from pathlib import Path

from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from matplotlib.ticker import FormatStrFormatter

from .train_checkpoint import atomic_write

__all__ = ["plot_loss", "save_figure", "smooth"]


def smooth(values: list[float], frac: float = 0.05) -> list[float]:
    """Trailing moving average over ``frac`` of the series (at least one value)."""
    k = max(1, int(len(values) * frac))
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v
        if i >= k:
            acc -= values[i - k]
        out.append(acc / min(i + 1, k))
    return out


def save_figure(fig: Figure, path: Path) -> None:
    """Render ``fig`` with the Agg canvas and write it to ``path`` as a PNG, atomically."""
    FigureCanvasAgg(fig)
    atomic_write(Path(path), lambda f: fig.savefig(f, format="png", dpi=100))


def plot_loss(records: list[dict], path: Path, title: str = "") -> None:
    """Training loss per logged step (raw and smoothed) and held-out loss points."""
    train = [r for r in records if r.get("kind") == "train"]
    evals = [r for r in records if r.get("kind") == "eval"]
    steps = [r["step"] for r in train]
    loss = [r["loss"] for r in train]
    fig = Figure(figsize=(7, 4.2))
    ax = fig.add_subplot(1, 1, 1)
    ax.plot(steps, loss, color="tab:blue", alpha=0.35, lw=1, label="train loss")
    ax.plot(steps, smooth(loss), color="tab:blue", lw=2, label="train loss (smoothed)")
    if evals:
        ax.plot([r["step"] for r in evals], [r["heldout_loss"] for r in evals], "o-",
                color="tab:orange", label="held-out loss (raw weights)")
        if any("heldout_loss_ema" in r for r in evals):
            ax.plot([r["step"] for r in evals], [r.get("heldout_loss_ema", float("nan")) for r in evals],
                    "s--", color="tab:red", label="held-out loss (EMA)")
    ax.set_xlabel("step")
    ax.set_ylabel("rectified-flow loss")
    if loss and min(loss) > 0:
        ax.set_yscale("log")
        ax.yaxis.set_major_formatter(FormatStrFormatter("%.2g"))
        ax.yaxis.set_minor_formatter(FormatStrFormatter("%.2g"))
    ax.grid(True, which="both", alpha=0.3)
    ax.legend()
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    save_figure(fig, path)
