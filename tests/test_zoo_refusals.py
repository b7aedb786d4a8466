"""Streams whose image rows the row analysis must find, or refuse: the patterns of the two
diffusers classes tread_fx.verify once caught routed wrongly (Ideogram4: image and text rows
packed in one sequence and chosen by masks; HiDream: image tokens padded to a maximum
resolution, with a joint RoPE table whose image rows come first, now gathered)."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tread_fx
from conftest import AttentionBlock

D, N, T = 16, 12, 5


class Packed(nn.Module):
    """Ideogram4: one sequence of image and text rows, each input masked to its rows by an
    indicator and the two summed; ``conditioned``: a per-sample vector broadcast to every
    row and added instead (every row an image row)."""

    def __init__(self, conditioned=False):
        super().__init__()
        self.conditioned = conditioned
        self.embed, self.text = nn.Linear(4, D), nn.Linear(6, D)
        self.blocks = nn.ModuleList(AttentionBlock(D) for _ in range(4))

    def forward(self, x, text, indicator):
        if self.conditioned:   # text: [B, 6], one vector per sample
            h = self.embed(x) + self.text(text)[:, None].expand(-1, x.shape[1], -1)
        else:
            image_mask = (indicator == 1).to(x.dtype).unsqueeze(-1)
            text_mask = (indicator == 0).to(x.dtype).unsqueeze(-1)
            h = self.embed(x * image_mask) * image_mask + self.text(text) * text_mask
        for b in self.blocks:
            h = b(h)
        return h


def _packed_inputs(per_row=True):
    torch.manual_seed(1)
    indicator = torch.ones(2, N, dtype=torch.long)
    indicator[:, :3] = 0   # three text rows first
    text = torch.randn(2, N, 6) if per_row else torch.randn(2, 6)
    return torch.randn(2, N, 4), text, indicator


@pytest.mark.parametrize("front_end", ["export", "concrete"])
def test_image_and_text_rows_chosen_by_masks_are_refused(front_end):
    with pytest.raises(tread_fx.TokenAxisError,
                       match=r"route 0 \(1:2@0.5\), the stream block 'blocks.0' takes: .*"
                             r"forward argument\(s\) \[('text', 'indicator'|'indicator', "
                             r"'text')\]"):
        tread_fx.route(Packed(), "1:2@0.5", example_inputs=_packed_inputs(),
                       front_end=front_end)
    # what the message offers: prefix_tokens says which rows to keep
    routed = tread_fx.route(Packed(), "1:2@0.5", example_inputs=_packed_inputs(),
                            prefix_tokens=3)
    assert routed.selectors[0].fixed == (3, 0)


def test_the_refusal_says_why():
    with pytest.raises(tread_fx.TokenAxisError) as err:
        tread_fx.route(Packed(), "1:2@0.5", example_inputs=_packed_inputs())
    assert "mixes the image with another input" in str(err.value)
    assert "prefix_tokens" in str(err.value)


def test_a_per_sample_vector_added_to_every_row_is_not_a_mix():
    torch.manual_seed(0)
    model, inputs = Packed(conditioned=True), _packed_inputs(per_row=False)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs)
    assert routed.selectors[0].fixed == (0, 0)
    assert tread_fx.verify(model, "1:2@0.5", inputs).ok


class MaskedKeyBlock(AttentionBlock):
    """HiDream's attention: the keys of the padding rows multiplied by their zero mask."""

    def forward(self, hidden_states, hidden_states_masks):
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        k = k * hidden_states_masks[..., None]
        h = hidden_states + self.out(F.scaled_dot_product_attention(q, k, v))
        return h + self.mlp(h)


