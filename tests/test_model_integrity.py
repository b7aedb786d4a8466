"""route() never changes the user's model behind their back, and copies stay routed modules."""

import copy

import pytest
import torch
from torch import nn
from torch.utils.checkpoint import checkpoint

import tread_fx
from conftest import dit_inputs, tiny_dit


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class Plain(nn.Module):
    def __init__(self, depth=4):
        super().__init__()
        self.register_buffer("pos", torch.zeros(1, 6, 8))
        self.register_buffer("tmp", torch.ones(1), persistent=False)
        self.scale = torch.full((8,), 2.0)  # a plain tensor attribute
        self.blocks = nn.ModuleList(Block() for _ in range(depth))

    def forward(self, x):
        x = x + self.pos * torch.tensor(3.0) + self.scale
        for blk in self.blocks:
            x = blk(x)
        return x * self.tmp


def test_routing_a_model_in_eval_mode_does_not_route_in_eval():
    model = tiny_dit(depth=4).eval()
    routed = tread_fx.route(model, "1:2@0.5")
    assert not routed.training and not routed.selectors[0].training
    with torch.no_grad():
        assert torch.equal(routed(*dit_inputs()), model(*dit_inputs()))
    assert tread_fx.kept_masks(routed) == []


def test_constants_and_plain_attributes_stay_off_the_model():
    model = Plain()
    before = set(vars(model))
    routed = tread_fx.route(model, "1:2@0.5")
    assert set(vars(model)) == before
    x = torch.randn(2, 6, 8)
    routed.eval()
    with torch.no_grad():
        assert torch.equal(routed(x), model(x))
    assert list(routed.state_dict()) == list(model.state_dict()) == [
        "pos", "blocks.0.fc.weight", "blocks.0.fc.bias", "blocks.1.fc.weight",
        "blocks.1.fc.bias", "blocks.2.fc.weight", "blocks.2.fc.bias", "blocks.3.fc.weight",
        "blocks.3.fc.bias"]


def test_buffers_stay_shared_through_to_and_load_state_dict():
    model = Plain()
    routed = tread_fx.route(model, "1:2@0.5")
    routed.to(torch.float64)
    assert model.pos.dtype == torch.float64 and model.pos is routed.pos
    state = {k: torch.ones_like(v) for k, v in model.state_dict().items()}
    routed.load_state_dict(state)
    assert model.pos.mean().item() == 1.0


def test_hooks_keep_firing_at_run_time():
    model = Plain()
    calls = []
    model.register_forward_hook(lambda m, a, o: calls.append("root"))
    routed = tread_fx.route(model, "1:2@0.5")
    routed(torch.randn(2, 6, 8))
    assert calls == ["root"]


def test_hooks_on_traced_through_modules_are_not_baked_in():
    class Inner(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)
            self.act = nn.Identity()

        def forward(self, x):
            return self.act(self.proj(x))

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.inner = Inner()
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            x = self.inner(x)
            for b in self.blocks:
                x = b(x)
            return x

    model = Model()
    seen = []
    handle = model.inner.register_forward_hook(lambda m, a, o: seen.append(o.shape))
    routed = tread_fx.route(model, "0:1@0.5")
    assert seen == []  # tracing did not run the hook
    routed(torch.randn(2, 6, 8))
    assert seen == [(2, 6, 8)]
    handle.remove()
    routed(torch.randn(2, 6, 8))
    assert seen == [(2, 6, 8)]


def test_copies_keep_both_graphs():
    model = tiny_dit(depth=4, class_dropout_prob=1.0)  # train mode drops every label
    routed = tread_fx.route(model, "1:2@0.5")
    x, t, y = dit_inputs()
    with torch.no_grad():
        expected = model.eval()(x, t, y)
    for twin in (copy.copy(routed), copy.deepcopy(routed)):
        assert type(twin).__name__ == "RoutedDiT"
        assert twin.block_chain == routed.block_chain and twin.routes == routed.routes
        twin.eval()  # the eval graph: labels are used, nothing is routed
        with torch.no_grad():
            assert torch.equal(twin(x, t, y), expected)
    replica = routed._replicate_for_data_parallel()
    assert replica._eval_graph is not None and len(replica._parameters) == 0


def test_blocks_outside_the_chain_are_refused():
    class Gapped(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(5))

        def forward(self, x):
            x = self.blocks[0](x).flip(1)   # mixes token positions: not the stream
            for b in self.blocks[1:]:
                x = b(x)
            return x

    with pytest.raises(tread_fx.NoBlocksFound, match=r"blocks.0 belong\(s\) with the block "
                                                     r"sequence blocks.1..blocks.4"):
        tread_fx.route(Gapped(), "1:2@0.5")


def test_trace_time_randomness_around_blocks_is_refused():
    class LayerDrop(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(4))

        def forward(self, x):
            for i, b in enumerate(self.blocks):
                if self.training and i == 1:  # stands in for `random.random() < p`
                    continue
                x = b(x)
            return x

    with pytest.raises(tread_fx.NoBlocksFound, match="train-mode trace calls blocks"):
        tread_fx.route(LayerDrop(), "0:1@0.5")


def test_checkpointed_block_calls_are_refused():
    class Ckpt(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Block() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = checkpoint(b, x, use_reentrant=False)
            return x

    with pytest.raises(tread_fx.TraceError, match="called through torch.utils.checkpoint"):
        tread_fx.route(Ckpt(), "0:1@0.5")


def test_side_output_with_kept_tokens_cannot_leave_a_route():
    class Tap(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            h = x + self.fc(x)
            return h, h[..., :4]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Tap() for _ in range(5))

        def forward(self, x):
            feats = []
            for b in self.blocks:
                x, f = b(x)
                feats.append(f)
            return x, feats[3]

    routed = tread_fx.route(Model(), "2:4@0.5").train()
    with pytest.raises(RuntimeError, match=r"route 0 .*leaves the route with the 5 kept tokens"):
        routed(torch.randn(2, 10, 8))
    routed.eval()
    assert routed(torch.randn(2, 10, 8))[1].shape == (2, 10, 4)
