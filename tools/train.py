"""``tread-fx train``: the training run -- :class:`Trainer` and the run loop :func:`run`.

What the command does, writes and prints is its ``--help`` text,
:data:`tread_fx.tools.train_config.TRAIN_HELP`.  The run is split by concern: flags, defaults
and checks in :mod:`.train_config`; the DiT and its held-out loss in :mod:`.train_model`;
checkpoint, metrics and the output folder in :mod:`.train_checkpoint`; sampling and the
labelled sample grid in :mod:`.train_samples`; the loss plot in :mod:`.train_plots`;
progress bars and status lines in :mod:`.train_progress`; ``--nproc`` (data-parallel ranks) in
:mod:`.train_distributed`.  The names other code imports from here (``Trainer``, ``EvalSet``,
``sample_images``, ``write_png``, ...) stay importable.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import time
import warnings
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import tread_fx
from tread_fx.diffusion import EMA, RectifiedFlow
from tread_fx.losses import patchify_loss, tread_loss
from tread_fx.models import DiT

from .data import Dataset, load_data
from .errors import UsageError
from .train_checkpoint import (CHECKPOINT_FORMAT, DCP_NAME, PT_NAME, existing_checkpoints,
                               find_checkpoint, load_checkpoint, output_folder, remove_sharded,
                               remove_stale, save_checkpoint, save_sharded_checkpoint,
                               truncate_metrics)
from .train_config import (DEFAULT_STEPS, DEFAULTS, RUN_DEFAULTS, TrainError, add_model_arguments,
                           check_config, check_out, check_route_tokens, default_routes,
                           resolve_config, resolve_device, resolve_routes, torch_dtype)
from .train_config import add_train_arguments as add_arguments
from .train_distributed import Parallel, launched_by_torchrun
from .train_model import EVAL_T_GRID, T_SCALE, EvalSet, TimeScaled, build_model
from .train_plots import plot_loss
from .train_progress import progress_bar, status
from .train_samples import image_grid, label_rows, sample_images, write_png

__all__ = [
    "CHECKPOINT_FORMAT", "DEFAULTS", "DEFAULT_STEPS", "EVAL_T_GRID", "EvalSet", "RUN_DEFAULTS",
    "T_SCALE", "TrainError", "Trainer", "add_arguments", "add_model_arguments", "build_model",
    "default_routes", "image_grid", "label_rows", "load_checkpoint", "main", "plot_loss",
    "resolve_routes", "run", "sample_images", "save_checkpoint", "setup", "write_png",
]

# purposes of the per-step random streams
_DATA, _NOISE, _MODEL = 0, 1, 2


# ---------------------------------------------------------------------------------------
# the trainer
# ---------------------------------------------------------------------------------------


def _stream_seed(seed: int, purpose: int, index: int, *more: int) -> int:
    """A 63-bit seed that is a function of (seed, purpose, index, *more) only."""
    entropy = [int(seed) & 0xFFFFFFFF, purpose, int(index), *map(int, more)]
    state = np.random.SeedSequence(entropy).generate_state(2)
    return (int(state[0]) << 31 | int(state[1]) >> 1) & ((1 << 63) - 1)


class Trainer:
    """One training run: model, routed view, optimizer, EMA, and the step counter.

    ``config`` holds the keys of :data:`DEFAULTS` (resolved).  The dense model is
    ``self.model``; ``self.net`` is what is trained (``tread_fx.route(model, ...)`` or the
    model itself for ``routes=None``) -- both share the parameters.

    With ``parallel`` (rank ``r`` of ``N``, the process group initialised), ``self.net`` is
    run through ``DistributedDataParallel`` (``self.wrapped``); ``config["batch"]`` is the
    global batch and rank ``r`` trains on its ``r``-th slice.  With ``parallel.fsdp`` it is
    sharded with FSDP2 instead (``self.sharded``): ``fully_shard`` on each of the model's
    blocks (which the routed module runs), then on ``self.net``; the parameters, the
    optimizer state and the EMA (made from the sharded parameters) are DTensors, each rank
    holding its shard.  Every method that needs the whole model then (:meth:`raw_model`,
    :meth:`ema_model`, :meth:`save`) is a collective that every rank calls.

    Everything lives on ``device``; ``config["dtype"]`` bf16 or fp16 runs the forward pass
    and the loss under ``torch.autocast`` of that type (the parameters, gradients,
    optimizer and EMA stay fp32); fp16 scales the loss with a ``torch.amp.GradScaler``.
    The random draws of the data order, ``t`` and the noise come from CPU generators on
    every device.
    """

    def __init__(self, config: dict, data: Dataset, *, ema: bool = True,
                 device: torch.device | str = "cpu", parallel: Parallel | None = None) -> None:
        self.config = dict(config)
        self.data = data
        self.device = torch.device(device)
        self.parallel = parallel or Parallel()
        world = self.parallel.world
        if config["batch"] % world:
            raise TrainError(f"--batch {config['batch']} is the global batch and must split "
                             f"evenly over the {world} processes; pass a multiple of {world}")
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
        # route first, wrap the routed module (route() refuses wrapped models)
        self.wrapped = self.net
        self.sharded = self.parallel.fsdp
        if self.sharded:   # FSDP2: each block (the routed module's are the model's), then the root
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import fully_shard

            mesh = init_device_mesh(self.device.type, (world,))
            for block in self.model.blocks:
                fully_shard(block, mesh=mesh)
            fully_shard(self.net, mesh=mesh)
        elif world > 1:
            ids = [self.device] if self.device.type == "cuda" else None
            self.wrapped = DistributedDataParallel(self.net, device_ids=ids)
        self.opt = torch.optim.AdamW(self.model.parameters(), lr=config["lr"], betas=(0.9, 0.999),
                                     weight_decay=config["weight_decay"])
        self.ema = EMA(self.model, decay=config["ema_decay"]) if ema else None
        self.dtype = str(config.get("dtype", "fp32"))
        self.amp_dtype = torch_dtype(self.dtype)
        self.scaler = None
        if self.dtype == "fp16":   # sharded: the overflow check is agreed on by every rank
            if self.sharded:
                from torch.distributed.fsdp.sharded_grad_scaler import ShardedGradScaler

                self.scaler = ShardedGradScaler(self.device.type)
            else:
                self.scaler = torch.amp.GradScaler(self.device.type)
        self.rf = RectifiedFlow()
        self.fn = TimeScaled(self.wrapped)
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
    def autocast(self) -> contextlib.AbstractContextManager:
        """``torch.autocast`` of ``--dtype`` on the device (nothing for fp32)."""
        if self.amp_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.amp_dtype)

    def loss(self, x: torch.Tensor, y: torch.Tensor, generator: torch.Generator | None,
             t: torch.Tensor | None = None, noise: torch.Tensor | None = None) -> torch.Tensor:
        """The TREAD loss of one batch (the per-element loss goes through ``patchify_loss``);
        ``t`` and ``noise`` are drawn from ``generator`` unless given."""
        cfg = self.config
        terms = self.rf.loss(self.fn, x, y, generator=generator, reduction="none", t=t,
                             noise=noise)
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
                with self.autocast():
                    loss = self.loss(x, y, torch.Generator().manual_seed(0))
                loss.backward()   # the gradients are dropped: no scaling needed
        self.opt.zero_grad(set_to_none=True)
        if self.device.type == "cuda":   # its kernels done before a clock starts
            torch.cuda.synchronize(self.device)

    def train_step(self) -> float:
        """One optimizer step; returns the loss (of the global batch).  Every draw is a
        function of (seed, step); data-parallel, label dropout and token selection also of
        (rank, world size)."""
        s, seed = self.step, self.config["seed"]
        rank, world = self.parallel.rank, self.parallel.world
        idx = self.batch_indices(s)
        gen = torch.Generator().manual_seed(_stream_seed(seed, _NOISE, s))
        t = noise = None
        if world > 1:   # this rank's slice of the batch and of its t and noise
            part = slice(rank * len(idx) // world, (rank + 1) * len(idx) // world)
            t = self.rf.sample_t(len(idx), self.device, gen)[part]
            shape = (len(idx), *self.data.train_x.shape[1:])
            noise = torch.randn(shape, generator=gen, dtype=torch.float32)[part]
            noise = noise.to(self.device, self.data.train_x.dtype)
            idx, gen = idx[part], None
        x = self.data.train_x[idx].to(self.device)
        y = self.data.train_y[idx].to(self.device)
        lr = self.lr_at(s)
        for group in self.opt.param_groups:
            group["lr"] = lr
        devices = [self.device] if self.device.type == "cuda" else []
        model_seed = _stream_seed(seed, _MODEL, s, *((rank, world) if world > 1 else ()))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(model_seed)  # label dropout, token selection
            with self.autocast():
                loss = self.loss(x, y, gen, t, noise)
            self.opt.zero_grad(set_to_none=True)
            (self.scaler.scale(loss) if self.scaler is not None else loss).backward()
        if self.scaler is not None:
            with warnings.catch_warnings():   # sharded: its (1,)-shaped found_inf meets DTensors
                warnings.filterwarnings("ignore", "Found a non-scalar tensor with numel=1")
                self.scaler.unscale_(self.opt)   # clip the true gradients
        if self.config["grad_clip"] > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), self.config["grad_clip"])
        if self.scaler is not None:
            self.scaler.step(self.opt)   # skipped when the scaled gradients overflowed
            self.scaler.update()
        else:
            self.opt.step()
        if self.ema is not None:
            n = self.ema.num_updates
            self.ema.update(self.model, decay=min(self.ema.decay, (1 + n) / (10 + n)))
        self.step += 1
        loss = loss.detach().float()
        if world > 1:   # the mean over the global batch, the same on every rank
            dist.all_reduce(loss, op=dist.ReduceOp.SUM)
            loss = loss / world
        return float(loss)

    def raw_model(self) -> torch.nn.Module | None:
        """The trained model with its current weights, whole: ``self.model``, or, sharded, a
        fresh DiT with the gathered weights on rank 0 (``None`` on the other ranks; every
        rank must call this)."""
        if not self.sharded:
            return self.model
        from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

        full = get_model_state_dict(self.model, options=StateDictOptions(full_state_dict=True,
                                                                         cpu_offload=True))
        if not self.parallel.main:
            return None
        m = build_model(self.config, self.data).to(self.device)
        m.load_state_dict(full)
        return m.train(self.model.training)

    def ema_model(self) -> DiT | None:
        """A fresh DiT holding the EMA weights (the raw model when there is no EMA).
        Sharded, the EMA is gathered to rank 0 (``None`` on the other ranks; every rank must
        call this)."""
        if self.ema is None:
            raw = self.raw_model()
            if raw is None:
                return None
            m = build_model(self.config, self.data).to(self.device)
            m.load_state_dict(raw.state_dict())
            return m.eval()
        if self.sharded:   # one tensor at a time, in the same order on every rank
            shadow = {n: _full(s) for n, s in self.ema.shadow.items()}
            if not self.parallel.main:
                return None
            m = build_model(self.config, self.data).to(self.device)
            with torch.no_grad():
                for n, p in m.named_parameters():
                    p.copy_(shadow[n])
                for n, b in m.named_buffers():
                    b.copy_(self.ema.buffers[n])
            return m.eval()
        m = build_model(self.config, self.data).to(self.device)
        self.ema.copy_to(m)
        return m.eval()

    # -- state ----------------------------------------------------------------------------
    def _header(self) -> dict:
        """The checkpoint's entries other than the model, optimizer and EMA tensors."""
        return {
            "format": CHECKPOINT_FORMAT,
            "step": self.step,
            "train_time": self.train_time,
            "config": dict(self.config),
            "rng": {
                "torch": torch.get_rng_state(),
                "scheme": "per-step streams: data order per epoch, t/noise and global "
                          "(label dropout, token selection) per step, seeded from (seed, index); "
                          "data-parallel: each rank's slice of the batch, t and noise, and the "
                          "global stream seeded from (seed, step, rank, world size)",
            },
            "data": self.data.fingerprint(),
            "world_size": self.parallel.world,
            "sharded": self.sharded,
            "device": str(self.device),
            "scaler": self.scaler.state_dict() if self.scaler is not None else None,
        }

    def state_dict(self) -> dict:
        """The one-process checkpoint (``checkpoint.pt``); not for a sharded trainer, whose
        checkpoint :meth:`save` writes."""
        if self.sharded:
            raise RuntimeError("a sharded trainer's checkpoint is written by Trainer.save")
        return dict(self._header(),
                    model=self.model.state_dict(),
                    optimizer=self.opt.state_dict(),
                    ema=self.ema.state_dict() if self.ema is not None else None)

    def _sharded_state(self) -> dict:
        """The tensors of a sharded checkpoint: the model's and the optimizer's state (by
        parameter name, from ``get_state_dict``) and the EMA's; DTensors when sharded,
        whole tensors otherwise (as templates to load into)."""
        from torch.distributed.checkpoint.state_dict import get_state_dict

        model, optim = get_state_dict(self.model, self.opt)
        state = {"model": model, "optimizer": optim}
        if self.ema is not None:
            state["ema"] = {"shadow": self.ema.shadow, "buffers": self.ema.buffers}
        return state

    def save(self, out: Path, extra: dict) -> Path:
        """Write the checkpoint to ``out``: ``checkpoint.pt`` (rank 0, one-process and DDP
        runs) or, sharded, ``checkpoint.dcp`` (every rank calls this).  ``extra`` is stored
        with it (the run options).  Returns the path."""
        if self.sharded:
            header = dict(self._header(), **extra)
            if self.ema is not None:
                header["ema"] = {k: v for k, v in self.ema.state_dict().items()
                                 if k not in ("shadow", "buffers")}
            return save_sharded_checkpoint(out, self.step, self._sharded_state(), header,
                                           main=self.parallel.main)
        if self.parallel.main:
            save_checkpoint(out / PT_NAME, dict(self.state_dict(), **extra))
            remove_sharded(out)
        return out / PT_NAME

    def load_state_dict(self, state: dict) -> None:
        """Load a checkpoint: ``checkpoint.pt``'s state, or the header of a sharded one
        (``state["dcp"]``, its folder), whatever the number of processes that wrote it and
        whether this trainer is sharded."""
        if "dcp" in state:
            self._load_sharded(state)
        elif self.sharded:
            self._load_whole_into_shards(state)
        else:
            self.model.load_state_dict(state["model"])
            self.opt.load_state_dict(state["optimizer"])
            if self.ema is not None and state.get("ema") is not None:
                self.ema.load_state_dict(state["ema"])
        if self.scaler is not None and state.get("scaler"):
            self.scaler.load_state_dict(state["scaler"])
        torch.set_rng_state(state["rng"]["torch"])
        self.step = int(state["step"])
        self.train_time = float(state.get("train_time", 0.0))

    def _load_sharded(self, state: dict) -> None:
        """Load the tensors of the sharded checkpoint ``state["dcp"]`` (written by any number
        of ranks) into this trainer: resharded to its ranks, or whole in one process."""
        import torch.distributed.checkpoint as dcp
        from torch.distributed.checkpoint.api import CheckpointException
        from torch.distributed.checkpoint.state_dict import set_state_dict

        tensors = self._sharded_state()
        if self.ema is not None and state.get("ema") is None:
            del tensors["ema"]   # a run without EMA: keep this one's
        alone = not (dist.is_available() and dist.is_initialized())
        try:
            with warnings.catch_warnings():   # one process loading: what it warns about
                warnings.filterwarnings("ignore", "torch.distributed is disabled")
                dcp.load(tensors, checkpoint_id=state["dcp"], no_dist=alone)
        except (Exception, CheckpointException) as e:   # noqa: BLE001 - damaged or foreign
            cause = e
            if isinstance(e, CheckpointException) and e.failures:   # the first rank's error
                cause = next(iter(e.failures.values()))   # (exception, its stack)
                cause = cause[0] if isinstance(cause, tuple) else cause
            raise TrainError(f"{state['dcp']}: cannot read the checkpoint "
                             f"({type(cause).__name__}: {cause})") from None
        set_state_dict(self.model, self.opt, model_state_dict=tensors["model"],
                       optim_state_dict=tensors["optimizer"])
        if "ema" in tensors:   # loaded in place into the EMA's own tensors
            self.ema.num_updates = int(state["ema"]["num_updates"])

    def _load_whole_into_shards(self, state: dict) -> None:
        """Load a one-process checkpoint (whole tensors, the optimizer's state by parameter
        index) into the sharded model, optimizer and EMA; each rank keeps its shards."""
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_state_dict

        names = [n for n, _ in self.model.named_parameters()]   # the optimizer's order
        saved = state["optimizer"]
        optim = {"state": {names[i]: v for i, v in saved["state"].items()},
                 "param_groups": [dict(g, params=[names[i] for i in g["params"]])
                                  for g in saved["param_groups"]]}
        set_state_dict(self.model, self.opt, model_state_dict=state["model"],
                       optim_state_dict=optim, options=StateDictOptions(full_state_dict=True))
        if self.ema is not None and state.get("ema") is not None:
            ema = state["ema"]
            with torch.no_grad():
                for n, s in self.ema.shadow.items():
                    _copy_whole_into(s, ema["shadow"][n])
                for n, b in self.ema.buffers.items():
                    b.copy_(ema["buffers"][n])
            self.ema.num_updates = int(ema.get("num_updates", 0))


