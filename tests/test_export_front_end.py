"""The torch.export front end (passes/export_trace.py): module-level graphs with the user's
own blocks as call_module nodes, bit-equal to the eager model."""

from __future__ import annotations

import operator
import warnings

import pytest
import torch
import torch.utils._pytree as pytree
from torch import fx, nn

from tread_fx.passes.export_trace import ExportResult, export_trace, graph_module

diffusers = pytest.importorskip("diffusers")

B = 2


def _ids_2d(h, w):
    ids = torch.zeros(h, w, 3)
    ids[..., 1] = torch.arange(h)[:, None]
    ids[..., 2] = torch.arange(w)[None, :]
    return ids.reshape(h * w, 3)


# Tiny configs (from /work/shared/diffusers_zoo.py, fewer layers to keep exports fast).
CONFIGS = {
    "dit": dict(
        cls="DiTTransformer2DModel",
        init=dict(in_channels=4, out_channels=8, activation_fn="gelu-approximate",
                  num_attention_heads=2, attention_head_dim=4, attention_bias=True, num_layers=3,
                  norm_type="ada_norm_zero", num_embeds_ada_norm=8, patch_size=2, sample_size=8),
        inputs=lambda b=B: dict(hidden_states=torch.randn(b, 4, 8, 8),
                                timestep=torch.randint(0, 1000, (b,)),
                                class_labels=torch.randint(0, 4, (b,))),
        blocks=["transformer_blocks"]),
    "sd3": dict(
        cls="SD3Transformer2DModel",
        init=dict(sample_size=32, patch_size=2, in_channels=4, num_layers=3, attention_head_dim=8,
                  num_attention_heads=4, caption_projection_dim=32, joint_attention_dim=24,
                  pooled_projection_dim=64, out_channels=4, pos_embed_max_size=96,
                  dual_attention_layers=(), qk_norm=None),
        inputs=lambda b=B: dict(hidden_states=torch.randn(b, 4, 10, 8),
                                encoder_hidden_states=torch.randn(b, 9, 24),
                                pooled_projections=torch.randn(b, 64),
                                timestep=torch.randint(0, 1000, (b,))),
        blocks=["transformer_blocks"]),
    "flux": dict(
        cls="FluxTransformer2DModel",
        init=dict(patch_size=1, in_channels=4, num_layers=2, num_single_layers=2,
                  attention_head_dim=16, num_attention_heads=2, joint_attention_dim=32,
                  pooled_projection_dim=32, axes_dims_rope=[4, 4, 8]),
        inputs=lambda b=B: dict(hidden_states=torch.randn(b, 20, 4),
                                encoder_hidden_states=torch.randn(b, 7, 32),
                                img_ids=_ids_2d(5, 4), txt_ids=torch.zeros(7, 3),
                                timestep=torch.rand(b), pooled_projections=torch.randn(b, 32)),
        blocks=["transformer_blocks", "single_transformer_blocks"]),
}


def _perturb(model: nn.Module) -> nn.Module:
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for p in model.parameters():   # zero-initialised output layers would hide errors
            p.add_(torch.randn(p.shape, generator=gen) * 0.05)
    return model


def _equal(a, b) -> bool:
    la, lb = pytree.tree_leaves(a), pytree.tree_leaves(b)
    return len(la) == len(lb) and all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) else x == y for x, y in zip(la, lb))


def _run_both(model, gm, result: ExportResult, inputs, mode: str):
    model.train(mode == "train")
    gm.train(mode == "train")
    graph_inputs = {k: v for k, v in inputs.items() if k not in result.baked}
    with torch.no_grad():
        torch.manual_seed(7)
        got = gm(**graph_inputs)
        torch.manual_seed(7)
        want = model(**inputs)
    model.eval()
    return got, want


def _block_names(model, containers):
    return [f"{c}.{n}" for c in containers for n, _ in model.get_submodule(c).named_children()]


@pytest.fixture(scope="module", params=sorted(CONFIGS))
def exported(request):
    cfg = CONFIGS[request.param]
    torch.manual_seed(0)
    model = _perturb(getattr(diffusers, cfg["cls"])(**cfg["init"]).float())
    torch.manual_seed(1)
    inputs = cfg["inputs"]()
    names = _block_names(model, cfg["blocks"])
    leaves = [model.get_submodule(n) for n in names]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        results = {mode: export_trace(model, leaves, inputs, mode) for mode in ("eval", "train")}
    return request.param, cfg, model, inputs, names, results


# -- (1) diffusers models: one call_module per block, bit-equal in both modes ------------

@pytest.mark.parametrize("mode", ["eval", "train"])
def test_diffusers_graph_matches_eager(exported, mode):
    _, _, model, inputs, names, results = exported
    result = results[mode]
    assert result.front_end == "export" and result.mode == mode
    calls = [n.target for n in result.graph.nodes if n.op == "call_module"]
    assert calls == names                       # exactly one call per block, in order
    assert result.blocks == names
    result.graph.lint()
    placeholders = [n.target for n in result.graph.nodes if n.op == "placeholder"]
    assert placeholders == list(inputs)        # forward order, named like the parameters
    got, want = _run_both(model, graph_module(model, result), result, inputs, mode)
    assert _equal(got, want)


