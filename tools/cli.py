"""The ``tread-fx`` command."""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Callable

from .errors import UsageError

__all__ = ["main"]

#: Packages of the ``train`` extra that ``train`` and ``convergence`` import.
_TRAIN_EXTRA = ("PIL", "matplotlib", "mlxtend", "tqdm")


def _command(name: str) -> Callable[[argparse.Namespace], int]:
    """``main`` of the module ``name``, imported when the command runs: the ``train`` and
    ``convergence`` modules need the ``train`` extra, which the other commands do not."""

    def run(args: argparse.Namespace) -> int:
        try:
            module = importlib.import_module(f"{__package__}.{name}")
        except ModuleNotFoundError as e:
            if (e.name or "").split(".")[0] not in _TRAIN_EXTRA:
                raise
            raise UsageError(f"needs {e.name.split('.')[0]}, which the train extra installs: "
                             f"pip install 'tread-fx[train]'") from None
        return module.main(args)

    return run


def build_parser() -> argparse.ArgumentParser:
    from . import backbones, bench

    parser = argparse.ArgumentParser(prog="tread-fx", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("bench", help="train-step time routed vs dense, next to the FLOP ratio")
    bench.add_arguments(p)
    p.set_defaults(func=bench.main)
    p = sub.add_parser("backbones", help="route every reference backbone (and diffusers "
                       "models) and print the support table")
    backbones.add_arguments(p)
    p.set_defaults(func=backbones.main)
    from . import inspect as inspect_cmd
    p = sub.add_parser("inspect", help="per-block tokens and FLOPs of a routed model, its "
                       "inserted nodes, graph diff and drawing", description=inspect_cmd.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    inspect_cmd.add_arguments(p)
    p.set_defaults(func=inspect_cmd.main)
    from . import verify as verify_cmd
    p = sub.add_parser("verify", help="prove that routing a model computes TREAD: eval and "
                       "ratio 0 equal to the model, the routed step equal to an independent "
                       "reference", description=verify_cmd.__doc__,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    verify_cmd.add_arguments(p)
    p.set_defaults(func=verify_cmd.main)
    from . import train_config

    p = sub.add_parser("train", help="train a small DiT with or without routing (default: "
                       "MNIST-5k digits, a few minutes on a CPU)",
                       description=train_config.TRAIN_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    train_config.add_train_arguments(p)
    p.set_defaults(func=_command("train"))
    p = sub.add_parser("convergence", help="dense vs routed held-out loss against wall-clock, "
                       "same seed, data and budget",
                       description=train_config.CONVERGENCE_HELP,
                       formatter_class=argparse.RawDescriptionHelpFormatter)
    train_config.add_convergence_arguments(p)
    p.set_defaults(func=_command("convergence"))
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run ``tread-fx``; bad input (a :class:`~tread_fx.tools.errors.UsageError`) is printed
    as ``tread-fx <command>: error: <message>`` on stderr and gives exit status 2."""
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except UsageError as e:
        message = " ".join(str(e).splitlines())
        print(f"tread-fx {args.command}: error: {message}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
