"""Print and draw what the rewrite did to a model: ``tread-fx inspect``.

    tread-fx inspect DiT-S/2 --routes 2:8@0.5                 # per-block table and routes
    tread-fx inspect DiT-S/2 --graph --draw routes.svg        # + graph diff, a figure
    tread-fx inspect PixArtTransformer2DModel --routes 1:2@0.5
    tread-fx inspect mypkg.models:make_model --routes 1:-2@0.5

MODEL is one of

* a reference DiT of :mod:`tread_fx.models` (``DiT-S/2`` ... ``DiT-XL/8``; ``--input-size``
  and ``--batch`` set the example: random latents, times and labels);
* a model of the zoo :mod:`tread_fx.tools.zoo` (small configurations with example inputs):
  ``U-ViT``, ``RoPE DiT``, ``MMDiT``, ``SSM``, ``ViT`` (with a class token), ``DiT`` (the
  zoo's tiny one), or a diffusers class ``DiTTransformer2DModel``,
  ``PixArtTransformer2DModel``, ``SD3Transformer2DModel`` (the zoo's full names, such as
  ``"U-ViT (models.uvit)"``, work too; case and punctuation do not matter);
* any diffusers transformer class by name (``FluxTransformer2DModel``, ...): its tiny
  configuration and example inputs from :mod:`tread_fx.tools.diffusers_zoo`;
* ``pkg.module:factory``: an importable module (the current directory is searched too)
  and a callable in it that takes no arguments and returns ``(model, example_inputs)``:
  an ``nn.Module`` and a tuple of positional or a dict of keyword arguments of its
  forward.  (Token counts and FLOPs are measured on them, so a bare model is refused.)

The table comes from :func:`tread_fx.explain`: tokens per sample each block sees in a
train-mode forward, and forward+backward FLOPs of each block dense vs routed, counted with
``torch.utils.flop_counter`` on the model at the example's shapes.
"""

from __future__ import annotations

import argparse
import importlib
import importlib.util
import os
import re
import sys
from pathlib import Path
from typing import Any

from torch import fx, nn

from tread_fx.explain import DRAW_FORMATS, Explanation, explain
from tread_fx.module import TreadGraphModule
from tread_fx.passes.insert_routes import TREAD_META

from .errors import UsageError

__all__ = ["summary", "route_nodes", "to_dot", "add_arguments", "main", "load_model",
           "inspect_model", "Explanation"]

DEFAULT_MODEL = "DiT-B/2"
DEFAULT_INPUT_SIZE = 32


def route_nodes(graph: fx.Graph) -> list[fx.Node]:
    """The TREAD nodes of a graph, in graph order."""
    return [n for n in graph.nodes if TREAD_META in n.meta]


def summary(routed: TreadGraphModule) -> str:
    """A table of the routes of ``routed``: blocks, ratio, token counts, inserted nodes."""
    chain = getattr(routed, "block_chain", ())
    lines = [f"{type(routed).__name__}: {len(chain)} blocks "
             f"({chain[0]}..{chain[-1]})" if chain else f"{type(routed).__name__}"]
    header = f"{'route':>5}  {'blocks':<30} {'ratio':>5}  {'tokens':>6}  {'kept':>5}  nodes"
    lines.append(header)
    by_route: dict[int, list[fx.Node]] = {}
    for node in route_nodes(routed.graph):
        by_route.setdefault(node.meta[TREAD_META]["route_index"], []).append(node)
    for selector in routed.selectors:
        nodes = by_route.get(selector.index, [])
        meta = nodes[0].meta[TREAD_META] if nodes else {}
        span = f"{selector.route.start}..{selector.route.end} " \
               f"({selector.blocks[0]}..{selector.blocks[-1]})"
        lines.append(f"{selector.index:>5}  {span:<30} {selector.selection_ratio:>5g}  "
                     f"{meta.get('tokens', '?'):>6}  {meta.get('kept', '?'):>5}  "
                     f"{', '.join(n.name for n in nodes)}")
    if not routed.selectors:
        lines.append("  (no routes: dense)")
    return "\n".join(lines)


