"""Graphs traced on example inputs know what they were specialised on (issue: exact in the
conditions people train): other shapes, batch sizes, dtypes, autocast, devices, argument
values and value branches are traced anew and give what the model gives, or are refused
at route() with the source line."""

from __future__ import annotations

import warnings

import pytest
import torch
from torch import nn

import tread_fx
from tread_fx.tools.zoo import build


def _diffusers(name):
    model, inputs, _ = build(name)
    inputs = {k: v for k, v in inputs.items() if k != "return_dict"}
    return model, inputs


def _out(model, inputs):
    return model(**inputs, return_dict=False)[0]


@pytest.mark.parametrize("name", ["diffusers DiTTransformer2DModel",
                                  "diffusers PixArtTransformer2DModel",
                                  "diffusers SD3Transformer2DModel"])
def test_bf16_autocast_eval_and_ratio0_train_equal_the_model_under_the_same_autocast(name):
    model, inputs = _diffusers(name)
    span = "1:2"
    r0 = tread_fx.route(model, f"{span}@0", example_inputs={**inputs, "return_dict": False})
    routed = tread_fx.route(model, f"{span}@0.5",
                            example_inputs={**inputs, "return_dict": False})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        model.eval(), routed.eval()
        with torch.no_grad():
            ref = _out(model, inputs)
            got = _out(routed, inputs)
        assert ref.dtype == got.dtype
        assert torch.equal(got, ref)
        model.train(), r0.train()
        torch.manual_seed(0)
        ref = _out(model, inputs)
        torch.manual_seed(0)
        got = _out(r0, inputs)
        assert torch.equal(got, ref)
    assert routed.retraces >= 1     # the fp32 graphs were not reused under autocast


def test_one_routed_model_trains_on_three_resolutions_and_two_batch_sizes():
    model, inputs = _diffusers("diffusers PixArtTransformer2DModel")
    routed = tread_fx.route(model, "1:2@0.5", example_inputs={**inputs, "return_dict": False})
    opt = torch.optim.SGD(routed.parameters(), lr=1e-3)
    seen = []
    handle = model.transformer_blocks[1].register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[:2]),
        with_kwargs=True)
    shapes = [(b, s) for b in (2, 3) for s in (8, 12, 16)]
    try:
        for epoch in range(2):
            seen.clear()   # the first epoch's traces run the blocks too (probes, checks)
            for b, s in shapes:
                batch = {**inputs, "hidden_states": torch.randn(b, 4, s, s),
                         "encoder_hidden_states": torch.randn(b, 5, 12),
                         "timestep": torch.randint(0, 1000, (b,))}
                routed.train()
                loss = _out(routed, batch).square().mean()
                opt.zero_grad()
                loss.backward()
                opt.step()
    finally:
        handle.remove()
    # every block call saw half of that resolution's tokens
    expected = [(b, (s // 2) ** 2 - ((s // 2) ** 2) // 2) for b, s in shapes]
    assert [tuple(x) for x in seen] == expected
    # none in the second epoch; in the first, one per new resolution: the exported graphs
    # have a symbolic batch (checked), so each serves both batch sizes
    assert routed.retraces == len({s for _, s in shapes}) - 1
    # eval of a new shape equals the model
    routed.eval(), model.eval()
    batch = {**inputs, "hidden_states": torch.randn(3, 4, 10, 10)}
    with torch.no_grad():
        assert torch.equal(_out(routed, batch), _out(model, batch))


class ValueBranch(nn.Module):
    """A branch on tensor values outside the blocks (fx cannot trace it)."""

    def __init__(self, depth=4, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))

    def forward(self, x, t):
        if (t > 0.5).all():
            x = x * 2
        for b in self.blocks:
            x = b(x)
        return x


class _Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(x)


def test_value_dependent_branch_is_guarded():
    model = ValueBranch().eval()
    x = torch.randn(2, 6, 8)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x, torch.full((2,), 0.9))).eval()
    for t in (0.9, 0.1, 0.7, 0.2):
        tt = torch.full((2,), t)
        assert torch.equal(routed(x, tt), model(x, tt))
    assert routed.retraces == 1     # one trace for the other branch, then both cached
    described = routed.specialisations
    assert len(described) == 3      # train and eval at route(), the other branch in eval
    assert all(d["argument 't'"][1] == (2,) for d in described)


