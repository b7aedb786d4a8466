"""``tread-fx verify``: prove on a model that routing it computes TREAD.

    tread-fx verify FluxTransformer2DModel --routes 1:2@0.5
    tread-fx verify mypkg.models:make_model --routes 2:-3@0.5
    tread-fx verify DiT-S/2

MODEL is what ``tread-fx inspect`` takes: a reference DiT, a zoo model, any diffusers
transformer class (its tiny configuration), or ``pkg.module:factory`` returning ``(model,
example_inputs)`` -- your own model with your own weights.  Runs :func:`tread_fx.verify`:
eval output equal to the model's, the ratio-0 train step (output and every gradient)
equal, the routed train step at the spec's ratios equal to an independent reference (the
dense model with the dropped tokens hidden from attention and reset after each routed
block), and no dropped row that the output never reads.  Prints the report with, per
route, the tokens kept, the rows never routed and the side inputs gathered.

Built-in models (reference and zoo) get small noise on every parameter first: their
zero-initialised output layers would make the model ignore its blocks and every check
vacuous.  A factory's model is checked as it is (a model that ignores its blocks is
reported "inconclusive").  Exit status 0: verified; 1: not verified; 2: bad input or a
model route() refuses (the reason names the block).
"""

from __future__ import annotations

import argparse
import sys

from .errors import UsageError

__all__ = ["add_arguments", "main"]


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", metavar="MODEL",
                   help="a reference DiT (DiT-S/2 ...), a zoo model, a diffusers class name "
                        "or pkg.module:factory returning (model, example_inputs)")
    p.add_argument("--routes", metavar="SPEC", default=None,
                   help="route spec (default: 2:8@0.5 for DiT-*, the zoo's span at 0.5, "
                        "else 1:-2@0.5)")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights, the example and "
                   "the token draw")
    p.add_argument("--front-end", choices=("fx", "export", "concrete"), default=None,
                   help="the tracer route() uses (default: the first that works)")
    p.add_argument("--input-size", type=int, default=None, help="latent side of a DiT-* model")
    p.add_argument("--batch", type=int, default=None, help="samples in a DiT-* example")


def main(args: argparse.Namespace) -> int:
    import tread_fx
    from tread_fx.spec import parse_spec
    from tread_fx.tools.zoo import perturb_

    from .front_ends import _refusal_types
    from .inspect import load_model

    if args.routes is not None:
        try:
            parse_spec(args.routes)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--routes {args.routes!r}: {err}") from None
    model, example, default_routes, label = load_model(args.model, args.input_size,
                                                       args.batch, args.seed)
    if ":" not in args.model:
        perturb_(model, seed=args.seed)
    spec = args.routes or default_routes
    print(f"verifying {label} with routes {spec} ...", file=sys.stderr, flush=True)
    try:
        report = tread_fx.verify(model, spec, example, seed=args.seed,
                                 front_end=args.front_end)
    except _refusal_types() as err:
        raise UsageError(f"{label} cannot be routed with {spec}: {err}".split("\n")[0]) \
            from None
    print(report)
    return 0 if report.ok else 1