def _full(t: torch.Tensor) -> torch.Tensor:
    """A DTensor's whole tensor (a collective), any other tensor as it is."""
    from torch.distributed.tensor import DTensor

    return t.full_tensor() if isinstance(t, DTensor) else t


def _copy_whole_into(dst: torch.Tensor, whole: torch.Tensor) -> None:
    """Copy ``whole`` into ``dst``: into this rank's shard when ``dst`` is a DTensor."""
    from torch.distributed.tensor import DTensor, distribute_tensor

    whole = whole.to(device=dst.device, dtype=dst.dtype)
    if isinstance(dst, DTensor):   # every rank has the whole tensor: no communication
        whole = distribute_tensor(whole, dst.device_mesh, dst.placements,
                                  src_data_rank=None).to_local()
        dst = dst.to_local()
    dst.copy_(whole)


# ---------------------------------------------------------------------------------------
# the command
# ---------------------------------------------------------------------------------------


def _check_run_flags(args: argparse.Namespace, steps: int, opts: dict) -> None:
    """The flags that are not settings of the run (checked before anything is loaded)."""
    if steps < 0:
        raise UsageError(f"--steps must be >= 0; got {steps}")
    for k in ("log_every", "ckpt_every"):
        if opts[k] < 1:
            raise UsageError(f"--{k.replace('_', '-')} must be >= 1; got {opts[k]}")
    if opts["eval_every"] < 0:
        raise UsageError(f"--eval-every must be >= 0 (0: only at the end); got {opts['eval_every']}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1; got {args.threads}")
    if args.sample_steps < 1:
        raise UsageError(f"--sample-steps must be >= 1; got {args.sample_steps}")
    if args.samples_per_class < 1:
        raise UsageError(f"--samples-per-class must be >= 1; got {args.samples_per_class}")


