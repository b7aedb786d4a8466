"""Which front end routes which model: torch.export vs the concrete tracer over a model zoo.

    python -m tread_fx.tools.front_ends [--zoo PATH] [--cases NAME,NAME] [--out FILE]

A zoo is a Python file defining ``CASES`` (dicts with ``name``, ``cls``, ``init``, ...) and
``build(case) -> (model, inputs)`` (default: :mod:`tread_fx.tools.diffusers_zoo`, tiny
configs of every diffusers transformer class).  For every case and each front end (``export``, ``concrete``) the model is
built afresh, every parameter gets small noise (zero-initialised output layers make many
models an identity at init), and it is routed with ``tread_fx.route(model, "1:-2@0.5",
example_inputs=inputs, front_end=fe)`` (blocks 1..len-2 of the found chain; ``0:0`` for a
chain of fewer than 3 blocks).  Measured:

* whether ``route()`` returned, else the exception's type and first line;
* the chain length and the seconds ``route()`` took;
* eval equality: ``routed.eval()`` vs ``model.eval()`` under ``torch.no_grad()``, first
  tensor of the output, ``torch.equal``;
* ratio-0 train equality: routed again at ratio 0, both in ``train()``, the same
  ``torch.manual_seed`` before each call, ``torch.equal`` (label dropout draws the same
  numbers in the same order in both).

Each front end of a case runs in a forked child process (a crash, a hang or leaked global
state cannot take the tool down or leak into the next measurement) under the case's time
limit (``--timeout``, 90 s by default, shared by both front ends; the second front end is
skipped when the first took more than 60 s).  Prints a markdown table and a summary; with
``--out`` also writes them (rewritten after each case, so a partial run is readable).
"""

from __future__ import annotations

import argparse
import importlib.util
import json
import multiprocessing as mp
import os
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable

__all__ = ["FRONT_ENDS", "SPEC", "main", "measure", "load_zoo", "default_zoo"]

FRONT_ENDS = ("export", "concrete")
SPEC = "1:-2"          # blocks 1..len-2 of the chain (needs >= 3 blocks)
SHORT_SPEC = "0:0"     # fewer than 3 blocks
RATIO = 0.5
SKIP_AFTER_S = 60.0    # the second front end is skipped when the first took longer


# --------------------------------------------------------------------------- zoo

def default_zoo() -> Path:
    """The zoo this package carries: :mod:`tread_fx.tools.diffusers_zoo`."""
    return Path(__file__).resolve().parent / "diffusers_zoo.py"


def load_zoo(path: str | os.PathLike):
    """Import a zoo file as a module (``CASES``, ``build``)."""
    path = Path(path)
    if not path.is_file():
        raise SystemExit(f"front_ends: zoo file {path} does not exist")
    spec = importlib.util.spec_from_file_location(f"_tread_zoo_{path.stem}", path)
    module = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = module
    spec.loader.exec_module(module)
    for attr in ("CASES", "build"):
        if not hasattr(module, attr):
            raise SystemExit(f"front_ends: {path} defines no {attr}; a zoo defines CASES (a "
                             f"list of dicts) and build(case) -> (model, inputs)")
    return module


# --------------------------------------------------------------------------- helpers

def _clone(value):
    import torch
    if torch.is_tensor(value):
        return value.clone()
    if isinstance(value, dict):
        return {k: _clone(v) for k, v in value.items()}
    if isinstance(value, list):
        return [_clone(v) for v in value]
    if isinstance(value, tuple) and not hasattr(value, "_fields"):
        return tuple(_clone(v) for v in value)
    return value


def _first_tensor(out):
    """The first tensor of a model output (a tensor, tuple, list, dict or ModelOutput)."""
    import torch
    if torch.is_tensor(out):
        return out
    if isinstance(out, dict):
        items = list(out.values())
    elif isinstance(out, (tuple, list)):
        items = list(out)
    else:
        items = []
    for item in items:
        found = _first_tensor(item)
        if found is not None:
            return found
    return None


