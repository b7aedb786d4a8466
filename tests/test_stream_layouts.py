"""Streams the way diffusers models build and carry them: hints added between blocks,
residual adapters, joint streams written sample by sample, rows placed by index tensors,
token counts passed as numbers, sequence-first streams, per-sample and causal attention.
Each routed model is checked with tread_fx.verify (an independent reference)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tread_fx
from conftest import AttentionBlock

D, N, T = 16, 12, 5


class Attn(nn.Module):
    def __init__(self, causal=False, per_sample=False):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)
        self.causal, self.per_sample = causal, per_sample

    def forward(self, x):
        q, k, v = self.qkv(x).chunk(3, dim=-1)
        if self.per_sample:   # one attention call per sample, as Mochi's processor does
            o = torch.cat([F.scaled_dot_product_attention(q[i:i + 1], k[i:i + 1], v[i:i + 1])
                           for i in range(x.shape[0])])
        else:
            o = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return x + self.out(o)


class Block(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.attn = Attn(**kw)
        self.mlp = nn.Sequential(nn.Linear(D, 2 * D), nn.GELU(), nn.Linear(2 * D, D))

    def forward(self, hidden_states):
        h = self.attn(hidden_states)
        return h + self.mlp(h)


class Hinted(nn.Module):
    """WanVACE: control hints made by their own blocks, added between the main blocks."""

    def __init__(self):
        super().__init__()
        self.embed, self.control = nn.Linear(4, D), nn.Linear(4, D)
        self.vace_blocks = nn.ModuleList(Block() for _ in range(2))
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x, c):
        h, hint = self.embed(x), self.control(c)
        hints = []
        for b in self.vace_blocks:
            hint = b(hint)
            hints.append(hint)
        for i, b in enumerate(self.blocks):
            h = b(h)
            if i in (1, 2):
                h = h + hints[i - 1] * 0.5
        return h


class Adapted(nn.Module):
    """WanAnimate: a residual adapter after some blocks, x = adapter(x) + x."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.face_adapter = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        h = self.embed(x)
        for i, b in enumerate(self.blocks):
            h = b(h)
            if i % 2 == 0:
                h = self.face_adapter[i // 2](h).float() + h
        return h


class PerSampleJoint(nn.Module):
    """Lumina2: the joint [text, image] stream written sample by sample into zeros."""

    def __init__(self, index_copy=False):
        super().__init__()
        self.index_copy = index_copy
        self.embed, self.text = nn.Linear(4, D), nn.Linear(6, D)
        self.blocks = nn.ModuleList(Block() for _ in range(4))
        self.out = nn.Linear(D, 4)

    def forward(self, x, context, text_len):
        h, e = self.embed(x), self.text(context)
        b, n = h.shape[0], h.shape[1] + e.shape[1]
        joint = h.new_zeros(b, n, D)
        if self.index_copy:   # MiniMaxH3: rows placed by index tensors
            joint = joint.index_copy(1, torch.arange(e.shape[1]), e)
            joint = joint.index_copy(1, torch.arange(e.shape[1], n), h)
        else:
            for i in range(b):
                length = int(text_len[i])
                joint[i, :length] = e[i, :length]
                joint[i, length:length + h.shape[1]] = h[i]
        for blk in self.blocks:
            joint = blk(joint)
        return self.out(joint[:, e.shape[1]:])


class Counted(nn.Module):
    """Helios: blocks told the image-token count as a number."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.blocks = nn.ModuleList(CountBlock() for _ in range(4))

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h, h.shape[1])
        return h


class CountBlock(Block):
    def forward(self, hidden_states, num_tokens):
        h = super().forward(hidden_states)
        return torch.cat([h[:, :num_tokens // 2] * 2, h[:, num_tokens // 2:]], dim=1)


class SeqFirst(nn.Module):
    """ErnieImage: a sequence-first [N, B, D] stream."""

    def __init__(self, **kw):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.blocks = nn.ModuleList(SeqFirstBlock(**kw) for _ in range(4))

    def forward(self, x):
        h = self.embed(x).transpose(0, 1)
        for b in self.blocks:
            h = b(h)
        return h.transpose(0, 1)


class SeqFirstBlock(Block):
    def forward(self, hidden_states):
        return super().forward(hidden_states.transpose(0, 1)).transpose(0, 1)


class Plain(nn.Module):
    def __init__(self, **kw):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.blocks = nn.ModuleList(Block(**kw) for _ in range(4))

    def forward(self, x):
        h = self.embed(x)
        for b in self.blocks:
            h = b(h)
        return h


def _x(n=N):
    torch.manual_seed(1)
    return torch.randn(2, n, 4)


def _verified(model, spec, inputs, **kw):
    report = tread_fx.verify(model, spec, inputs, **kw)
    assert report.ok, str(report)
    return report


def test_hints_added_between_blocks_are_inside_the_route():
    torch.manual_seed(0)
    model, inputs = Hinted(), (_x(), _x())
    routed = tread_fx.route(model, "1:3@0.5", example_inputs=inputs)
    assert routed.block_chain == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    report = _verified(model, "1:3@0.5", inputs)
    assert len(report.routes[0].side_inputs) == 2   # the two hints, gathered


def test_a_residual_adapter_is_not_a_block_of_the_chain():
    torch.manual_seed(0)
    model = Adapted()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(_x(),))
    assert routed.block_chain == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    _verified(model, "1:3@0.5", (_x(),))   # adapter 1 runs inside the route


def test_a_joint_stream_written_sample_by_sample_keeps_its_text_rows():
    torch.manual_seed(0)
    model = PerSampleJoint()
    inputs = (_x(), torch.randn(2, T, 6), torch.full((2,), T))
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs, front_end="concrete")
    assert routed.selectors[0].fixed == (T, 0)
    report = _verified(model, "1:2@0.5", inputs, front_end="concrete")
    assert report.rows == "ok"


def test_text_of_different_lengths_per_sample_is_refused():
    torch.manual_seed(0)
    inputs = (_x(), torch.randn(2, T, 6), torch.tensor([T, T - 2]))
    with pytest.raises(tread_fx.TokenAxisError, match="laid out differently"):
        tread_fx.route(PerSampleJoint(), "1:2@0.5", example_inputs=inputs, front_end="concrete")


def test_rows_placed_by_index_tensors_are_refused():
    inputs = (_x(), torch.randn(2, T, 6), torch.full((2,), T))
    with pytest.raises(tread_fx.TokenAxisError, match=r"index_copy.*positions given by an "
                                                      r"index tensor"):
        tread_fx.route(PerSampleJoint(index_copy=True), "1:2@0.5", example_inputs=inputs)


def test_a_token_count_passed_as_a_number_is_refused_unless_declared():
    with pytest.raises(tread_fx.TokenAxisError, match="gets the number 12 as argument "
                                                      "'num_tokens'"):
        tread_fx.route(Counted(), "1:2@0.5", example_inputs=(_x(),))
    routed = tread_fx.route(Counted(), "1:2@0.5", example_inputs=(_x(),),
                            token_inputs={"num_tokens": None})
    assert routed.selectors[0].selection_ratio == 0.5


def test_a_sequence_first_stream_verifies():
    torch.manual_seed(0)
    _verified(SeqFirst(), "1:2@0.5", (_x(),))


@pytest.mark.parametrize("kw", [{"per_sample": True}, {"causal": True}])
def test_per_sample_and_causal_attention_verify(kw):
    torch.manual_seed(0)
    _verified(Plain(**kw), "1:2@0.5", (_x(),))


class Embedded(nn.Module):
    """LongCat: the latent and the text embedders are one class (a same-class pair), and
    the latent embedder's output is the first block's stream."""

    def __init__(self):
        super().__init__()
        self.input_embed = nn.Sequential(nn.Linear(4, D), nn.SiLU(), nn.Linear(D, D))
        self.text_embed = nn.Sequential(nn.Linear(4, D), nn.SiLU(), nn.Linear(D, D))
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x, text):
        h = self.input_embed(x)
        h = h + self.text_embed(text).mean(1, keepdim=True)
        for b in self.blocks:
            h = b(hidden_states=h)
        return h


def test_an_embedder_feeding_the_blocks_is_not_the_first_block():
    torch.manual_seed(0)
    model, inputs = Embedded(), (_x(), _x(5))
    routed = tread_fx.route(model, "0:1@0.5", example_inputs=inputs)
    assert routed.block_chain == ("blocks.0", "blocks.1", "blocks.2", "blocks.3")
    _verified(model, "0:1@0.5", inputs)


class Buffered(nn.Module):
    """The joint stream written into a zeros buffer; an exported graph keeps copy_."""

    def __init__(self, variant):
        super().__init__()
        self.variant = variant
        self.embed, self.text = nn.Linear(4, D), nn.Linear(6, D)
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x, context):
        h, e = self.embed(x), self.text(context)
        if self.variant == "buffer":
            buf = torch.zeros(h.shape[0], T + h.shape[1], D)
            buf[:, :T] = e
            buf[:, T:] = h
        else:   # registers made with new_zeros: not image rows though built from h's dtype
            buf = torch.cat([h, h.new_zeros(h.shape[0], 2, D) + 1.0], dim=1)
        for b in self.blocks:
            buf = b(buf)
        return buf


def test_an_exported_in_place_write_into_the_stream_buffer_is_refused():
    inputs = (_x(), torch.randn(2, T, 6))
    with pytest.raises(tread_fx.TokenAxisError, match=r"copy_.*writes in place into"):
        tread_fx.route(Buffered("buffer"), "1:2@0.5", example_inputs=inputs,
                       front_end="export")
    # the concrete tracer follows the same writes
    routed = tread_fx.route(Buffered("buffer"), "1:2@0.5", example_inputs=inputs,
                            front_end="concrete")
    assert routed.selectors[0].fixed == (T, 0)


def test_rows_made_with_new_zeros_are_not_image_rows():
    routed = tread_fx.route(Buffered("registers"), "1:2@0.5", example_inputs=(_x(),
                                                                             torch.randn(2, T, 6)))
    assert routed.selectors[0].fixed == (0, 2)


class Skipping(nn.Module):
    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.in_blocks = nn.ModuleList(Block() for _ in range(4))
        self.mid_block, self.out_block = Block(), Block()

    def forward(self, x):
        x = self.embed(x)
        for b in self.in_blocks:
            x = b(x)
        skip = x
        x = self.mid_block(x)
        return self.out_block(x + skip)


def test_a_chain_that_would_go_around_a_block_is_refused():
    with pytest.raises(tread_fx.NoBlocksFound, match="mid_block belong"):
        tread_fx.route(Skipping(), "1:2@0.5", example_inputs=(_x(),))


class Lists(nn.Module):
    """Two ModuleLists of equal blocks must not hide the blocks inside them."""

    def __init__(self):
        super().__init__()
        self.embed = nn.Linear(4, D)
        self.in_blocks = nn.ModuleList(Block() for _ in range(4))
        self.mid_blocks = nn.ModuleList(Block() for _ in range(2))
        self.out_blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        x = self.embed(x)
        for b in [*self.in_blocks, *self.mid_blocks, *self.out_blocks]:
            x = b(x)
        return x


def test_module_lists_are_containers_not_blocks():
    routed = tread_fx.route(Lists(), "-2:-1@0.5", example_inputs=(_x(),))
    assert len(routed.block_chain) == 8 and routed.block_chain[-1] == "out_blocks.1"


class Prior(nn.Module):
    """GlmImage: embedded prior tokens, one per image token, some zeroed in place
    (``prior[drop] *= 0``), added to the image tokens."""

    def __init__(self):
        super().__init__()
        self.embed, self.prior = nn.Linear(4, D), nn.Embedding(64, D)
        self.prior_proj = nn.Linear(D, D)
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, x, prior_token_id, prior_token_drop):
        prior = self.prior(prior_token_id)
        prior[prior_token_drop] *= 0.0
        h = self.embed(x) + self.prior_proj(prior)
        for b in self.blocks:
            h = b(h)
        return h


class Posed(nn.Module):
    """WanAnimate: a pose added in place to the frames after the first of the patch
    embedding (``x[:, :, 1:] = x[:, :, 1:] + pose``); ``zero_first``: the first frame zeroed
    in place instead (constant rows written into image rows)."""

    def __init__(self, zero_first=False):
        super().__init__()
        self.zero_first = zero_first
        self.patch = nn.Conv3d(4, D, (1, 2, 2), (1, 2, 2))
        self.pose_patch = nn.Conv3d(4, D, (1, 2, 2), (1, 2, 2))
        self.blocks = nn.ModuleList(Block() for _ in range(4))

    def forward(self, hidden_states, pose_hidden_states):
        h = self.patch(hidden_states)
        if self.zero_first:
            h[:, :, 0] = 0.0
        else:
            h[:, :, 1:] = h[:, :, 1:] + self.pose_patch(pose_hidden_states)
        h = h.flatten(2).transpose(1, 2)
        for b in self.blocks:
            h = b(h)
        return h


def _posed_inputs():
    torch.manual_seed(1)
    return torch.randn(2, 4, 3, 4, 6), torch.randn(2, 4, 2, 4, 6)


@pytest.mark.parametrize("front_end", ["export", "concrete"])
def test_in_place_writes_that_keep_the_rows_image_rows_verify(front_end):
    """A write into a tensor whose rows are all image rows, of values that are image rows
    too, moves no image row among other rows: routed, every row routable."""
    torch.manual_seed(0)
    prior = (_x(), torch.randint(0, 64, (2, N)), torch.tensor([True, False]))
    for model, inputs in ((Prior(), prior), (Posed(), _posed_inputs())):
        routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs, front_end=front_end)
        assert routed.selectors[0].fixed == (0, 0)
        _verified(model, "1:2@0.5", inputs, front_end=front_end)


def test_a_constant_written_in_place_into_image_rows_is_refused():
    with pytest.raises(tread_fx.TokenAxisError,
                       match=r"(copy_|fill_).*writes in place into 'conv3d'.*holds image rows "
                             r"and the write puts non-image values"):
        tread_fx.route(Posed(zero_first=True), "1:2@0.5", example_inputs=_posed_inputs(),
                       front_end="export")


class TextBlock(nn.Module):
    """A double-stream block: attention over [image, text], with a [B, 1, 1, N + T] mask."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, hidden_states, encoder_hidden_states, attention_mask):
        n = hidden_states.shape[1]
        q, k, v = self.qkv(torch.cat([hidden_states, encoder_hidden_states], 1)).chunk(3, -1)
        o = self.out(F.scaled_dot_product_attention(q[:, None], k[:, None], v[:, None],
                                                    attn_mask=attention_mask)[:, 0])
        return hidden_states + o[:, :n], encoder_hidden_states + o[:, n:]


class OneLonger(nn.Module):
    """HunyuanVideoFramepack: a text stream one row longer than the image stream, beside a
    mask with a broadcast axis of length 1 (not a stream of one row)."""

    def __init__(self):
        super().__init__()
        self.embed, self.text = nn.Linear(4, D), nn.Linear(6, D)
        self.blocks = nn.ModuleList(TextBlock() for _ in range(4))

    def forward(self, x, text):
        h, e = self.embed(x), self.text(text)
        mask = torch.ones(x.shape[0], 1, 1, h.shape[1] + e.shape[1], dtype=torch.bool)
        for b in self.blocks:
            h, e = b(h, e, mask)
        return h


def test_a_text_stream_one_row_longer_is_not_a_joint_table():
    torch.manual_seed(0)
    model, inputs = OneLonger(), (_x(), torch.randn(2, N + 1, 6))
    # the mask is filled by position (no concatenation shows its row order): say it
    order = {"attention_mask": "tokens_first"}
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs, token_inputs=order)
    gathered = [n.meta["tread"]["arg"] for n in routed.graph.nodes
                if n.name.startswith("tread_side")]
    assert gathered == ["blocks.1:2"]   # the mask; the text stream passes untouched
    _verified(model, "1:2@0.5", inputs, token_inputs=order)