def _sampling_routes(config: dict, guidance: str) -> str | None:
    """The routes sparse guidance samples with: the run's own, else the default placement."""
    if guidance not in ("sparse", "sparse-cfg"):
        return None
    routes = resolve_routes(config["routes"], config["depth"])
    if routes is not None:
        return routes
    if config["depth"] < 3:
        raise UsageError(f"--guidance {guidance} routes at inference with the default placement, "
                         f"which needs --depth >= 3 (got {config['depth']}); use --guidance cfg "
                         f"or none")
    return default_routes(config["depth"])


def _where(trainer: Trainer) -> str:
    """``device cuda:0 (rank 0's), dtype bf16 (autocast)``: where and in what a run trains."""
    mine = " (rank 0's)" if trainer.parallel.world > 1 and trainer.device.type == "cuda" else ""
    amp = " (autocast)" if trainer.amp_dtype is not None else ""
    return f"device {trainer.device}{mine}, dtype {trainer.dtype}{amp}"


def _whole_models(trainer: Trainer) -> tuple[torch.nn.Module | None, DiT | None]:
    """The raw and the EMA model (``None`` without EMA), whole, for evaluation and sampling.
    Sharded, every rank must call this (the weights are gathered to rank 0) and the other
    ranks get ``(None, None)``."""
    raw = trainer.raw_model()
    return raw, trainer.ema_model() if trainer.ema is not None else None


