"""``tread-fx train --nproc N``: the run of :mod:`.train`, data-parallel on N processes.

:func:`main` starts N local processes with torch.distributed's elastic launcher (the
machinery behind ``torchrun --standalone``); each runs :func:`worker`, which joins the
process group (on cuda -- ``--device cuda``/``auto``, or ``--device`` left out on a machine
with GPUs -- nccl with one GPU per process, ``cuda:LOCAL_RANK``; on the CPU gloo) and runs
:func:`tread_fx.tools.train.run` as rank ``r`` of N.  Processes that ``torchrun``
started run :func:`worker` directly.

The trainer routes the model first and wraps the routed module in
``DistributedDataParallel`` (``tread_fx.route`` refuses wrapped models); with ``--fsdp`` it
shards it with FSDP2 instead (``fully_shard`` on each block of the model, then on the routed
module).  Every rank takes its slice of each step's batch; rank 0 evaluates and writes every
file.  A DDP run's checkpoint is the one-process checkpoint (``checkpoint.pt``, written by
rank 0); an FSDP run's is ``checkpoint.dcp/``, the sharded state written by every rank with
``torch.distributed.checkpoint``.  Either resumes at any number of processes, with or
without ``--fsdp``.  A rank that raises records its error for the launcher and ends at
once; the launcher then stops the other ranks (which may be waiting in a collective) and
:func:`launch` raises :class:`DistributedError` naming the rank and its error.
"""

from __future__ import annotations

import argparse
import gc
import glob
import json
import logging
import os
import shutil
import signal
import sys
import tempfile
import threading
import traceback
import uuid
from dataclasses import dataclass
from typing import Any, Callable, NoReturn

import torch
import torch.distributed as dist

from .errors import UsageError
from .train_config import TrainError, resolve_device

__all__ = ["DistributedError", "Parallel", "launch", "launched_by_torchrun", "main", "worker"]

#: Signals the elastic launcher handles in the process that launches (it stops the ranks).
_LAUNCHER_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGINT", "SIGHUP",
                                                             "SIGQUIT") if hasattr(signal, name))


@dataclass(frozen=True)
class Parallel:
    """This process's place in a data-parallel run: rank ``rank`` of ``world``; ``fsdp``:
    the model, optimizer and EMA are sharded over the ranks (FSDP2) instead of replicated
    (DDP)."""

    rank: int = 0
    world: int = 1
    fsdp: bool = False

    @property
    def main(self) -> bool:
        """Rank 0: the rank that evaluates, prints and writes the files."""
        return self.rank == 0


class DistributedError(TrainError):
    """A rank of a data-parallel run failed: names the rank and its error (printed by
    ``tread-fx`` as one line, exit status 2; the rank printed its traceback above)."""


def launched_by_torchrun() -> bool:
    """Is this process a rank that torchrun (``torch.distributed.run``) started?"""
    return "TORCHELASTIC_RUN_ID" in os.environ and "WORLD_SIZE" in os.environ


def launch(entry: Callable[..., Any], args: tuple, nproc: int,
           name: str = "tread-fx") -> dict[int, Any]:
    """Run ``entry(*args)`` in ``nproc`` local processes; each rank's return value.

    The processes are started like ``torchrun --standalone --nproc-per-node nproc`` starts
    them (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``MASTER_ADDR``/``MASTER_PORT`` set;
    ``entry`` calls ``torch.distributed.init_process_group``), without restarts.  When a
    rank fails, the others are stopped at once and :class:`DistributedError` gives the error
    of every rank that recorded one, the earliest first (a rank waiting in a collective for
    the failed one may fail too, with "connection closed by peer").  ``entry`` must be
    importable (a module-level function): the processes are spawned.
    """
    from torch.distributed.elastic.multiprocessing import DefaultLogsSpecs
    from torch.distributed.elastic.multiprocessing.errors import ChildFailedError
    from torch.distributed.launcher.api import LaunchConfig, elastic_launch

    records = tempfile.mkdtemp(prefix=f"{name}-ranks-")   # each rank's error record
    config = LaunchConfig(min_nodes=1, max_nodes=1, nproc_per_node=nproc,
                          run_id=f"{name}-{uuid.uuid4().hex[:12]}", rdzv_backend="c10d",
                          rdzv_endpoint="localhost:0", max_restarts=0, monitor_interval=0.1,
                          start_method="spawn", logs_specs=DefaultLogsSpecs(log_dir=records))
    # the launcher turns these signals into exceptions while it runs (to stop the ranks)
    # and leaves its handlers installed; the caller gets its own back
    handlers = {}
    if threading.current_thread() is threading.main_thread():
        handlers = {sig: h for sig in _LAUNCHER_SIGNALS
                    if (h := signal.getsignal(sig)) is not None}
    # it logs a failed rank with the traceback of its own polling loop; the error below
    # names the rank and its error instead
    poll_log = logging.getLogger("torch.distributed.elastic.multiprocessing.api")
    level = poll_log.level
    poll_log.setLevel(logging.CRITICAL)
    try:
        return elastic_launch(config, entry)(*args)
    except ChildFailedError as e:
        raise DistributedError(f"{_failures(records, e, nproc)} (the output of the ranks is "
                               f"above)") from None
    finally:
        shutil.rmtree(records, ignore_errors=True)
        poll_log.setLevel(level)
        for sig, handler in handlers.items():
            signal.signal(sig, handler)