def _label(node: fx.Node) -> str:
    if node.op == "call_module":
        return f"{node.name}\\n{node.target}"
    if node.op == "call_function":
        return f"{node.name}\\n{getattr(node.target, '__name__', node.target)}"
    return node.name


def to_dot(graph: fx.Graph, name: str = "routed") -> str:
    """Graphviz DOT text of ``graph``; TREAD nodes are filled, blocks are boxes.

    Render with ``dot -Tsvg routed.dot -o routed.svg`` (Graphviz is not a dependency).
    """
    lines = [f'digraph "{name}" {{', "  rankdir=TB; node [fontsize=10];"]
    for node in graph.nodes:
        attrs = {"label": _label(node), "shape": "ellipse"}
        if TREAD_META in node.meta:
            attrs.update(style="filled", fillcolor="orange", shape="box")
        elif node.op == "call_module":
            attrs["shape"] = "box"
        elif node.op in ("placeholder", "output"):
            attrs["shape"] = "plaintext"
        rendered = ", ".join(f'{k}="{v}"' for k, v in attrs.items())
        lines.append(f'  "{node.name}" [{rendered}];')
        for inp in node.all_input_nodes:
            lines.append(f'  "{inp.name}" -> "{node.name}";')
    lines.append("}")
    return "\n".join(lines) + "\n"


# -- MODEL ------------------------------------------------------------------------------
def _key(name: str) -> str:
    """Names compare without case and punctuation: ``dit-s/2`` is ``DiT-S/2``."""
    return re.sub(r"[^0-9a-z]", "", name.lower())


def _zoo_names() -> dict[str, str]:
    """Accepted spellings of the zoo's models -> the zoo's own name."""
    from .zoo import BACKBONES, DIFFUSERS
    names: dict[str, str] = {}
    for full in BACKBONES:                     # "U-ViT (models.uvit)"
        short, _, module = full.partition(" (")
        module = module.rstrip(")")
        for alias in (full, short, module, module.rpartition(".")[2], short.split()[0]):
            names.setdefault(_key(alias), full)
    for full in DIFFUSERS:                     # "diffusers PixArtTransformer2DModel"
        for alias in (full, full.split()[-1]):
            names.setdefault(_key(alias), full)
    return names


def _known_models() -> str:
    from tread_fx.models import DiT_models
    from .zoo import BACKBONES, DIFFUSERS
    zoo = [n.partition(" (")[0] for n in BACKBONES] + [n.split()[-1] for n in DIFFUSERS]
    return (f"a reference model ({', '.join(sorted(DiT_models, key=_dit_order))}), a zoo "
            f"model ({', '.join(zoo)}), any diffusers transformer class (FluxTransformer2DModel, "
            f"WanTransformer3DModel, ...: tiny configs of tread_fx.tools.diffusers_zoo) or "
            f"pkg.module:factory")


def _dit_order(name: str) -> tuple:
    size, patch = name[4:].split("/")
    return ("SBLX".index(size[0]), int(patch))


def _from_factory(text: str) -> tuple[nn.Module, Any]:
    module_name, _, attr = text.partition(":")
    if not module_name or not attr:
        raise UsageError(f"MODEL {text!r}: write a factory as pkg.module:callable")
    here = os.getcwd()
    searched = here not in sys.path and "" not in sys.path   # modules in the current folder
    if searched:
        sys.path.append(here)
    try:
        obj: Any = importlib.import_module(module_name)
    except ImportError as err:
        raise UsageError(f"MODEL {text!r}: cannot import {module_name!r} ({err}); give a module "
                         f"importable from here (installed, or in the current folder)") from None
    finally:
        if searched:
            sys.path.remove(here)
    for part in attr.split("."):
        try:
            obj = getattr(obj, part)
        except AttributeError:
            raise UsageError(f"MODEL {text!r}: {module_name} has no attribute {attr!r}; name "
                             f"a callable defined in it") from None
    if isinstance(obj, nn.Module) or not callable(obj):
        raise UsageError(f"MODEL {text!r}: {attr} is a {type(obj).__name__}, not a callable; "
                         f"name a function that returns (model, example_inputs)")
    result = obj()
    if isinstance(result, tuple) and len(result) == 2 and isinstance(result[0], nn.Module):
        return result
    if isinstance(result, nn.Module):
        raise UsageError(f"MODEL {text!r}: {attr}() returned a model without example inputs; "
                         f"return (model, example_inputs) (a tuple of positional or a dict "
                         f"of keyword arguments of its forward), which the counts run on")
    raise UsageError(f"MODEL {text!r}: {attr}() returned {type(result).__name__}; return "
                     f"(model, example_inputs)")


