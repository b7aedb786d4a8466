"""diffusers transformers built from small configs (random weights, no downloads) route
without any per-model code: torch.fx cannot trace them, so torch.export does."""

import pytest
import torch

import tread_fx
from tread_fx.tools.backbones import check_backbone
from tread_fx.tools.zoo import DIFFUSERS, build


@pytest.mark.parametrize("name", list(DIFFUSERS))
def test_diffusers_model_routes(name):
    result = check_backbone(name)
    assert result["front_end"] == "export"
    assert result["ratio0_bit_equal"] and result["eval_equal"] and result["trains_at_half"]
    model, inputs, _ = build(name)
    with pytest.raises(tread_fx.TraceError, match="torch.fx could not trace"):
        tread_fx.route(model, "1:2@0.5")  # shape-dependent Python: needs example inputs
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=inputs)
    assert routed.front_end == "export"
    assert routed.block_chain[:3] == ("transformer_blocks.0", "transformer_blocks.1",
                                      "transformer_blocks.2")
    # the routed blocks see 8 of the 16 image tokens
    routed.train()
    seen = []
    handle = model.transformer_blocks[1].register_forward_pre_hook(
        lambda m, a, kw: seen.append((a[0] if a else kw["hidden_states"]).shape[1]),
        with_kwargs=True)
    routed(**inputs)[0].square().mean().backward()
    handle.remove()
    assert seen == [8]
    # the graph is specialised to the example: other values are traced anew and give
    # what the model gives
    routed.eval(), model.eval()
    with torch.no_grad():
        as_dict = routed(**{**inputs, "return_dict": True})
        assert torch.equal(as_dict.sample, model(**{**inputs, "return_dict": True}).sample)
        bigger = {k: torch.cat([v, v]) if torch.is_tensor(v) else v for k, v in inputs.items()}
        assert torch.equal(routed(**bigger)[0], model(**bigger)[0])
    # the exported graph serves any batch size (symbolic batch, checked); return_dict=True
    # is a new argument value: one trace
    assert routed.retraces == 1
