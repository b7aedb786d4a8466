"""Cost of the routed module's per-call guard check next to a DiT-S/2 train step, and the
time of one re-trace (README, "What a routed graph is specialised on").

    python3 tools/guard_cost.py
"""
import time, torch, tread_fx
from tread_fx.models import DiT_S_2
from tread_fx.tools.zoo import build
def dispatch_cost(routed, args, kwargs, n=2000):
    g = routed._guard
    t0 = time.perf_counter()
    for _ in range(n):
        if g.inputs:
            call = g.bind(args, kwargs); key = g.key(call)
            for v in routed._variants[key]:
                if v.accepts(routed, call): break
        else:
            key = g.key(None); routed._variants[key]
    return (time.perf_counter() - t0) / n


def main():
    torch.set_num_threads(2)
    model = DiT_S_2(input_size=32, num_classes=10)
    x, t, y = torch.randn(8, 4, 32, 32), torch.rand(8), torch.randint(0, 10, (8,))
    routed = tread_fx.route(model, "2:8@0.5").train()
    fx_cost = dispatch_cost(routed, (x, t, y), {})
    routed_c = tread_fx.route(model, "2:8@0.5", example_inputs=(x, t, y)).train()
    opt = torch.optim.AdamW(model.parameters())
    def step():
        loss = routed(x, t, y).square().mean(); opt.zero_grad(); loss.backward(); opt.step()
    step()
    t0 = time.perf_counter()
    for _ in range(3): step()
    step_s = (time.perf_counter() - t0) / 3
    pm, inputs, _ = build("diffusers PixArtTransformer2DModel")
    pr = tread_fx.route(pm, "1:2@0.5", example_inputs=inputs).train()
    d_cost = dispatch_cost(pr, (), inputs)
    print(f"DiT-S/2 train step (batch 8, 256 tokens, 2:8@0.5): {step_s*1e3:.0f} ms")
    print(f"guard check, fx graph (training flags): {fx_cost*1e6:.1f} us = {fx_cost/step_s*100:.4f}% of the step")
    print(f"guard check, diffusers PixArt (shapes, dtypes, args, autocast, flags): {d_cost*1e6:.1f} us = {d_cost/step_s*100:.4f}% of the DiT-S/2 step")
    t0 = time.perf_counter(); pr(**{**inputs, "hidden_states": torch.randn(3, 4, 12, 12)}); print(f"re-trace + forward, PixArt at a new resolution: {time.perf_counter()-t0:.2f} s")


if __name__ == "__main__":
    main()
