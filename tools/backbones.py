"""``tread-fx backbones``: the support table, measured by routing each backbone.

For each backbone of :mod:`tread_fx.tools.zoo`: which front end traced it, whether ratio 0
is the original bit for bit (outputs and every gradient, train mode), whether eval mode
is the original at ratio 0.5, and whether a ratio-0.5 training step runs (forward and
backward).  The tests assert the same facts through :func:`check_backbone`.
"""

from __future__ import annotations

import argparse
from typing import Any

import torch

import tread_fx

from .zoo import BACKBONES, DIFFUSERS, build

__all__ = ["check_backbone", "main", "add_arguments"]


def _call(model, inputs):
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return out[0] if isinstance(out, (tuple, list)) else out


def _train_step(model, params, inputs, seed):
    for p in params.values():
        p.grad = None
    torch.manual_seed(seed)
    out = _call(model, inputs)
    out.float().square().mean().backward()
    return out.detach(), {n: p.grad.clone() for n, p in params.items() if p.grad is not None}


def check_backbone(name: str) -> dict[str, Any]:
    """Route backbone ``name`` and measure the three facts of the support table."""
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
    out, grads = _train_step(routed, params, inputs, 1)
    trains = bool(torch.isfinite(out).all()) and len(grads) > 0
    return {"backbone": name, "front_end": r0.front_end, "chain": r0.block_chain,
            "route": f"{span}@0.5", "prefix": routed.selectors[0].prefix,
            "side_inputs": sum(1 for n in routed.graph.nodes
                               if n.meta.get("tread", {}).get("role") == "side"),
            "ratio0_bit_equal": ratio0, "eval_equal": eval_equal, "trains_at_half": trains,
            "grads": len(grads), "trainable": sum(p.requires_grad for p in params.values())}


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--no-diffusers", action="store_true", help="skip the diffusers models")


def main(args: argparse.Namespace) -> int:
    names = list(BACKBONES)
    if not args.no_diffusers:
        try:
            import diffusers  # noqa: F401
        except ImportError:
            raise SystemExit("tread-fx backbones: the diffusers rows need `pip install "
                             "diffusers`; or pass --no-diffusers") from None
        names += list(DIFFUSERS)
    print("| backbone | traced by | blocks | side inputs gathered | prefix kept | "
          "ratio 0 bit-equal | eval equal | r=0.5 trains |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    ok = True
    for name in names:
        r = check_backbone(name)
        ok &= r["ratio0_bit_equal"] and r["eval_equal"] and r["trains_at_half"]
        yes = {True: "yes", False: "**no**"}
        print(f"| {name} | {r['front_end']} | {len(r['chain'])} | {r['side_inputs']} | "
              f"{r['prefix']} | {yes[r['ratio0_bit_equal']]} | {yes[r['eval_equal']]} | "
              f"{yes[r['trains_at_half']]} |")
    return 0 if ok else 1
