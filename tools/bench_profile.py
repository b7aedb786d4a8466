"""Where a train step's time goes, by kind of work, for each model of a bench run.

``tread-fx bench --profile`` runs a few more forward + backward passes of each model under
``torch.profiler`` and sums the time of the operators by kind: matrix products, attention,
normalisation, the routing's own gathers, scatters and draws, copies, and the rest
(elementwise and fused kernels).  On CUDA the time is the kernels' (device) time, and
"outside operators" is the step's wall time the device was not busy with them (launch and
Python overhead); on CPU it is the operators' own time and the framework time around them.

Beside each kind the FLOP ratio of that kind (``torch.utils.flop_counter``: matrix
products, attention) says what routing should save there, so a kind whose time drops less
than its FLOPs is where measured speed-up falls short of the prediction.
"""

from __future__ import annotations

from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode, sdpa_backward_flop_count, sdpa_flop_count

__all__ = ["KINDS", "busy_speedup", "flop_counter", "flops_by_kind", "kind_of", "profile_steps",
           "report"]

# (kind, substrings of aten operator or CUDA kernel names), first match wins
KINDS = (
    ("attention", ("scaled_dot_product", "flash", "efficient_attention", "fmha", "cudnn",
                   "_attention")),
    ("matmul", ("::mm", "addmm", "bmm", "::linear", "matmul", "gemm", "_scaled_mm", "cutlass",
                "xmma", "cublas", "nvjet", "sm80_", "sm90_", "triton_tem", "convolution")),
    ("norm", ("layer_norm", "group_norm", "rms_norm", "batch_norm")),
    ("routing", ("gather", "scatter", "sort", "::rand", "distribution", "index_select", "topk",
                 "randperm", "radix")),
    ("copy", ("copy", "clone", "contiguous", "::cat", "catarray", "::stack")),
)
OTHER = "elementwise / other"


def kind_of(name: str) -> str:
    """The kind of an operator or kernel name (``aten::addmm`` -> ``matmul``)."""
    low = name.lower()
    for kind, needles in KINDS:
        if any(n in low for n in needles):
            return kind
    return OTHER


def profile_steps(steps: dict[str, Callable[[], None]], device: torch.device,
                  repeats: int = 3) -> dict[str, dict[str, float]]:
    """``{model: {kind: seconds per step, ..., "wall": ..., "outside operators": ...}}``.

    ``steps[name]()`` runs one forward + backward.  The models take turns, one profiled
    step each per round, ``repeats`` rounds (after one unprofiled step each), so load on a
    shared machine hits all alike, as in the timed steps."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    cuda = device.type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    out = {name: {kind: 0.0 for kind in [k for k, _ in KINDS] + [OTHER, "wall"]}
           for name in steps}
    for name, step in steps.items():
        step()   # allocator and caches as in the timed steps
    for _ in range(repeats):
        for name, step in steps.items():
            if cuda:
                torch.cuda.synchronize(device)
            with profile(activities=activities) as prof:
                step()
                if cuda:
                    torch.cuda.synchronize(device)
            kinds = out[name]
            for event in prof.key_averages():
                if cuda:   # the kernels themselves, by name (each once)
                    if event.device_type != DeviceType.CUDA:
                        continue
                    us = event.self_device_time_total
                else:      # the operators' own time (not the autograd or module wrappers)
                    if not event.key.startswith("aten::"):
                        continue
                    us = event.self_cpu_time_total
                kinds[kind_of(event.key)] += us / 1e6 / repeats
            kinds["wall"] += _wall(prof) / repeats
    for kinds in out.values():
        kinds["operators"] = sum(v for k, v in kinds.items() if k != "wall")
        kinds["outside operators"] = max(kinds["wall"] - kinds["operators"], 0.0)
    return out


def _wall(prof) -> float:
    """Seconds from the first to the last profiled CPU event."""
    events = prof.events()
    start = min(e.time_range.start for e in events)
    end = max(e.time_range.end for e in events)
    return (end - start) / 1e6


def flop_counter() -> FlopCounterMode:
    """torch's FLOP counter, also counting attention on CPU: torch counts its CUDA attention
    kernels but not the CPU one, which left attention out of CPU FLOP ratios."""
    aten = torch.ops.aten
    mapping = {}
    if hasattr(aten, "_scaled_dot_product_flash_attention_for_cpu_backward"):
        mapping[aten._scaled_dot_product_flash_attention_for_cpu] = \
            lambda q, k, v, *_, out_shape=None, **__: sdpa_flop_count(q, k, v)
        mapping[aten._scaled_dot_product_flash_attention_for_cpu_backward] = \
            lambda g, q, k, v, *_, out_shape=None, **__: sdpa_backward_flop_count(g, q, k, v)
    return FlopCounterMode(display=False, custom_mapping=mapping)


def flops_by_kind(run: Callable[[], torch.Tensor]) -> dict[str, int]:
    """FLOPs of one forward + backward by kind (matmul, attention); they sum to the
    counter's total."""
    with flop_counter() as counter:
        run().backward()
    kinds: dict[str, int] = {}
    for op, flops in counter.get_flop_counts().get("Global", {}).items():
        kind = kind_of(f"aten::{getattr(op, '__name__', str(op))}")
        kinds[kind] = kinds.get(kind, 0) + int(flops)
    return kinds


def report(times: dict[str, dict[str, float]], flops: dict[str, dict[str, float]]) -> str:
    """Per kind: ms per forward + backward of each model, routed / dense, and where the
    FLOPs say what it should be, the FLOP ratio."""
    names = list(times)
    rows = [("ms per fwd+bwd", *names, "routed/dense", "FLOP ratio")]
    for kind in [k for k, _ in KINDS] + [OTHER, "operators", "outside operators", "wall"]:
        dense, routed = times["dense"][kind], times["routed"][kind]
        fd, fr = flops["dense"].get(kind), flops["routed"].get(kind)
        rows.append((kind, *(f"{times[n][kind] * 1e3:.2f}" for n in names),
                     f"{routed / dense:.3f}" if dense > 0 else "-",
                     f"{fr / fd:.3f}" if fd and fr is not None else "-"))
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.rjust(w) if i else c.ljust(w) for i, (c, w) in enumerate(zip(r, widths)))
             for r in rows]
    total = {name: sum(kinds.values()) for name, kinds in flops.items()}
    if total.get("dense") and total.get("routed") and times["routed"]["operators"] > 0:
        speedup, ratio = busy_speedup(times, total)
        lines.append(f"operator time: dense / routed {speedup:.2f}x = {speedup * ratio:.2f} of "
                     f"predicted; busy (operators / wall): " + ", ".join(
                         f"{n} {times[n]['operators'] / times[n]['wall']:.2f}" for n in names))
    return "\n".join(["where the time goes (torch.profiler; kernel time on CUDA, operator "
                      "self time on CPU):", *lines])


def busy_speedup(times: dict[str, dict[str, float]], flops: dict[str, float]
                 ) -> tuple[float, float]:
    """(dense ÷ routed operator time, routed ÷ dense FLOPs): the speed-up routing gives the
    device's own work, and the FLOP ratio it is measured against.  Where the measured
    speed-up falls short of this one, the step waits on the host (launches, Python)."""
    return (times["dense"]["operators"] / times["routed"]["operators"],
            flops["routed"] / flops["dense"])
