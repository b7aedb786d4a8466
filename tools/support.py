"""``tread-fx backbones --diffusers``: every diffusers transformer class, routed and verified.

For each case of a zoo (default :mod:`tread_fx.tools.diffusers_zoo`: a tiny config and
example inputs for each transformer class of diffusers), in a forked child under a time
limit: build the model, add small noise to every parameter (zero-initialised output
layers would make the model an identity and every check vacuous), and run
:func:`tread_fx.verify` with the route ``1:-2@0.5`` (blocks 1..len-2 of the found chain;
``0:0@0.5`` for chains of fewer than 3 blocks).  Outcomes:

* **verified**: eval and ratio-0 equal to the model, the routed train step equal to the
  independent reference, no dropped row that the output does not read;
* **refused**: ``route()`` raised a tread_fx error naming the block and the reason;
* **cannot verify** / **inconclusive**: routed, but the reference cannot check it (blocks
  that mix tokens other than through attention) or proves nothing;
* **WRONG**: a check failed (a routed model that computes something else);
* **crash** / **timeout**: anything else.

Prints a markdown table and the totals; ``--out`` writes them to a file as well.
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any, Callable

from .front_ends import _clone, _error, _first_line, _run_isolated, _short_chain, \
    build_case, default_zoo, load_zoo

__all__ = ["OUTCOMES", "main", "verify_case", "render"]

SPEC, SHORT_SPEC, RATIO = "1:-2", "0:0", 0.5
OUTCOMES = ("verified", "refused", "cannot verify", "inconclusive", "WRONG", "crash",
            "timeout")


def verify_case(zoo, case: dict, front_end: str | None = None,
                report: Callable[..., None] = lambda **kw: None) -> dict[str, Any]:
    """Build, perturb, route and verify one zoo case; ``report(**facts)`` as they come."""
    from tread_fx.verify import verify

    from .front_ends import _refusal_types

    facts: dict[str, Any] = {}

    def note(**kw):
        facts.update(kw)
        report(**kw)

    note(step="build")
    try:
        model, inputs, extra = build_case(zoo, case)
    except Exception as err:   # the zoo's problem, not tread_fx's
        note(outcome="crash", detail=f"building the case: {_first_line(err)}")
        return facts
    if front_end is not None:
        extra["front_end"] = front_end
    note(step="verify")
    start = time.perf_counter()
    spec = SPEC
    try:
        try:
            result = verify(model, f"{spec}@{RATIO}", _clone(inputs), **extra)
        except ValueError as err:
            gap = getattr(err, "index", None)   # the route spans the gap before block gap
            if gap is not None:   # one route on each side of it
                spec = f"1:{gap - 1},{gap}:-2" if gap >= 2 else f"{gap}:-2"
            elif _short_chain(err):
                spec = SHORT_SPEC
            else:
                raise
            result = verify(model, ",".join(f"{s}@{RATIO}" for s in spec.split(",")),
                            _clone(inputs), **extra)
            spec = ",".join(f"{s}@{RATIO}" for s in spec.split(","))
    except Exception as err:
        refused = isinstance(err, _refusal_types())
        note(outcome="refused" if refused else "crash", detail=_first_line(err, 400),
             error=_error(err), seconds=time.perf_counter() - start, step="done")
        return facts
    if result.ok:
        outcome = "verified"
    elif result.reference in ("cannot verify", "inconclusive") and result.eval_equal and \
            result.ratio0_equal and result.rows != "wrong":
        outcome = result.reference
    else:
        outcome = "WRONG"
    failed = [name for name, ok in (("eval", result.eval_equal), ("ratio 0", result.ratio0_equal),
                                    ("reference", result.reference == "equal"),
                                    ("rows", result.rows != "wrong")) if not ok]
    detail = result.reference_detail if outcome != "WRONG" else \
        f"failed: {', '.join(failed)}; {result.reference_detail}; {result.rows_detail}"
    note(outcome=outcome, detail=detail, front_end=result.front_end, chain=len(result.chain),
         spec=spec if "@" in spec else f"{spec}@{RATIO}", kept=[f"{r.kept}/{r.tokens}" for r in result.routes],
         never_routed=[list(r.never_routed) for r in result.routes],
         side_inputs=sum(len(r.side_inputs) for r in result.routes),
         seconds=time.perf_counter() - start, step="done")
    return facts


def _cell(text: Any, limit: int = 170) -> str:
    text = str(text).replace("|", "\\|").replace("\n", " ")
    return text if len(text) <= limit else text[:limit - 3] + "..."


def render(results: dict[str, dict[str, Any]], zoo_path: Any, total_s: float) -> str:
    counts = {o: 0 for o in OUTCOMES}
    for r in results.values():
        counts[r.get("outcome", "crash")] = counts.get(r.get("outcome", "crash"), 0) + 1
    lines = [
        f"{len(results)} cases of {zoo_path}: " + ", ".join(
            f"{n} {o}" for o, n in counts.items() if n) + f" ({total_s / 60:.0f} min)",
        "",
        "| class | traced by | blocks | route | outcome | kept / tokens | rows never routed "
        "| side inputs | detail |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for name, r in results.items():
        outcome = r.get("outcome", "crash")
        lines.append(
            f"| {name} | {r.get('front_end', '')} | {r.get('chain', '')} | {r.get('spec', '')} "
            f"| {'**' + outcome + '**' if outcome != 'verified' else outcome} "
            f"| {', '.join(r.get('kept', []))} "
            f"| {', '.join(f'{h}+{t}' for h, t in r.get('never_routed', []))} "
            f"| {r.get('side_inputs', '')} "
            f"| {_cell(r.get('detail', r.get('timeout', '')), 170 if outcome == 'verified' else 300)} |")
    return "\n".join(lines) + "\n"


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--zoo", help="zoo file (CASES, build); default: the package's "
                   "tools/diffusers_zoo.py")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--out", help="also write the markdown table to this file")
    p.add_argument("--json", help="also write the raw results to this file (JSON)")
    p.add_argument("--timeout", type=float, default=180.0,
                   help="seconds per case (default 180)")
    p.add_argument("--in-process", action="store_true",
                   help="no child processes (no time limit; for debugging, and for callers "
                        "whose threads make fork unsafe)")


def main(args: argparse.Namespace) -> int:
    from .errors import UsageError

    zoo_path = Path(args.zoo) if args.zoo else default_zoo()
    if not zoo_path.is_file():
        raise UsageError(f"--zoo {zoo_path}: no such file")
    zoo = load_zoo(zoo_path)
    cases = list(zoo.CASES)
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        names = {c["name"] for c in cases}
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise UsageError(f"--cases: unknown case(s) {unknown}; the zoo has "
                             f"{sorted(names)[:8]} ...")
        cases = [c for c in cases if c["name"] in wanted]
    results: dict[str, dict[str, Any]] = {}
    start = time.monotonic()
    for i, case in enumerate(cases, 1):
        if args.in_process:
            started = time.monotonic()
            facts = verify_case(zoo, case)
            facts["wall_s"] = time.monotonic() - started
        else:
            facts = _run_isolated(zoo, case, None, args.timeout, verify_case)
        if "outcome" not in facts:
            facts["outcome"] = "timeout" if "timeout" in facts else "crash"
            facts.setdefault("detail", facts.get("timeout") or (facts.get("error") or {})
                             .get("line", ""))
        results[case["name"]] = facts
        print(f"[{i}/{len(cases)}] {case['name']}: {facts['outcome']} "
              f"({facts.get('wall_s', 0):.0f} s) {_first_line_of(facts.get('detail', ''))}",
              flush=True)
        text = render(results, zoo_path.name, time.monotonic() - start)
        if args.out:
            Path(args.out).write_text(text)
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    print(render(results, zoo_path.name, time.monotonic() - start))
    return 0 if not any(r["outcome"] in ("WRONG", "crash") for r in results.values()) else 1


def _first_line_of(text: str, limit: int = 140) -> str:
    text = str(text).split("\n")[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."
