"""Regression tests for the review's findings (issue: exact in the conditions people train).

Each test builds the situation the review found and checks the outcome against what the
user's own model computes or what the semantics say, never against the pass's decisions.
"""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn
import torch.nn.functional as F

import tread_fx
from tread_fx.models.vit import ViT

from conftest import block_inputs as _seen_by, dit_inputs, perturb_, tiny_dit


class TimmViT(ViT):
    """timm's layout: pos_drop and norm_pre between the class-token cat and the blocks."""

    def __init__(self, *args, drop=0.0, **kwargs):
        super().__init__(*args, **kwargs)
        self.pos_drop = nn.Dropout(drop)
        self.norm_pre = nn.LayerNorm(self.hidden_size, eps=1e-6)

    def forward(self, x, t, y):
        c = self.t_embedder(t) + self.y_embedder(y, self.training)
        x = self.patch_embed(x)
        cls_token = self.cls_token.expand(x.shape[0], -1, -1) + c.unsqueeze(1)
        x = torch.cat((cls_token, x), dim=1)
        x = self.pos_drop(x + self.pos_embed)
        x = self.norm_pre(x)
        x = self.blocks(x)
        x = self.norm(x)
        return self.unpatchify(self.head(x[:, 1:]))


def _timm_vit(drop=0.0):
    torch.manual_seed(0)
    return perturb_(TimmViT(input_size=8, patch_size=2, hidden_size=32, depth=6, num_heads=2,
                            num_classes=10, class_dropout_prob=0.0, drop=drop))


# -- 1: discovery must not join same-class siblings outside the blocks -------------------

def test_norms_beside_the_blocks_are_not_part_of_the_chain():
    model = _timm_vit()
    routed = tread_fx.route(model, "2:4@0.5", example_inputs=dit_inputs())
    assert routed.block_chain == tuple(f"blocks.{i}" for i in range(6))
    assert routed.routes[0].start == 2 and routed.routes[0].end == 4
    counts = _seen_by(list(model.blocks), lambda: routed.train()(*dit_inputs()))
    n = 1 + 16
    kept = 1 + 16 - math.floor(16 * 0.5)
    assert [counts[i].shape[1] for i in range(6)] == [n, n, kept, kept, kept, n]
    last = tread_fx.route(model, "-1:-1@0.5", example_inputs=dit_inputs())
    assert last.selectors[0].blocks == ("blocks.5",)


# -- 2: prefix (class token) detection ---------------------------------------------------

@pytest.mark.parametrize("drop", [0.0, 0.1])
def test_class_token_behind_dropout_and_norm_is_never_routed(drop):
    model = _timm_vit(drop)
    routed = tread_fx.route(model, "1:3@0.5", example_inputs=dit_inputs()).train()
    for _ in range(30):
        seen = _seen_by(list(model.blocks), lambda: routed(*dit_inputs()))
        before = seen[0]
        # the class token (row 0) always reaches the routed blocks as row 0
        indices = routed.selectors[0].last_indices
        assert (indices[:, 0] == 0).all()
        assert seen[1].shape[1] == 1 + 8


class PosFirst(nn.Module):
    """``pos + cat(...)`` with the position embedding first; fx-traceable."""

    def __init__(self, d=16, n=8, depth=4):
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.pos = nn.Parameter(torch.randn(1, n + 1, d))
        self.proj = nn.Linear(d, d)
        self.blocks = nn.ModuleList(_Attn(d) for _ in range(depth))

    def forward(self, x):
        x = self.pos + torch.cat([self.cls.expand(x.shape[0], -1, -1), self.proj(x)], dim=1)
        for b in self.blocks:
            x = b(x)
        return x[:, 1:]


