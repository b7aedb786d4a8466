"""route() with the torch.export front end: the user's own blocks run (hooks, parameters),
one graph serves every batch size where that is proven, and not where it is not."""

from __future__ import annotations

import collections

import torch
from torch import nn

import tread_fx
from tread_fx.tools.zoo import build


def _pixart():
    model, inputs, _ = build("diffusers PixArtTransformer2DModel")
    return model, {k: v for k, v in inputs.items() if k != "return_dict"}


def _batch(inputs, b, seed=0):
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in inputs.items():
        if k == "timestep":
            out[k] = torch.randint(0, 1000, (b,), generator=gen)
        elif torch.is_tensor(v):
            out[k] = torch.randn((b, *v.shape[1:]), generator=gen)
        else:
            out[k] = v
    return out


def test_exported_graph_calls_the_users_blocks_and_reads_its_parameters():
    model, inputs = _pixart()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs, front_end="export")
    assert routed.front_end == "export"
    blocks = [n for n in routed.graph.nodes if n.op == "call_module"
              and n.target.startswith("transformer_blocks.")]
    assert [n.target for n in blocks] == [f"transformer_blocks.{i}" for i in range(4)]
    for node in routed.graph.nodes:
        if node.op == "get_attr" and not node.target.startswith("_tread."):
            owner, _, name = node.target.rpartition(".")
            module = model.get_submodule(owner)
            assert getattr(routed.get_submodule(owner), name) is getattr(module, name)
    assert routed.state_dict().keys() == model.state_dict().keys()
    # a hook on the user's block (as LoRA or a profiler adds) changes what the routed model
    # computes, in eval mode exactly like in the model
    routed.eval(), model.eval()
    handle = model.transformer_blocks[2].register_forward_hook(lambda m, a, out: out * 0.5)
    try:
        with torch.no_grad():
            assert torch.equal(routed(**inputs)[0], model(**inputs)[0])
            hooked = routed(**inputs)[0]
    finally:
        handle.remove()
    with torch.no_grad():
        assert not torch.equal(hooked, routed(**inputs)[0])


def test_one_exported_graph_serves_every_batch_size():
    model, inputs = _pixart()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs)
    assert routed.front_end == "export" and routed._guard.free_dims
    routed.eval(), model.eval()
    with torch.no_grad():
        for b in (2, 3, 5):
            batch = _batch(inputs, b, seed=b)
            assert torch.equal(routed(**batch)[0], model(**batch)[0])
    routed.train()
    for b in (2, 4):
        out = routed(**_batch(inputs, b))[0]
        assert out.shape[0] == b and routed.selectors[0].last_indices.shape == (b, 8)
    assert routed.retraces == 0
    # export specialises a size of 1: batch 1 is outside the graph's range, traced anew
    routed.eval()
    with torch.no_grad():
        batch = _batch(inputs, 1)
        assert torch.equal(routed(**batch)[0], model(**batch)[0])
    assert routed.retraces == 1


class _Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(x)


class UnrolledBatch(nn.Module):
    """Python loop over pairs of samples: export unrolls it for the example's batch."""

    def __init__(self, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(_Block() for _ in range(depth))

    def forward(self, x):
        parts = [p * (i + 1) for i, p in enumerate(torch.split(x, 2))]
        x = torch.cat(parts)
        for b in self.blocks:
            x = b(x)
        return x


def test_batch_dim_not_trusted_where_the_graph_depends_on_it():
    model = UnrolledBatch().eval()
    x = torch.randn(4, 6, 8)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,)).eval()
    for b in (4, 3, 6, 4):
        xb = torch.randn(b, 6, 8)
        assert torch.equal(routed(xb), model(xb))


CALLS: collections.Counter = collections.Counter()   # (block, batch size): real calls


class _CountedBlock(nn.Module):
    def __init__(self, d=8, p=0.0):
        super().__init__()
        self.lin = nn.Linear(d, d)
        self.drop = nn.Dropout(p)

    def forward(self, x):
        if type(x) is torch.Tensor:      # not while traced
            CALLS[id(self), x.shape[0]] += 1
        return x + self.drop(self.lin(x))