class Padded(nn.Module):
    """HiDream: the image's patches written into a buffer of the maximum token count,
    ``[B, C, max_tokens, p*p]``, then permuted and reshaped into the stream: the rows after
    the image's patches are padding (``masked_keys``: their keys zeroed by a mask)."""

    def __init__(self, max_tokens=32, p=2, c=4, masked_keys=False):
        super().__init__()
        self.max_tokens, self.p, self.masked_keys = max_tokens, p, masked_keys
        self.embed = nn.Linear(c * p * p, D)
        self.blocks = nn.ModuleList((MaskedKeyBlock if masked_keys else AttentionBlock)(D)
                                    for _ in range(4))

    def forward(self, x):
        b, c, height, width = x.shape
        p, n = self.p, (height // self.p) * (width // self.p)
        patches = x.reshape(b, c, height // p, p, width // p, p).permute(0, 1, 2, 4, 3, 5)
        buf = torch.zeros(b, c, self.max_tokens, p * p)
        buf[:, :, :n] = patches.reshape(b, c, n, p * p)
        h = self.embed(buf.permute(0, 2, 3, 1).reshape(b, self.max_tokens, p * p * c))
        masks = torch.zeros(b, self.max_tokens)
        masks[:, :n] = 1.0
        for blk in self.blocks:
            h = blk(h, masks) if self.masked_keys else blk(h)
        return h[:, :n]


def test_padding_rows_after_the_image_patches_are_never_routed():
    torch.manual_seed(0)
    model, inputs = Padded(), (torch.randn(2, 4, 6, 8),)   # 12 patches, 20 padding rows
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs, front_end="concrete")
    assert routed.selectors[0].fixed == (0, 20)
    report = tread_fx.verify(model, "1:2@0.5", inputs, front_end="concrete")
    assert report.ok, str(report)
    assert report.routes[0].kept == 32 - 6


def test_padding_rows_with_zeroed_keys_verify():
    """The reference finds where the tokens sit among the keys by changing tokens the route
    drops, not the last row: a padding row's key is zero whatever the row holds."""
    torch.manual_seed(0)
    model, inputs = Padded(masked_keys=True), (torch.randn(2, 4, 6, 8),)
    report = tread_fx.verify(model, "1:2@0.5", inputs, front_end="concrete")
    assert report.ok, str(report)
    assert report.routes[0].never_routed == (0, 20)


class JointBlock(nn.Module):
    """Attention over the image and the text rows joined in ``order``, with a position
    table of both (a RoPE table of ``cat(img_ids, txt_ids)`` in HiDream)."""

    def __init__(self, order):
        super().__init__()
        self.order = order
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, hidden_states, text, table):
        n = hidden_states.shape[1]
        joint = torch.cat([hidden_states, text] if self.order == "image_first"
                          else [text, hidden_states], dim=1)
        q, k, v = self.qkv(joint).chunk(3, dim=-1)
        o = self.out(F.scaled_dot_product_attention(q * table.cos(), k * table.cos(), v))
        o = o[:, :n] if self.order == "image_first" else o[:, -n:]
        return hidden_states + o


class Joint(nn.Module):
    def __init__(self, order):
        super().__init__()
        self.order = order
        self.embed, self.text, self.pos = nn.Linear(4, D), nn.Linear(6, D), nn.Linear(2, D)
        self.blocks = nn.ModuleList(JointBlock(order) for _ in range(4))

    def forward(self, x, text, img_ids, txt_ids):
        ids = torch.cat([img_ids, txt_ids] if self.order == "image_first"
                        else [txt_ids, img_ids], dim=1)
        table = self.pos(ids)
        h, e = self.embed(x), self.text(text)
        for b in self.blocks:
            h = b(h, e, table)
        return h


def _joint_inputs():
    torch.manual_seed(1)
    return torch.randn(2, N, 4), torch.randn(2, T, 6), torch.randn(2, N, 2), \
        torch.randn(2, T, 2)


def test_a_joint_table_with_the_image_rows_first_verifies():
    """HiDream's ``cat([img_ids, txt_ids])``: the other stream's rows after the token rows
    are kept, the token rows gathered (not the rows of a [text, image] table)."""
    torch.manual_seed(0)
    model = Joint("image_first")
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=_joint_inputs())
    side = [n for n in routed.graph.nodes if n.name.startswith("tread_side")]
    assert [(n.meta["tread"]["offset"], n.meta["tread"]["tail"]) for n in side] == [(0, T)]
    report = tread_fx.verify(model, "1:2@0.5", _joint_inputs())
    assert report.ok, str(report)


def test_a_joint_table_with_the_text_rows_first_verifies():
    torch.manual_seed(0)
    model = Joint("text_first")
    report = tread_fx.verify(model, "1:2@0.5", _joint_inputs())
    assert report.ok, str(report)


class MaskBlock(nn.Module):
    """Joint attention over ``[image, text]`` with a key mask of both."""

    def __init__(self):
        super().__init__()
        self.qkv, self.out = nn.Linear(D, 3 * D), nn.Linear(D, D)

    def forward(self, hidden_states, text, mask):
        n = hidden_states.shape[1]
        q, k, v = self.qkv(torch.cat([hidden_states, text], dim=1)).chunk(3, dim=-1)
        o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask[:, None, :])
        return hidden_states + self.out(o[:, :n])