class _Attn(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.qkv = nn.Linear(d, 3 * d)
        self.out = nn.Linear(d, d)

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        return x + self.out(F.scaled_dot_product_attention(q, k, v))


def test_pos_plus_cat_without_examples_is_refused_not_routed():
    with pytest.raises(tread_fx.TokenAxisError, match="prefix_tokens"):
        tread_fx.route(PosFirst(), "1:2@0.5")
    routed = tread_fx.route(PosFirst(), "1:2@0.5", example_inputs=(torch.randn(2, 8, 16),))
    assert routed.selectors[0].fixed == (1, 0)


class InContext(nn.Module):
    """In-context conditioning: text tokens in front of the image tokens, more of them."""

    def __init__(self, d=16, depth=4):
        super().__init__()
        self.txt = nn.Linear(12, d)
        self.img = nn.Linear(4, d)
        self.blocks = nn.ModuleList(_Attn(d) for _ in range(depth))

    def forward(self, x, context):
        h = torch.cat([self.txt(context), self.img(x)], dim=1)
        for b in self.blocks:
            h = b(h)
        return h[:, context.shape[1]:]


def test_text_tokens_longer_than_image_tokens_are_never_routed():
    model = InContext()
    x, ctx = torch.randn(2, 6, 4), torch.randn(2, 10, 12)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x, ctx)).train()
    routed(x, ctx)
    indices = routed.selectors[0].last_indices
    assert indices.shape[1] == 10 + 3
    assert (indices[:, :10] == torch.arange(10)).all()


# -- 3: single-stream models: only image rows are routed ---------------------------------

class SingleStream(nn.Module):
    """Image first, then caption, then padding rows from a learned pad token."""

    def __init__(self, d=16, depth=4, pad=3):
        super().__init__()
        self.img = nn.Linear(4, d)
        self.txt = nn.Linear(12, d)
        self.pad_token = nn.Parameter(torch.randn(d))
        self.pad = pad
        self.blocks = nn.ModuleList(_Attn(d) for _ in range(depth))

    def forward(self, x, caption):
        img = self.img(x)
        pad = self.pad_token.expand(x.shape[0], self.pad, -1)
        h = torch.cat([img, self.txt(caption), pad], dim=1)
        for b in self.blocks:
            h = b(h)
        return h[:, :x.shape[1]]


def test_single_stream_routes_only_image_rows():
    model = SingleStream()
    x, cap = torch.randn(2, 8, 4), torch.randn(2, 5, 12)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x, cap)).train()
    for _ in range(10):
        routed(x, cap)
        indices = routed.selectors[0].last_indices
        assert indices.shape[1] == 4 + 5 + 3
        # every caption and padding row is kept, in place after the image rows
        assert (indices[:, 4:] == torch.arange(8, 16)).all()
        assert (indices[:, :4] < 8).all()


# -- 4: sequence-first streams are routed on the token axis, never the batch --------------

class SeqFirstBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.attn = nn.MultiheadAttention(d, 2)
        self.ff = nn.Linear(d, d)

    def forward(self, x):  # x [N, B, D]
        x = x + self.attn(x, x, x, need_weights=False)[0]
        return x + self.ff(x)


class SeqFirst(nn.Module):
    def __init__(self, d=16, depth=4):
        super().__init__()
        self.proj = nn.Linear(4, d)
        self.blocks = nn.ModuleList(SeqFirstBlock(d) for _ in range(depth))

    def forward(self, x):  # x [B, N, 4]
        h = self.proj(x).transpose(0, 1)
        for b in self.blocks:
            h = b(h)
        return h.transpose(0, 1)


