"""Semantics of a routed DiT: exact TREAD, shared parameters, untouched input model."""

import copy
import pickle

import pytest
import torch
from torch import fx

import tread_fx
from conftest import block_token_counts, dit_inputs, tiny_dit


def reference_routed_forward(model, x, t, y, start, end, indices):
    """TREAD written by hand for DiT, with the given kept indices ``[B, kept]``."""
    h = model.x_embedder(x) + model.pos_embed
    c = model.t_embedder(t) + model.y_embedder(y, model.training)
    rows = torch.arange(h.shape[0])[:, None]
    for i, block in enumerate(model.blocks):
        if i == start:
            remembered = h
            h = remembered[rows, indices]
        h = block(h, c)
        if i == end:
            full = remembered.clone()
            full[rows, indices] = h
            h = full
    return model.unpatchify(model.final_layer(h, c))


@pytest.mark.parametrize("keep_order", [True, False])
def test_matches_hand_written_tread(keep_order):
    model = tiny_dit(depth=6, class_dropout_prob=0.0)
    x, t, y = dit_inputs(batch=3)
    routed = tread_fx.route(model, "1:4@0.5", keep_order=keep_order)
    routed.train(), model.train()
    out = routed(x, t, y)
    indices = routed.selectors[0].last_indices
    assert indices.shape == (3, 8)  # 16 tokens, floor(16 * 0.5) = 8 routed
    # every sample keeps distinct tokens; the order is the original one with keep_order
    assert all(len(set(row.tolist())) == 8 for row in indices)
    if keep_order:
        assert torch.equal(indices, indices.sort(dim=1).values)
    expected = reference_routed_forward(model, x, t, y, 1, 4, indices)
    torch.testing.assert_close(out, expected, rtol=0, atol=1e-6)


def test_routed_tokens_leave_the_span_with_their_pre_route_values():
    model = tiny_dit(depth=6, class_dropout_prob=0.0)
    x, t, y = dit_inputs(batch=2)
    routed = tread_fx.route(model, "2:3@0.75")
    routed.train()
    captured = {}

    def keep(key, value):
        captured[key] = value  # hooks must return None

    hooks = [
        model.blocks[1].register_forward_hook(lambda m, a, o: keep("in", o)),
        model.blocks[3].register_forward_hook(lambda m, a, o: keep("last", o)),
        model.blocks[4].register_forward_pre_hook(lambda m, a: keep("out", a[0])),
    ]
    routed(x, t, y)
    for h in hooks:
        h.remove()
    indices = routed.selectors[0].last_indices
    kept = torch.zeros(2, 16, dtype=torch.bool)
    kept[torch.arange(2)[:, None], indices] = True
    assert kept.sum(1).tolist() == [4, 4]
    assert torch.equal(captured["out"][~kept], captured["in"][~kept])
    rows = torch.arange(2)[:, None]
    assert torch.equal(captured["out"][rows, indices], captured["last"])
    assert not torch.equal(captured["out"][kept], captured["in"][kept])


def test_several_routes_and_negative_indices():
    model = tiny_dit(depth=8)
    x, t, y = dit_inputs()
    routed = tread_fx.route(model, "1:2@0.5,4:-2@0.25")
    assert [str(r) for r in routed.routes] == ["1:2@0.5", "4:6@0.25"]
    routed.train()
    seen = block_token_counts(routed, model.blocks, lambda: routed(x, t, y))
    assert seen == [16, 8, 8, 16, 12, 12, 12, 16]


def test_backward_reaches_every_parameter_at_half_ratio():
    model = tiny_dit(depth=6)
    routed = tread_fx.route(model, "2:-2@0.5")
    routed.train()
    routed(*dit_inputs()).square().mean().backward()
    for name, p in routed.named_parameters():
        if p.requires_grad:
            assert p.grad is not None and p.grad.abs().sum() > 0, name


def test_route_leaves_the_input_model_as_it_was():
    model = tiny_dit(depth=4)
    model.eval()
    model.blocks[0].train()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    modules = [(n, id(m), m.training) for n, m in model.named_modules()]
    x, t, y = dit_inputs()
    with torch.no_grad():
        out_before = model(x, t, y)
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=(x, t, y))
    assert [(n, id(m), m.training) for n, m in model.named_modules()] == modules
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not hasattr(model, "_tread")
    with torch.no_grad():
        assert torch.equal(model(x, t, y), out_before)
    assert routed.training is False  # follows the model's own flag


def test_parameters_are_shared_and_state_dict_keys_identical():
    model = tiny_dit(depth=4)
    routed = tread_fx.route(model, "1:2@0.5")
    assert list(routed.state_dict()) == list(model.state_dict())
    for (n1, p1), (n2, p2) in zip(model.named_parameters(), routed.named_parameters()):
        assert n1 == n2 and p1 is p2
    assert routed.blocks[0] is model.blocks[0]
    # load both ways, strictly
    other = tiny_dit(depth=4, seed=5)
    routed.load_state_dict(other.state_dict())
    assert torch.equal(model.blocks[2].attn.qkv.weight, other.blocks[2].attn.qkv.weight)
    fresh = tiny_dit(depth=4, seed=9)
    fresh.load_state_dict(routed.state_dict())
    assert torch.equal(fresh.final_layer.linear.weight, other.final_layer.linear.weight)


