"""Flux-style models: double-stream blocks, then the text joined to the stream, then
single-stream blocks.  One block sequence to the user; a route stays on one side."""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import tread_fx
from conftest import AttentionBlock
from tread_fx.verify import verify

D, N, T = 16, 12, 5


class Double(nn.Module):
    """Image and text streams with their own weights, one attention over [text, image]."""

    def __init__(self):
        super().__init__()
        self.qkv_img, self.qkv_txt = nn.Linear(D, 3 * D), nn.Linear(D, 3 * D)
        self.out_img, self.out_txt = nn.Linear(D, D), nn.Linear(D, D)

    def forward(self, hidden_states, encoder_hidden_states, rope):
        qi, ki, vi = self.qkv_img(hidden_states).chunk(3, dim=-1)
        qt, kt, vt = self.qkv_txt(encoder_hidden_states).chunk(3, dim=-1)
        qi, ki = qi * rope, ki * rope
        o = F.scaled_dot_product_attention(torch.cat([qt, qi], 1), torch.cat([kt, ki], 1),
                                           torch.cat([vt, vi], 1))
        ot, oi = o[:, :encoder_hidden_states.shape[1]], o[:, encoder_hidden_states.shape[1]:]
        return (encoder_hidden_states + self.out_txt(ot), hidden_states + self.out_img(oi))


class FluxLike(nn.Module):
    def __init__(self, refiner=False):
        super().__init__()
        self.embed, self.text = nn.Linear(4, D), nn.Linear(6, D)
        self.context_refiner = nn.ModuleList(AttentionBlock(D) for _ in range(2)) if refiner else None
        self.transformer_blocks = nn.ModuleList(Double() for _ in range(3))
        self.single_transformer_blocks = nn.ModuleList(AttentionBlock(D) for _ in range(3))
        self.proj_out = nn.Linear(D, 4)

    def forward(self, x, context, rope):
        h, e = self.embed(x), self.text(context)
        if self.context_refiner is not None:   # same class as the single-stream blocks
            for block in self.context_refiner:
                e = block(e)
        for block in self.transformer_blocks:
            e, h = block(h, e, rope)
        h = torch.cat([e, h], dim=1)
        for block in self.single_transformer_blocks:
            h = block(h)
        return self.proj_out(h[:, e.shape[1]:])


def _inputs():
    torch.manual_seed(1)
    return (torch.randn(2, N, 4), torch.randn(2, T, 6), torch.rand(N, D) + 0.5)


def _model(**kw):
    torch.manual_seed(0)
    return FluxLike(**kw)


def test_both_kinds_are_one_sequence_in_execution_order():
    routed = tread_fx.route(_model(), "4:5@0.5", example_inputs=_inputs())
    assert routed.block_chain == tuple([f"transformer_blocks.{i}" for i in range(3)] +
                                       [f"single_transformer_blocks.{i}" for i in range(3)])
    # the single-stream blocks carry [text, image]: the text rows are never routed
    assert routed.selectors[0].fixed == (T, 0)


def test_a_route_across_the_join_is_refused_naming_both_blocks():
    with pytest.raises(ValueError, match=r"spans blocks 'transformer_blocks.2' \(index 2\) "
                                         r"and 'single_transformer_blocks.0' \(index 3\)"):
        tread_fx.route(_model(), "1:4@0.5", example_inputs=_inputs())


@pytest.mark.parametrize("spec", ["1:2@0.5", "4:5@0.5", "0:1@0.5,3:5@0.25"])
def test_routes_on_either_side_verify(spec):
    report = verify(_model(), spec, _inputs())
    assert report.ok, str(report)


def test_single_stream_route_keeps_the_text_rows():
    model, inputs = _model(), _inputs()
    routed = tread_fx.route(model, "4:5@0.5", example_inputs=inputs).train()
    seen = []
    hook = model.single_transformer_blocks[1].register_forward_pre_hook(
        lambda m, args: seen.append(args[0].detach()))
    try:
        routed(*inputs)
    finally:
        hook.remove()
    idx = routed.selectors[0].last_indices
    assert seen[0].shape[1] == T + N - N // 2
    assert (idx[:, :T] == torch.arange(T)).all()     # every text row kept, first
    assert (idx[:, T:] >= T).all()


def test_a_refiner_of_the_same_class_elsewhere_does_not_block_discovery():
    routed = tread_fx.route(_model(refiner=True), "4:5@0.5", example_inputs=_inputs())
    assert not any(b.startswith("context_refiner") for b in routed.block_chain)
    assert routed.block_chain[0] == "transformer_blocks.0"
    assert verify(_model(refiner=True), "4:5@0.5", _inputs()).ok