def test_modes_are_restored(exported):
    _, _, model, inputs, names, _ = exported
    model.train()
    model.transformer_blocks[0].eval()
    export_trace(model, [model.get_submodule(n) for n in names[:1]], inputs, "eval")
    assert model.training and not model.transformer_blocks[0].training
    assert all(m.training for n, m in model.named_modules()
               if not n.startswith("transformer_blocks.0"))
    model.eval()


# -- (2) the call_module nodes run the user's own block objects (hooks fire) -------------

def test_blocks_are_the_users_modules_and_hooks_fire(exported):
    _, _, model, inputs, names, results = exported
    result = results["eval"]
    gm = graph_module(model, result)
    for node in result.graph.nodes:
        if node.op == "call_module":
            assert gm.get_submodule(node.target) is model.get_submodule(node.target)
    seen = []
    handle = model.get_submodule(names[-1]).register_forward_hook(
        lambda mod, args, out: seen.append(mod))
    try:
        _run_both(model, gm, result, inputs, "eval")
    finally:
        handle.remove()
    assert seen == [model.get_submodule(names[-1])] * 2   # graph run + eager run


# -- (3) parameters reached through get_attr are the model's own --------------------------

def test_get_attr_targets_are_the_models_own_tensors(exported):
    _, _, model, _, _, results = exported
    own = {id(t) for t in model.parameters()} | {id(t) for t in model.buffers()}
    for result in results.values():
        gm = graph_module(model, result)
        targets = [n.target for n in result.graph.nodes if n.op == "get_attr"]
        assert targets
        for target in targets:
            if target in result.constants:
                assert getattr(gm, target) is result.constants[target]
                continue
            obj = model
            for part in target.split("."):
                obj = getattr(obj, part)
            assert id(obj) in own
            assert gm.get_parameter(target) is obj if isinstance(obj, nn.Parameter) \
                else gm.get_buffer(target) is obj


# -- (5) dynamic batch on a diffusers model ----------------------------------------------

def test_diffusers_dynamic_batch(exported):
    key, cfg, model, _, _, results = exported
    result = results["eval"]
    dims = result.input_dims["hidden_states"]
    assert result.dynamic and isinstance(dims[0], str)      # batch stays symbolic
    torch.manual_seed(4)
    inputs = cfg["inputs"](3)
    result.check_inputs(inputs)
    got, want = _run_both(model, graph_module(model, result), result, inputs, "eval")
    assert _equal(got, want)


# -- small models of our own -------------------------------------------------------------

class Block(nn.Module):
    def __init__(self, dim=8):
        super().__init__()
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, dim)

    def forward(self, x, context=None, scale=1.0):
        h = self.fc(self.norm(x))
        if context is not None:
            h = h + context.mean(1, keepdim=True)
        return x + scale * h, context