def test_training_updates_the_shared_parameters():
    model = tiny_dit(depth=4)
    routed = tread_fx.route(model, "1:2@0.5")
    routed.train()
    before = model.blocks[1].mlp.fc1.weight.clone()
    opt = torch.optim.AdamW(routed.parameters(), lr=1e-2)
    routed(*dit_inputs()).square().mean().backward()
    opt.step()
    assert not torch.equal(model.blocks[1].mlp.fc1.weight, before)


def test_label_dropout_branch_follows_the_mode():
    """Code outside the blocks that reads self.training keeps its meaning in both modes."""
    model = tiny_dit(depth=4, class_dropout_prob=1.0)
    routed = tread_fx.route(model, "1:2@0.0")
    x, t, y = dit_inputs()
    null = torch.full_like(y, model.num_classes)
    routed.train(), model.train()
    torch.manual_seed(0)
    train_out = routed(x, t, y)
    model.eval(), routed.eval()
    with torch.no_grad():
        assert torch.equal(train_out.detach(), model(x, t, null))
        assert torch.equal(routed(x, t, y), model(x, t, y))


def test_seeded_selection_is_reproducible():
    model = tiny_dit(depth=4)
    x, t, y = dit_inputs(batch=4)
    draws = []
    for seed in (3, 3, 4):
        routed = tread_fx.route(model, "1:2@0.5", seed=seed).train()
        routed(x, t, y)
        draws.append(routed.selectors[0].last_indices)
    assert torch.equal(draws[0], draws[1])
    assert not torch.equal(draws[0], draws[2])


def test_selection_is_redrawn_every_forward_and_per_sample():
    model = tiny_dit(depth=4)
    routed = tread_fx.route(model, "1:2@0.5").train()
    x, t, y = dit_inputs(batch=8)
    routed(x, t, y)
    first = routed.selectors[0].last_indices.clone()
    routed(x, t, y)
    assert not torch.equal(first, routed.selectors[0].last_indices)
    assert len({tuple(row.tolist()) for row in first}) > 1


def test_unroute_and_reroute():
    model = tiny_dit(depth=6)
    x, t, y = dit_inputs()
    routed = tread_fx.route(model, "1:3@0.5")
    assert tread_fx.is_routed(routed)
    dense = tread_fx.unroute(routed)
    assert not tread_fx.is_routed(dense) and "tread" not in dense.code
    assert type(dense).__name__ == "DiT"
    dense.train(), model.train()
    torch.manual_seed(0)
    a = dense(x, t, y)
    torch.manual_seed(0)
    assert torch.equal(a, model(x, t, y))
    rerouted = tread_fx.route(routed, "0:1@0.25")
    assert [str(r) for r in rerouted.routes] == ["0:1@0.25"]
    assert rerouted.code.count("self._tread.select_") == 1
    rerouted.train()
    seen = block_token_counts(rerouted, model.blocks, lambda: rerouted(x, t, y))
    assert seen == [12, 12, 16, 16, 16, 16]
    assert list(rerouted.state_dict()) == list(model.state_dict())


def test_nodes_carry_metadata_for_tools():
    model = tiny_dit(depth=6)
    routed = tread_fx.route(model, "1:3@0.5", example_inputs=dit_inputs())
    for graph in routed.graphs():
        tread_nodes = {n.name: n.meta["tread"] for n in graph.nodes if "tread" in n.meta}
        assert set(tread_nodes) == {"tread_select_0", "tread_gather_0", "tread_scatter_0"}
        meta = tread_nodes["tread_scatter_0"]
        assert meta["blocks"] == ("blocks.1", "blocks.2", "blocks.3")
        assert (meta["tokens"], meta["kept"], meta["role"]) == (16, 8, "scatter")


def test_user_traced_graph_module():
    model = tiny_dit(depth=4)

    class Leaves(fx.Tracer):
        def is_leaf_module(self, m, name):
            return name.startswith("blocks.") or super().is_leaf_module(m, name)

    model.eval()  # the user's graph bakes in the mode it was traced in
    gm = fx.GraphModule(model, Leaves().trace(model))
    routed = tread_fx.route(gm, "1:2@0.0")
    x, t, y = dit_inputs()
    routed.eval()
    with torch.no_grad():
        assert torch.equal(routed(x, t, y), model(x, t, y))
    routed.train()
    seen = block_token_counts(routed, [gm.blocks.get_submodule(str(i)) for i in range(4)],
                              lambda: routed(x, t, y))
    assert seen == [16, 16, 16, 16]
    half = tread_fx.route(gm, "1:2@0.5").train()
    assert block_token_counts(half, model.blocks, lambda: half(x, t, y)) == [16, 8, 8, 16]


def test_deepcopy_gives_an_independent_routed_model():
    model = tiny_dit(depth=4)
    routed = tread_fx.route(model, "1:2@0.5", seed=1)
    twin = copy.deepcopy(routed)
    assert type(twin).__name__ == "RoutedDiT" and twin.routes == routed.routes
    assert twin.blocks[0].attn.qkv.weight is not model.blocks[0].attn.qkv.weight
    x, t, y = dit_inputs()
    routed.train(), twin.train()
    torch.manual_seed(0)
    a = routed(x, t, y)
    torch.manual_seed(0)
    assert torch.equal(a, twin(x, t, y))  # same seeded selector state, same weights
    twin.eval(), routed.eval()
    with torch.no_grad():
        assert torch.equal(twin(x, t, y), routed(x, t, y))


def test_pickling_says_what_to_do_instead():
    routed = tread_fx.route(tiny_dit(depth=4), "1:2@0.5")
    with pytest.raises(TypeError, match="save its state_dict"):
        pickle.dumps(routed)
