"""The inserted nodes are compiler-friendly: torch.compile(fullgraph=True) of a routed DiT."""

import torch

import tread_fx
from tread_fx import TreadGraphModule
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


# -- recompiles, regional compilation, diffusers models ------------------------------------
import copy  # noqa: E402

import pytest  # noqa: E402
from torch._dynamo.testing import CompileCounterWithBackend  # noqa: E402


def _counter():
    # aot_eager: dynamo and autograd's graph capture as inductor sees them, without the C++
    # compile (recompiles are decided by dynamo's guards, whatever the backend)
    return CompileCounterWithBackend("aot_eager")


def _compiled_graphs() -> int:
    """Cache entries of the routed module's forward: one per (re)compilation (a compile
    that restarts its analysis runs the backend twice, but caches one graph)."""
    from torch._dynamo.eval_frame import _debug_get_cache_entry_list
    return len(_debug_get_cache_entry_list(TreadGraphModule._dispatch.__code__))


def _train_step(model, opt, x, t, y):
    opt.zero_grad(set_to_none=True)
    out = model(x, t, y)
    out.square().mean().backward()
    opt.step()
    return out


def test_fixed_shapes_compile_once_and_mode_and_ratio_changes_recompile_once_each():
    torch._dynamo.reset()
    routed = tread_fx.route(tiny_dit(depth=4, class_dropout_prob=0.0), "1:2@0.5").train()
    counter = _counter()
    compiled = torch.compile(routed, backend=counter)
    opt = torch.optim.SGD(routed.parameters(), lr=1e-3)
    x, t, y = dit_inputs(batch=2)
    for _ in range(50):
        _train_step(compiled, opt, x, t, y)
    assert counter.frame_count == 1 and _compiled_graphs() == 1
    routed.eval()
    with torch.no_grad():
        compiled(x, t, y)
    routed.train()
    _train_step(compiled, opt, x, t, y)
    assert _compiled_graphs() == 2           # eval once; back to train: cached
    with tread_fx.routing(routed, 0.25):
        _train_step(compiled, opt, x, t, y)
    _train_step(compiled, opt, x, t, y)
    assert _compiled_graphs() == 3           # the new ratio once; back to 0.5: cached


def test_compile_blocks_compiles_the_chain_once_per_token_count_and_leaves_the_model():
    torch._dynamo.reset()
    model = tiny_dit(depth=6, class_dropout_prob=0.0)
    routed = tread_fx.route(model, "1:3@0.5", seed=3).train()
    eager = tread_fx.route(model, "1:3@0.5", seed=3).train()   # the same draws
    counter = _counter()
    assert tread_fx.compile_blocks(routed, backend=counter) is routed
    x, t, y = dit_inputs(batch=2)
    for _ in range(4):
        out, expected = routed(x, t, y), eager(x, t, y)
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
    # six blocks, one compiled function, static shapes: the full token count in the patch
    # embedder's transposed layout (block 0), the kept count, the full count contiguous
    assert counter.frame_count == 3
    params = [p for p in model.parameters() if p.requires_grad]
    grads = torch.autograd.grad(routed(x, t, y).square().mean(), params)
    expected = torch.autograd.grad(eager(x, t, y).square().mean(), params)
    for g, e in zip(grads, expected):
        torch.testing.assert_close(g, e, rtol=1e-5, atol=1e-6)
    # the routed module's code calls its blocks through the compiled function; the model's
    # blocks themselves are not compiled, and the routed module's printed code is the graph
    assert all(b._compiled_call_impl is None for b in model.blocks)
    assert "call_compiled_block" not in routed.code
    # eval: the dense computation, still through compiled blocks
    routed.eval()
    with torch.no_grad():
        torch.testing.assert_close(routed(x, t, y), model.eval()(x, t, y),
                                   rtol=1e-5, atol=1e-6)
    assert counter.frame_count == 4          # no_grad: one more graph, for every block
    # a copy calls its own blocks through the compiled function too
    clone = copy.deepcopy(routed).train()
    clone(x, t, y)
    assert counter.frame_count == 4


def _symbolic_inputs(graph: torch.fx.GraphModule) -> list[str]:
    """Placeholders of a dynamo graph that are sizes, or tensors with a symbolic size."""
    out = []
    for node in graph.graph.nodes:
        value = node.meta.get("example_value")
        if node.op == "placeholder" and (
                isinstance(value, torch.SymInt) or isinstance(value, torch.Tensor)
                and any(isinstance(d, torch.SymInt) for d in value.shape)):
            out.append(node.name)
    return out


