"""Files of a ``tread-fx train`` run: the output folder, atomic writes, checkpoint and metrics."""

from __future__ import annotations

import copy
import json
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import UsageError
from .train_config import TrainError, check_out

__all__ = ["CHECKPOINT_FORMAT", "atomic_write", "load_checkpoint", "output_folder",
           "read_metrics", "save_checkpoint", "truncate_metrics"]

#: Stored in every checkpoint; a checkpoint of another format is refused on ``--resume``.
CHECKPOINT_FORMAT = "tread-fx-train/1"


def _current_umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


_UMASK = _current_umask()


@contextmanager
def output_folder(path: str | os.PathLike, flag: str = "--out") -> Iterator[Path]:
    """Create the folder ``path`` (and missing parents) for the body of the ``with``.

    When the body raises, the folders this call created are removed again, deepest first,
    as long as they are empty: a run that fails before writing leaves nothing behind, and a
    folder that existed before is never touched.
    """
    out = check_out(path)
    created = []
    for p in (out, *out.parents):
        if p.exists():
            break
        created.append(p)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise UsageError(f"{flag} {out}: cannot create the folder ({e.strerror or e}); "
                         f"choose another {flag}") from None
    try:
        yield out
    except BaseException:
        for p in created:  # deepest first
            try:
                p.rmdir()
            except OSError:  # not empty (the run wrote something): keep it and its parents
                break
        raise


def atomic_write(path: Path, write: Callable[[Any], None]) -> None:
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
        Path(tmp).unlink(missing_ok=True)
        raise
    try:  # make the rename durable
        dfd = os.open(path.parent, os.O_RDONLY)
    except OSError:  # a file system that cannot open folders: the rename is done, only not synced
        return
    try:
        os.fsync(dfd)
    except OSError:  # some file systems refuse fsync on a folder; same as above
        return
    finally:
        os.close(dfd)


def _on_cpu(obj: Any) -> Any:
    """``obj`` with every tensor in it (in dicts, lists, tuples) moved to the CPU; CPU
    tensors are kept as they are (not copied)."""
    if isinstance(obj, torch.Tensor):
        return obj.cpu()
    if isinstance(obj, dict):   # a copy of the same type (a state_dict keeps its _metadata)
        out = copy.copy(obj)
        for k, v in obj.items():
            out[k] = _on_cpu(v)
        return out
    if type(obj) in (list, tuple):
        return type(obj)(_on_cpu(v) for v in obj)
    return obj


def save_checkpoint(path: Path, state: dict) -> None:
    """``torch.save`` ``state`` to ``path`` atomically (a kill never leaves half a file).

    Tensors are saved on the CPU, so a checkpoint written by a run on a GPU loads (and
    resumes) on a machine without one; :func:`load_checkpoint` also maps to the CPU."""
    state = _on_cpu(state)
    atomic_write(path, lambda f: torch.save(state, f))


def load_checkpoint(path: Path) -> dict:
    """A checkpoint written by :func:`save_checkpoint`; :class:`TrainError` for anything else."""
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"{path}: cannot read the checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a tread-fx train checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT!r})")
    return state


def read_metrics(path: Path) -> list[dict]:
    """The records of a ``metrics.jsonl`` (none when it does not exist)."""
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


def truncate_metrics(path: Path, step: int) -> list[dict]:
    """Keep the metrics up to ``step`` (a killed run may have logged past its checkpoint)."""
    records = [r for r in read_metrics(path) if r.get("step", 0) <= step]
    text = "".join(json.dumps(r) + "\n" for r in records)
    atomic_write(path, lambda f: f.write(text.encode()))
    return records
