"""Train-step time of a routed vs the dense DiT, measured side by side, next to the FLOP ratio.

    tread-fx bench                       # DiT-S/2, 256 tokens, route 2:8@0.5
    tread-fx bench --model DiT-B/2 --routes 2:8@0.5 --batch 4 --steps 10

The two models step alternately in one process (dense, routed, routed, dense, ...), so load
on a shared machine hits both alike; the medians are compared.  FLOPs are counted for one
forward + backward with ``torch.utils.flop_counter``.  Bad flags are reported as one
``tread-fx bench: error: ...`` line (exit status 2) before a model is built; a status line on
stderr announces each phase and each timed step (``--no-progress`` turns them off).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time

import torch
from torch.utils.flop_counter import FlopCounterMode

import tread_fx
from tread_fx.models import DiT_models
from tread_fx.spec import kept_count, parse_spec

from .errors import UsageError

__all__ = ["add_arguments", "check_arguments", "main", "run"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="DiT-S/2", choices=sorted(DiT_models))
    p.add_argument("--routes", default="2:8@0.5", help="route spec, e.g. 2:8@0.5")
    p.add_argument("--input-size", type=int, default=32,
                   help="latent side; 32 with patch 2 gives 256 tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print one JSON object")
    p.add_argument("--no-progress", action="store_true", help="no status lines on stderr")


def check_arguments(args: argparse.Namespace) -> None:
    """Every flag, and the routes against the model's depth and token count, without
    building the model (its shapes come from a copy on the meta device)."""
    for flag, value, low in (("--batch", args.batch, 1), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0), ("--input-size", args.input_size, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}; got {value}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1; got {args.threads}")
    try:
        with torch.device("meta"):
            meta = DiT_models[args.model](input_size=args.input_size, num_classes=1000)
    except ValueError as e:
        raise UsageError(f"--input-size {args.input_size}: {e}; choose a multiple of "
                         f"{args.model}'s patch size") from None
    depth, tokens = len(meta.blocks), meta.x_embedder.num_patches
    try:
        spec = parse_spec(args.routes).resolve(depth, where=args.model)
        for r in spec.routes:
            kept_count(tokens, r.selection_ratio, f"route {r}")
    except (ValueError, TypeError) as e:
        raise UsageError(f"--routes {args.routes}: {e}; {args.model} at --input-size "
                         f"{args.input_size} has blocks 0..{depth - 1} and {tokens} tokens "
                         f"(a route such as 2:{min(8, depth - 1)}@0.5)") from None


def _step(model, opt, batch):
    x, t, y, target = batch
    opt.zero_grad(set_to_none=True)
    out = model(x, t, y)[:, : x.shape[1]]
    loss = torch.nn.functional.mse_loss(out, target)
    loss.backward()
    opt.step()


def _flops(model, batch) -> int:
    x, t, y, target = batch
    with FlopCounterMode(display=False) as counter:
        out = model(x, t, y)[:, : x.shape[1]]
        torch.nn.functional.mse_loss(out, target).backward()
    model.zero_grad(set_to_none=True)
    return counter.get_total_flops()


def run(args: argparse.Namespace) -> dict:
    """Time ``--steps`` alternating train steps of both models; returns the result dict."""
    check_arguments(args)
    quiet = getattr(args, "no_progress", False)

    def status(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    status(f"building {args.model} at --input-size {args.input_size} and routing it "
           f"({args.routes}) ...")
    torch.manual_seed(args.seed)
    dense = DiT_models[args.model](input_size=args.input_size, num_classes=1000)
    twin = DiT_models[args.model](input_size=args.input_size, num_classes=1000)
    twin.load_state_dict(dense.state_dict())
    routed = tread_fx.route(twin, args.routes)
    dense.train(), routed.train()
    gen = torch.Generator().manual_seed(args.seed)
    c = dense.in_channels
    batch = (torch.randn(args.batch, c, args.input_size, args.input_size, generator=gen),
             torch.rand(args.batch, generator=gen) * 999,
             torch.randint(0, 1000, (args.batch,), generator=gen),
             torch.randn(args.batch, c, args.input_size, args.input_size, generator=gen))
    tokens = dense.x_embedder.num_patches
    status("counting the FLOPs of one forward + backward of each ...")
    flops = {"dense": _flops(dense, batch), "routed": _flops(routed, batch)}
    models = {"dense": (dense, torch.optim.AdamW(dense.parameters(), lr=1e-4)),
              "routed": (routed, torch.optim.AdamW(routed.parameters(), lr=1e-4))}
    times = {"dense": [], "routed": []}
    total = args.warmup + args.steps
    status(f"timing {args.steps} train steps of each model, alternating, after "
           f"{args.warmup} warm-up steps ...")
    for i in range(total):
        order = ("dense", "routed") if i % 2 == 0 else ("routed", "dense")
        took = {}
        for name in order:
            model, opt = models[name]
            start = time.perf_counter()
            _step(model, opt, batch)
            took[name] = time.perf_counter() - start
            if i >= args.warmup:
                times[name].append(took[name])
        what = (f"warm-up {i + 1}/{args.warmup}" if i < args.warmup
                else f"step {i + 1 - args.warmup}/{args.steps}")
        status(f"  {what}: dense {took['dense']:.3f} s, routed {took['routed']:.3f} s")
    med = {k: statistics.median(v) for k, v in times.items()}
    flop_ratio = flops["routed"] / flops["dense"]
    predicted = 1 / flop_ratio
    measured = med["dense"] / med["routed"]
    return {
        "model": args.model, "tokens": tokens, "batch": args.batch, "routes": args.routes,
        "threads": torch.get_num_threads(), "steps": args.steps,
        "dense_step_s": med["dense"], "routed_step_s": med["routed"],
        "dense_gflop": flops["dense"] / 1e9, "routed_gflop": flops["routed"] / 1e9,
        "flop_ratio": flop_ratio, "predicted_speedup": predicted,
        "measured_speedup": measured, "fraction_of_predicted": measured / predicted,
    }


def report(r: dict) -> str:
    return "\n".join([
        f"{r['model']}  tokens {r['tokens']}  batch {r['batch']}  routes {r['routes']}  "
        f"threads {r['threads']}  steps {r['steps']} (median, alternating)",
        f"{'':22}{'dense':>10}{'routed':>10}",
        f"{'train step (s)':22}{r['dense_step_s']:>10.3f}{r['routed_step_s']:>10.3f}",
        f"{'fwd+bwd GFLOP':22}{r['dense_gflop']:>10.1f}{r['routed_gflop']:>10.1f}",
        f"FLOP ratio routed/dense   {r['flop_ratio']:.3f}  -> predicted speed-up "
        f"{r['predicted_speedup']:.2f}x",
        f"measured speed-up         {r['measured_speedup']:.2f}x  "
        f"= {r['fraction_of_predicted']:.2f} of predicted (target >= 0.90)",
    ])


def main(args: argparse.Namespace) -> int:
    """``tread-fx bench``; a :class:`~tread_fx.tools.errors.UsageError` propagates to
    ``tread_fx.tools.cli.main``, which prints it as one line."""
    result = run(args)
    print(json.dumps(result) if args.json else report(result))
    return 0