def _call(model, inputs):
    inputs = _clone(inputs)
    out = model(**inputs) if isinstance(inputs, dict) else model(*inputs)
    return _first_tensor(out)


def _equal(a, b) -> bool:
    import torch
    if a is None or b is None:
        return False
    if torch.equal(a, b):
        return True
    # NaN in the same places and every other entry equal
    return a.shape == b.shape and a.dtype == b.dtype and bool(
        torch.isnan(a).any()) and bool(torch.eq(a, b).logical_or(
            torch.isnan(a) & torch.isnan(b)).all())


def _first_line(err: BaseException, limit: int = 300) -> str:
    """The message's first line; with the next one where the first introduces a list
    ("found no repeated block sequence to route. Considered:")."""
    lines = [line.strip() for line in str(err).strip().split("\n")]
    text = " ".join(lines[:2]) if lines[0].endswith(":") else lines[0]
    return text if len(text) <= limit else text[:limit - 3] + "..."


def _refusal_types() -> tuple[type, ...]:
    import tread_fx
    return (tread_fx.TraceError, tread_fx.NoBlocksFound, tread_fx.TokenAxisError,
            tread_fx.RoutingSafetyError, tread_fx.RouteEscapeError, ValueError)


def _error(err: BaseException) -> dict[str, Any]:
    tb = traceback.format_exception(type(err), err, err.__traceback__)
    tail = "".join(tb)[-2500:]
    return {"type": type(err).__name__, "line": _first_line(err),
            "refusal": isinstance(err, _refusal_types()), "traceback": tail}


def _short_chain(err: BaseException) -> bool:
    text = str(err)
    return type(err) is ValueError and (("which has" in text and "is outside" in text) or
                                        "comes after end=" in text)


# --------------------------------------------------------------------------- measuring

def build_case(zoo, case: dict) -> tuple[Any, Any, dict[str, Any]]:
    """The case's model with small noise on every parameter (zero-initialised output layers
    make many models an identity at init), its inputs, and the route() options it needs."""
    from tread_fx.tools.zoo import perturb_

    model, inputs = zoo.build(case)
    perturb_(model)
    # what a user would tell route() about this model (the block container, the stream
    # argument, a joint table's row order)
    return model, inputs, {k: case[k] for k in ("blocks", "hidden", "token_inputs")
                           if case.get(k) is not None}


def measure(zoo, case: dict, front_end: str,
            report: Callable[..., None] = lambda **kw: None) -> dict[str, Any]:
    """Route ``case`` with ``front_end`` and measure it; ``report(**facts)`` is called as
    facts become known (so a killed run keeps what it had)."""
    import torch

    import tread_fx

    facts: dict[str, Any] = {}

    def note(**kw):
        facts.update(kw)
        report(**kw)

    note(step="build")
    try:
        model, inputs, extra = build_case(zoo, case)
    except Exception as err:   # the zoo's problem, not tread_fx's
        note(status="build error", error=_error(err))
        return facts

    def route(span, ratio):
        return tread_fx.route(model, f"{span}@{ratio}", example_inputs=_clone(inputs),
                              front_end=front_end, **extra)

    note(step="route")
    span = SPEC
    start = time.perf_counter()
    try:
        try:
            routed = route(span, RATIO)
        except ValueError as err:
            if not _short_chain(err):
                raise
            span = SHORT_SPEC
            start = time.perf_counter()
            routed = route(span, RATIO)
    except Exception as err:
        note(status="error", error=_error(err), route_s=time.perf_counter() - start)
        return facts
    note(status="ok", route_s=time.perf_counter() - start, chain=len(routed.block_chain),
         span=span, traced_by=getattr(routed, "front_end", None))

    note(step="eval")
    try:
        model.eval()
        routed.eval()
        with torch.no_grad():
            want = _call(model, inputs)
            got = _call(routed, inputs)
        note(eval_equal=_equal(got, want))
    except Exception as err:
        note(eval_equal=None, eval_error=_error(err))

    note(step="ratio 0")
    try:
        start = time.perf_counter()
        routed0 = route(span, 0)
        note(route0_s=time.perf_counter() - start)
        model.train()
        routed0.train()
        torch.manual_seed(0)
        want = _call(model, inputs)
        torch.manual_seed(0)
        got = _call(routed0, inputs)
        note(ratio0_equal=_equal(got, want))
    except Exception as err:
        note(ratio0_equal=None, ratio0_error=_error(err))
    note(step="done")
    return facts