def test_sequence_first_stream_routes_tokens_not_samples():
    torch.manual_seed(0)
    model = SeqFirst().train()
    x = torch.randn(3, 10, 4)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,)).train()
    seen = _seen_by(list(model.blocks), lambda: routed(x))
    assert tuple(seen[1].shape) == (5, 3, 16)       # 5 of 10 tokens, all 3 samples
    assert tuple(seen[3].shape) == (10, 3, 16)
    # reference: the blocks run by hand on the kept tokens of each sample
    indices = routed.selectors[0].last_indices
    with torch.no_grad():
        h = model.proj(x).transpose(0, 1)
        h = model.blocks[0](h)
        kept = torch.stack([h[indices[b], b] for b in range(3)], dim=1)
        kept = model.blocks[2](model.blocks[1](kept))
        for b in range(3):
            h[indices[b], b] = kept[:, b]
        ref = model.blocks[3](h).transpose(0, 1)
        torch.manual_seed(5)
        routed(x)
        indices2 = routed.selectors[0].last_indices
    assert torch.equal(indices, indices) and indices2.shape == indices.shape
    torch.manual_seed(7)
    out = routed(x)
    torch.manual_seed(7)
    routed(x)
    assert torch.allclose(_hand_seq_first(model, x, routed.selectors[0].last_indices), out,
                          atol=1e-6)


def _hand_seq_first(model, x, indices):
    with torch.no_grad():
        h = model.blocks[0](model.proj(x).transpose(0, 1))
        kept = torch.stack([h[indices[b], b] for b in range(x.shape[0])], dim=1)
        kept = model.blocks[2](model.blocks[1](kept))
        h = h.clone()
        for b in range(x.shape[0]):
            h[indices[b], b] = kept[:, b]
        return model.blocks[3](h).transpose(0, 1)


# -- 16: several token axes are refused, naming the block ---------------------------------

class GridBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(self.norm(x))


class GridStream(nn.Module):
    def __init__(self, d=8, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(GridBlock(d) for _ in range(depth))

    def forward(self, x):  # x [B, H, W, C], window-attention style
        for b in self.blocks:
            x = b(x)
        return x


def test_hidden_state_with_two_token_axes_is_refused():
    with pytest.raises(tread_fx.TokenAxisError, match=r"blocks\.1.*token ax"):
        tread_fx.route(GridStream(), "1:2@0.5", example_inputs=(torch.randn(2, 4, 6, 8),))


# -- 5: submodules keep their own train/eval mode ----------------------------------------

class CondDrop(nn.Module):
    def __init__(self, p=1.0):
        super().__init__()
        self.p = p

    def forward(self, c):
        if self.training:
            return c * (torch.rand_like(c[:, :1]) >= self.p)
        return c


class WithCondDrop(nn.Module):
    def __init__(self, d=8, depth=4):
        super().__init__()
        self.drop = CondDrop()
        self.blocks = nn.ModuleList(_CondBlock(d) for _ in range(depth))

    def forward(self, x, c):
        c = self.drop(c)
        for b in self.blocks:
            x = b(x, c)
        return x


class _CondBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, c):
        return x + self.lin(x) * c[:, None]


def test_submodule_left_in_eval_keeps_its_mode():
    model = WithCondDrop().train()
    model.drop.eval()                      # the user turned conditioning dropout off
    x, c = torch.randn(2, 6, 8), torch.randn(2, 8)
    routed = tread_fx.route(model, "1:2@0", example_inputs=(x, c))
    assert routed.training and not model.drop.training
    assert torch.equal(routed(x, c), model(x, c))
    routed.train()                         # like model.train(): now the dropout is on too
    assert model.drop.training
    assert torch.equal(routed(x, c), model(x, c))


# -- 6: unroute keeps what the graph is specialised on -------------------------------------

def test_unroute_keeps_guards_and_accepts_return_dict():
    from tread_fx.tools.zoo import build
    model, inputs, _ = build("diffusers DiTTransformer2DModel")
    inputs = {k: v for k, v in inputs.items() if k != "return_dict"}
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs)
    dense = tread_fx.unroute(routed).eval()
    model.eval()
    with torch.no_grad():
        ref = model(**inputs, return_dict=False)[0]
        assert torch.equal(dense(**inputs, return_dict=False)[0], ref)
        bigger = {k: torch.cat([v, v]) for k, v in inputs.items()}
        assert torch.equal(dense(**bigger, return_dict=False)[0],
                           model(**bigger, return_dict=False)[0])


# -- 7: ratio changes under torch.compile(fullgraph=True) ----------------------------------

