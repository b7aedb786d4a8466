"""The inserted nodes are compiler-friendly: torch.compile(fullgraph=True) of a routed DiT."""

import torch

import tread_fx
from conftest import dit_inputs, tiny_dit


def test_compile_fullgraph_train_step():
    torch._dynamo.reset()
    model = tiny_dit(depth=4, class_dropout_prob=0.0)
    routed = tread_fx.route(model, "1:2@0.5").train()
    compiled = torch.compile(routed, fullgraph=True)
    x, t, y = dit_inputs(batch=2)
    out = compiled(x, t, y)
    out.square().mean().backward()
    assert out.shape == (2, 8, 8, 8)
    # the selector ran inside the compiled graph and recorded its draw
    indices = routed.selectors[0].last_indices
    assert indices is not None and indices.shape == (2, 8)
    # same indices, eager: the compiled forward computes the same routed function
    rows = torch.arange(2)[:, None]
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, True)
    h = model.blocks[0](h, c)
    kept = model.blocks[2](model.blocks[1](h[rows, indices], c), c)
    h = h.clone()
    h[rows, indices] = kept
    expected = model.unpatchify(model.final_layer(model.blocks[3](h, c), c))
    torch.testing.assert_close(out, expected, rtol=1e-4, atol=1e-5)
    assert all(p.grad is not None for p in model.parameters() if p.requires_grad)
    # eval mode compiles to the dense computation
    routed.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x, t, y), model.eval()(x, t, y),
                                   rtol=1e-4, atol=1e-5)