@pytest.mark.parametrize("dynamic", ["default", None])
def test_compile_blocks_gives_the_kept_token_count_a_static_graph(dynamic):
    # by default both token counts get static shapes, like the dense model's blocks; torch's
    # automatic dynamic shapes (dynamic=None) would compile the kept count symbolically
    torch._dynamo.reset()
    routed = tread_fx.route(tiny_dit(depth=6), "1:3@0.5").train()
    counter = _counter()
    options = {} if dynamic == "default" else {"dynamic": dynamic}
    tread_fx.compile_blocks(routed, backend=counter, **options)
    x, t, y = dit_inputs(batch=2)
    for _ in range(2):
        routed(x, t, y).square().mean().backward()
    symbolic = [_symbolic_inputs(g) for g in counter.graphs]
    if dynamic == "default":   # embedder's layout, kept count, full count after the route
        assert symbolic == [[], [], []]
    else:                      # the second graph serves the other two, symbolically
        assert len(symbolic) == 2 and symbolic[0] == [] and symbolic[1]


def test_compile_blocks_refuses_a_model_that_is_not_routed():
    with pytest.raises(TypeError, match="compile_blocks"):
        tread_fx.compile_blocks(tiny_dit(depth=2))


@pytest.mark.parametrize("name", ["DiTTransformer2DModel", "SD3Transformer2DModel",
                                  "FluxTransformer2DModel"])
def test_exported_diffusers_models_compile_fullgraph_once(name):
    pytest.importorskip("diffusers")
    from tread_fx.tools import diffusers_zoo as zoo
    case = next(c for c in zoo.CASES if c["name"] == name)
    model, inputs = zoo.build(case)
    routed = tread_fx.route(model, "1:-2@0.5", example_inputs=inputs).train()
    torch._dynamo.reset()
    counter = _counter()
    compiled = torch.compile(routed, fullgraph=True, backend=counter)
    for seed in range(3):
        torch.manual_seed(seed)
        out = compiled(**inputs)[0]
        torch.manual_seed(seed)
        expected = routed(**inputs)[0]
        torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)
        out.square().mean().backward()
    assert counter.frame_count == 1 and _compiled_graphs() == 1


def test_compile_blocks_gives_each_block_class_its_own_recompile_budget():
    # Flux's chain has two block classes, each compiled at every token count and input
    # layout, train and eval: under one shared code object dynamo's recompile limit (8) was
    # hit after a ratio change and the blocks ran eagerly from then on
    pytest.importorskip("diffusers")
    from tread_fx.tools import diffusers_zoo as zoo
    case = next(c for c in zoo.CASES if c["name"] == "FluxTransformer2DModel")
    model, inputs = zoo.build(case)
    routed = tread_fx.route(model, "1:-2@0.5", example_inputs=inputs).train()
    eager = copy.deepcopy(routed)
    torch._dynamo.reset()
    counter = _counter()
    tread_fx.compile_blocks(routed, backend=counter)
    with torch._dynamo.config.patch(fail_on_recompile_limit_hit=True):
        for seed in range(2):
            torch.manual_seed(seed)
            out = routed(**inputs)[0]
            torch.manual_seed(seed)
            torch.testing.assert_close(out, eager(**inputs)[0], rtol=1e-5, atol=1e-6)
            out.square().mean().backward()
        with tread_fx.routing(routed, 0.25):          # another kept count
            routed(**inputs)[0].square().mean().backward()
        routed.eval()
        with torch.no_grad():
            torch.testing.assert_close(routed(**inputs)[0], model.eval()(**inputs)[0],
                                       rtol=1e-5, atol=1e-6)
    # more graphs than one code object may have: shared, the limit would have been hit
    assert counter.frame_count > torch._dynamo.config.recompile_limit


def test_compile_blocks_compiles_the_blocks_of_the_chains_class_beside_it():
    # SD3's last block has no context feed-forward, so it is in no chain; export inlined it
    # and compile_blocks left it eager, one SD3 block in twelve (on an H200 the routed
    # model's elementwise kernels then took longer than the dense model's, all compiled)
    pytest.importorskip("diffusers")
    from tread_fx.tools import diffusers_zoo as zoo
    case = next(c for c in zoo.CASES if c["name"] == "SD3Transformer2DModel")
    model, inputs = zoo.build(case)
    last = f"transformer_blocks.{len(model.transformer_blocks) - 1}"
    assert model.get_submodule(last).context_pre_only
    routed = tread_fx.route(model, "1:-2@0.5", example_inputs=inputs).train()
    assert last not in routed.block_chain
    eager = copy.deepcopy(routed)
    gelus = []   # per compiled graph: two feed-forwards in a chain block, one in the last

    def backend(gm, example_inputs):
        gelus.append(sum(1 for n in gm.graph.nodes
                         if getattr(n.target, "__name__", "") == "gelu"))
        return gm.forward

    torch._dynamo.reset()
    tread_fx.compile_blocks(routed, backend=backend)
    torch.manual_seed(0)
    out = routed(**inputs)[0]
    torch.manual_seed(0)
    torch.testing.assert_close(out, eager(**inputs)[0], rtol=1e-5, atol=1e-6)
    assert 2 in gelus and 1 in gelus, gelus
    routed.eval()
    gelus.clear()
    with torch.no_grad():
        torch.testing.assert_close(routed(**inputs)[0], model.eval()(**inputs)[0],
                                   rtol=1e-5, atol=1e-6)
    assert 1 in gelus, gelus