def test_compiled_routed_model_survives_a_ratio_change():
    model = tiny_dit(depth=4)
    routed = tread_fx.route(model, "1:2@0.5").train()
    compiled = torch.compile(routed, fullgraph=True, backend="eager")
    x, t, y = dit_inputs()
    compiled(x, t, y)
    with tread_fx.routing(routed, 0.25):
        torch.manual_seed(3)
        out = compiled(x, t, y)
        torch.manual_seed(3)
        ref = routed(x, t, y)
    assert torch.allclose(out, ref, atol=1e-6)


# -- 8: a text stream as long as the kept count is not "kept tokens" -----------------------

def test_mmdit_text_length_equal_to_kept_count():
    from tread_fx.models.mmdit import MMDiT
    torch.manual_seed(0)
    model = perturb_(MMDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=4,
                           num_heads=2, context_dim=12, pooled_dim=10))
    n = 16
    kept = n - n // 2
    inputs = (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randn(2, kept, 12),
              torch.randn(2, 10))
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs).train()
    routed(*inputs).square().mean().backward()


# -- 9: token_inputs always takes effect or raises ----------------------------------------

class RopeBlock(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, rotary_emb):
        return x + self.lin(x * rotary_emb)


class PositionalRope(nn.Module):
    def __init__(self, d=8, n=6, depth=4):
        super().__init__()
        self.register_buffer("table", torch.randn(n, d))
        self.blocks = nn.ModuleList(RopeBlock(d) for _ in range(depth))

    def forward(self, x):
        rope = self.table * 1.0
        for b in self.blocks:
            x = b(x, rope)          # the table passed by position
        return x


def _hand_rope(model, x, indices, start, end):
    with torch.no_grad():
        rope = model.table
        h = x
        for i, b in enumerate(model.blocks):
            if i == start:
                full = h
                h = h[torch.arange(x.shape[0])[:, None], indices]
            idx = indices if start <= i <= end else None
            table = rope if idx is None else rope[idx]
            h = h + b.lin(h * table)
            if i == end:
                full = full.clone()
                full[torch.arange(x.shape[0])[:, None], indices] = h
                h = full
        return h


def test_token_inputs_by_parameter_name_applies_to_positional_arguments():
    model = PositionalRope()
    x = torch.randn(2, 6, 8)
    # with examples: the override by name must apply (here it says "per token on axis 0")
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,),
                            token_inputs={"rotary_emb": 0}).train()
    torch.manual_seed(0)
    out = routed(x)
    assert torch.allclose(out, _hand_rope(model, x, routed.selectors[0].last_indices, 1, 2),
                          atol=1e-6)
    # an override for a name no routed block takes raises instead of being ignored
    with pytest.raises(ValueError, match="token_inputs.*'rope_table'"):
        tread_fx.route(model, "1:2@0.5", example_inputs=(x,), token_inputs={"rope_table": 0})


def test_token_inputs_without_examples_take_effect():
    model = PositionalRope()
    x = torch.randn(2, 6, 8)
    routed = tread_fx.route(model, "1:2@0.5", token_inputs={"rotary_emb": 0}).train()
    out = routed(x)
    assert torch.allclose(out, _hand_rope(model, x, routed.selectors[0].last_indices, 1, 2),
                          atol=1e-6)
    with pytest.raises(ValueError, match="token_inputs"):
        tread_fx.route(model, "1:2@0.5", token_inputs={"nope": 0})


# -- 10: the route's hidden input passed again as a side input is gathered -----------------

class X0Block(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, x0):
        return x + self.lin(x0) * 0.5 + self.lin(x)


