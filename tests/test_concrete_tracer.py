"""Python the concrete tracer follows on real values: item assignment, sizes given one by
one, torch.tensor of traced numbers, protocol probes; and what it must refuse."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tread_fx
from tread_fx.verify import verify


class Block(nn.Module):
    def __init__(self, d=16):
        super().__init__()
        self.qkv, self.out = nn.Linear(d, 3 * d), nn.Linear(d, d)

    def forward(self, hidden_states, bias):
        q, k, v = self.qkv(hidden_states + bias).chunk(3, dim=-1)
        return hidden_states + self.out(F.scaled_dot_product_attention(q, k, v))


class Net(nn.Module):
    """Builds a per-token bias the way diffusers models often do: zeros, then writes."""

    def __init__(self, d=16, write="plain"):
        super().__init__()
        self.write = write
        self.embed = nn.Linear(4, d)
        self.blocks = nn.ModuleList(Block(d) for _ in range(4))
        self.register_buffer("freqs", torch.linspace(0.1, 1.0, d))

    def forward(self, x, scale):
        h = self.embed(x)
        b, n, d = h.shape
        bias = torch.zeros(b, n, d)                       # sizes one by one, traced
        bias[:, : n // 2] = scale[:, None, None]          # item assignment
        bias[:, n // 2:] = self.freqs[None, None].expand(b, n - n // 2, -1)
        if self.write == "view":
            view = bias[:, :2]
            view[:] = 1.0                                 # writes through a view of bias
        if self.write == "input":
            x[:, 0] = 0.0                                 # writes into the caller's tensor
        grid = torch.tensor([n, d])                       # a tensor of traced numbers
        h = h * (grid.float().mean() / grid.float().mean())
        for blk in self.blocks:
            h = blk(h, bias)
        return h


def _inputs():
    torch.manual_seed(1)
    return (torch.randn(2, 10, 4), torch.rand(2))


def test_item_assignment_and_sizes_trace_and_route_correctly():
    torch.manual_seed(0)
    model = Net()
    report = verify(model, "1:2@0.5", _inputs(), front_end="concrete")
    assert report.front_end == "concrete"
    assert report.ok, str(report)
    # the bias is per token: gathered for the route
    assert any(s.endswith(":1") or "bias" in s for s in report.routes[0].side_inputs)


def test_a_traced_write_does_not_touch_the_values_it_was_traced_on():
    torch.manual_seed(0)
    model = Net()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=_inputs(), front_end="concrete")
    x, scale = _inputs()
    x2, scale2 = x.clone(), scale * 3
    model.eval(), routed.eval()
    with torch.no_grad():   # a new value of `scale` reaches the written rows
        assert torch.equal(routed(x2, scale2), model(x2, scale2))


def test_a_write_through_a_view_is_refused():
    with pytest.raises(tread_fx.TraceError, match="writes in place into a tensor that .* "
                                                  "reads afterwards through"):
        tread_fx.route(Net(write="view"), "1:2@0.5", example_inputs=_inputs(),
                       front_end="concrete")


def test_a_write_into_an_input_is_refused():
    with pytest.raises(tread_fx.TraceError, match=r"writes into an input \(x\) in place"):
        tread_fx.route(Net(write="input"), "1:2@0.5", example_inputs=_inputs(),
                       front_end="concrete")


def test_protocol_probes_are_not_traced_attributes():
    from tread_fx.passes.trace import _ConcreteTracer

    seen = {}

    class Probe(nn.Module):
        def forward(self, x):
            seen["cuda"] = hasattr(x, "__cuda_array_interface__")
            seen["shape"] = hasattr(x, "shape")
            return x * 2

    _ConcreteTracer([], {"x": torch.randn(2, 3)}).trace(Probe())
    assert seen == {"cuda": False, "shape": True}


class _Cached(nn.Module):
    """Caches what it computed, keyed on the input's length (AnyFlow's RoPE does)."""

    def __init__(self):
        super().__init__()
        self._cache = None

    def forward(self, x):
        if self._cache is not None and self._cache[0] == x.shape[1]:
            return self._cache[1]
        table = torch.linspace(0, 1, x.shape[1])[:, None].expand(-1, x.shape[-1])
        self._cache = (x.shape[1], table)
        return table


class CachingNet(Net):
    def __init__(self):
        super().__init__()
        self.rope = _Cached()

    def forward(self, x, scale):
        h = self.embed(x)
        h = h + self.rope(h)
        for blk in self.blocks:
            h = blk(h, torch.zeros_like(h))
        return h


@pytest.mark.parametrize("front_end", [None, "export", "concrete"])
def test_caches_the_tracer_filled_are_as_they_were(front_end):
    torch.manual_seed(0)
    model = CachingNet()
    inputs = _inputs()
    tread_fx.route(model, "1:2@0.5", example_inputs=inputs, front_end=front_end)
    assert model.rope._cache is None          # not a proxy or fake tensor left behind
    model.eval()
    with torch.no_grad():
        model(*inputs)                        # the user's model still runs
    assert isinstance(model.rope._cache[1], torch.Tensor)