def _eval_record(trainer: Trainer, evalset: EvalSet, wall: float,
                 models: tuple[torch.nn.Module, DiT | None]) -> dict:
    """The held-out losses of ``models`` (from :func:`_whole_models`) as a metrics record."""
    raw, ema_model = models
    what = "raw and EMA weights" if ema_model is not None else "raw weights"
    status(f"step {trainer.step}: evaluating the held-out loss ({len(evalset.x)} images x "
           f"{len(evalset.grid)} noise levels, {what}) ...")
    loss, per_t = evalset.loss(raw)
    rec = {"kind": "eval", "step": trainer.step, "heldout_loss": loss,
           "heldout_per_t": dict(zip([str(t) for t in evalset.grid], per_t)),
           "wall_s": round(wall, 3), "train_s": round(trainer.train_time, 3)}
    if ema_model is not None:
        rec["heldout_loss_ema"] = evalset.loss(ema_model)[0]
    ema = f" (EMA {rec['heldout_loss_ema']:.4f})" if "heldout_loss_ema" in rec else ""
    status(f"step {trainer.step}: held-out loss {loss:.4f}{ema}")
    return rec


def _samples(trainer: Trainer, args: argparse.Namespace, sparse_routes: str | None,
             model: DiT) -> np.ndarray:
    """The sample grid of ``model`` (the EMA model), one labelled row per class (8 x 8 for
    one class)."""
    data = trainer.data
    k = data.num_classes
    if k == 1:
        rows = cols = 8
        labels = torch.zeros(rows * cols, dtype=torch.long)
    else:
        rows = min(k, 16)
        cols = args.samples_per_class
        labels = torch.arange(rows).repeat_interleave(cols)
    null = data.num_classes if trainer.config["class_dropout"] > 0 else None
    guidance = args.guidance
    if guidance in ("cfg", "sparse-cfg") and null is None:
        guidance = "none" if guidance == "cfg" else "sparse"
    status(f"sampling {len(labels)} images ({rows} rows x {cols}; {args.sample_steps} Euler "
           f"steps, guidance {guidance}, EMA weights) ...")
    routed = tread_fx.route(model, sparse_routes) if sparse_routes is not None else None
    images = sample_images(model, labels, data.shape, steps=args.sample_steps,
                           seed=args.sample_seed, guidance=guidance, cfg_scale=args.cfg_scale,
                           null_class=null, routed=routed, gamma_strong=args.gamma_strong,
                           gamma_weak=args.gamma_weak, sparse_scale=args.sparse_scale,
                           progress=not args.no_progress)
    grid = image_grid(images, rows, data.kind)
    if k == 1:
        return grid
    names = data.class_names if len(data.class_names) == k else [str(i) for i in range(k)]
    return label_rows(grid, names[:rows])