def _failures(records: str, error: Any, nproc: int) -> str:
    """``rank 1 of 2 failed: Type: text; ...``: every rank's recorded error, the earliest
    first, ranks with the same error together.  The launcher reports one failed rank, which
    may be a rank that only lost its peer; the records of all ranks name the first cause."""
    found: dict[int, tuple[float, str]] = {}
    for path in glob.glob(os.path.join(records, "*", "attempt_*", "*", "error.json")):
        with open(path) as f:
            record = json.load(f).get("message", {})
        if isinstance(record, dict):   # when it was written: its timestamp has whole seconds
            rank = int(os.path.basename(os.path.dirname(path)))
            found[rank] = (os.stat(path).st_mtime, record["message"])
    for rank, failure in error.failures.items():   # e.g. killed by a signal: no record
        message = failure.message
        if isinstance(message, dict):
            message = message.get("message", message)
        found.setdefault(rank, (float(failure.timestamp), str(message)))
    by_message: dict[str, list[int]] = {}
    for rank in sorted(found, key=lambda r: (found[r][0], r)):
        by_message.setdefault(" ".join(found[rank][1].split()), []).append(rank)
    return "; ".join(f"rank{'s' * (len(ranks) > 1)} {', '.join(map(str, sorted(ranks)))} of "
                     f"{nproc} failed: {message}" for message, ranks in by_message.items())


def _end_rank(error: BaseException) -> NoReturn:
    """Record ``error`` for the launcher, print it and end this process at once.

    Skipping the interpreter's teardown is deliberate: the other ranks may be inside a
    collective, and freeing DistributedDataParallel or the process group now could wait on
    them.  The launcher reads the record and stops the other ranks.
    """
    from torch.distributed.elastic.multiprocessing.errors.error_handler import ErrorHandler

    ErrorHandler().record_exception(error)   # the exception being handled, with traceback
    if not isinstance(error, UsageError):    # bad input: the launcher's one line says it all
        traceback.print_exc()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(1)


def worker(args: argparse.Namespace) -> dict | None:
    """One rank of ``tread-fx train``: join the process group, run, leave the group.

    Returns the run's summary on rank 0 (``None`` on the others).  The collectives time out
    after torch's default (10 minutes for nccl, 30 for gloo) if a rank stops answering
    without failing.
    """
    from tqdm import tqdm

    from .train import run

    # tqdm's default lock is a multiprocessing semaphore, which a rank that fails (and ends
    # with os._exit) would leave to a "leaked semaphore" warning; a rank prints on its own
    tqdm.set_lock(threading.RLock())
    try:
        local = int(os.environ.get("LOCAL_RANK", "0"))
        world = int(os.environ.get("WORLD_SIZE", "1"))
        # --dtype as given (a resumed run's own is checked again by run's setup)
        device = resolve_device(getattr(args, "device", None), getattr(args, "dtype", None) or
                                "fp32", distributed=True, world=world, local_rank=local)
        if device.type == "cuda":
            torch.cuda.set_device(device)
            dist.init_process_group("nccl", device_id=device)
        else:
            device = torch.device("cpu")
            dist.init_process_group("gloo")
        parallel = Parallel(dist.get_rank(), dist.get_world_size(),
                            fsdp=bool(getattr(args, "fsdp", False)))
        summary = run(args, parallel=parallel, device=device)
    except BaseException as e:  # noqa: BLE001 - every failure ends the rank, see _end_rank
        _end_rank(e)
    # DistributedDataParallel (inside the run's trainer, freed on return) holds the group:
    # collect it before the group goes, or gloo's worker threads can wait forever
    gc.collect()
    dist.destroy_process_group()
    return summary if parallel.main else None


def main(args: argparse.Namespace) -> int:
    """``tread-fx train --nproc N``: check the flags, start N ranks, wait for them."""
    from .train import setup

    nproc = args.nproc
    if launched_by_torchrun():
        raise UsageError(f"--nproc {nproc}: this process was started by torchrun, which "
                         f"starts the ranks itself; leave --nproc out (torchrun's "
                         f"--nproc-per-node sets their number)")
    # every check before any process starts
    found = setup(args, Parallel(0, nproc, fsdp=bool(getattr(args, "fsdp", False))),
                  announce=False)
    gpus = torch.cuda.device_count() if found.device.type == "cuda" else 0
    if gpus and nproc > gpus:
        raise UsageError(f"--nproc {nproc}: only {gpus} GPU(s) here, and each process uses one; "
                         f"pass --nproc {gpus} or fewer, or --device cpu")
    if args.threads is None and not gpus:
        args.threads = max(1, torch.get_num_threads() // nproc)   # share the CPU cores
    # the flags only: the parser's callback (``func``) does not pickle into a new process
    flags = argparse.Namespace(**{k: v for k, v in vars(args).items() if k != "func"})
    results = launch(worker, (flags,), nproc)
    return 0 if results.get(0) is not None else 1