def _child(conn, zoo, case, front_end, measure_fn):
    def report(**kw):
        conn.send(kw)
    try:
        measure_fn(zoo, case, front_end, report)
    except BaseException as err:   # measure catches everything it expects
        try:
            conn.send({"status": "error", "error": _error(err)})
        except Exception:
            pass
    finally:
        conn.close()


def _run_isolated(zoo, case, front_end, limit: float,
                  measure_fn: Callable[..., dict[str, Any]] = measure) -> dict[str, Any]:
    """``measure_fn(zoo, case, front_end, report)`` (default :func:`measure`) in a forked
    child, killed after ``limit`` seconds."""
    ctx = mp.get_context("fork")
    recv, send = ctx.Pipe(duplex=False)
    proc = ctx.Process(target=_child, args=(send, zoo, case, front_end, measure_fn))
    start = time.monotonic()
    proc.start()
    send.close()
    facts: dict[str, Any] = {}
    timed_out = False
    while True:
        left = start + limit - time.monotonic()
        if left <= 0:
            timed_out = True
            break
        if recv.poll(min(left, 1.0)):
            try:
                facts.update(recv.recv())
            except (EOFError, OSError):
                break
    if timed_out:
        proc.kill()
        facts["timeout"] = f"killed after {limit:.0f} s in step {facts.get('step', '?')!r}"
        if facts.get("status") in (None, "ok") and facts.get("step") in (None, "build", "route"):
            facts["status"] = "timeout"
    proc.join(10)
    if not timed_out and facts.get("step") != "done" and "status" not in facts:
        facts["status"] = "crashed"
        facts["error"] = {"type": "ChildDied", "refusal": False, "traceback": "",
                          "line": f"the child process died (exit code {proc.exitcode}) in "
                                  f"step {facts.get('step', '?')!r}"}
    elif not timed_out and facts.get("status") == "ok" and facts.get("step") != "done":
        facts["crash_note"] = (f"child died (exit code {proc.exitcode}) in step "
                               f"{facts.get('step')!r}")
    facts["wall_s"] = time.monotonic() - start
    return facts


def _run_in_process(zoo, case, front_end, limit: float) -> dict[str, Any]:
    start = time.monotonic()
    facts = measure(zoo, case, front_end)
    facts["wall_s"] = time.monotonic() - start
    return facts


def run_case(zoo, case, timeout: float, isolate: bool = True) -> dict[str, dict[str, Any]]:
    runner = _run_isolated if isolate else _run_in_process
    results: dict[str, dict[str, Any]] = {}
    start = time.monotonic()
    for fe in FRONT_ENDS:
        elapsed = time.monotonic() - start
        if results and (elapsed > SKIP_AFTER_S or elapsed >= timeout - 5):
            results[fe] = {"status": "skipped",
                           "timeout": f"skipped: the case had run {elapsed:.0f} s already"}
            continue
        results[fe] = runner(zoo, case, fe, max(timeout - elapsed, 5.0))
    return results


# --------------------------------------------------------------------------- report

def _cell(text: str) -> str:
    return str(text).replace("|", "\\|").replace("\n", " ")


def _status(r: dict[str, Any], short: bool = True) -> str:
    status = r.get("status")
    if status == "ok":
        return "ok"
    if status in ("timeout", "skipped"):
        return status
    err = r.get("error") or {}
    line = err.get("line", "")
    if short and len(line) > 110:
        line = line[:107] + "..."
    prefix = "" if status == "error" else f"{status}: "
    return _cell(f"{prefix}{err.get('type', '?')}: {line}")