class X0Model(nn.Module):
    def __init__(self, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(X0Block() for _ in range(depth))

    def forward(self, x):
        x0 = x * 1.0
        h = x0
        for b in self.blocks:
            h = b(h, x0)
        return h


def test_hidden_input_reused_as_side_input_is_gathered():
    model = X0Model()
    x = torch.randn(2, 6, 8)
    routed = tread_fx.route(model, "0:1@0.5", example_inputs=(x,)).train()
    out = routed(x)
    idx = routed.selectors[0].last_indices
    rows = torch.arange(2)[:, None]
    with torch.no_grad():
        k = x[rows, idx]
        k = model.blocks[1](model.blocks[0](k, k), k)
        h = x.clone()
        h[rows, idx] = k
        ref = model.blocks[3](model.blocks[2](h, x), x)
    assert torch.allclose(out, ref, atol=1e-6)


# -- 11 and 15: batch axes are decided by a second probe, not by a size match --------------

class TableModel(nn.Module):
    """A learned [1, N, D] position table added inside each block (batch-less)."""

    def __init__(self, d=8, n=6, depth=4):
        super().__init__()
        self.pos = nn.Parameter(torch.randn(1, n, d))
        self.blocks = nn.ModuleList(_PosBlock(d) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x, self.pos * 1.0)
        return x


class _PosBlock(nn.Module):
    def __init__(self, d):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x, pos):
        return x + self.lin(x + pos)


def test_batch_one_example_then_batch_two_training():
    model = TableModel()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(torch.randn(1, 6, 8),)).train()
    x = torch.randn(2, 6, 8)
    out = routed(x)
    idx = routed.selectors[0].last_indices
    rows = torch.arange(2)[:, None]
    with torch.no_grad():
        pos = model.pos
        h = model.blocks[0](x, pos)
        k = h[rows, idx]
        p = pos.expand(2, -1, -1)[rows, idx]
        k = model.blocks[2](model.blocks[1](k, p), p)
        h = h.clone()
        h[rows, idx] = k
        ref = model.blocks[3](h, pos)
    assert torch.allclose(out, ref, atol=1e-6)


class BiasBlock(nn.Module):
    def __init__(self, d=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(d, 3 * d)

    def forward(self, x, bias):  # bias [heads, N, N]
        b, n, d = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=bias)
        return x + o.transpose(1, 2).reshape(b, n, d)


class BiasModel(nn.Module):
    def __init__(self, n=6, heads=2, depth=4):
        super().__init__()
        self.bias = nn.Parameter(torch.randn(heads, n, n))
        self.blocks = nn.ModuleList(BiasBlock(heads=heads) for _ in range(depth))

    def forward(self, x):
        for b in self.blocks:
            x = b(x, self.bias * 1.0)
        return x


def test_head_bias_with_heads_equal_to_batch_is_not_per_sample():
    model = BiasModel()
    x = torch.randn(2, 6, 8)       # batch 2 == heads 2
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,)).train()
    out = routed(x)
    idx = routed.selectors[0].last_indices
    assert torch.equal(idx, idx[:1].expand_as(idx))    # batch-less table: one draw
    i = idx[0]
    with torch.no_grad():
        h = model.blocks[0](x, model.bias)
        bias = model.bias[:, i][:, :, i]
        k = model.blocks[2](model.blocks[1](h[:, i], bias), bias)
        h = h.clone()
        h[:, i] = k
        ref = model.blocks[3](h, model.bias)
    assert torch.allclose(out, ref, atol=1e-6)


# -- 12: the safety check does not consume the seeded generator ---------------------------

def test_seeded_selection_is_not_advanced_by_route():
    model = tiny_dit(depth=4)
    x, t, y = dit_inputs()
    a = tread_fx.route(model, "1:2@0.5", seed=7).train()
    b = tread_fx.route(model, "1:2@0.5", seed=7, example_inputs=(x, t, y)).train()
    a(x, t, y)
    b(x, t, y)
    assert torch.equal(a.selectors[0].last_indices, b.selectors[0].last_indices)


# -- 13: wrappers ----------------------------------------------------------------------------

def test_compiled_wrapper_is_refused_with_what_to_do():
    model = tiny_dit(depth=4)
    with pytest.raises(TypeError, match=r"torch.compile\(tread_fx.route\(model"):
        tread_fx.route(torch.compile(model), "1:2@0.5")


