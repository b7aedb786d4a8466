"""Train-step time, FLOPs and memory of a routed model vs the dense one, side by side.

    tread-fx bench                                    # DiT-S/2, 256 tokens, route 2:8@0.5
    tread-fx bench --model DiT-B/2 --compile full     # torch.compile of each model
    tread-fx bench --suite                            # DiT-S/2, DiT-B/2, diffusers SD3, each
                                                      #   eager and block-compiled: one table
    tread-fx bench --model DiT-XL/2 --routes 2:24@0.5 --device cuda --dtype bf16 --compile full

Per configuration three models train in one process, stepping in turn (dense, routed,
hand-written, then rotated), so load on a shared machine hits all alike; the medians are
compared:

* **dense**: the model as built;
* **routed**: ``tread_fx.route(model, ROUTES)`` (``--compile blocks``: with
  :func:`tread_fx.compile_blocks`);
* **hand-written** (reference DiTs only): the same routing written into a forward by hand,
  the way the official code does it (draw, gather before the route's first block, scatter
  after its last) — the routed GraphModule's overhead is measured against it.

Reported: step times; fwd+bwd FLOPs of each (``torch.utils.flop_counter`` on one joint
forward + backward), their ratio and the speed-up it predicts, the measured speed-up and its
fraction of the prediction; the bytes autograd saves for backward (activation memory; any
device) and on CUDA the peak memory a step allocates above what was allocated before it;
the seconds ``route()`` took.  Each model has its own copy of the weights and its own
AdamW.  ``--dtype bf16|fp16`` runs forward and loss under ``torch.autocast``;
``--fp32-after-route`` routes with ``fp32_after_route=True``.  Bad flags are reported as
one ``tread-fx bench: error: ...`` line (exit status 2) before a model is built.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, Callable

import torch
from torch import nn

import tread_fx
from tread_fx.models import DiT_models
from tread_fx.spec import kept_count, parse_spec

from . import bench_profile
from .errors import UsageError

__all__ = ["MODELS", "SUITE", "add_arguments", "check_arguments", "main", "run", "run_suite"]

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
COMPILE = ("none", "full", "blocks")
# torch.compile's modes; the CUDA-graph ones replay each compiled graph's kernels without
# launching them one by one from Python
COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")
CUDA_GRAPH_MODES = ("reduce-overhead", "max-autotune")
# a diffusers model at DiT-S/2's size: SD3's joint text/image blocks, 12 of them, width 384
SD3_S2 = dict(patch_size=2, in_channels=4, num_layers=12, attention_head_dim=64,
              num_attention_heads=6, joint_attention_dim=256, caption_projection_dim=384,
              pooled_projection_dim=128, out_channels=4)
SD3_TEXT_TOKENS = 32
MODELS = (*sorted(DiT_models), "diffusers-SD3-S/2")
# (model, routes, compile) of `--suite`: the two reference sizes and a diffusers model,
# eager and compiled
SUITE = tuple((m, "2:8@0.5", c) for m in ("DiT-S/2", "DiT-B/2", "diffusers-SD3-S/2")
              for c in ("none", "blocks"))


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="DiT-S/2", choices=MODELS)
    p.add_argument("--routes", default="2:8@0.5", help="route spec, e.g. 2:8@0.5")
    p.add_argument("--input-size", type=int, default=32,
                   help="latent side; 32 with patch 2 gives 256 tokens")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--steps", type=int, default=8, help="timed steps per model")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps first (compiled: these include the compile)")
    p.add_argument("--compile", default="none", choices=COMPILE,
                   help="none: eager; full: torch.compile(model); blocks: every block "
                        "compiled (tread_fx.compile_blocks for the routed model)")
    p.add_argument("--compile-mode", default="default", choices=COMPILE_MODES,
                   help="torch.compile's mode for --compile full or blocks "
                        "(reduce-overhead: CUDA graphs on a GPU)")
    p.add_argument("--device", default="cpu", help="cpu, cuda or cuda:N")
    p.add_argument("--dtype", default="fp32", choices=sorted(DTYPES),
                   help="fp32, or bf16/fp16 autocast")
    p.add_argument("--fp32-after-route", action="store_true",
                   help="route with fp32_after_route=True")
    p.add_argument("--route-in-autocast", action="store_true",
                   help="call route() inside the --dtype autocast the models train under "
                        "(an exported model then traces its autocast graph in route(), not "
                        "on the first step)")
    p.add_argument("--suite", action="store_true",
                   help="run DiT-S/2, DiT-B/2 and diffusers-SD3-S/2, each eager and with "
                        "compiled blocks (--model, --routes and --compile are ignored), "
                        "one table")
    p.add_argument("--profile", action="store_true",
                   help="also profile a few forward + backward passes of each model and print "
                        "where the time goes by kind of work (matmul, attention, norm, "
                        "routing, copies, other) beside each kind's FLOP ratio")
    p.add_argument("--no-hand-written", action="store_true",
                   help="skip the hand-written routed forward")
    p.add_argument("--threads", type=int, default=None, help="torch.set_num_threads")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", action="store_true", help="print JSON (a list with --suite)")
    p.add_argument("--no-progress", action="store_true", help="no status lines on stderr")


# -- the models --------------------------------------------------------------------------
@dataclass
class Bench:
    """One model family: how to build it, its inputs, and its output as a tensor."""
    build: Callable[[], nn.Module]
    inputs: Callable[[int, torch.Generator], tuple[tuple, dict, torch.Tensor]]
    output: Callable[[Any], torch.Tensor]
    depth: int
    tokens: int
    hand: Callable[[nn.Module, Any], Callable] | None = None


def _dit(name: str, size: int) -> Bench:
    def build():
        return DiT_models[name](input_size=size, num_classes=1000)

    with torch.device("meta"):
        meta = build()

    def inputs(batch, gen):
        c = meta.in_channels
        x = torch.randn(batch, c, size, size, generator=gen)
        return ((x, torch.rand(batch, generator=gen) * 999,
                 torch.randint(0, 1000, (batch,), generator=gen)), {},
                torch.randn(batch, c, size, size, generator=gen))

    return Bench(build, inputs, lambda out: out, len(meta.blocks), meta.x_embedder.num_patches,
                 hand=hand_routed_dit)


def _sd3(size: int) -> Bench:
    from diffusers import SD3Transformer2DModel

    def build():
        return SD3Transformer2DModel(sample_size=size, **SD3_S2)

    def inputs(batch, gen):
        x = torch.randn(batch, 4, size, size, generator=gen)
        return ((), {"hidden_states": x,
                     "encoder_hidden_states": torch.randn(
                         batch, SD3_TEXT_TOKENS, SD3_S2["joint_attention_dim"], generator=gen),
                     "pooled_projections": torch.randn(batch, SD3_S2["pooled_projection_dim"],
                                                       generator=gen),
                     "timestep": torch.rand(batch, generator=gen) * 999,
                     "return_dict": False},
                torch.randn(batch, 4, size, size, generator=gen))

    tokens = (size // SD3_S2["patch_size"]) ** 2
    return Bench(build, inputs, lambda out: out[0], SD3_S2["num_layers"], tokens)


def _bench_of(name: str, size: int) -> Bench:
    if name.startswith("diffusers-"):
        return _sd3(size)
    return _dit(name, size)


def hand_routed_dit(model: nn.Module, routes) -> Callable:
    """The routes written into DiT's forward by hand, as the official code does it: per
    route a uniform draw (``rand``, ``argsort``, the first ``kept``, in order), a gather
    before its first block and a scatter after its last."""
    starts = {r.start: r for r in routes}
    ends = {r.end for r in routes}

    def forward(x, t, y):
        h = model.x_embedder(x) + model.pos_embed
        c = model.t_embedder(t) + model.y_embedder(y, model.training)
        batch, tokens, width = h.shape
        saved = index = None
        for i, block in enumerate(model.blocks):
            route = starts.get(i) if model.training else None
            if route is not None:
                kept = kept_count(tokens, route.selection_ratio)
                ids = torch.rand(batch, tokens, device=h.device).argsort(dim=1)[:, :kept]
                index = ids.sort(dim=1).values.unsqueeze(-1).expand(-1, -1, width)
                saved, h = h, h.gather(1, index)
            h = block(h, c)
            if i in ends and saved is not None:
                h = saved.to(h.dtype).scatter(1, index, h)
                saved = None
        return model.unpatchify(model.final_layer(h, c))

    return forward


# -- checks ------------------------------------------------------------------------------
def check_arguments(args: argparse.Namespace) -> None:
    """Every flag, and the routes against each model's depth and token count, without
    building a model."""
    for flag, value, low in (("--batch", args.batch, 1), ("--steps", args.steps, 1),
                             ("--warmup", args.warmup, 0), ("--input-size", args.input_size, 1)):
        if value < low:
            raise UsageError(f"{flag} must be >= {low}; got {value}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1; got {args.threads}")
    try:
        device = torch.device(args.device)
    except RuntimeError:
        raise UsageError(f"--device {args.device}: not a device; use cpu, cuda or cuda:N") \
            from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UsageError(f"--device {args.device}: CUDA is not available on this machine; "
                         f"use --device cpu")
    if device.type not in ("cpu", "cuda"):
        raise UsageError(f"--device {args.device}: the bench runs on cpu or cuda")
    mode = getattr(args, "compile_mode", "default")
    if mode != "default" and args.compile == "none" and not args.suite:
        raise UsageError(f"--compile-mode {mode} needs --compile full or --compile blocks")
    for model, routes, _ in _configs(args):
        if model.startswith("diffusers-"):
            try:
                import diffusers  # noqa: F401
            except ImportError:
                raise UsageError(f"--model {model} needs diffusers: pip install "
                                 f"'tread-fx[diffusers]'") from None
        try:
            bench = _bench_of(model, args.input_size)
        except (ValueError, AssertionError) as e:
            raise UsageError(f"--input-size {args.input_size}: {e}; choose a multiple of "
                             f"{model}'s patch size") from None
        try:
            spec = parse_spec(routes).resolve(bench.depth, where=model)
            for r in spec.routes:
                kept_count(bench.tokens, r.selection_ratio, f"route {r}")
        except (ValueError, TypeError) as e:
            raise UsageError(f"--routes {routes}: {e}; {model} at --input-size "
                             f"{args.input_size} has blocks 0..{bench.depth - 1} and "
                             f"{bench.tokens} tokens (a route such as "
                             f"2:{min(8, bench.depth - 1)}@0.5)") from None


def _configs(args: argparse.Namespace) -> list[tuple[str, str, str]]:
    return list(SUITE) if getattr(args, "suite", False) else \
        [(args.model, args.routes, args.compile)]


# -- measuring ---------------------------------------------------------------------------
def _saved_bytes(run: Callable[[], torch.Tensor], params) -> int:
    """Bytes of the tensors autograd saves for backward during ``run()`` (distinct
    storages, parameters not counted): the activation memory of a train step, on any
    device."""
    storages: dict[Any, int] = {}
    weights = {(p.untyped_storage().data_ptr(), p.device) for p in params}

    def pack(t):
        s = t.untyped_storage()
        key = (s.data_ptr(), t.device)
        if key not in weights:
            storages[key] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = run()
    loss.backward()
    return sum(storages.values())


def run(args: argparse.Namespace, model: str | None = None, routes: str | None = None,
        compile_mode: str | None = None, check: bool = True) -> dict:
    """Measure one configuration (``--model``, ``--routes``, ``--compile`` unless given);
    returns the result dict."""
    if check:
        check_arguments(args)
    model = model or args.model
    routes = routes or args.routes
    compile_mode = compile_mode or args.compile
    quiet = getattr(args, "no_progress", False)

    def status(message: str) -> None:
        if not quiet:
            print(message, file=sys.stderr, flush=True)

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    dtype = DTYPES[args.dtype]
    cuda = device.type == "cuda"
    bench = _bench_of(model, args.input_size)
    spec = parse_spec(routes).resolve(bench.depth, where=model)
    status(f"[{model} {routes} compile={compile_mode} {args.dtype} on {device}] building ...")
    torch.manual_seed(args.seed)
    dense = bench.build().to(device)
    gen = torch.Generator().manual_seed(args.seed)
    call_args, call_kwargs, target = bench.inputs(args.batch, gen)
    move = lambda v: v.to(device) if isinstance(v, torch.Tensor) else v  # noqa: E731
    call_args = tuple(move(a) for a in call_args)
    call_kwargs = {k: move(v) for k, v in call_kwargs.items()}
    target = target.to(device)

    def twin() -> nn.Module:
        m = bench.build().to(device)
        m.load_state_dict(dense.state_dict())
        return m.train()

    if cuda:   # CUDA's one-time start-up (context, cuBLAS, attention kernels) is not route()'s
        with torch.no_grad():
            dense(*call_args, **call_kwargs)
        torch.cuda.synchronize(device)
    autocast = (torch.autocast(device.type, dtype=dtype) if dtype != torch.float32
                else nullcontext())
    status("  routing ...")
    twin_model = twin()
    start = time.perf_counter()
    with autocast if getattr(args, "route_in_autocast", False) else nullcontext():
        routed = tread_fx.route(twin_model, routes, fp32_after_route=args.fp32_after_route,
                                example_inputs=None if bench.hand else
                                (call_args, call_kwargs) if call_args else call_kwargs).train()
    route_s = time.perf_counter() - start
    dense.train()
    models: dict[str, Callable] = {"dense": dense, "routed": routed}
    params = {"dense": list(dense.parameters()), "routed": list(routed.parameters())}
    if bench.hand is not None and not args.no_hand_written:
        hand_model = twin()
        models["hand-written"] = bench.hand(hand_model, spec.routes)
        params["hand-written"] = list(hand_model.parameters())

    def loss_of(fn) -> torch.Tensor:
        with autocast:
            out = bench.output(fn(*call_args, **call_kwargs))
            return torch.nn.functional.mse_loss(out[:, : target.shape[1]].float(), target)

    # A routed model traced for other inputs traces a graph on its first call under a new
    # key (autocast after fp32 examples, another shape); its ops are not the step's.
    status("  one forward + backward of each model first ...")
    first_s = {}
    for name, fn in models.items():
        begin = time.perf_counter()
        loss_of(fn).backward()
        first_s[name] = time.perf_counter() - begin
    status("  counting FLOPs and saved activations of one forward + backward ...")
    flops_by_kind = {name: bench_profile.flops_by_kind(lambda fn=fn: loss_of(fn))
                     for name, fn in models.items()}
    flops = {name: sum(kinds.values()) for name, kinds in flops_by_kind.items()}
    saved = {name: _saved_bytes(lambda fn=fn: loss_of(fn), params[name])
             for name, fn in models.items()}
    mode = getattr(args, "compile_mode", "default") if compile_mode != "none" else "default"
    options = {} if mode == "default" else {"mode": mode}
    if compile_mode == "full":
        models = {name: torch.compile(fn, **options) for name, fn in models.items()}
    elif compile_mode == "blocks":
        # static shapes for every block, as compile_blocks does by default: the hand-written
        # route's blocks would otherwise compile the kept token count symbolically
        for block in _blocks(dense):
            block.compile(dynamic=False, **options)
        tread_fx.compile_blocks(routed, **options)
        if "hand-written" in models:
            for block in hand_model.blocks:
                block.compile(dynamic=False, **options)
    # CUDA graphs reuse their output memory: each step tells them a new step begins
    graphed = compile_mode != "none" and cuda and mode in CUDA_GRAPH_MODES
    new_step = torch.compiler.cudagraph_mark_step_begin if graphed else (lambda: None)
    opts = {name: torch.optim.AdamW(p, lr=1e-4) for name, p in params.items()}

    def sync() -> None:
        if cuda:
            torch.cuda.synchronize(device)

    def step(name: str) -> tuple[float, float]:
        """(forward + backward, whole step with AdamW) seconds."""
        sync()
        begin = time.perf_counter()
        new_step()
        opts[name].zero_grad(set_to_none=True)
        loss_of(models[name]).backward()
        sync()
        middle = time.perf_counter()
        opts[name].step()
        sync()
        return middle - begin, time.perf_counter() - begin

    names = list(models)
    times: dict[str, list[float]] = {n: [] for n in names}
    steps: dict[str, list[float]] = {n: [] for n in names}
    peak: dict[str, float | None] = {n: None for n in names}
    status(f"  {args.warmup} warm-up steps (compiles), then {args.steps} timed steps of each, "
           f"in turn ...")
    for i in range(args.warmup + args.steps):
        order = names[i % len(names):] + names[:i % len(names)]
        took = {}
        for name in order:
            if cuda and i == args.warmup:
                torch.cuda.reset_peak_memory_stats(device)
                before = torch.cuda.memory_allocated(device)
            took[name] = step(name)
            if cuda and i == args.warmup and not graphed:   # CUDA graphs: pool allocated
                peak[name] = torch.cuda.max_memory_allocated(device) - before
            if i >= args.warmup:
                times[name].append(took[name][0])
                steps[name].append(took[name][1])
        what = (f"warm-up {i + 1}/{args.warmup}" if i < args.warmup
                else f"step {i + 1 - args.warmup}/{args.steps}")
        status(f"  {what}: " + ", ".join(f"{n} {took[n][0]:.3f} s" for n in names)
               + " (forward + backward)")
    profiled = None
    if getattr(args, "profile", False):
        status("  profiling forward + backward of each model ...")

        def fwd_bwd(name: str) -> None:
            new_step()
            opts[name].zero_grad(set_to_none=True)
            loss_of(models[name]).backward()

        profiled = {"seconds": bench_profile.profile_steps(
            {n: lambda n=n: fwd_bwd(n) for n in names}, device), "flops": flops_by_kind}
    med = {n: statistics.median(v) for n, v in times.items()}
    step_med = {n: statistics.median(v) for n, v in steps.items()}
    flop_ratio = float(flops["routed"]) / float(flops["dense"])
    measured = med["dense"] / med["routed"]
    hand = med.get("hand-written")
    mb = lambda v: None if v is None else float(v) / 2**20  # noqa: E731
    return {
        "model": model, "tokens": bench.tokens, "batch": args.batch, "routes": routes,
        "compile": compile_mode if mode == "default" else f"{compile_mode} ({mode})",
        "device": str(device), "dtype": args.dtype,
        "device_name": torch.cuda.get_device_name(device) if cuda else "cpu",
        "threads": torch.get_num_threads(), "steps": args.steps,
        "fp32_after_route": args.fp32_after_route,
        "dense_fwd_bwd_s": med["dense"], "routed_fwd_bwd_s": med["routed"],
        "hand_fwd_bwd_s": hand,
        "dense_step_s": step_med["dense"], "routed_step_s": step_med["routed"],
        "hand_step_s": step_med.get("hand-written"),
        "dense_gflop": float(flops["dense"]) / 1e9, "routed_gflop": float(flops["routed"]) / 1e9,
        "hand_gflop": float(flops["hand-written"]) / 1e9 if "hand-written" in flops else None,
        "flop_ratio": flop_ratio, "predicted_speedup": 1 / flop_ratio,
        "measured_speedup": measured, "fraction_of_predicted": measured * flop_ratio,
        "step_speedup": step_med["dense"] / step_med["routed"],
        "overhead_vs_hand": None if hand is None else med["routed"] / hand - 1,
        "dense_saved_mb": mb(saved["dense"]), "routed_saved_mb": mb(saved["routed"]),
        "dense_peak_mb": mb(peak["dense"]), "routed_peak_mb": mb(peak["routed"]),
        "route_s": route_s, "first_call_s": first_s,
        "retraces": getattr(routed, "retraces", 0), "profile": profiled,
    }


def _blocks(model: nn.Module) -> list[nn.Module]:
    for name in ("blocks", "transformer_blocks"):
        if hasattr(model, name):
            return list(getattr(model, name))
    raise UsageError(f"--compile blocks: {type(model).__name__} has no blocks container")


def run_suite(args: argparse.Namespace) -> list[dict]:
    check_arguments(args)
    return [run(args, model, routes, mode, check=False) for model, routes, mode in _configs(args)]


# -- printing ----------------------------------------------------------------------------
def _fmt(value, spec: str, none: str = "-") -> str:
    return none if value is None else format(value, spec)


def report(results: list[dict]) -> str:
    """One row per configuration."""
    first = results[0]
    head = (f"{first['device_name']}  {first['dtype']}  batch {first['batch']}  "
            f"threads {first['threads']}  {first['steps']} timed steps (median, in turn)"
            + ("  fp32_after_route" if first["fp32_after_route"] else ""))
    cols = ("model", "tokens", "routes", "compile", "dense s", "routed s", "hand s",
            "FLOP ratio", "predicted", "measured", "of pred.", "overhead", "step",
            "saved MB d/r", "peak MB d/r", "route() s")
    rows = [cols]
    for r in results:
        rows.append((
            r["model"], str(r["tokens"]), r["routes"], r["compile"],
            f"{r['dense_fwd_bwd_s']:.4f}", f"{r['routed_fwd_bwd_s']:.4f}",
            _fmt(r["hand_fwd_bwd_s"], ".4f"), f"{r['flop_ratio']:.3f}",
            f"{r['predicted_speedup']:.2f}x", f"{r['measured_speedup']:.2f}x",
            f"{r['fraction_of_predicted']:.2f}", _fmt(r["overhead_vs_hand"], "+.1%"),
            f"{r['step_speedup']:.2f}x",
            f"{r['dense_saved_mb']:.0f}/{r['routed_saved_mb']:.0f}",
            "-" if r["dense_peak_mb"] is None else
            f"{r['dense_peak_mb']:.0f}/{r['routed_peak_mb']:.0f}",
            f"{r['route_s']:.2f}"))
    widths = [max(len(row[i]) for row in rows) for i in range(len(cols))]
    lines = [head, ""] + ["  ".join(c.rjust(w) if i >= 4 else c.ljust(w)
                                    for i, (c, w) in enumerate(zip(row, widths))).rstrip()
                          for row in rows]
    lines.append("")
    lines.append("times: median forward + backward; measured = dense / routed (the FLOPs "
                 "count forward + backward); of pred. = measured / predicted (target >= 0.95);")
    lines.append("overhead = routed vs hand-written routed forward (target <= 2%); step = "
                 "speed-up of the whole step with AdamW; saved = activations saved for backward")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``tread-fx bench``; a :class:`~tread_fx.tools.errors.UsageError` propagates to
    ``tread_fx.tools.cli.main``, which prints it as one line."""
    results = run_suite(args)
    print(json.dumps(results if args.suite else results[0]) if args.json
          else report(results))
    for r in results:
        if r.get("profile") and not args.json:
            print(f"\n{r['model']} {r['routes']} compile={r['compile']}: "
                  + bench_profile.report(r["profile"]["seconds"], r["profile"]["flops"]))
    return 0
