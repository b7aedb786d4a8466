"""Mixed precision: bf16/fp16 autocast train steps of routed models, the reinjected tensor's
dtype, and ``fp32_after_route`` (the block after a route in float32, autocast off)."""

import pytest
import torch
from torch import nn

import tread_fx
from tread_fx.explain import strip_routes
from conftest import dit_inputs, tiny_dit


class Block(nn.Module):
    """No residual: under autocast its output is in the autocast dtype."""

    def __init__(self, dim):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc1 = nn.Linear(dim, 2 * dim)
        self.fc2 = nn.Linear(2 * dim, dim)

    def forward(self, x):
        return self.fc2(torch.nn.functional.gelu(self.fc1(self.norm(x))))


class Stack(nn.Module):
    def __init__(self, dim=16, tokens=12, depth=4):
        super().__init__()
        self.embed = nn.Linear(3, dim)
        self.pos = nn.Parameter(torch.randn(1, tokens, dim))   # float32 add: fp32 stream
        self.blocks = nn.Sequential(*[Block(dim) for _ in range(depth)])
        self.out = nn.Linear(dim, 3)

    def forward(self, x):
        return self.out(self.blocks(self.embed(x) + self.pos))


def _dtypes(model, run):
    """(input dtype, output dtype) of each block during ``run()``."""
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, o, i=i: seen.__setitem__(i, (a[0].dtype,
                                                                              o.dtype)))
             for i, b in enumerate(model.blocks)]
    try:
        run()
    finally:
        for h in hooks:
            h.remove()
    return [seen[i] for i in range(len(model.blocks))]


def _step(routed, *inputs, dtype=torch.bfloat16):
    with torch.autocast("cpu", dtype=dtype):
        out = routed(*inputs)
    out.float().square().mean().backward()
    return out


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_autocast_train_step_of_a_routed_dit(dtype):
    model = tiny_dit(depth=4, class_dropout_prob=0.0)
    routed = tread_fx.route(model, "1:2@0.5").train()
    out = _step(routed, *dit_inputs(), dtype=dtype)
    assert out.dtype == dtype and torch.isfinite(out).all()
    grads = [p.grad for p in model.parameters() if p.requires_grad]
    assert all(g is not None and g.dtype == torch.float32 and torch.isfinite(g).all()
               for g in grads)


def test_reinjected_tensor_has_the_block_output_dtype():
    torch.manual_seed(0)
    model = Stack()
    routed = tread_fx.route(model, "0:1@0.5").train()   # enters on the fp32 embedding
    x = torch.randn(2, 12, 3)
    dtypes = _dtypes(model, lambda: _step(routed, x))
    # the route's blocks return bf16; the tensor put back is bf16 too (not the fp32 input)
    assert dtypes[1][1] == torch.bfloat16
    assert dtypes[2][0] == torch.bfloat16
    assert model.embed.weight.grad is not None


def test_fp32_after_route_runs_only_the_block_after_the_route_in_float32():
    torch.manual_seed(0)
    model = Stack(depth=5)
    x = torch.randn(2, 12, 3)
    plain = tread_fx.route(model, "1:2@0.5").train()
    routed = tread_fx.route(model, "1:2@0.5", fp32_after_route=True).train()
    assert [d for _, d in _dtypes(model, lambda: _step(plain, x))] == [torch.bfloat16] * 5
    dtypes = _dtypes(model, lambda: _step(routed, x))
    assert dtypes[3] == (torch.float32, torch.float32)
    assert [dtypes[i][1] for i in (0, 1, 2, 4)] == [torch.bfloat16] * 4
    assert torch.is_autocast_enabled("cpu") is False   # the context was left
    with torch.autocast("cpu", dtype=torch.bfloat16):
        routed(x)
        assert torch.is_autocast_enabled("cpu")       # ... and restored inside one
    # inactive (eval, or ratio 0): the model's own computation, in its own dtypes
    routed.eval()
    with torch.no_grad():
        assert [d for _, d in _dtypes(model, lambda: _step_no_grad(routed, x))] == \
            [torch.bfloat16] * 5
    routed.train()
    with tread_fx.routing(routed, 0.0), torch.autocast("cpu", dtype=torch.bfloat16):
        torch.testing.assert_close(routed(x), model(x), rtol=0, atol=0)
    # with the TREAD nodes taken out, the graph is the unrouted one
    assert strip_routes(routed.graph).python_code("self").src == \
        strip_routes(plain.graph).python_code("self").src


def _step_no_grad(routed, x):
    with torch.autocast("cpu", dtype=torch.bfloat16):
        return routed(x)


def test_fp32_after_route_in_an_exported_diffusers_model_under_autocast():
    pytest.importorskip("diffusers")
    from tread_fx.tools import diffusers_zoo as zoo
    case = next(c for c in zoo.CASES if c["name"] == "DiTTransformer2DModel")
    model, inputs = zoo.build(case)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs,
                            fp32_after_route=True).train()
    assert routed.front_end == "export"
    seen = {}
    hooks = [b.register_forward_hook(lambda m, a, kw, o, i=i: seen.__setitem__(i, o.dtype),
                                     with_kwargs=True)
             for i, b in enumerate(model.transformer_blocks)]
    try:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = routed(**inputs)[0]
    finally:
        for h in hooks:
            h.remove()
    out.float().square().mean().backward()
    assert seen[3] == torch.float32 and seen[1] != torch.float32


def test_fp32_after_route_must_be_a_bool():
    with pytest.raises(ValueError, match="fp32_after_route must be True or False"):
        tread_fx.route(Stack(), "1:2@0.5", fp32_after_route="yes")