def _yes(v) -> str:
    return {True: "yes", False: "**no**", None: "error"}.get(v, "-")


def _pair(rs: dict[str, dict[str, Any]], fn) -> str:
    return " / ".join(fn(rs[fe]) if fe in rs else "-" for fe in FRONT_ENDS)


def _routed(r: dict[str, Any]) -> bool:
    return r.get("status") == "ok"


def render(results: dict[str, dict[str, dict[str, Any]]], zoo_path, total_s: float,
           done: bool) -> str:
    import torch
    lines = [f"# Front ends over {Path(zoo_path).name}", ""]
    lines.append(
        f"`python -m tread_fx.tools.front_ends --zoo {zoo_path}`; torch {torch.__version__}, "
        f"{os.cpu_count()} CPU cores; route `{SPEC}@{RATIO}` (`{SHORT_SPEC}` for chains under "
        f"3 blocks) after perturbing every parameter (std 0.05); {len(results)} cases, "
        f"{total_s / 60:.1f} min{'' if done else ' (partial run)'}.")
    lines.append("")
    lines.append("Pairs are export / concrete. *eval equal*: routed.eval() vs model.eval(), "
                 "torch.equal. *ratio-0 equal*: routed at ratio 0 vs the model, train mode, "
                 "same seed, torch.equal. *route s*: the ratio-0.5 route() call.")
    lines.append("")
    lines.append("| case | export | concrete | chain | route s | eval equal | ratio-0 equal |")
    lines.append("| --- | --- | --- | --- | --- | --- | --- |")
    for name, rs in results.items():
        lines.append("| " + " | ".join([
            _cell(name), _status(rs.get("export", {})), _status(rs.get("concrete", {})),
            _pair(rs, lambda r: str(r["chain"]) if "chain" in r else "-"),
            _pair(rs, lambda r: f"{r['route_s']:.1f}" if _routed(r) else "-"),
            _pair(rs, lambda r: _yes(r.get("eval_equal")) if _routed(r) else "-"),
            _pair(rs, lambda r: _yes(r.get("ratio0_equal")) if _routed(r) else "-"),
        ]) + " |")
    lines.append("")
    lines += _summary(results)
    return "\n".join(lines) + "\n"


def _summary(results) -> list[str]:
    by = {fe: [n for n, rs in results.items() if _routed(rs.get(fe, {}))] for fe in FRONT_ENDS}
    either = [n for n, rs in results.items() if any(_routed(rs.get(fe, {})) for fe in FRONT_ENDS)]
    neither = [n for n in results if n not in either]
    export_only = [n for n in by["export"] if n not in by["concrete"]]
    concrete_only = [n for n in by["concrete"] if n not in by["export"]]
    correct = {fe: [n for n in by[fe] if results[n][fe].get("eval_equal") is True
                    and results[n][fe].get("ratio0_equal") is True] for fe in FRONT_ENDS}
    out = ["## Summary", "",
           f"- cases: {len(results)}",
           f"- routed by export: {len(by['export'])} (eval and ratio-0 equal: "
           f"{len(correct['export'])})",
           f"- routed by concrete: {len(by['concrete'])} (eval and ratio-0 equal: "
           f"{len(correct['concrete'])})",
           f"- routed by either: {len(either)}",
           f"- by concrete only ({len(concrete_only)}): {', '.join(concrete_only) or '-'}",
           f"- by export only ({len(export_only)}): {', '.join(export_only) or '-'}",
           f"- by neither ({len(neither)}): {', '.join(neither) or '-'}"]
    for fe in FRONT_ENDS:
        wrong = [n for n in by[fe] if n not in correct[fe]]
        if wrong:
            out.append(f"- routed by {fe} but not equal (eval or ratio 0): {', '.join(wrong)}")
    died = [f"{n} ({fe}): {rs[fe]['crash_note']}" for n, rs in results.items()
            for fe in FRONT_ENDS if rs.get(fe, {}).get("crash_note")]
    if died:
        out.append(f"- child process died after routing: {'; '.join(died)}")
    timeouts = [f"{n} ({fe})" for n, rs in results.items() for fe in FRONT_ENDS
                if rs.get(fe, {}).get("status") in ("timeout", "skipped")]
    if timeouts:
        out.append(f"- timed out or skipped: {', '.join(timeouts)}")
    out += ["", "### Why the other front end failed", ""]
    for label, names, other in (("concrete only", concrete_only, "export"),
                                ("export only", export_only, "concrete")):
        for n in names:
            out.append(f"- {label}: **{n}**: {other}: {_status(results[n][other], False)}")
    crashes = []
    for n, rs in results.items():
        for fe in FRONT_ENDS:
            r = rs.get(fe, {})
            for key in ("error", "eval_error", "ratio0_error"):
                err = r.get(key)
                if err and not err.get("refusal") and r.get("status") != "build error":
                    crashes.append((n, fe, key, err))
    out += ["", "### Exceptions that are not a tread_fx refusal", ""]
    if not crashes:
        out.append("none")
    for n, fe, key, err in crashes:
        out += [f"- **{n}** ({fe}, {key}): {_cell(err['type'])}: {_cell(err['line'])}", "",
                "```", err.get("traceback", "").rstrip()[-1500:], "```", ""]
    builds = [n for n, rs in results.items()
              if any(rs.get(fe, {}).get("status") == "build error" for fe in FRONT_ENDS)]
    if builds:
        out += ["", f"Build errors (the zoo, not tread_fx): {', '.join(builds)}"]
    return out


