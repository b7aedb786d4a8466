"""``tread-fx convergence``: dense vs routed training, held-out loss against wall-clock.

What the command does, prints and writes is its ``--help`` text,
:data:`tread_fx.tools.train_config.CONVERGENCE_HELP` (with its flags, in
:mod:`.train_config`, so that building the ``tread-fx`` parser imports no plotting package).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from matplotlib.figure import Figure

from .data import load_data
from .errors import UsageError
from .train import EvalSet, Trainer
from .train_checkpoint import output_folder
from .train_config import (DEFAULTS, add_convergence_arguments, check_config, check_out,
                           check_route_tokens, resolve_device, resolve_routes)
from .train_plots import save_figure
from .train_progress import status

__all__ = ["add_arguments", "main", "run", "time_to_reach"]

#: The flags of ``tread-fx convergence`` (defined in :mod:`.train_config`).
add_arguments = add_convergence_arguments


def time_to_reach(curve: list[tuple[float, float]], level: float) -> tuple[float | None, float | None]:
    """First time a ``(seconds, loss)`` curve is at or below ``level``.

    Returns ``(interpolated, at_eval)``: linear interpolation between the evaluations just
    before and at the crossing, and the time of the first evaluation at or below the level;
    ``(None, None)`` when the curve never gets there.
    """
    for i, (t, loss) in enumerate(curve):
        if loss <= level:
            if i == 0:
                return t, t
            t0, l0 = curve[i - 1]
            frac = (l0 - level) / (l0 - loss) if l0 != loss else 1.0
            return t0 + frac * (t - t0), t
    return None, None


def _plot(path: Path, curves: dict[str, list[tuple[float, float]]], summary: dict) -> None:
    """Both runs' held-out loss against their training seconds, and where routed crosses."""
    fig = Figure(figsize=(7.5, 4.5))
    ax = fig.add_subplot(1, 1, 1)
    styles = {"dense": ("tab:blue", "dense"), "routed": ("tab:orange", f"routed {summary['routes']}")}
    for name, curve in curves.items():
        color, label = styles[name]
        ax.plot([t for t, _ in curve], [v for _, v in curve], "o-", ms=3, color=color, label=label)
    level = summary["dense_final_heldout"]
    ax.axhline(level, color="tab:blue", ls=":", lw=1, label=f"dense final {level:.4f}")
    if summary["routed_time_to_reach_s"] is not None:
        ax.axvline(summary["routed_time_to_reach_s"], color="tab:orange", ls=":", lw=1,
                   label=f"routed reaches it: {summary['time_ratio']:.2f} of dense time")
    ax.set_xlabel("training wall-clock of the run (s)")
    ax.set_ylabel("held-out loss (fixed t grid, fixed noise)")
    finals = [v for c in curves.values() for _, v in c[len(c) // 3:]]
    if finals:
        lo, hi = min(finals), max(finals)
        ax.set_ylim(lo - 0.1 * (hi - lo + 1e-6), hi + 0.6 * (hi - lo + 1e-6))
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title(f"{summary['model']}, batch {summary['batch']}, {summary['data']}", fontsize=8)
    fig.tight_layout()
    save_figure(fig, path)


def _check(args: argparse.Namespace, base: dict) -> tuple[str, torch.device]:
    """Every flag, before anything is loaded; returns the routed run's routes and the
    device."""
    check_out(args.out)
    check_config(base)
    routes = resolve_routes(base["routes"], base["depth"])
    if routes is None:
        raise UsageError("convergence compares dense with routed training: --routes must not "
                         "be none (give a route such as 2:8@0.5, or auto)")
    if not args.minutes > 0:
        raise UsageError(f"--minutes must be > 0; got {args.minutes:g}")
    if not args.eval_every > 0:
        raise UsageError(f"--eval-every must be > 0 seconds; got {args.eval_every:g}")
    if args.chunk < 1:
        raise UsageError(f"--chunk must be >= 1; got {args.chunk}")
    if args.threads is not None and args.threads < 1:
        raise UsageError(f"--threads must be >= 1; got {args.threads}")
    return routes, resolve_device(getattr(args, "device", None), base["dtype"])


def run(args: argparse.Namespace) -> dict:
    """Train both runs for ``--minutes`` each; returns the summary (also the last line of
    ``convergence.jsonl``)."""
    base = {k: getattr(args, k) for k in DEFAULTS if hasattr(args, k)}
    base["ema_decay"] = DEFAULTS["ema_decay"]
    routes, device = _check(args, base)
    if args.threads:
        torch.set_num_threads(args.threads)
    status("loading the data ...")
    data = load_data(base["data"], patch=base["patch"], image_size=base["image_size"],
                     holdout=base["holdout"], kind=base["data_kind"])
    _, h, w = data.shape
    tokens = (h // base["patch"]) * (w // base["patch"])
    check_route_tokens(routes, base["depth"], tokens,
                       f"{tokens} tokens: {h}x{w} {data.kind} with --patch {base['patch']}")
    print(f"data   {data.describe()}", file=sys.stderr)
    status("building the dense and the routed model and warming them up ...")
    runs = {"dense": Trainer(dict(base, routes="none"), data, ema=False, device=device),
            "routed": Trainer(dict(base, routes=routes), data, ema=False, device=device)}
    sd_d, sd_r = runs["dense"].model.state_dict(), runs["routed"].model.state_dict()
    assert all(torch.equal(sd_d[k], sd_r[k]) for k in sd_d), "the two runs must start equal"
    for tr in runs.values():  # first-call costs (allocator, kernels) outside the clocks
        tr.warmup()
    evalset = EvalSet(data)
    budget = args.minutes * 60.0
    model_name = (f"DiT depth {base['depth']} width {base['hidden']} patch {base['patch']} "
                  f"({runs['dense'].model.x_embedder.num_patches} tokens)")
    amp = " (autocast)" if base["dtype"] != "fp32" else ""
    print(f"model  {model_name}; routed: {routes}, loss {base['loss']}; device {device}, dtype "
          f"{base['dtype']}{amp}; {args.minutes:g} min "
          f"of training per run; a line per held-out evaluation (every {args.eval_every:g} s "
          f"of a run's training)", file=sys.stderr)

    with output_folder(args.out) as out:
        jsonl = out / "convergence.jsonl"
        jsonl.unlink(missing_ok=True)
        curves: dict[str, list[tuple[float, float]]] = {"dense": [], "routed": []}
        next_eval = {"dense": 0.0, "routed": 0.0}
        acc = {n: [0.0, 0] for n in runs}
        with open(jsonl, "w") as f:
            def evaluate(name: str) -> None:
                tr = runs[name]
                loss, per_t = evalset.loss(tr.model)
                curves[name].append((tr.train_time, loss))
                s, c = acc[name]
                rec = {"run": name, "step": tr.step, "train_s": round(tr.train_time, 3),
                       "heldout_loss": loss,
                       "heldout_per_t": dict(zip(map(str, evalset.grid), per_t)),
                       "train_loss": s / c if c else None}
                acc[name] = [0.0, 0]
                f.write(json.dumps(rec) + "\n")
                f.flush()
                while next_eval[name] <= tr.train_time:
                    next_eval[name] += args.eval_every
                print(f"  {name:6s} {tr.train_time:7.1f} s  step {tr.step:5d}  held-out {loss:.4f}",
                      file=sys.stderr, flush=True)

            for name in runs:
                evaluate(name)
            turn = 0
            while any(r.train_time < budget for r in runs.values()):
                order = ("dense", "routed") if turn % 2 == 0 else ("routed", "dense")
                turn += 1
                for name in order:
                    tr = runs[name]
                    for _ in range(args.chunk):
                        if tr.train_time >= budget:
                            break
                        t0 = time.perf_counter()
                        loss = tr.train_step()
                        tr.train_time += time.perf_counter() - t0
                        acc[name][0] += loss
                        acc[name][1] += 1
                        if tr.train_time >= next_eval[name] and tr.train_time < budget:
                            evaluate(name)
            for name in runs:
                evaluate(name)

            dense_final = curves["dense"][-1][1]
            dense_time = curves["dense"][-1][0]
            reach, reach_eval = time_to_reach(curves["routed"], dense_final)
            ratio = reach / dense_time if reach is not None else None
            sps = {n: r.step / r.train_time for n, r in runs.items()}
            summary = {
                "kind": "summary", "model": model_name, "routes": routes, "loss": base["loss"],
                "batch": base["batch"], "data": data.source, "minutes": args.minutes,
                "threads": torch.get_num_threads(), "device": str(device), "dtype": base["dtype"],
                "dense_steps": runs["dense"].step, "routed_steps": runs["routed"].step,
                "dense_steps_per_s": sps["dense"], "routed_steps_per_s": sps["routed"],
                "step_speedup": sps["routed"] / sps["dense"],
                "dense_final_heldout": dense_final, "dense_time_s": dense_time,
                "routed_final_heldout": curves["routed"][-1][1],
                "routed_time_to_reach_s": reach, "routed_time_to_reach_at_eval_s": reach_eval,
                "time_ratio": ratio, "target": args.target,
                "meets_target": ratio is not None and ratio <= args.target,
            }
            f.write(json.dumps(summary) + "\n")
        _plot(out / "convergence.png", curves, summary)
        return summary


def report(s: dict) -> str:
    lines = [
        f"{s['model']}, batch {s['batch']}, {s['minutes']:g} min of training per run, "
        f"{s['threads']} threads, device {s.get('device', 'cpu')}, dtype {s.get('dtype', 'fp32')}",
        f"dense : {s['dense_steps']} steps ({s['dense_steps_per_s']:.2f} steps/s), final held-out "
        f"loss {s['dense_final_heldout']:.4f} at {s['dense_time_s']:.1f} s",
        f"routed: {s['routed_steps']} steps ({s['routed_steps_per_s']:.2f} steps/s, "
        f"{s['step_speedup']:.2f}x), final held-out loss {s['routed_final_heldout']:.4f}",
    ]
    if s["time_ratio"] is None:
        lines.append(f"routed ({s['routes']}) did not reach the dense final loss "
                     f"{s['dense_final_heldout']:.4f} within its budget: target <= "
                     f"{s['target']:g} NOT met")
    else:
        lines.append(
            f"routed ({s['routes']}) reaches {s['dense_final_heldout']:.4f} at "
            f"{s['routed_time_to_reach_s']:.1f} s (first evaluation at or below: "
            f"{s['routed_time_to_reach_at_eval_s']:.1f} s) = {s['time_ratio']:.2f} of the dense "
            f"run's time: target <= {s['target']:g} {'met' if s['meets_target'] else 'NOT met'}")
    return "\n".join(lines)


def main(args: argparse.Namespace) -> int:
    """``tread-fx convergence``; a :class:`~tread_fx.tools.errors.UsageError` propagates to
    ``tread_fx.tools.cli.main``, which prints it as one line."""
    summary = run(args)
    print(json.dumps(summary) if args.json else report(summary))
    print(f"wrote {Path(args.out) / 'convergence.jsonl'}, {Path(args.out) / 'convergence.png'}",
          file=sys.stderr)
    return 0
