"""LoRA fine-tuning with peft, the way diffusers models are fine-tuned: adapters added
before route(), adapters added to a routed model, only adapters train, peft saves them."""

import copy

import pytest
import torch

import tread_fx
from tread_fx.tools.zoo import build

peft = pytest.importorskip("peft")
pytest.importorskip("diffusers")
from peft import LoraConfig, get_peft_model_state_dict, inject_adapter_in_model  # noqa: E402
from peft import set_peft_model_state_dict  # noqa: E402

SD3 = "diffusers SD3Transformer2DModel"
# in the blocks (attention projections) and outside them (the output projection, which an
# exported graph would otherwise flatten into a plain matmul on the base weight)
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "proj_out"]


def _config():
    return LoraConfig(r=4, lora_alpha=4, target_modules=TARGETS)


def _draw_adapters(*models, seed=5):
    """Non-zero adapter weights (lora_B starts at zero: an adapter would do nothing),
    the same in every model given."""
    gen = torch.Generator().manual_seed(seed)
    named = [dict(m.named_parameters()) for m in models]
    with torch.no_grad():
        for name, p in named[0].items():
            if "lora_" in name:
                value = torch.randn(p.shape, generator=gen) * 0.1
                for params in named:
                    params[name].copy_(value)


def _sd3_with_adapters():
    model, inputs, span = build(SD3)
    model.add_adapter(_config())
    _draw_adapters(model)
    return model, inputs, span


def test_a_model_with_adapters_routes_and_verifies():
    model, inputs, span = _sd3_with_adapters()
    report = tread_fx.verify(model, f"{span}@0.5", inputs)
    assert report.ok, str(report)


def test_only_the_adapters_train():
    model, inputs, span = _sd3_with_adapters()
    routed = tread_fx.route(model, f"{span}@0.5", example_inputs=inputs,
                            front_end="concrete").train()
    trainable = {n for n, p in routed.named_parameters() if p.requires_grad}
    assert trainable and all("lora_" in n for n in trainable)
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    opt = torch.optim.AdamW([p for p in routed.parameters() if p.requires_grad], lr=1e-2)
    routed(**inputs)[0].square().mean().backward()
    opt.step()
    after = dict(model.named_parameters())   # routed shares the model's parameters
    changed = {n for n in before if not torch.equal(before[n], after[n])}
    assert changed == trainable


def test_adapters_save_and_load_with_peft():
    model, inputs, span = _sd3_with_adapters()
    routed = tread_fx.route(model, f"{span}@0.5", example_inputs=inputs, front_end="concrete")
    # trained through `routed`, saved from `model`: they share every parameter
    saved = get_peft_model_state_dict(model)
    assert saved and all("lora_" in k for k in saved)
    assert routed.state_dict().keys() == model.state_dict().keys()

    fresh, _, _ = build(SD3)                 # the same base weights, new adapters
    fresh.add_adapter(_config())
    set_peft_model_state_dict(fresh, saved)
    again = tread_fx.route(fresh, f"{span}@0.5", example_inputs=inputs, front_end="concrete")
    routed.eval(), again.eval()
    with torch.no_grad():
        assert torch.equal(routed(**inputs)[0], again(**inputs)[0])


def _equal_to_a_copy_with_the_same_adapters(routed, reference, inputs):
    _draw_adapters(routed, reference)
    reference.eval(), routed.eval()
    with torch.no_grad():
        want = reference(**inputs)[0]
        eval_equal = torch.equal(routed(**inputs)[0], want)
    reference.train(), routed.train()
    torch.manual_seed(0)
    want = reference(**inputs)[0]
    torch.manual_seed(0)
    with tread_fx.routing(routed, 0.0):
        ratio0_equal = torch.equal(routed(**inputs)[0], want)
    return eval_equal and ratio0_equal


@pytest.mark.parametrize("front_end", ["export", "concrete"])
def test_adapters_added_to_a_routed_model_take_effect(front_end):
    model, inputs, span = build(SD3)
    reference = copy.deepcopy(model)
    routed = tread_fx.route(model, f"{span}@0.5", example_inputs=inputs, front_end=front_end)
    inject_adapter_in_model(_config(), routed)
    inject_adapter_in_model(_config(), reference)
    assert _equal_to_a_copy_with_the_same_adapters(routed, reference, inputs)
    assert routed.retraces == 2                   # traced again for the new modules, once per mode
    assert model.proj_out is routed.proj_out      # the model holds the same modules
    assert {n for n, p in routed.named_parameters() if p.requires_grad} == \
        {n for n, p in reference.named_parameters() if p.requires_grad}


def test_adapters_added_to_the_model_after_route_take_effect():
    model, inputs, span = build(SD3)
    reference = copy.deepcopy(model)
    routed = tread_fx.route(model, f"{span}@0.5", example_inputs=inputs, front_end="concrete")
    model.add_adapter(_config())                  # diffusers' own way, on the model
    reference.add_adapter(_config())
    assert _equal_to_a_copy_with_the_same_adapters(routed, reference, inputs)


def test_without_the_structure_check_an_exported_graph_would_ignore_the_adapter(monkeypatch):
    """The check above can fail: an exported graph reads proj_out's base weight directly."""
    from tread_fx.module import TreadGraphModule

    monkeypatch.setattr(TreadGraphModule, "_sync_structure", lambda self: None)
    model, inputs, span = build(SD3)
    reference = copy.deepcopy(model)
    routed = tread_fx.route(model, f"{span}@0.5", example_inputs=inputs, front_end="export")
    inject_adapter_in_model(_config(), routed)
    inject_adapter_in_model(_config(), reference)
    assert not _equal_to_a_copy_with_the_same_adapters(routed, reference, inputs)
