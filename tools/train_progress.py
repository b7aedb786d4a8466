"""Progress on stderr for the long phases of ``tread-fx train`` and ``convergence``."""

from __future__ import annotations

import sys

from tqdm import tqdm

__all__ = ["progress_bar", "status"]


def status(message: str) -> None:
    """One status line on stderr, printed above an open progress bar (if any)."""
    tqdm.write(message, file=sys.stderr)
    sys.stderr.flush()


def progress_bar(total: int, *, initial: int = 0, unit: str = "step", desc: str | None = None,
                 enabled: bool = True) -> tqdm:
    """A tqdm bar on stderr; ``enabled=False`` (``--no-progress``) gives a silent one."""
    return tqdm(total=total, initial=initial, unit=unit, desc=desc, dynamic_ncols=True,
                file=sys.stderr, smoothing=0.1, disable=not enabled)
