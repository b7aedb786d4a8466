"""Kept-token masks for losses, and routing at inference (sparse guidance)."""

import pytest
import torch

import tread_fx
from conftest import dit_inputs, tiny_dit


def test_kept_masks_agree_with_the_tokens_the_blocks_saw():
    model = tiny_dit(depth=6, class_dropout_prob=0.0)
    routed = tread_fx.route(model, "1:2@0.5,4:4@0.25").train()
    x, t, y = dit_inputs(batch=3)
    seen = {}
    model.blocks[0].register_forward_hook(lambda m, a, o: seen.__setitem__("before_1", o))
    model.blocks[1].register_forward_pre_hook(lambda m, a: seen.__setitem__("in_1", a[0]))
    model.blocks[3].register_forward_hook(lambda m, a, o: seen.__setitem__("before_4", o))
    model.blocks[4].register_forward_pre_hook(lambda m, a: seen.__setitem__("in_4", a[0]))
    routed(x, t, y)
    masks = tread_fx.kept_masks(routed)
    assert [m.shape for m in masks] == [(3, 16), (3, 16)]
    assert masks[0].sum(1).tolist() == [8, 8, 8] and masks[1].sum(1).tolist() == [12] * 3
    # keep_order: the tokens block 1 saw are exactly the masked tokens, in order
    assert torch.equal(seen["in_1"], seen["before_1"][masks[0]].reshape(3, 8, -1))
    assert torch.equal(seen["in_4"], seen["before_4"][masks[1]].reshape(3, 12, -1))


def test_kept_masks_empty_when_not_routing():
    routed = tread_fx.route(tiny_dit(depth=4), "1:2@0.5").eval()
    with torch.no_grad():
        routed(*dit_inputs())
    assert tread_fx.kept_masks(routed) == []
    with pytest.raises(TypeError, match="kept_masks\\(\\) takes a module returned by"):
        tread_fx.kept_masks(tiny_dit(depth=2))


def test_masks_recorded_under_compile_fullgraph():
    torch._dynamo.reset()
    routed = tread_fx.route(tiny_dit(depth=4, class_dropout_prob=0.0), "1:2@0.5").train()
    compiled = torch.compile(routed, fullgraph=True, backend="aot_eager")
    compiled(*dit_inputs(batch=2)).mean().backward()
    (mask,) = tread_fx.kept_masks(routed)
    assert mask.shape == (2, 16) and mask.sum().item() == 16


def test_routing_context_routes_in_eval_mode_with_another_ratio():
    model = tiny_dit(depth=6, class_dropout_prob=0.0)
    routed = tread_fx.route(model, "1:3@0.5").eval()
    inputs = dit_inputs()
    seen = []
    model.blocks[2].register_forward_pre_hook(lambda m, a: seen.append(a[0].shape[1]))
    with torch.no_grad():
        dense = routed(*inputs)
        with tread_fx.routing(routed, 0.25) as r:
            assert r is routed
            sparse = routed(*inputs)
            assert len(tread_fx.kept_masks(routed)) == 1
        after = routed(*inputs)
    assert seen == [16, 12, 16]
    assert not torch.equal(dense, sparse) and torch.equal(dense, after)
    assert routed.selectors[0].selection_ratio == 0.5
    assert not model.blocks[0].training and not routed.training
    with pytest.raises(ValueError, match=r"route 0 .*selection_ratio=1.5 is outside"):
        with tread_fx.routing(routed, 1.5):
            pass


def test_seeded_selection_under_compile_says_what_to_do():
    torch._dynamo.reset()
    routed = tread_fx.route(tiny_dit(depth=4), "1:2@0.5", seed=0).train()
    compiled = torch.compile(routed, fullgraph=True, backend="aot_eager")
    with pytest.raises(Exception, match=r"route 0 .*seed=0 draws from a torch.Generator.*"
                                        r"torch.manual_seed"):
        compiled(*dit_inputs())
