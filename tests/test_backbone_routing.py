"""Every reference backbone routes without edits to its code (issue: architecture-agnostic).

For each: ratio 0 is the original bit for bit (outputs and gradients, train mode); eval
is the original at any ratio; a ratio-0.5 train step (output and every gradient) equals an
independent reference computed from the same kept indices without tread_fx's routing code
(:mod:`tread_fx.reference`); the blocks of a route see the kept count; prefix tokens
(pinned per backbone) are never routed; routed tokens leave with their pre-route values;
per-token side inputs reach the routed blocks gathered with the same indices. Some tests
break tread_fx on purpose and check that these checks then fail.
"""

import math

import pytest
import torch

import tread_fx
from tread_fx.tools.backbones import TOLERANCE, check_backbone, compare_with_reference
from tread_fx.tools.zoo import BACKBONES, build
from conftest import break_side_gather

B = 3
NAMES = {name.split(" (")[0]: name for name in BACKBONES}

# Read from the models' code, not from tread_fx: the blocks of the chain, and the tokens
# concatenated in front of the patch tokens before the first block.
EXPECTED = {                       # short name: (chain length, prefix tokens)
    "DiT": (6, 0),                 # blocks.0-5; patch tokens only
    "U-ViT": (7, 2),               # in_blocks.0-2, mid_block, out_blocks.0-2; [time, label, patches]
    "RoPE DiT": (6, 0),            # blocks.0-5; patch tokens only
    "MMDiT": (6, 0),               # joint_blocks.0-5; text is another stream, not a prefix
    "bidirectional SSM": (6, 0),   # blocks.0-5; patch tokens only
    "ViT + class token": (6, 1),   # blocks.0-5 of the Sequential; [cls, patches]
}
assert EXPECTED.keys() == NAMES.keys()


def chain_blocks(model, routed):
    return [model.get_submodule(t) for t in routed.block_chain]


def hidden_of(args, kwargs):
    return args[0] if args else kwargs.get("x", kwargs.get("hidden_states"))


@pytest.mark.parametrize("name", list(BACKBONES))
def test_ratio_zero_is_original_eval_is_original_and_half_ratio_equals_reference(name):
    result = check_backbone(name)
    depth, prefix = EXPECTED[name.split(" (")[0]]
    assert len(result["chain"]) == depth
    assert result["prefix"] == prefix
    assert result["ratio0_bit_equal"], "ratio 0 differs from the original"
    assert result["eval_equal"], "eval mode differs from the original"
    assert result["equals_reference"], (
        f"ratio 0.5 differs from the reference: output {result['reference_max_diff']:.2e} "
        f"(scale {result['reference_scale']:.2f}), gradients "
        f"{result['reference_grad_diff']:.2e} relative")
    assert result["trains_at_half"]
    assert result["grads"] >= 0.9 * result["trainable"]


def check_kept_tokens_return_unchanged(name):
    """The blocks of the route see the kept tokens (prefix pinned), the others come back
    with their pre-route values."""
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
    try:
        routed(*inputs)
    finally:
        for h in handles:
            h.remove()
    selector = routed.selectors[0]
    indices = selector.last_indices
    n = seen[0].shape[1]
    prefix = EXPECTED[name.split(" (")[0]][1]
    assert selector.prefix == prefix, "prefix tokens detected wrongly"
    assert getattr(selector, "fixed", (prefix, 0)) == (prefix, 0)  # and no tail rows
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


@pytest.mark.parametrize("name", list(BACKBONES))
def test_route_sees_kept_tokens_and_routed_tokens_return_unchanged(name):
    check_kept_tokens_return_unchanged(name)


@pytest.mark.parametrize("short", ["U-ViT", "ViT + class token"])
def test_kept_token_check_fails_when_prefix_detection_is_broken(short, monkeypatch):
    from tread_fx.passes import token_axes

    if hasattr(token_axes, "fixed_rows"):   # (head, tail) rows never routed
        monkeypatch.setattr(token_axes, "fixed_rows", lambda *args, **kwargs: (0, 0))
    else:
        monkeypatch.setattr(token_axes, "detect_prefix", lambda *args, **kwargs: 0)
    model, inputs, span = build(NAMES[short])
    assert tread_fx.route(model, f"{span}@0.5", example_inputs=inputs).selectors[0].prefix == 0
    with pytest.raises(AssertionError):
        check_kept_tokens_return_unchanged(NAMES[short])


@pytest.mark.parametrize("short", ["RoPE DiT", "MMDiT"])
def test_reference_comparison_fails_when_side_inputs_are_gathered_wrongly(short, monkeypatch):
    break_side_gather(monkeypatch)
    name = NAMES[short]
    model, inputs, span = build(name)
    routed = tread_fx.route(model, f"{span}@0.5", example_inputs=inputs).train()
    result = compare_with_reference(name, model, routed, inputs, f"{span}@0.5")
    assert result["finite"]                  # the broken model runs ...
    assert not result["equal"]               # ... and the reference catches it
    assert result["max_abs_diff"] > 100 * TOLERANCE * result["scale"]  # far off, not noise


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
    # the skips leaving route 0 come back with their pre-route values (the reference resets
    # the dropped tokens of every block output made inside a route)
    result = compare_with_reference(NAMES["U-ViT"], model, routed, inputs, "0:1@0.5,4:5@0.5")
    assert result["equal"], result
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