def load_model(name: str, input_size: int | None = None, batch: int | None = None,
               seed: int = 0) -> tuple[nn.Module, Any, str, str]:
    """MODEL -> (model, example inputs, default routes, display name); see the module doc.

    Raises :class:`~tread_fx.tools.errors.UsageError` for a name it does not know.
    """
    import torch

    from tread_fx.models import DiT_models
    dit = {_key(k): k for k in DiT_models}
    sized = input_size is not None or batch is not None
    if _key(name) in dit:
        full = dit[_key(name)]
        size = DEFAULT_INPUT_SIZE if input_size is None else input_size
        batch = 1 if batch is None else batch
        patch = int(full.split("/")[1])
        if size < patch or size % patch:
            raise UsageError(f"--input-size {size}: {full} needs a multiple of its patch "
                             f"size {patch}")
        if batch < 1:
            raise UsageError(f"--batch {batch}: give at least one sample")
        torch.manual_seed(seed)
        model = DiT_models[full](input_size=size, num_classes=1000)
        gen = torch.Generator().manual_seed(seed)
        example = (torch.randn(batch, model.in_channels, size, size, generator=gen),
                   torch.rand(batch, generator=gen) * 999,
                   torch.randint(0, 1000, (batch,), generator=gen))
        return model, example, "2:8@0.5", full
    zoo = _zoo_names()
    if _key(name) in zoo or ":" in name:
        if sized:
            raise UsageError(f"--input-size and --batch set the example of the DiT-* "
                             f"reference models; MODEL {name!r} brings its own")
        if ":" in name:
            model, example = _from_factory(name)
            return model, example, "1:-2@0.5", name
        from .zoo import build
        full = zoo[_key(name)]
        model, example, span = build(full, seed)
        return model, example, f"{span}@0.5", full
    cases = _diffusers_cases()
    if _key(name) in cases:
        if sized:
            raise UsageError(f"--input-size and --batch set the example of the DiT-* "
                             f"reference models; MODEL {name!r} brings its own")
        from .diffusers_zoo import build as build_case
        case = cases[_key(name)]
        torch.manual_seed(seed)
        model, example = build_case(case)
        return model, example, "1:-2@0.5", case["name"]
    raise UsageError(f"MODEL {name!r}: unknown; give {_known_models()}")


def _diffusers_cases() -> dict[str, dict]:
    """Every case of :mod:`tread_fx.tools.diffusers_zoo` by its (class) name, if diffusers
    is installed."""
    if importlib.util.find_spec("diffusers") is None:
        return {}
    from .diffusers_zoo import CASES
    return {_key(c["name"]): c for c in CASES}