# -- 14: forward arguments with defaults ---------------------------------------------------

class Scaled(nn.Module):
    def __init__(self, depth=4):
        super().__init__()
        self.blocks = nn.ModuleList(_Attn(8) for _ in range(depth))

    def forward(self, x, scale=1.0):
        if x.ndim != 3:            # not fx-traceable: traced on the example
            raise ValueError
        for b in self.blocks:
            x = b(x)
        return x * scale


def test_default_argument_given_another_value():
    model = Scaled()
    x = torch.randn(2, 6, 8)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,)).eval()
    assert torch.equal(routed(x, scale=3.0), model(x, scale=3.0))
    assert torch.equal(routed(x, 2.0), model(x, 2.0))
    assert torch.equal(routed(x), model(x))


# -- zoo: a text refiner's blocks do not join the main blocks' chain -----------------------

class _Refiner(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.lin = nn.Linear(d, d)

    def forward(self, x):
        return x + self.lin(x)


class _Main(nn.Module):
    def __init__(self, d=8):
        super().__init__()
        self.q = nn.Linear(d, d)
        self.kv = nn.Linear(d, 2 * d)

    def forward(self, hidden_states, encoder_hidden_states):
        k, v = self.kv(torch.cat([encoder_hidden_states, hidden_states], 1)).chunk(2, -1)
        return hidden_states + F.scaled_dot_product_attention(self.q(hidden_states), k, v)


class RefinedText(nn.Module):
    """Like HunyuanVideo: refiner blocks on the text, whose output enters every main block."""

    def __init__(self, depth=4):
        super().__init__()
        self.refiner = nn.ModuleList(_Refiner() for _ in range(2))
        self.blocks = nn.ModuleList(_Main() for _ in range(depth))

    def forward(self, hidden_states, encoder_hidden_states):
        for r in self.refiner:
            encoder_hidden_states = r(encoder_hidden_states)
        for b in self.blocks:
            hidden_states = b(hidden_states, encoder_hidden_states)
        return hidden_states


def test_chain_does_not_run_from_text_refiner_into_main_blocks():
    model = RefinedText()
    inputs = (torch.randn(2, 10, 8), torch.randn(2, 6, 8))
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs).train()
    assert routed.block_chain == tuple(f"blocks.{i}" for i in range(4))
    seen = _seen_by(list(model.blocks), lambda: routed(*inputs))
    assert [seen[i].shape[1] for i in range(4)] == [10, 5, 5, 10]


# -- second review: cached graphs, copies and what a graph depends on -----------------------

def _text_rows_dropped(routed, inputs, text, steps=10):
    """How often a text row (rows 0..text-1) was left out of the kept tokens."""
    dropped = 0
    for _ in range(steps):
        routed(*inputs)
        kept = routed.selectors[0].last_indices
        dropped += int((~torch.isin(torch.arange(text), kept[0])).sum())
    return dropped


@pytest.mark.parametrize("front_end", ["fx", "concrete", "export"])
def test_other_text_length_keeps_every_text_row(front_end):
    model = InContext()
    x = torch.randn(2, 16, 4)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x, torch.randn(2, 4, 12)),
                            front_end=front_end).train()
    long_text = (x, torch.randn(2, 8, 12))
    assert _text_rows_dropped(routed, long_text, 8) == 0
    assert routed.selectors[0].last_indices.shape[1] == 8 + 8
    # back to the first text length: the first graph's own decisions, not the last trace's
    assert _text_rows_dropped(routed, (x, torch.randn(2, 4, 12)), 4) == 0
    assert routed.selectors[0].last_indices.shape[1] == 4 + 8


class _Branchy(InContext):
    def forward(self, x, context):
        h = torch.cat([self.txt(context), self.img(x)], dim=1)
        if context.shape[1] > 6:            # a shape branch: not fx-traceable
            h = h * 2
        for b in self.blocks:
            h = b(h)
        return h[:, context.shape[1]:]


