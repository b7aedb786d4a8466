"""``tread-fx backbones``: the support table, measured by routing each backbone.

For each backbone of :mod:`tread_fx.tools.zoo`: which front end traced it, whether ratio 0
is the original bit for bit (outputs and every gradient, train mode), whether eval mode
is the original at ratio 0.5, and whether a ratio-0.5 training step (forward and
backward) computes what an independent reference computes from the same kept indices
(:mod:`tread_fx.reference`: the original model run densely with masked attention
and the dropped tokens reset after each routed block, or a hand-written routed forward for
the SSM).  The tests assert the same facts through :func:`check_backbone`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import tread_fx

from tread_fx.reference import reference
from .zoo import BACKBONES, DIFFUSERS, build

__all__ = ["TOLERANCE", "check_backbone", "compare_with_reference", "main",
           "add_arguments"]

# Routed vs reference: max abs difference relative to the reference's max abs value.
TOLERANCE = 1e-5


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _train_step(model, params, inputs, seed, forward=None):
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    out = forward() if forward is not None else _call(model, inputs)
    out = out[0] if isinstance(out, (tuple, list)) else out
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def _spans(spec: str, depth: int) -> list[tuple[int, int]]:
    """``"1:3@0.5,4:5@0.5"`` -> ``[(1, 3), (4, 5)]`` (negative indices count from the end)."""
    return [tuple(int(v) % depth for v in part.split("@")[0].split(":"))
            for part in spec.split(",")]


def compare_with_reference(name: str, model, routed, inputs, spec: str,
                           seed: int = 1) -> dict[str, Any]:
    """One train step (forward, backward) of ``routed`` and of the reference on its indices.

    ``routed`` must be in train mode and route ``model`` with ``spec`` (``"start:end@r"``
    routes, indices into ``routed.block_chain``).  The label dropout of both runs draws from the
    same seed.  Returns the max abs differences of the outputs and of every parameter's
    gradient (the output's relative to the reference output's max abs value, the gradients'
    to the largest reference gradient entry), and whether both are within :data:`TOLERANCE`.
    """
    params = dict(model.named_parameters())
    model.train()
    out, grads = _train_step(routed, params, inputs, seed)
    indices = [s.last_indices for s in routed.selectors]
    if any(i is None for i in indices):
        raise RuntimeError(f"{name}: a route did not draw indices (is `routed` in train mode?)")
    blocks = [model.get_submodule(t) for t in routed.block_chain]
    ref, ref_grads = _train_step(model, params, inputs, seed, lambda: reference(
        model, inputs, blocks, _spans(spec, len(blocks)), indices))
    scale = ref.abs().max().item() or 1.0
    out_diff = (out - ref).abs().max().item()
    # gradients relative to the largest gradient entry of any parameter: some are zero up
    # to rounding (a key projection's bias does not change a softmax), so a per-parameter
    # scale would measure noise
    g_scale = max((g.abs().max().item() for g in ref_grads.values()), default=0.0) or 1.0
    grad_rel = 0.0 if ref_grads.keys() == grads.keys() else float("inf")
    for k in ref_grads.keys() & grads.keys():
        grad_rel = max(grad_rel, (grads[k] - ref_grads[k]).abs().max().item() / g_scale)
    return {"max_abs_diff": out_diff, "scale": scale, "grad_rel_diff": grad_rel,
            "finite": bool(torch.isfinite(out).all()), "grads": len(grads),
            "equal": out_diff <= TOLERANCE * scale and grad_rel <= TOLERANCE
            and bool(torch.isfinite(out).all())}


def check_backbone(name: str) -> dict[str, Any]:
    """Route backbone ``name`` and measure the facts of the support table."""
    model, inputs, span = build(name)
    params = dict(model.named_parameters())
    r0 = tread_fx.route(model, f"{span}@0", example_inputs=inputs).train()
    model.train()
    out_d, g_d = _train_step(model, params, inputs, 0)
    out_r, g_r = _train_step(r0, params, inputs, 0)
    ratio0 = torch.equal(out_d, out_r) and g_d.keys() == g_r.keys() and all(
        torch.equal(g_d[k], g_r[k]) for k in g_d)
    routed = tread_fx.route(model, f"{span}@0.5", example_inputs=inputs)
    routed.eval(), model.eval()
    with torch.no_grad():
        eval_equal = torch.equal(_call(routed, inputs), _call(model, inputs))
    routed.train()
    ref = compare_with_reference(name, model, routed, inputs, f"{span}@0.5")
    return {"backbone": name, "front_end": r0.front_end, "chain": r0.block_chain,
            "route": f"{span}@0.5", "prefix": routed.selectors[0].prefix,
            "side_inputs": sum(1 for n in routed.graph.nodes
                               if n.meta.get("tread", {}).get("role") == "side"),
            "ratio0_bit_equal": ratio0, "eval_equal": eval_equal,
            "equals_reference": ref["equal"], "reference_max_diff": ref["max_abs_diff"],
            "reference_scale": ref["scale"], "reference_grad_diff": ref["grad_rel_diff"],
            # kept for callers of the old table: the ratio-0.5 step runs AND is correct
            "trains_at_half": ref["equal"] and ref["grads"] > 0,
            "grads": ref["grads"], "trainable": sum(p.requires_grad for p in params.values())}


def add_arguments(p: argparse.ArgumentParser) -> None:
    from . import support
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers models")
    g = p.add_argument_group("every diffusers transformer (tread_fx.tools.support)")
    g.add_argument("--diffusers", action="store_true",
                   help="instead: route and verify every class of the diffusers zoo and "
                        "print the support table with its totals (about an hour on 2 cores)")
    support.add_arguments(g)


def main(args: argparse.Namespace) -> int:
    if args.diffusers:
        from . import support
        return support.main(args)
    names = list(BACKBONES)
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise SystemExit("tread-fx backbones: the diffusers rows need `pip install "
                             "diffusers`; or pass --no-diffusers") from None
        names += list(DIFFUSERS)
    print("| backbone | traced by | blocks | side inputs gathered | prefix kept | "
          "ratio 0 bit-equal | eval equal | r=0.5 = reference (max abs diff) |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ok = True
    for name in names:
        r = check_backbone(name)
        ok &= r["ratio0_bit_equal"] and r["eval_equal"] and r["equals_reference"]
        yes = {True: "yes", False: "**no**"}
        print(f"| {name} | {r['front_end']} | {len(r['chain'])} | {r['side_inputs']} | "
              f"{r['prefix']} | {yes[r['ratio0_bit_equal']]} | {yes[r['eval_equal']]} | "
              f"{yes[r['equals_reference']]} ({r['reference_max_diff']:.1e}) |")
    return 0 if ok else 1