class ModuleBranch(nn.Module):
    """A branch on a value a submodule computes: cannot be checked before the call."""

    def __init__(self, depth=4, d=8):
        super().__init__()
        self.gate = nn.Linear(d, 1)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))

    def forward(self, x):
        if self.gate(x).mean() > 0:
            x = -x
        for b in self.blocks:
            x = b(x)
        return x


def test_unguardable_value_branch_is_refused_with_the_source_line():
    with pytest.raises(tread_fx.TraceError, match=r"test_guards.py:\d+: if self.gate\(x\)"):
        tread_fx.route(ModuleBranch(), "1:2@0.5", example_inputs=(torch.randn(2, 6, 8),))


class SizedBranch(nn.Module):
    """OmniGen's pattern: position ids viewed by the length of a module's output, then a
    branch on their largest value (the rotary table's scaling)."""

    def __init__(self, depth=4, d=8):
        super().__init__()
        self.embed = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))

    def forward(self, x, position_ids):
        h = self.embed(x)
        pos = position_ids.view(-1, h.size(1))
        if pos.max() + 1 > 10:
            h = h * 2
        for b in self.blocks:
            h = b(h)
        return h


def test_branch_through_the_size_of_a_module_output_is_guarded():
    model = SizedBranch().eval()
    x = torch.randn(2, 6, 8)
    short = torch.arange(6).repeat(2, 1)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x, short)).eval()
    for pos in (short, short + 20, short):
        assert torch.equal(routed(x, pos), model(x, pos))
    assert routed.retraces == 1     # the long positions took the other branch


class DataShapedBranch(SizedBranch):
    """The same, but the length read comes from a mask: it differs from call to call at
    the same input shapes, so a traced value of it cannot be reused."""

    def forward(self, x, position_ids, keep):
        h = self.embed(x)[keep]
        pos = position_ids[:, : h.size(0)]
        if pos.max() + 1 > 10:
            h = h * 2
        for b in self.blocks:
            h = b(h)
        return h


def test_branch_through_a_data_dependent_size_is_refused():
    x, pos = torch.randn(2, 6, 8), torch.arange(6).repeat(2, 1)
    keep = torch.tensor([True, False])
    with pytest.raises(tread_fx.TraceError, match=r"if pos.max\(\) \+ 1 > 10"):
        tread_fx.route(DataShapedBranch(), "1:2@0.5", example_inputs=(x, pos, keep))


class ListInput(nn.Module):
    def __init__(self, depth=4, d=8):
        super().__init__()
        self.blocks = nn.ModuleList(_Block(d) for _ in range(depth))

    def forward(self, xs, scale=1.0):
        if len(xs) != 2:
            raise ValueError("two inputs")
        x = xs[0] + xs[1] * scale
        for b in self.blocks:
            x = b(x)
        return x


def test_tensors_in_lists_are_inputs_and_arguments_are_guarded():
    model = ListInput().eval()
    a, b = torch.randn(2, 6, 8), torch.randn(2, 6, 8)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=([a, b],)).eval()
    assert not routed._tread._buffers    # no tensor of the list became a constant
    c = torch.randn(2, 6, 8)
    assert torch.equal(routed([a, c]), model([a, c]))
    assert torch.equal(routed([a, c], scale=3.0), model([a, c], scale=3.0))


def test_to_meta_device_then_forward():
    model = ListInput()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=([torch.randn(2, 6, 8)] * 2,))
    routed.to("meta").train()
    out = routed([torch.randn(2, 6, 8, device="meta")] * 2)
    assert out.device.type == "meta" and out.shape == (2, 6, 8)
    assert routed.selectors[0].last_indices.shape == (2, 3)


def test_half_precision_model_retraces():
    model = ValueBranch().eval()
    x, t = torch.randn(2, 6, 8), torch.full((2,), 0.9)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x, t)).eval()
    routed.to(torch.float64)
    assert model.blocks[0].lin.weight.dtype == torch.float64     # shared parameters
    out = routed(x.double(), t.double())
    assert out.dtype == torch.float64 and torch.equal(out, model(x.double(), t.double()))


def test_warns_when_it_keeps_retracing():
    model = ValueBranch().eval()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(torch.randn(2, 6, 8),
                                                             torch.full((2,), 0.9))).eval()
    with pytest.warns(UserWarning, match="traced its model 8 times.*argument 'x'"):
        for n in range(7, 16):
            routed(torch.randn(2, n, 8), torch.full((2,), 0.9))