def test_deepcopy_keeps_the_guards_and_traces_its_own_model():
    import copy
    model = _Branchy().eval()
    x = torch.randn(2, 16, 4)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x, torch.randn(2, 8, 12)))
    ema = copy.deepcopy(routed).eval()
    with torch.no_grad():
        for p in ema.parameters():
            p.add_(1.0)                      # the copy's weights are its own
        ref = copy.deepcopy(model)
        for p in ref.parameters():
            p.add_(1.0)
        short = (x, torch.randn(2, 4, 12))
        assert torch.equal(ema(*short), ref(*short))       # a re-trace, of the copy
        assert torch.equal(routed.eval()(*short), model(*short))
    assert ema.retraces == 1 and routed.retraces == 1
    tread_fx.unroute(ema)


class _Attributes(nn.Module):
    def __init__(self, d=16, depth=4):
        super().__init__()
        self.proj = nn.Linear(4, d)
        self.blocks = nn.ModuleList(_Attn(d) for _ in range(depth))
        self.out_scale = 1.0
        self.use_skip = False
        self.axes_dims = [4, 6, 6]          # a list attribute (diffusers RoPE configs)

    def forward(self, x):
        h0 = h = self.proj(x)
        for b in self.blocks:
            h = b(h)
        if self.use_skip:
            h = h + h0
        return h * self.out_scale


def test_plain_attributes_read_by_forward_are_guarded():
    model = _Attributes().eval()
    x = torch.randn(2, 8, 4)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,)).eval()
    model.out_scale, model.use_skip = 0.5, True
    with torch.no_grad():
        assert torch.equal(routed(x), model(x))
    assert routed.retraces == 1


class _WithNorm(nn.Module):
    def __init__(self, d=16, depth=4):
        super().__init__()
        self.proj = nn.Linear(4, d)
        self.bn = nn.BatchNorm1d(8)
        self.blocks = nn.ModuleList(_Attn(d) for _ in range(depth))

    def forward(self, x):
        if x.ndim != 3:
            raise ValueError
        h = self.bn(self.proj(x))
        for b in self.blocks:
            h = b(h)
        return h


def test_tracing_on_examples_leaves_buffers_as_they_were():
    model = _WithNorm().train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(torch.randn(2, 8, 4),),
                            front_end="concrete")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    routed(torch.randn(3, 8, 4))            # one training call, with a re-trace
    assert int(model.bn.num_batches_tracked) == 1


class _Kwargs(nn.Module):
    def __init__(self, d=16, depth=4):
        super().__init__()
        self.proj = nn.Linear(4, d)
        self.blocks = nn.ModuleList(_Attn(d) for _ in range(depth))

    def forward(self, x, **kwargs):
        if x.ndim != 3:
            raise ValueError
        h = self.proj(x)
        if "cond" in kwargs:
            h = h + kwargs["cond"][:, None]
        h = h * kwargs.get("scale", 1.0)
        for b in self.blocks:
            h = b(h)
        return h


def test_var_keyword_arguments_reach_the_forward():
    model = _Kwargs().eval()
    x, c = torch.randn(2, 8, 4), torch.randn(2, 16)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs={"x": x, "scale": 2.0}).eval()
    with torch.no_grad():
        assert torch.equal(routed(x, scale=2.0), model(x, scale=2.0))
        assert torch.equal(routed(x, cond=c), model(x, cond=c))


def test_seeded_selection_goes_on_across_a_retrace():
    model = tiny_dit(depth=4)
    kw = dict(seed=3, example_inputs=dit_inputs(), front_end="concrete")
    routed = tread_fx.route(model, "1:2@0.5", **kw).train()
    fresh = tread_fx.route(model, "1:2@0.5", **kw).train()
    for _ in range(3):
        routed(*dit_inputs())
    bigger = dit_inputs(batch=3)
    routed(*bigger)                         # a re-trace (and its safety check), then a draw
    fresh(*bigger)                          # the seeded generator's first draw
    assert routed.retraces == fresh.retraces == 1
    assert not torch.equal(routed.selectors[0].last_indices, fresh.selectors[0].last_indices)