@dataclass
class Setup:
    """What :func:`setup` found: the run's folder, checkpoint, settings and step target."""

    out: Path
    state: dict | None
    config: dict
    steps: int
    opts: dict
    sparse_routes: str | None
    device: torch.device = torch.device("cpu")
    #: the checkpoint that ``state`` comes from (None for a new run)
    resumed_from: Path | None = None
    #: FSDP2 (``--fsdp``): the checkpoint is ``checkpoint.dcp`` instead of ``checkpoint.pt``
    sharded: bool = False

    @property
    def ckpt_path(self) -> Path:
        """The checkpoint this run writes."""
        return self.out / (DCP_NAME if self.sharded else PT_NAME)


def _check_fsdp(args: argparse.Namespace, ranked: bool) -> None:
    """``--fsdp`` shards over the ranks of ``--nproc N`` (N >= 2) or of torchrun."""
    if getattr(args, "fsdp", False) and not ranked:
        given = f" with --nproc {args.nproc}" if getattr(args, "nproc", None) is not None else ""
        raise UsageError(f"--fsdp{given}: FSDP shards the model over several processes; pass "
                         f"--nproc N with N >= 2, or start the ranks with torchrun")


def setup(args: argparse.Namespace, parallel: Parallel | None = None, *,
          announce: bool = True) -> Setup:
    """Every check of the flags and of the checkpoint to resume, before any data are loaded
    or a model is built (``tread-fx train --nproc`` runs it before it starts processes)."""
    par = parallel or Parallel()
    world = par.world
    ranked = world > 1 or launched_by_torchrun()
    _check_fsdp(args, ranked)
    out = check_out(args.out)
    ckpt_path = find_checkpoint(out) if out.is_dir() else None
    state = None
    if args.resume:
        if ckpt_path is not None:
            state = load_checkpoint(ckpt_path)
        elif announce:
            print(f"note: --resume but {out} holds no {PT_NAME} or {DCP_NAME}; starting a new "
                  f"run", file=sys.stderr)
    elif not args.overwrite and (held := existing_checkpoints(out) if out.is_dir() else []):
        raise TrainError(f"{out} already holds a run ({held[0]}); pass --resume to continue "
                         f"it, --overwrite to start over, or choose another --out")
    config = resolve_config(args, state["config"] if state else None,
                            ckpt_path or out / PT_NAME)
    steps = DEFAULT_STEPS if args.steps is None else args.steps
    opts = dict(RUN_DEFAULTS, **((state or {}).get("run_options") or {}))
    opts.update({k: getattr(args, k) for k in RUN_DEFAULTS if getattr(args, k, None) is not None})
    check_config(config)
    _check_run_flags(args, steps, opts)
    if config["batch"] % world:
        given = "the checkpoint's --batch" if state is not None else "--batch"
        raise UsageError(f"{given} {config['batch']} is the global batch and must split evenly "
                         f"over {world} processes; use a number of processes that divides it")
    device = resolve_device(getattr(args, "device", None), config["dtype"], distributed=ranked,
                            world=world, local_rank=int(os.environ.get("LOCAL_RANK", "0")))
    return Setup(out, state, config, steps, opts, _sampling_routes(config, args.guidance), device,
                 resumed_from=ckpt_path if state is not None else None, sharded=par.fsdp)


