"""Blocks called in other ways than block(x, c): keywords, tuples, nn.Sequential."""

import pytest
import torch
from torch import nn

import tread_fx
from conftest import block_token_counts


class Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.fc = nn.Linear(d, d)

    def forward(self, x, scale=None):
        h = torch.tanh(self.fc(x))
        return x + (h if scale is None else h * scale[:, None, :])


class KeywordCalls(nn.Module):
    def __init__(self, depth=5):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(depth))
        self.scale = nn.Linear(3, 8)

    def forward(self, x, cond):
        s = self.scale(cond)
        for blk in self.blocks:
            x = blk(scale=s, x=x)
        return x


class SequentialBlocks(nn.Module):
    def __init__(self, depth=5):
        super().__init__()
        self.body = nn.Sequential(*(Block() for _ in range(depth)))

    def forward(self, x):
        return self.body(x)


class TupleBlock(Block):
    """Returns (gate, hidden): the hidden state is the second element."""

    def __init__(self, d=8):
        super().__init__(d)
        self.gate = nn.Linear(3, d)

    def forward(self, x, cond):
        gate = torch.sigmoid(self.gate(cond))
        return gate, x + gate[:, None, :] * torch.tanh(self.fc(x))


class TupleOutputs(nn.Module):
    def __init__(self, depth=5):
        super().__init__()
        self.layers = nn.ModuleList(TupleBlock() for _ in range(depth))

    def forward(self, x, cond):
        gates = 0
        for layer in self.layers:
            g, x = layer(x, cond)
            gates = gates + g
        return x, gates


class TwoStreams(nn.Module):
    """Both streams flow block to block: which one to route cannot be told from shapes here."""

    def __init__(self, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(TwoStreamBlock() for _ in range(depth))

    def forward(self, x, ctx):
        for blk in self.blocks:
            ctx, x = blk(x, ctx)
        return x


class TwoStreamBlock(nn.Module):
    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(8, 8)

    def forward(self, a, b):  # no conventional name says which stream is the token stream
        return b + 1, a + self.fc(a)


@pytest.mark.parametrize("model, inputs, blocks", [
    (KeywordCalls(), (torch.randn(2, 10, 8), torch.randn(2, 3)), "blocks"),
    (SequentialBlocks(), (torch.randn(2, 10, 8),), "body"),
    (TupleOutputs(), (torch.randn(2, 10, 8), torch.randn(2, 3)), "layers"),
])
def test_routes_other_calling_conventions(model, inputs, blocks):
    torch.manual_seed(0)
    dense_out = model(*inputs)
    routed = tread_fx.route(model, "1:3@0.0").train()
    out = routed(*inputs)
    flat = lambda o: o if isinstance(o, tuple) else (o,)  # noqa: E731
    assert all(torch.equal(a, b) for a, b in zip(flat(out), flat(dense_out)))
    half = tread_fx.route(model, "1:3@0.5").train()
    container = model.get_submodule(blocks)
    seen = block_token_counts(half, list(container), lambda: half(*inputs))
    assert seen == [10, 5, 5, 5, 10]
    assert routed.block_chain[0] == f"{blocks}.0"


def test_ambiguous_streams_are_refused_not_guessed():
    with pytest.raises(tread_fx.NoBlocksFound, match=r"several streams .* ambiguous"):
        tread_fx.route(TwoStreams(), "1:2@0.5")


def test_hidden_option_names_the_token_stream():
    model = TwoStreams()
    x, ctx = torch.randn(2, 10, 8), torch.randn(2, 3, 8)
    routed = tread_fx.route(model, "1:2@0.5", hidden=0).train()
    seen = block_token_counts(routed, list(model.blocks), lambda: routed(x, ctx))
    assert seen == [10, 5, 5, 10]
    ctx_seen = []
    model.blocks[1].register_forward_pre_hook(lambda m, a: ctx_seen.append(a[1].shape))
    routed(x, ctx)
    assert ctx_seen == [(2, 3, 8)]  # the other stream passes untouched


class InOutBlocks(nn.Module):
    """Encoder blocks, one mid block and decoder blocks of other shapes (U-ViT-like)."""

    def __init__(self):
        super().__init__()
        self.down = nn.ModuleList(Block() for _ in range(2))
        self.mid = Block()
        self.up = nn.ModuleList(nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 8)) for _ in range(2))

    def forward(self, x):
        for b in self.down:
            x = b(x)
        x = self.mid(x)
        for b in self.up:
            x = b(x)
        return x


def test_chain_spans_block_kinds_and_a_lone_mid_block():
    routed = tread_fx.route(InOutBlocks(), "1:3@0.5")
    assert routed.block_chain == ("down.0", "down.1", "mid", "up.0", "up.1")