def test_unhashable_arguments_are_refused_not_keyed_by_identity():
    from types import SimpleNamespace

    class Opts(nn.Module):
        def __init__(self):
            super().__init__()
            self.blocks = nn.ModuleList(_Attn(8) for _ in range(4))

        def forward(self, x, opts):
            if x.ndim != 3:
                raise ValueError
            for b in self.blocks:
                x = b(x)
            return x * opts.scale

    with pytest.raises(TypeError, match="SimpleNamespace cannot be compared"):
        tread_fx.route(Opts(), "1:2@0.5",
                       example_inputs=(torch.randn(2, 6, 8), SimpleNamespace(scale=2.0)))


def test_parameter_dtype_read_through_python_is_guarded():
    class Casts(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(4, 8)
            self.blocks = nn.ModuleList(_Attn(8) for _ in range(4))

        def forward(self, x):
            if x.ndim != 3:
                raise ValueError
            x = self.proj(x.to(self.proj.weight.dtype))   # like diffusers' self.dtype
            for b in self.blocks:
                x = b(x)
            return x

    model = Casts().eval()
    x = torch.randn(2, 6, 4)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x,)).eval()
    routed.double()
    with torch.no_grad():
        assert torch.equal(routed(x), model(x))


class _ClsFromImage(nn.Module):
    """A class token initialised from the mean image token."""

    def __init__(self, d=16, depth=4):
        super().__init__()
        self.img = nn.Linear(4, d)
        self.cls = nn.Parameter(torch.randn(1, 1, d))
        self.blocks = nn.ModuleList(_Attn(d) for _ in range(depth))

    def forward(self, x):
        img = self.img(x)
        h = torch.cat([self.cls + img.mean(1, keepdim=True), img], dim=1)
        for b in self.blocks:
            h = b(h)
        return h[:, 1:]


class _TextRefinedByImage(nn.Module):
    """Text refined by attending to the image before both are concatenated."""

    def __init__(self, d=16, depth=4):
        super().__init__()
        self.txt = nn.Linear(12, d)
        self.img = nn.Linear(4, d)
        self.blocks = nn.ModuleList(_Attn(d) for _ in range(depth))

    def forward(self, x, context):
        img, ctx = self.img(x), self.txt(context)
        ctx = ctx + F.scaled_dot_product_attention(ctx, img, img)
        h = torch.cat([ctx, img], dim=1)
        for b in self.blocks:
            h = b(h)
        return h[:, context.shape[1]:]


class _TextFirstArgument(InContext):
    """InContext with arguments named so that neither says which one is the image."""

    def forward(self, prompt_embeds, noisy):
        return super().forward(noisy, prompt_embeds)


@pytest.mark.parametrize("model, inputs, text", [
    (_ClsFromImage, (torch.randn(2, 8, 4),), 1),
    (_TextRefinedByImage, (torch.randn(2, 8, 4), torch.randn(2, 5, 12)), 5),
])
def test_rows_built_from_image_values_are_not_image_tokens(model, inputs, text):
    routed = tread_fx.route(model(), "1:2@0.5", example_inputs=inputs).train()
    assert _text_rows_dropped(routed, inputs, text, steps=20) == 0


def test_unknown_image_argument_is_refused_not_guessed():
    inputs = (torch.randn(2, 5, 12), torch.randn(2, 8, 4))
    with pytest.raises(tread_fx.TokenAxisError, match="prefix_tokens"):
        tread_fx.route(_TextFirstArgument(), "1:2@0.5", example_inputs=inputs)
    routed = tread_fx.route(_TextFirstArgument(), "1:2@0.5", example_inputs=inputs,
                            prefix_tokens=5).train()
    assert _text_rows_dropped(routed, inputs, 5) == 0