class GatedWrite(nn.Module):
    """A write into the stream's rows of image rows gated by a mask from another input plus
    text rows (Ideogram4's packing, done by item assignment on a slice)."""

    def __init__(self):
        super().__init__()
        self.embed, self.text = nn.Linear(4, D), nn.Linear(6, D)
        self.blocks = nn.ModuleList(AttentionBlock(D) for _ in range(4))

    def forward(self, x, text, mask):
        h = self.embed(x)
        h[:, 1:] = h[:, 1:] * mask[:, 1:] + self.text(text)[:, 1:]
        for b in self.blocks:
            h = b(h)
        return h


@pytest.mark.parametrize("front_end", ["export", "concrete"])
def test_a_gated_sum_written_into_the_stream_is_refused(front_end):
    """Routed, rows where the mask is 0 are text, and verify finds them dropped: both front
    ends refuse (the concrete tracer's write path compared the slice's 11 rows with the
    12-row text argument and let it through)."""
    torch.manual_seed(0)
    inputs = (_x(), torch.randn(2, N, 6), (torch.rand(2, N, 1) > 0.5).float())
    with pytest.raises(tread_fx.TokenAxisError, match="mixes the image with another input"):
        tread_fx.route(GatedWrite(), "1:2@0.5", example_inputs=inputs, front_end=front_end)
