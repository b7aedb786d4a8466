"""diffusers transformers built from small configs (random weights, no downloads) route
without any per-model code: torch.fx cannot trace them, so the concrete front end does."""

import pytest
import torch
from diffusers import DiTTransformer2DModel, PixArtTransformer2DModel, SD3Transformer2DModel

import tread_fx
from conftest import perturb_

B = 2


def dit():
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  num_layers=4, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=10)
    for m in model.modules():  # its label dropout (0.1, not configurable) draws per block
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8),
                       timestep=torch.randint(0, 1000, (B,)),
                       class_labels=torch.randint(0, 10, (B,)), return_dict=False)


def pixart():
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=8, num_layers=4, cross_attention_dim=16,
                                     sample_size=8, patch_size=2, caption_channels=12)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8),
                       encoder_hidden_states=torch.randn(B, 5, 12),
                       timestep=torch.randint(0, 1000, (B,)),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                       return_dict=False)


def sd3():
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4,
                                  attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=12, caption_projection_dim=16,
                                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8)
    return model, dict(hidden_states=torch.randn(B, 4, 8, 8),
                       encoder_hidden_states=torch.randn(B, 5, 12),
                       pooled_projections=torch.randn(B, 10),
                       timestep=torch.randint(0, 1000, (B,)), return_dict=False)


MODELS = {"DiTTransformer2DModel": dit, "PixArtTransformer2DModel": pixart,
          "SD3Transformer2DModel": sd3}


def build(name):
    torch.manual_seed(0)
    model, inputs = MODELS[name]()
    return perturb_(model, std=0.05), inputs


@pytest.mark.parametrize("name", list(MODELS))
def test_diffusers_model_routes(name):
    model, inputs = build(name)
    with pytest.raises(tread_fx.TraceError, match="torch.fx could not trace"):
        tread_fx.route(model, "1:2@0.5")  # shape-dependent Python: needs example inputs
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs)
    assert routed.front_end == "concrete"
    assert routed.block_chain[:3] == ("transformer_blocks.0", "transformer_blocks.1",
                                      "transformer_blocks.2")
    # ratio 0: the original, bit for bit, outputs and gradients (train mode)
    r0 = tread_fx.route(model, "1:2@0", example_inputs=inputs).train()
    model.train()
    grads = []
    for m in (model, r0):
        m.zero_grad(set_to_none=True)
        out = m(**inputs)[0]
        out.square().mean().backward()
        grads.append((out.detach(), {n: p.grad.clone() for n, p in model.named_parameters()
                                     if p.grad is not None}))
    assert torch.equal(grads[0][0], grads[1][0])
    assert grads[0][1].keys() == grads[1][1].keys()
    assert all(torch.equal(grads[0][1][k], grads[1][1][k]) for k in grads[0][1])
    # eval: the original at any ratio
    routed.eval(), model.eval()
    with torch.no_grad():
        assert torch.equal(routed(**inputs)[0], model(**inputs)[0])
    # r = 0.5 trains, and the routed blocks see 8 of the 16 image tokens
    routed.train()
    seen = []
    handle = model.transformer_blocks[1].register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
        with_kwargs=True)
    routed(**inputs)[0].square().mean().backward()
    handle.remove()
    assert seen == [8]
    # the graph is specialised to the example: other values are refused, clearly
    with pytest.raises(ValueError, match="return_dict=False"):
        routed(**{**inputs, "return_dict": True})
    bigger = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in inputs.items()}
    with pytest.raises(ValueError, match="specialised to them"):
        routed(**bigger)
