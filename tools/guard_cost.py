"""Cost of the routed module's per-call guard check next to a DiT-S/2 train step, and the
time of one re-trace (README, "What a routed graph is specialised on").

    python3 -m tread_fx.tools.guard_cost

The check is what a call does before running its graph: bind the arguments, compute the
key, find the graph and run its own checks (export's ranges, value guards).  Measured by
calling that part alone many times; the train step is measured in the same run.
"""

from __future__ import annotations

import time

import torch

import tread_fx
from tread_fx.models import DiT_S_2
from tread_fx.tools.zoo import build


def dispatch_cost(routed, args, kwargs, n: int = 2000) -> float:
    """Seconds per call spent choosing the graph (the guard check)."""
    guard = routed._guard
    start = time.perf_counter()
    for _ in range(n):
        if guard.inputs:
            call = guard.bind(args, kwargs)
            found = [v for v in routed._variants[guard.key(call)] if v.accepts(routed, call)]
        else:
            found = routed._variants[guard.key(None)]
        assert found
    return (time.perf_counter() - start) / n


def main() -> None:
    torch.set_num_threads(2)
    torch.manual_seed(0)
    model = DiT_S_2(input_size=32, num_classes=10)
    x, t, y = torch.randn(8, 4, 32, 32), torch.rand(8), torch.randint(0, 10, (8,))
    routed = tread_fx.route(model, "2:8@0.5").train()
    opt = torch.optim.AdamW(model.parameters())

    def step():
        loss = routed(x, t, y).square().mean()
        opt.zero_grad()
        loss.backward()
        opt.step()

    step()
    start = time.perf_counter()
    for _ in range(3):
        step()
    step_s = (time.perf_counter() - start) / 3
    print(f"DiT-S/2 train step (batch 8, 256 tokens, 2:8@0.5): {step_s * 1e3:.0f} ms")
    cost = dispatch_cost(routed, (x, t, y), {})
    print(f"guard check, fx graph (training flags): {cost * 1e6:.1f} us = "
          f"{cost / step_s * 100:.4f}% of the step")
    pixart, inputs, _ = build("diffusers PixArtTransformer2DModel")
    for front_end in ("export", "concrete"):
        start = time.perf_counter()
        routed_p = tread_fx.route(pixart, "1:2@0.5", example_inputs=inputs,
                                  front_end=front_end).train()
        took = time.perf_counter() - start
        cost = dispatch_cost(routed_p, (), inputs)
        print(f"diffusers PixArt, {front_end}: route() {took:.1f} s; guard check "
              f"{cost * 1e6:.1f} us = {cost / step_s * 100:.4f}% of the DiT-S/2 step")
        other = {**inputs, "hidden_states": torch.randn(3, 4, 12, 12)}
        start = time.perf_counter()
        routed_p(**other)
        print(f"  new resolution: re-trace and forward {time.perf_counter() - start:.2f} s")


if __name__ == "__main__":
    main()
