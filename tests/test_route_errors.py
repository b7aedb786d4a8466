"""Bad input gets a clear error naming what is wrong; never a silent no-op."""

import pytest
import torch
from torch import nn

import tread_fx
from conftest import dit_inputs, tiny_dit


class Block(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x):
        return x + torch.tanh(self.fc(x))


class NoRepeats(nn.Module):
    def __init__(self):
        super().__init__()
        self.a = nn.Linear(8, 16)
        self.b = nn.Linear(16, 8)

    def forward(self, x):
        return self.b(self.a(x))


class ParallelHeads(nn.Module):
    """Same-class siblings that never feed each other."""

    def __init__(self):
        super().__init__()
        self.heads = nn.ModuleList(Block(8) for _ in range(3))

    def forward(self, x):
        return sum(h(x) for h in self.heads)


class FeatureTap(nn.Module):
    """Reuses an intermediate block output after the loop (like a long skip)."""

    def __init__(self, depth=6):
        super().__init__()
        self.blocks = nn.ModuleList(Block(8) for _ in range(depth))

    def forward(self, x):
        feats = []
        for blk in self.blocks:
            x = blk(x)
            feats.append(x)
        return x + feats[2]


class ShapeDependent(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block(8) for _ in range(3))

    def forward(self, x):
        side = int(x.shape[1] ** 0.5)
        for blk in self.blocks:
            x = blk(x)
        return x.reshape(x.shape[0], side, side, -1)


def test_no_repeated_blocks_lists_what_was_considered():
    with pytest.raises(tread_fx.NoBlocksFound, match="no sibling modules of the same class"):
        tread_fx.route(NoRepeats(), "0:1@0.5")
    with pytest.raises(tread_fx.NoBlocksFound,
                       match=r"3 x Block under 'heads': no block's output is the input"):
        tread_fx.route(ParallelHeads(), "0:1@0.5")


def test_unknown_container():
    with pytest.raises(tread_fx.NoBlocksFound, match=r"blocks='layers': .* no submodule"):
        tread_fx.route(tiny_dit(depth=4), "0:1@0.5", blocks="layers")


def test_container_override_is_used():
    routed = tread_fx.route(tiny_dit(depth=4), "0:1@0.5", blocks="blocks")
    assert routed.block_chain == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")


def test_index_outside_found_sequence_names_it():
    with pytest.raises(ValueError, match=r"route 0 \(1:4@0.5\): end=4 is outside the block "
                                         r"sequence blocks.0..blocks.3, which has 4 blocks"):
        tread_fx.route(tiny_dit(depth=4), "1:4@0.5")


def test_ratio_that_routes_nothing_is_rejected():
    model = tiny_dit(depth=4)
    inputs = dit_inputs()  # 16 tokens
    with pytest.raises(ValueError, match=r"route 0 .*selection_ratio=0.05 routes no token of 16"):
        tread_fx.route(model, "1:2@0.05", example_inputs=inputs)
    routed = tread_fx.route(model, "1:2@0.05").train()  # no example: caught at the first step
    with pytest.raises(ValueError, match=r"routes no token of 16"):
        routed(*inputs)
    x, t, y = inputs
    tread_fx.route(model, "1:2@0.0625", example_inputs={"x": x, "t": t, "y": y})  # 1 token: fine


def test_value_escaping_a_route_names_the_node():
    with pytest.raises(tread_fx.RouteEscapeError,
                       match=r"route 0 \(1:3@0.5.*node 'blocks_2' is computed on the kept "
                             r"tokens only, but 'add' .*outside the route uses it"):
        tread_fx.route(FeatureTap(), "1:3@0.5")
    # a route that ends at the tapped block is fine: its output is scattered back first
    routed = tread_fx.route(FeatureTap(), "1:2@0.5").train()
    assert routed(torch.randn(2, 10, 8)).shape == (2, 10, 8)


def test_untraceable_model_says_what_to_do():
    with pytest.raises(tread_fx.TraceError, match=r"torch.fx could not trace ShapeDependent"):
        tread_fx.route(ShapeDependent(), "0:1@0.5")


def test_unroute_needs_a_routed_module():
    with pytest.raises(TypeError, match="unroute\\(\\) takes a module returned by"):
        tread_fx.unroute(tiny_dit(depth=2))


def test_example_inputs_errors():
    with pytest.raises(ValueError, match=r"unknown argument\(s\) \['z'\]"):
        tread_fx.route(tiny_dit(depth=4), "1:2@0.5", example_inputs={"z": 1})


def test_block_that_changes_token_count_is_caught():
    class Pool(nn.Module):
        def __init__(self):
            super().__init__()
            self.fc = nn.Linear(8, 8)

        def forward(self, x):
            return self.fc(x)[:, :1]

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(Pool() for _ in range(3))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    routed = tread_fx.route(Model(), "0:0@0.5").train()
    with pytest.raises(RuntimeError, match=r"route 0 .*must keep the token count"):
        routed(torch.randn(2, 6, 8))