class PositionMask(nn.Module):
    """HunyuanVideo: the joint mask is filled by position (image rows, then the text's valid
    rows), with no concatenation that shows the row order."""

    def __init__(self):
        super().__init__()
        self.embed, self.text = nn.Linear(4, D), nn.Linear(6, D)
        self.blocks = nn.ModuleList(MaskBlock() for _ in range(4))

    def forward(self, x, text, text_mask):
        h, e = self.embed(x), self.text(text)
        valid = h.shape[1] + text_mask.sum(dim=1, keepdim=True)
        mask = torch.arange(h.shape[1] + e.shape[1]) < valid
        for b in self.blocks:
            h = b(h, e, mask)
        return h


def _padded_inputs():
    torch.manual_seed(1)
    text_mask = torch.ones(2, T)
    text_mask[1, 3:] = 0          # the second caption is two tokens shorter
    return torch.randn(2, N, 4), torch.randn(2, T, 6), text_mask


def test_a_joint_mask_of_undecided_row_order_is_refused_until_the_user_says_it():
    torch.manual_seed(0)
    model = PositionMask()
    with pytest.raises(tread_fx.TokenAxisError, match="no concatenation upstream shows which"):
        tread_fx.route(model, "1:2@0.5", example_inputs=_padded_inputs())
    said = tread_fx.verify(model, "1:2@0.5", _padded_inputs(),
                           token_inputs={"mask": "tokens_first"})
    assert said.ok, str(said)
    # the other order gathers the wrong mask rows, and verify sees it
    wrong = tread_fx.verify(model, "1:2@0.5", _padded_inputs(),
                            token_inputs={"mask": "tokens_last"})
    assert not wrong.ok


def test_explain_names_the_trailing_rows_of_an_image_first_table():
    torch.manual_seed(0)
    routed = tread_fx.route(Joint("image_first"), "1:2@0.5", example_inputs=_joint_inputs())
    text = str(tread_fx.explain(routed))
    assert f"{T} trailing rows of another stream kept" in text


class PaddedMask(PositionMask):
    """HunyuanImage: the joint mask is the text mask padded in front with the image rows
    (``F.pad(text_mask, (n, 0), value=True)``), a concatenation with a constant block."""

    def forward(self, x, text, text_mask):
        h, e = self.embed(x), self.text(text)
        mask = F.pad(text_mask.bool(), (h.shape[1], 0), value=True)
        for b in self.blocks:
            h = b(h, e, mask)
        return h


def test_a_joint_mask_padded_in_front_with_the_image_rows_verifies():
    torch.manual_seed(0)
    model = PaddedMask()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=_padded_inputs())
    side = [n for n in routed.graph.nodes if n.name.startswith("tread_side")]
    assert [(n.meta["tread"]["offset"], n.meta["tread"]["tail"]) for n in side] == [(0, T)]
    report = tread_fx.verify(model, "1:2@0.5", _padded_inputs())
    assert report.ok, str(report)


class SpaceTime(nn.Module):
    """Latte: spatial blocks over the patches of each frame ([B*F, N, D]) alternate with
    temporal blocks over the frames of each patch ([B*N, F, D]), reshaped in between."""

    def __init__(self, frames=3):
        super().__init__()
        self.frames = frames
        self.embed = nn.Linear(4, D)
        self.spatial = nn.ModuleList(AttentionBlock(D) for _ in range(3))
        self.temporal = nn.ModuleList(AttentionBlock(D) for _ in range(3))

    def forward(self, x):   # x: [B, F, N, 4]
        b, f, n, _ = x.shape
        h = self.embed(x).reshape(b * f, n, D)
        for s, t in zip(self.spatial, self.temporal):
            h = s(h)
            h = h.reshape(b, f, n, D).permute(0, 2, 1, 3).reshape(b * n, f, D)
            h = t(h)
            h = h.reshape(b, n, f, D).permute(0, 2, 1, 3).reshape(b * f, n, D)
        return h.reshape(b, f, n, D)


@pytest.mark.parametrize("front_end", ["fx", "export"])
def test_factorised_space_time_blocks_are_refused_naming_the_layouts(front_end):
    x = torch.randn(2, 3, N, 4)
    with pytest.raises(tread_fx.NoBlocksFound,
                       match=r"spatial\.0's output reaches temporal\.0 only through reshapes "
                             r"or permutes.*same tokens kept in every frame"):
        tread_fx.route(SpaceTime(), "1:2@0.5", example_inputs=(x,), front_end=front_end)