class Stack(nn.Module):
    def __init__(self, depth=4, p=0.0, after=None):
        super().__init__()
        self.blocks = nn.ModuleList(_CountedBlock(p=p) for _ in range(depth))
        self.after = after

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        if self.after == "pairs":   # a Python loop over pairs of samples after the blocks
            x = torch.cat([p * (i + 1) for i, p in enumerate(torch.split(x, 2))])
        if self.after == "noise" and self.training:
            x = x + torch.randn_like(x)
        return x


def _block_runs_at_one_more_sample() -> tuple[bool, list[int]]:
    """Route a Stack exported on batch-4 examples: (batch dim left free, how often each
    block ran at batch 5)."""
    model = Stack().train()
    CALLS.clear()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(torch.randn(4, 6, 8),),
                            front_end="export")
    return bool(routed._guard.free_dims), [CALLS[id(b), 5] for b in model.blocks]


def test_batch_check_runs_the_blocks_once_per_mode():
    """The check at one more sample runs the model once per mode (the train run is the one
    that probed the blocks' batch axes); the graphs' calls of the blocks are answered with
    the model's outputs."""
    assert _block_runs_at_one_more_sample() == (True, [2, 2, 2, 2])


def test_batch_check_past_its_memory_budget_runs_the_blocks_again(monkeypatch):
    """Copies of block calls stop at RECORD_BYTES (a big model routed on the CPU); the
    check then runs every block itself, and still grants the free batch dim."""
    from tread_fx import replay
    monkeypatch.setattr(replay, "RECORD_BYTES", 0)
    assert _block_runs_at_one_more_sample() == (True, [5, 5, 5, 5])


def test_batch_check_follows_the_random_stream():
    """Dropout in the blocks and noise after them: the graph matches the model at one more
    sample only if each answered block call leaves the random state where the block would."""
    model = Stack(p=0.5, after="noise").train()
    x = torch.randn(4, 6, 8)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,), front_end="export")
    assert routed._guard.free_dims
    routed.eval(), model.eval()
    xb = torch.randn(7, 6, 8)
    assert torch.equal(routed(xb), model(xb)) and routed.retraces == 0


def test_batch_dim_not_trusted_where_the_code_after_the_blocks_depends_on_it():
    model = Stack(after="pairs").eval()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(torch.randn(4, 6, 8),),
                            front_end="export").eval()
    assert not routed._guard.free_dims
    for b in (4, 3, 6, 4):
        xb = torch.randn(b, 6, 8)
        assert torch.equal(routed(xb), model(xb))


class _Res(nn.Module):
    def __init__(self, d, bias=True):
        super().__init__()
        self.norm, self.lin = nn.LayerNorm(d), nn.Linear(d, d, bias=bias)

    def forward(self, x):
        return x + self.lin(self.norm(x))


class _OddLast(nn.Module):
    """Three equal blocks, then one of the same class with other parameters (as SD3's last
    block), called twice."""

    def __init__(self, d=8):
        super().__init__()
        self.blocks = nn.ModuleList([_Res(d), _Res(d), _Res(d), _Res(d, bias=False)])

    def forward(self, x):
        for block in self.blocks[:3]:
            x = block(x)
        return self.blocks[3](self.blocks[3](x))


def test_a_same_class_block_outside_the_chain_is_a_call_and_stays_out_of_routes():
    torch.manual_seed(0)
    model, x = _OddLast(), torch.randn(2, 6, 8)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,), front_end="export").train()
    assert routed.block_chain == ("blocks.0", "blocks.1", "blocks.2")
    calls = [n.target for n in routed.graph.nodes if n.op == "call_module"]
    assert calls.count("blocks.3") == 2
    out = routed(x)
    # hand-written route with the selector's draw: blocks 1-2 on the kept rows only
    index = routed.selectors[0].last_indices
    rows = torch.arange(2)[:, None]
    h = model.blocks[0](x)
    kept = model.blocks[2](model.blocks[1](h[rows, index]))
    h = h.clone()
    h[rows, index] = kept
    torch.testing.assert_close(out, model.blocks[3](model.blocks[3](h)), rtol=0, atol=0)
    routed.eval()
    assert torch.equal(routed(x), model.eval()(x))