# --------------------------------------------------------------------------- main

def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m tread_fx.tools.front_ends",
                                description=__doc__.split("\n")[0])
    p.add_argument("--zoo", help="zoo file (CASES, build); default: the package's "
                   "tools/diffusers_zoo.py")
    p.add_argument("--cases", help="comma-separated case names (default: all)")
    p.add_argument("--out", help="also write the markdown report to this file")
    p.add_argument("--json", help="also write the raw measurements to this file (JSON)")
    p.add_argument("--timeout", type=float, default=90.0,
                   help="seconds per case, both front ends together (default 90)")
    p.add_argument("--in-process", action="store_true",
                   help="no child processes (no hard time limit; for debugging)")
    args = p.parse_args(argv)
    zoo_path = args.zoo or default_zoo()
    zoo = load_zoo(zoo_path)
    cases = list(zoo.CASES)
    if args.cases:
        wanted = [c.strip() for c in args.cases.split(",") if c.strip()]
        names = {c["name"] for c in cases}
        unknown = [w for w in wanted if w not in names]
        if unknown:
            raise SystemExit(f"front_ends: unknown case(s) {unknown}; the zoo has "
                             f"{sorted(names)}")
        cases = [c for c in cases if c["name"] in wanted]
    # import what the children need once, before forking
    import importlib

    import torch  # noqa: F401

    import tread_fx  # noqa: F401
    from tread_fx.tools import zoo as _  # noqa: F401
    for c in cases:
        try:
            getattr(importlib.import_module(c.get("module", "diffusers")), c["cls"])
        except Exception:
            pass   # the child reports it as a build error
    results: dict[str, dict[str, dict[str, Any]]] = {}
    start = time.monotonic()
    for i, case in enumerate(cases):
        t0 = time.monotonic()
        results[case["name"]] = run_case(zoo, case, args.timeout, not args.in_process)
        rs = results[case["name"]]
        print(f"[{i + 1}/{len(cases)}] {case['name']}: "
              + ", ".join(f"{fe} {_status(rs[fe])}" for fe in FRONT_ENDS)
              + f" ({time.monotonic() - t0:.0f} s)", file=sys.stderr, flush=True)
        if args.out:
            Path(args.out).write_text(render(results, zoo_path, time.monotonic() - start,
                                             False))
        if args.json:
            Path(args.json).write_text(json.dumps(results, indent=1, default=str))
    text = render(results, zoo_path, time.monotonic() - start, True)
    print(text)
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
