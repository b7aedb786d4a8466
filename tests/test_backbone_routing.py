"""Every reference backbone routes without edits to its code (issue: architecture-agnostic).

For each: ratio 0 is the original bit for bit (outputs and gradients, train mode); eval
is the original at any ratio; the blocks of a route see the kept count; routed tokens
leave with their pre-route values; per-token side inputs reach the routed blocks
gathered with the same indices; forward and backward run at ratio 0.5.
"""

import math

import pytest
import torch

import tread_fx
from tread_fx.tools.backbones import check_backbone
from tread_fx.tools.zoo import BACKBONES, build

B = 3
NAMES = {name.split(" (")[0]: name for name in BACKBONES}


def chain_blocks(model, routed):
    return [model.get_submodule(t) for t in routed.block_chain]


def hidden_of(args, kwargs):
    return args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_ratio_zero_is_original_eval_is_original_and_half_ratio_trains(name):
    result = check_backbone(name)
    assert result["ratio0_bit_equal"], "ratio 0 differs from the original"
    assert result["eval_equal"], "eval mode differs from the original"
    assert result["trains_at_half"]
    assert result["grads"] >= 0.9 * result["trainable"]


@pytest.mark.parametrize("name", list(BACKBONES))
def test_route_sees_kept_tokens_and_routed_tokens_return_unchanged(name):
    model, inputs, span = build(name)
    routed = tread_fx.route(model, f"{span}@0.5", example_inputs=inputs).train()
    start, end = (int(v) for v in span.split(":"))
    blocks = chain_blocks(model, routed)
    seen, hidden_in = {}, {}

    def pre(i):
        def hook(mod, args, kwargs):
            seen[i] = hidden_of(args, kwargs)
        return hook

    def post(i):
        def hook(mod, args, kwargs, out):
            hidden_in[i] = out if torch.is_tensor(out) else out[-1]
        return hook

    handles = [b.register_forward_pre_hook(pre(i), with_kwargs=True) for i, b in enumerate(blocks)]
    handles += [b.register_forward_hook(post(i), with_kwargs=True) for i, b in enumerate(blocks)]
    routed(*inputs)
    for h in handles:
        h.remove()
    selector = routed.selectors[0]
    indices = selector.last_indices
    n = seen[0].shape[1]
    prefix = selector.prefix
    kept = prefix + (n - prefix) - math.floor((n - prefix) * 0.5)
    assert [seen[i].shape[1] for i in range(len(blocks))] == [
        kept if start <= i <= end else n for i in range(len(blocks))]
    rows = torch.arange(B)[:, None]
    before = hidden_in[start - 1]          # the tensor that entered the route
    assert torch.equal(seen[start], before[rows, indices])
    after = seen[end + 1]                  # what the block after the route receives
    mask = torch.zeros(B, n, dtype=torch.bool)
    mask[rows, indices] = True
    assert torch.equal(after[~mask], before[~mask])
    assert torch.equal(after[rows, indices], hidden_in[end])
    assert mask[:, :prefix].all()  # prefix tokens (class, time, label) are never routed


def test_rope_tables_reach_routed_blocks_gathered_with_the_same_indices():
    model, inputs, span = build(NAMES["RoPE DiT"])
    routed = tread_fx.route(model, "1:3@0.5", example_inputs=inputs).train()
    received = {}
    model.blocks[2].register_forward_pre_hook(
        lambda m, a, kw: received.update(x=a[0], rope=kw["rope"]), with_kwargs=True)
    routed(*inputs)
    indices = routed.selectors[0].last_indices
    assert routed.selectors[0].shared  # a batch-less table: one draw for the batch
    assert torch.equal(indices, indices[:1].expand_as(indices))
    cos, sin = received["rope"]
    assert torch.equal(cos, model.freqs_cos[indices[0]])
    assert torch.equal(sin, model.freqs_sin[indices[0]])


def test_joint_rope_keeps_text_rows_and_gathers_image_rows():
    model, inputs, span = build(NAMES["MMDiT"])
    routed = tread_fx.route(model, "1:3@0.5", example_inputs=inputs).train()
    received = {}
    model.joint_blocks[2].register_forward_pre_hook(
        lambda m, a, kw: received.update(args=a, kw=kw), with_kwargs=True)
    model.joint_blocks[0].register_forward_pre_hook(
        lambda m, a, kw: received.update(full=a, full_kw=kw), with_kwargs=True)
    routed(*inputs)
    indices = routed.selectors[0].last_indices[0]
    rope = received["args"][3] if len(received["args"]) > 3 else received["kw"]["rope"]
    full = received["full"][3] if len(received["full"]) > 3 else received["full_kw"]["rope"]
    text = inputs[2].shape[1]
    rows = torch.cat([torch.arange(text), text + indices])
    assert torch.equal(rope[0], full[0][rows]) and torch.equal(rope[1], full[1][rows])
    assert received["args"][1].shape[1] == text  # the text stream is never routed


def test_uvit_long_skips_are_gathered_and_scattered_back():
    model, inputs, span = build(NAMES["U-ViT"])
    # chain: in_blocks.0-2, mid_block, out_blocks.0-2. Route 0 makes skips that leave it
    # (scattered back for out_blocks.1-2); route 1 consumes skips made before it (gathered).
    routed = tread_fx.route(model, "0:1@0.5,4:5@0.5", example_inputs=inputs).train()
    roles = {(n.meta["tread"]["route_index"], n.meta["tread"]["role"])
             for n in routed.graph.nodes if "tread" in n.meta}
    assert (0, "scatter_escape") in roles and (1, "side") in roles
    routed(*inputs).square().mean().backward()
    r0 = tread_fx.route(model, "0:1@0,4:5@0", example_inputs=inputs).train()
    model.train()
    assert torch.equal(r0(*inputs), model(*inputs))


def test_block_that_needs_the_full_grid_is_refused_by_the_safety_check():
    from torch import nn

    class GridBlock(nn.Module):
        """Like Sana's feed-forward: reshapes tokens into the height x width grid."""

        def __init__(self, d=8, side=4):
            super().__init__()
            self.conv = nn.Conv2d(d, d, 3, padding=1)
            self.side = side

        def forward(self, x):
            b, n, d = x.shape
            grid = x.transpose(1, 2).reshape(b, d, self.side, self.side)
            return x + self.conv(grid).flatten(2).transpose(1, 2)

    class Model(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(GridBlock() for _ in range(4))

        def forward(self, x):
            for b in self.blocks:
                x = b(x)
            return x

    with pytest.raises(tread_fx.RoutingSafetyError,
                       match=r"route 0 .*block 'blocks.1' \(GridBlock\) cannot run on the kept "
                             r"tokens"):
        tread_fx.route(Model(), "1:2@0.5", example_inputs=(torch.randn(2, 16, 8),))
