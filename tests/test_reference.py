"""The independent reference of tread_fx/reference.py, checked without tread_fx's routing.

Its premise -- a dense run with the dropped keys masked out of every attention inside a
route, and the dropped tokens reset after each routed block, computes what running the
route's blocks on the kept tokens computes -- is checked against forwards written by hand
here (gather the kept tokens and the matching RoPE rows, run the blocks, write back).
"""

import pytest
import torch

from tread_fx.reference import kept_mask, masked_reference, reference, ssm_reference
from tread_fx.tools.zoo import build

B = 3


def _name(short):
    from tread_fx.tools.zoo import BACKBONES
    return next(n for n in BACKBONES if n.startswith(short + " ("))


def _draw(n, kept, shared=False, seed=0):
    gen = torch.Generator().manual_seed(seed)
    rows = 1 if shared else B
    idx = torch.rand(rows, n, generator=gen).topk(kept, dim=1).indices.sort(dim=1).values
    return idx.expand(B, -1)


def _hand_routed_dit(model, x, t, y, start, end, idx, rope=False):
    """DiT / RoPE DiT forward with blocks start..end on x[rows, idx] (shared idx for RoPE)."""
    rows = torch.arange(B)[:, None]
    x = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    for i, block in enumerate(model.blocks):
        kwargs = {}
        if rope:
            table = (model.freqs_cos, model.freqs_sin)
            kwargs["rope"] = tuple(v[idx[0]] for v in table) if start <= i <= end else table
        if i == start:
            x_in, x = x, x[rows, idx]
        x = block(x, c, **kwargs)
        if i == end:
            x = x_in.index_put((rows, idx), x)
    return model.unpatchify(model.final_layer(x, c))


@pytest.mark.parametrize("short,rope", [("DiT", False), ("RoPE DiT", True)])
def test_masked_reference_equals_running_the_blocks_on_the_kept_tokens(short, rope):
    model, inputs, _ = build(_name(short))
    model.eval()
    n = model.x_embedder.num_patches
    idx = _draw(n, n // 2, shared=rope)
    with torch.no_grad():
        by_hand = _hand_routed_dit(model, *inputs, 1, 3, idx, rope=rope)
        ref = masked_reference(model, inputs, list(model.blocks), [(1, 3)], [idx])
        dense = model(*inputs)
    assert (ref - by_hand).abs().max() <= 1e-5 * by_hand.abs().max()
    assert (dense - by_hand).abs().max() > 1e-2 * by_hand.abs().max()  # routing matters here


@pytest.mark.parametrize("short,joint", [("DiT", None), ("MMDiT", "text_first"),
                                         ("ViT + class token", None)])
def test_keeping_every_token_is_the_dense_model(short, joint):
    model, inputs, _ = build(_name(short))
    model.eval()
    blocks = list(getattr(model, "joint_blocks", None) or model.blocks)
    n = 1 + model.patch_embed.num_patches if short.startswith("ViT") else \
        model.x_embedder.num_patches
    every = torch.arange(n).expand(B, n)
    with torch.no_grad():
        ref = masked_reference(model, inputs, blocks, [(0, 1), (3, 4)], [every, every],
                               joint=joint)
        dense = model(*inputs)
    assert torch.allclose(ref, dense, atol=1e-6, rtol=0)


def test_ssm_reference_keeping_every_token_is_the_dense_model_and_routing_changes_it():
    model, inputs, _ = build(_name("bidirectional SSM"))
    model.eval()
    n = model.x_embedder.num_patches
    with torch.no_grad():
        dense = model(*inputs)
        every = ssm_reference(model, *inputs, routes=[(1, 3)], indices=[torch.arange(n).expand(B, n)])
        half = reference(model, inputs, list(model.blocks), [(1, 3)], [_draw(n, n // 2)])
    assert torch.equal(every, dense)
    assert not torch.allclose(half, dense, atol=1e-3)


def test_joint_attention_by_lengths_needs_the_order_of_the_streams():
    model, inputs, _ = build(_name("MMDiT"))
    n = model.x_embedder.num_patches
    with pytest.raises(ValueError, match="joint='text_first' or 'image_first'"):
        masked_reference(model, inputs, list(model.joint_blocks), [(1, 2)], [_draw(n, n // 2)],
                         joint=None)


def test_measured_token_positions_equal_the_known_order_and_the_wrong_order_differs():
    """joint="auto" finds MMDiT's [text, image] keys itself: the same result as the order
    read from its code, and unlike the other order."""
    model, inputs, _ = build(_name("MMDiT"))
    n = model.x_embedder.num_patches
    idx = [_draw(n, n // 2)]
    blocks = list(model.joint_blocks)
    with torch.no_grad():
        auto = masked_reference(model, inputs, blocks, [(1, 2)], idx)
        known = masked_reference(model, inputs, blocks, [(1, 2)], idx, joint="text_first")
        wrong = masked_reference(model, inputs, blocks, [(1, 2)], idx, joint="image_first")
    assert torch.allclose(auto, known, atol=1e-6, rtol=0)
    assert not torch.allclose(auto, wrong, atol=1e-3)


def test_masked_reference_refuses_blocks_that_mix_tokens_without_attention():
    model, inputs, _ = build(_name("bidirectional SSM"))
    n = model.x_embedder.num_patches
    with pytest.raises(RuntimeError, match="made no attention call over its tokens"):
        masked_reference(model, inputs, list(model.blocks), [(1, 2)], [_draw(n, n // 2)])


def test_kept_mask():
    mask = kept_mask(torch.tensor([[0, 2], [1, 3]]), 4)
    assert mask.tolist() == [[True, False, True, False], [False, True, False, True]]


def test_reference_does_not_use_tread_fx_routing_code():
    import ast
    import inspect

    from tread_fx import reference as module

    imported = set()
    for node in ast.walk(ast.parse(inspect.getsource(module))):
        if isinstance(node, ast.ImportFrom):
            imported.add(node.module or "")
        elif isinstance(node, ast.Import):
            imported.update(alias.name for alias in node.names)
    assert imported <= {"__future__", "typing", "torch", "torch.nn.functional",
                        "torch.nn", "tread_fx.models.ssm"}, imported