class ListModel(nn.Module):
    """Takes a list of tensors, a dict of tensors and a python flag."""

    def __init__(self, dim=8, depth=3):
        super().__init__()
        self.embed = nn.Linear(dim, dim)
        self.blocks = nn.ModuleList(Block(dim) for _ in range(depth))
        self.register_buffer("shift", torch.linspace(0, 1, dim))
        self.table = torch.arange(dim, dtype=torch.float32) / dim   # a plain tensor attribute
        self.head = nn.Linear(dim, dim)

    def forward(self, xs, cond, double: bool = False):
        x = self.embed(xs[0] + xs[1]) + self.shift + self.table
        n = x.shape[1]                  # shape-dependent python
        context = cond["ctx"][:, : max(n // 2, 1)]
        for blk in self.blocks:
            x, context = blk(x, context=context, scale=0.5)
        x = self.head(x)
        return (x * 2 if double else x), {"tokens": n}


def _list_inputs(b=2, n=6, dim=8, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return dict(xs=[torch.randn(b, n, dim, generator=gen), torch.randn(b, n, dim, generator=gen)],
                cond={"ctx": torch.randn(b, 4, dim, generator=gen)}, double=True)


def test_list_inputs_are_graph_inputs():
    torch.manual_seed(0)
    model = ListModel().eval()
    inputs = _list_inputs()
    result = export_trace(model, list(model.blocks), inputs, "eval")
    g = result.graph
    assert [n.target for n in g.nodes if n.op == "placeholder"] == ["xs", "cond"]
    assert result.baked == {"double": True}
    xs = next(n for n in g.nodes if n.op == "placeholder")
    assert {u.target for u in xs.users} == {operator.getitem}
    assert [n.target for n in g.nodes if n.op == "call_module"] == [
        "blocks.0", "blocks.1", "blocks.2"]
    first = next(n for n in g.nodes if n.op == "call_module")
    assert set(first.kwargs) == {"context", "scale"} and first.kwargs["scale"] == 0.5
    # lifted constant: the plain tensor attribute
    assert list(result.constants) == ["table"]
    assert result.constants["table"] is model.table
    gm = graph_module(model, result)
    for seed in (0, 1):                 # other tensor values in the list: other outputs
        inputs = _list_inputs(seed=seed)
        got = gm(inputs["xs"], inputs["cond"])
        want = model(**inputs)
        assert _equal(got, want)
    assert not torch.equal(gm(**{k: v for k, v in _list_inputs(seed=0).items() if k != "double"})[0],
                           gm(**{k: v for k, v in _list_inputs(seed=1).items() if k != "double"})[0])


def test_dynamic_batch_on_own_model():
    # the batch is exported symbolic (one symbol for every input's batch); the token count
    # is specialised, since a routed graph's key pins every dim but the batch
    torch.manual_seed(0)
    model = ListModel().eval()
    result = export_trace(model, list(model.blocks), _list_inputs(), "eval")
    assert result.dynamic
    b, n = result.input_dims["xs[0]"][:2]
    assert isinstance(b, str) and n == 6
    assert result.input_dims["xs[1]"][:2] == (b, n)                 # same symbol
    assert result.input_dims["cond['ctx']"][0] == b
    assert b in result.range_constraints
    gm = graph_module(model, result)
    for batch in (3, 2, 5):
        inputs = _list_inputs(b=batch, n=6, seed=batch)
        result.check_inputs(inputs)
        got = gm(inputs["xs"], inputs["cond"])
        want = model(**inputs)
        assert got[0].shape[:2] == (batch, 6)
        assert _equal(got, want)
    with pytest.raises(ValueError, match="specialised to 6"):
        result.check_inputs(_list_inputs(b=3, n=10))
    with pytest.raises(ValueError, match="double"):
        result.check_inputs({**_list_inputs(), "double": False})
    bad = _list_inputs()
    bad["xs"][1] = torch.randn(3, 6, 8)
    with pytest.raises(ValueError, match="must equal"):
        result.check_inputs(bad)


class NoDynamic(nn.Module):
    """The batch size used as a dict key: a symbolic size is unhashable, so only a static
    export works."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))

    def forward(self, x):
        table = {x.shape[0]: 2.0}
        for blk in self.blocks:
            x, _ = blk(x)
        return x * table[x.shape[0]]


def test_static_fallback():
    torch.manual_seed(0)
    model = NoDynamic().eval()
    x = torch.randn(2, 5, 8)
    result = export_trace(model, list(model.blocks), {"x": x}, "eval")
    assert not result.dynamic and "unhashable" in result.dynamic_error
    assert not [k for k in vars(x) if "dynamo" in k]    # export's dim marks are taken off
    assert result.input_dims == {"x": (2, 5, 8)}
    assert torch.equal(graph_module(model, result)(x), model(x))
    with pytest.raises(ValueError, match="specialised"):
        result.check_inputs({"x": torch.randn(3, 5, 8)})


class Shared(nn.Module):
    """A block called twice, a dropout and a training-dependent branch."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.drop = nn.Dropout(0.5)

    def forward(self, x):
        for blk in (self.blocks[0], self.blocks[1], self.blocks[0]):
            x, _ = blk(x)
        if self.training:
            x = self.drop(x) + 1
        return x


def test_repeated_calls_train_branch_and_interpreter():
    torch.manual_seed(0)
    model = Shared()
    x = torch.randn(2, 5, 8)
    for mode in ("train", "eval"):
        result = export_trace(model, list(model.blocks), {"x": x}, mode)
        assert [n.target for n in result.graph.nodes if n.op == "call_module"] == [
            "blocks.0", "blocks.1", "blocks.0"]
        has_dropout = any("dropout" in str(n.target) for n in result.graph.nodes)
        assert has_dropout == (mode == "train")
        model.train(mode == "train")
        torch.manual_seed(3)
        got = fx.Interpreter(graph_module(model, result), graph=result.graph).run(x)
        torch.manual_seed(3)
        want = model(x)
        assert torch.equal(got, want)
    model.train()
    assert model.training


class _Rope:
    """A plain helper object with a lazily filled table (as ZImage's RopeEmbedder)."""

    def __init__(self, dim):
        self.dim, self.table = dim, None

    def __call__(self, n):
        if self.table is None:
            self.table = torch.linspace(0, 1, 64 * self.dim).reshape(64, self.dim)
        return self.table[:n]


class Cached(nn.Module):
    def __init__(self):
        super().__init__()
        self.rope = _Rope(8)
        self.blocks = nn.ModuleList(Block() for _ in range(2))
        self.cache = {}

    def forward(self, x):
        x = x + self.rope(x.shape[1])
        self.cache["last"] = x
        for blk in self.blocks:
            x, _ = blk(x)
        return x


@pytest.mark.filterwarnings("ignore:The tensor attribute")
def test_export_leaves_no_fake_tensors_in_python_caches():
    torch.manual_seed(0)
    model = Cached().eval()
    x = torch.randn(2, 5, 8)
    result = export_trace(model, list(model.blocks), {"x": x}, "eval")
    assert model.rope.table is None and model.cache == {}     # export's fake values undone
    assert torch.equal(graph_module(model, result)(x), model(x))
    assert type(model.rope.table) is torch.Tensor