# -- the command ------------------------------------------------------------------------
def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("model", nargs="?", metavar="MODEL",
                   help=f"a reference DiT (DiT-S/2 ... DiT-XL/8), a zoo model (U-ViT, MMDiT, "
                        f"PixArtTransformer2DModel, ...) or pkg.module:factory returning "
                        f"(model, example_inputs); default {DEFAULT_MODEL}")
    p.add_argument("--model", dest="model_option", metavar="MODEL",
                   help="the same as MODEL (the older spelling)")
    p.add_argument("--routes", metavar="SPEC", default=None,
                   help="route spec, e.g. 2:8@0.5 or 1:3@0.5,5:6@0.25 (default: 2:8@0.5 for "
                        "the DiT-* models, the zoo's span at 0.5, else 1:-2@0.5)")
    p.add_argument("--input-size", type=int, default=None,
                   help=f"latent side of a DiT-* model (default {DEFAULT_INPUT_SIZE}: "
                        f"256 tokens at patch 2)")
    p.add_argument("--batch", type=int, default=None,
                   help="samples in a DiT-* model's example (default 1); FLOPs are for it")
    p.add_argument("--seed", type=int, default=0, help="seed of the weights and the example")
    p.add_argument("--front-end", choices=("fx", "export", "concrete"), default=None,
                   help="the tracer route() uses (default: the first that works)")
    p.add_argument("--graph", action="store_true",
                   help="print the routed train graph as a diff against the dense one")
    p.add_argument("--code", action="store_true", help="print the routed train graph's code")
    p.add_argument("--dot", metavar="FILE", help="write the routed graph as Graphviz DOT")
    p.add_argument("--draw", metavar="FILE",
                   help="draw tokens per block and the routes (.svg, .png or .pdf)")


def _output_path(flag: str, value: str | None, suffixes: tuple[str, ...] | None) -> None:
    if value is None:
        return
    path = Path(value)
    if suffixes is not None and path.suffix.lower() not in suffixes:
        raise UsageError(f"{flag} {value}: the file must end in {', '.join(suffixes)}")
    if path.is_dir():
        raise UsageError(f"{flag} {value}: is a folder; give a file name")
    if not path.parent.is_dir():
        raise UsageError(f"{flag} {value}: the folder {path.parent} does not exist")


def inspect_model(name: str, routes: str | None = None, *, input_size: int | None = None,
                  batch: int | None = None, seed: int = 0,
                  front_end: str | None = None) -> Explanation:
    """Build MODEL, route it and explain it (what ``tread-fx inspect`` prints)."""
    import tread_fx
    from tread_fx.spec import parse_spec

    if routes is not None:   # before building the model
        try:
            parse_spec(routes)
        except (TypeError, ValueError) as err:
            raise UsageError(f"--routes {routes!r}: {err}") from None
    model, example, default_routes, label = load_model(name, input_size, batch, seed)
    spec = default_routes if routes is None else routes
    try:
        routed = tread_fx.route(model, spec, example_inputs=example, front_end=front_end)
    except ValueError as err:
        # a spec that does not fit this model (indices, a ratio that routes no token) is a
        # plain ValueError naming the route; the analysis' errors have their own types
        if type(err) is ValueError and str(err).startswith("route "):
            raise UsageError(f"--routes {spec!r}: {err}") from None
        raise
    return explain(routed, name=label)


def main(args: argparse.Namespace) -> int:
    model = getattr(args, "model", None)
    option = getattr(args, "model_option", None)
    if model is not None and option is not None and model != option:
        raise UsageError(f"MODEL {model!r} and --model {option!r} differ; give one of them")
    _output_path("--draw", args.draw, DRAW_FORMATS)
    _output_path("--dot", args.dot, None)
    if args.draw and importlib.util.find_spec("matplotlib") is None:
        raise UsageError(f"--draw {args.draw}: needs matplotlib, which the train and test "
                         f"extras install: pip install 'tread-fx[train]'")
    report = inspect_model(model or option or DEFAULT_MODEL, args.routes,
                           input_size=args.input_size, batch=args.batch, seed=args.seed,
                           front_end=args.front_end)
    print(report)
    routed = report.routed
    if args.graph:
        print()
        print(report.graph_diff())
    if args.code:
        print()
        print(routed.code)
    if args.dot:
        Path(args.dot).write_text(to_dot(routed.graph, type(routed).__name__))
        print(f"wrote {args.dot} (render: dot -Tsvg {args.dot} -o routed.svg)")
    if args.draw:
        report.draw(args.draw)
        print(f"wrote {args.draw}")
    return 0
