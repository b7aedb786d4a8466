"""Files of a ``tread-fx train`` run: the output folder, atomic writes, checkpoint and metrics."""

from __future__ import annotations

import copy
import json
import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterator

import torch

from .errors import UsageError
from .train_config import TrainError, check_out

__all__ = ["CHECKPOINT_FORMAT", "CHECKPOINT_NAMES", "DCP_NAME", "PT_NAME", "atomic_write",
           "existing_checkpoints", "find_checkpoint", "load_checkpoint", "load_sharded_meta",
           "output_folder", "read_metrics", "remove_sharded", "remove_stale", "save_checkpoint",
           "save_sharded_checkpoint", "truncate_metrics"]

#: Stored in every checkpoint; a checkpoint of another format is refused on ``--resume``.
CHECKPOINT_FORMAT = "tread-fx-train/1"
#: The one-process checkpoint (one ``torch.save`` file; one-process and DDP runs).
PT_NAME = "checkpoint.pt"
#: The sharded checkpoint of an FSDP run: a ``torch.distributed.checkpoint`` folder (the
#: tensors of the model, optimizer and EMA) with ``meta.pt`` (step, settings, RNG, ...).
DCP_NAME = "checkpoint.dcp"
#: The header of a sharded checkpoint, inside its folder (written last: it marks it whole).
DCP_META = "meta.pt"
#: The previous sharded checkpoint while a new one takes its place (see save_sharded_checkpoint).
_DCP_OLD = ".checkpoint.dcp.old"
#: What ``--resume`` looks for (and what a new run refuses to overwrite without --overwrite).
CHECKPOINT_NAMES = (PT_NAME, DCP_NAME)


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
    """A checkpoint written by :func:`save_checkpoint` (or the header of one written by
    :func:`save_sharded_checkpoint`, see :func:`load_sharded_meta`); :class:`TrainError`
    for anything else."""
    if Path(path).is_dir():
        return load_sharded_meta(Path(path))
    try:
        state = torch.load(path, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"{path}: cannot read the checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a tread-fx train checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT!r})")
    return state


def _sync_folder(path: Path) -> None:
    """fsync the folder ``path`` (its renames durable), where the file system allows it."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _dcp_complete(path: Path) -> bool:
    return (path / DCP_META).is_file() and (path / ".metadata").is_file()


def find_checkpoint(out: Path) -> Path | None:
    """The checkpoint in ``out`` to resume: ``checkpoint.pt`` or ``checkpoint.dcp`` (the
    sharded one of an FSDP run, or the previous one when a run was killed while putting a
    new one in its place).  When both kinds are there (a run killed between writing its
    checkpoint and removing the other kind), the one written last."""
    found = []
    if (out / PT_NAME).is_file():
        found.append(out / PT_NAME)
    for name in (DCP_NAME, _DCP_OLD):
        if _dcp_complete(out / name):
            found.append(out / name)
            break
    if not found:
        return None

    def written(p: Path) -> float:
        return (p / DCP_META if p.is_dir() else p).stat().st_mtime

    return max(found, key=lambda p: (written(p), p.name == PT_NAME))


def existing_checkpoints(out: Path) -> list[str]:
    """The names of the checkpoints (of either kind) in ``out``."""
    return [name for name in (PT_NAME, DCP_NAME, _DCP_OLD) if (out / name).exists()]


def remove_stale(out: Path) -> None:
    """Remove what a run killed while saving left behind (temporary files and folders)."""
    for stale in out.glob(f".{PT_NAME}.*.tmp"):
        stale.unlink(missing_ok=True)
    for stale in out.glob(f".{DCP_NAME}.*.tmp"):
        shutil.rmtree(stale, ignore_errors=True)


def remove_sharded(out: Path) -> None:
    """Remove the sharded checkpoint in ``out`` (once a ``checkpoint.pt`` took its place)."""
    for name in (DCP_NAME, _DCP_OLD):
        shutil.rmtree(out / name, ignore_errors=True)


def save_sharded_checkpoint(out: Path, step: int, state: dict, meta: dict, *,
                            main: bool) -> Path:
    """Write ``out/checkpoint.dcp``: ``state`` (of DTensors; every rank calls this) with
    ``torch.distributed.checkpoint.save``, then, on rank 0 (``main``), the header ``meta``.

    The checkpoint is written to a new folder, which then takes the old one's place by two
    renames (the old one is kept as ``.checkpoint.dcp.old`` until the new one is in place):
    a kill at any moment leaves a whole checkpoint that :func:`find_checkpoint` finds.  A
    one-process ``checkpoint.pt`` of the same run is removed once the new one is in place.
    """
    import torch.distributed.checkpoint as dcp

    tmp = out / f".{DCP_NAME}.{step}.tmp"
    dcp.save(state, checkpoint_id=tmp)   # rank 0 returns once every rank's shards are written
    if main:
        atomic_write(tmp / DCP_META, lambda f: torch.save(_on_cpu(meta), f))
        final, old = out / DCP_NAME, out / _DCP_OLD
        if final.exists():     # whole (only a whole checkpoint is ever renamed to it)
            shutil.rmtree(old, ignore_errors=True)
            final.rename(old)
        # else a kill came between the renames last time: ``old`` is the last whole one
        tmp.rename(final)
        _sync_folder(out)
        shutil.rmtree(old, ignore_errors=True)
        (out / PT_NAME).unlink(missing_ok=True)
    return out / DCP_NAME


def load_sharded_meta(path: Path) -> dict:
    """The header of the sharded checkpoint ``path`` (its tensors are loaded by the
    trainer); ``state["dcp"]`` is the folder.  :class:`TrainError` for anything else."""
    try:
        state = torch.load(path / DCP_META, map_location="cpu", weights_only=False)
    except Exception as e:
        raise TrainError(f"{path}: cannot read the checkpoint ({e})") from None
    if not isinstance(state, dict) or state.get("format") != CHECKPOINT_FORMAT:
        raise TrainError(f"{path}: not a tread-fx train checkpoint (expected format "
                         f"{CHECKPOINT_FORMAT!r})")
    state["dcp"] = str(path)
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