def run(args: argparse.Namespace, parallel: Parallel | None = None,
        device: torch.device | str | None = None) -> dict:
    """Train (or continue) a run; returns a summary dict.

    Every flag is checked, and the routes parsed against ``--depth``, before the data are
    loaded or a model is built; the output folder is created only once the run can start,
    and removed again (if it is new and still empty) when the run fails.  With ``parallel``
    (the process group initialised) this is one rank of a data-parallel run: rank 0 prints,
    evaluates and writes; the other ranks only train.  ``device`` (the rank's own, from
    :mod:`.train_distributed`) overrides ``--device``.
    """
    par = parallel or Parallel()
    found = setup(args, par, announce=par.main)
    device = found.device if device is None else torch.device(device)
    out, state, config, steps, opts = found.out, found.state, found.config, found.steps, found.opts
    ckpt_path, metrics_path = found.resumed_from, out / "metrics.jsonl"
    say = status if par.main else (lambda message: None)
    if args.threads:
        torch.set_num_threads(args.threads)

    if config["data"] is not None:
        config["data"] = os.path.abspath(config["data"])
    say("loading the data ...")
    data = load_data(config["data"], patch=config["patch"], image_size=config["image_size"],
                     holdout=config["holdout"], kind=config["data_kind"])
    c, h, w = data.shape
    tokens = (h // config["patch"]) * (w // config["patch"])
    where = f"{tokens} tokens: {h}x{w} {data.kind} with --patch {config['patch']}"
    check_route_tokens(resolve_routes(config["routes"], config["depth"]), config["depth"],
                       tokens, where)
    check_route_tokens(found.sparse_routes, config["depth"], tokens, where)
    say(f"data   {data.describe()}")
    say("building and routing the model ...")
    trainer = Trainer(config, data, device=device, parallel=par)
    if state is not None and state["data"] != data.fingerprint():
        raise TrainError(f"{ckpt_path}: the data differ from the data the run was trained "
                         f"on ({state['data']['source']}); a resumed run needs the same data")
    n_params = sum(p.numel() for p in trainer.model.parameters() if p.requires_grad)
    routes = trainer.routes or "none (dense)"
    how = "FSDP2, sharded" if par.fsdp else "DDP"
    ranks = f", {par.world} processes ({how}, batch {config['batch'] // par.world} each)" \
        if par.world > 1 or par.fsdp else ""
    say(f"model  DiT depth {config['depth']} width {config['hidden']} patch {config['patch']} "
        f"({trainer.model.x_embedder.num_patches} tokens, {n_params / 1e6:.2f}M params), "
        f"routes {routes}, loss {config['loss']}{ranks}; {_where(trainer)}")

    with output_folder(out) if par.main else contextlib.nullcontext(out):
        if par.main:
            remove_stale(out)   # left by a run killed while saving
        records, wall0 = [], 0.0
        if state is not None:
            trainer.load_state_dict(state)
            if par.main:
                records = truncate_metrics(metrics_path, trainer.step)
                wall0 = max([r.get("wall_s", 0.0) for r in records] + [trainer.train_time])
            was, was_sharded = state.get("world_size", 1), bool(state.get("sharded"))
            now = ""
            if (was, was_sharded) != (par.world, par.fsdp):
                now = (f" on {par.world} process(es){' (FSDP)' * par.fsdp}, saved by {was}"
                       f"{' (FSDP)' * was_sharded}")
            say(f"resume step {trainer.step} -> {steps} from {ckpt_path}{now}")
            if trainer.step > steps:
                say(f"note: the run is already at step {trainer.step} > --steps {steps}; only "
                    f"the samples and the plot are written again")
        elif par.main:
            for name in ("metrics.jsonl", "samples.png", "loss.png"):
                (out / name).unlink(missing_ok=True)
        summary = _train(trainer, args, out, records, wall0, steps, opts, found.sparse_routes,
                         ckpt_path)
    return summary


def _train(trainer: Trainer, args: argparse.Namespace, out: Path, records: list[dict], wall0: float,
           steps: int, opts: dict, sparse_routes: str | None, resumed_from: Path | None) -> dict:
    """The training loop, the final evaluation, samples and plot of :func:`run` (the
    evaluations, samples, plot and every file on rank 0 only; sharded, every rank takes
    part in gathering the weights for them and in writing the checkpoint)."""
    config, data = trainer.config, trainer.data
    main, sharded = trainer.parallel.main, trainer.sharded
    ckpt_path, metrics_path = resumed_from, out / "metrics.jsonl"
    log_every, ckpt_every, eval_every = opts["log_every"], opts["ckpt_every"], opts["eval_every"]
    evalset = EvalSet(data) if main else None
    start_wall = time.perf_counter()
    ran = 0
    acc_loss, acc_n, acc_time = 0.0, 0, 0.0
    last_loss = float("nan")
    with open(metrics_path, "a") if main else contextlib.nullcontext() as mf:
        def emit(rec: dict) -> None:
            records.append(rec)
            if main:
                mf.write(json.dumps(rec) + "\n")
                mf.flush()

        def save() -> None:
            nonlocal ckpt_path
            ckpt_path = trainer.save(out, {"run_options": opts})

        bar = progress_bar(steps, initial=min(trainer.step, steps), desc="training",
                           enabled=main and not args.no_progress)
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
                bar.update(1)
                if s % log_every == 0 or s == steps:
                    last_loss = acc_loss / acc_n
                    sps = acc_n / acc_time
                    emit({"kind": "train", "step": s, "loss": last_loss, "steps_per_s": sps,
                          "wall_s": round(wall, 3), "train_s": round(trainer.train_time, 3),
                          "lr": trainer.lr_at(s - 1), "device": str(trainer.device),
                          "dtype": trainer.dtype})
                    bar.set_postfix(loss=f"{last_loss:.4f}", steps_per_s=f"{sps:.2f}", refresh=False)
                    acc_loss, acc_n, acc_time = 0.0, 0, 0.0
                if eval_every and s % eval_every == 0 and s != steps and (main or sharded):
                    models = _whole_models(trainer)   # sharded: every rank gathers
                    if main:
                        emit(_eval_record(trainer, evalset, wall, models))
                    del models
                if s % ckpt_every == 0 or s == steps:
                    save()
        finally:
            bar.close()
        if ran == 0 and resumed_from is None:   # --steps 0: the checkpoint of the new run
            save()
        if not main and not sharded:   # the other ranks are done: rank 0 evaluates, samples
            return {"out": str(out), "step": trainer.step, "steps_run": ran}
        raw, ema_model = _whole_models(trainer)   # sharded: every rank gathers, then is done
        if not main:
            return {"out": str(out), "step": trainer.step, "steps_run": ran}
        if not any(r.get("kind") == "eval" and r.get("step") == trainer.step for r in records):
            emit(_eval_record(trainer, evalset, wall0 + time.perf_counter() - start_wall,
                              (raw, ema_model)))
    if ema_model is None:   # no EMA: sample with the raw weights
        ema_model = build_model(config, data).to(trainer.device)
        ema_model.load_state_dict(raw.state_dict())
        ema_model.eval()

    t0 = time.perf_counter()
    write_png(out / "samples.png", _samples(trainer, args, sparse_routes, ema_model))
    sample_s = time.perf_counter() - t0
    routes = trainer.routes or "none (dense)"
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
        "device": str(trainer.device), "dtype": trainer.dtype,
    }
    print(f"step {trainer.step}: held-out loss {final_eval['heldout_loss']:.4f} (EMA "
          f"{final_eval.get('heldout_loss_ema', float('nan')):.4f}), {trainer.train_time:.1f} s "
          f"training in total")
    print(f"wrote {out / 'metrics.jsonl'}, {ckpt_path}, {out / 'samples.png'} "
          f"({args.guidance}), {out / 'loss.png'}")
    return summary


def main(args: argparse.Namespace) -> int:
    """``tread-fx train``; a :class:`~tread_fx.tools.errors.UsageError` (``TrainError`` and
    ``DataError`` are ones) propagates to ``tread_fx.tools.cli.main``, which prints it.

    ``--nproc N`` (N > 1) starts N data-parallel processes; a process torchrun started is
    one rank of such a run (:mod:`.train_distributed`)."""
    from . import train_distributed

    nproc = getattr(args, "nproc", None)
    if nproc is not None and nproc < 1:
        raise UsageError(f"--nproc must be >= 1; got {nproc}")
    if launched_by_torchrun() and nproc is None:
        train_distributed.worker(args)
    elif nproc is not None and nproc > 1:
        return train_distributed.main(args)
    else:
        run(args)
    return 0
