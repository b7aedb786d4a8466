"""tread_fx.explain and ``tread-fx inspect``: token counts, FLOPs, graph diff, drawings, CLI."""

import argparse
import re
import struct
import sys
import textwrap

import pytest
import torch
from torch.utils.flop_counter import FlopCounterMode

import tread_fx
from tread_fx.explain import strip_routes
from tread_fx.tools import inspect as inspect_tool
from tread_fx.tools.errors import UsageError
from tread_fx.tools.zoo import build
from conftest import block_token_counts, dit_inputs, tiny_dit

SPEC = "1:2@0.5,4:5@0.25"


@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """Tiny models: one thread is much faster than two on a shared, loaded CPU."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def routed_dit():
    model = tiny_dit(depth=6)
    example = dit_inputs(batch=2)
    routed = tread_fx.route(model, SPEC, example_inputs=example)
    return model, example, routed, tread_fx.explain(routed)


def _parse(argv):
    parser = argparse.ArgumentParser(prog="tread-fx inspect")
    inspect_tool.add_arguments(parser)
    return parser.parse_args(argv)


def _fwd_bwd_flops(forward) -> int:
    with FlopCounterMode(display=False) as counter:
        out = forward()
        out.backward(torch.ones_like(out))
    return counter.get_total_flops()


def _block_call(model, routed_or_model, block, example):
    """The arguments ``block`` receives in a train forward of ``routed_or_model``."""
    seen = []
    handle = block.register_forward_pre_hook(lambda m, args: seen.append(args))
    try:
        with torch.no_grad():
            routed_or_model.train()(*example)
    finally:
        handle.remove()
    return tuple(a.detach().requires_grad_() for a in seen[0])


def test_token_counts_are_what_the_blocks_receive(routed_dit):
    model, (x, t, y), routed, report = routed_dit
    seen = block_token_counts(model, model.blocks, lambda: routed.train()(x, t, y))
    assert seen == [16, 8, 8, 16, 12, 12]
    assert [b.tokens for b in report.blocks] == seen
    assert [b.dense_tokens for b in report.blocks] == [16] * 6
    assert [b.route for b in report.blocks] == [None, 0, 0, None, 1, 1]
    assert [b.path for b in report.blocks] == [f"blocks.{i}" for i in range(6)]
    assert [(r.tokens, r.kept, r.fixed) for r in report.routes] == [(16, 8, (0, 0)),
                                                                    (16, 12, (0, 0))]
    assert report.batch == 2
    rows = {line.split()[1]: line.split() for line in str(report).splitlines()
            if line.split()[1:2] and line.split()[1].startswith("blocks.")}
    assert [rows[f"blocks.{i}"][3] for i in range(6)] == ["16", "8/16", "8/16", "16", "12/16",
                                                          "12/16"]


def test_flops_of_a_block_dense_and_routed(routed_dit):
    model, example, routed, report = routed_dit
    try:
        # dense: the block alone, forward and backward, on what it receives in the model
        call = _block_call(model, model, model.blocks[1], example)
        dense = _fwd_bwd_flops(lambda: model.blocks[1](*call))
        assert [b.dense_flops for b in report.blocks] == [dense] * 6
        # the same block costs that much inside the model: one block more, that much more
        deeper = tiny_dit(depth=7)
        assert (_fwd_bwd_flops(lambda: deeper.train()(*example))
                - _fwd_bwd_flops(lambda: model.train()(*example))) == dense
        assert report.dense_flops == _fwd_bwd_flops(lambda: model.train()(*example))
        # routed: fewer FLOPs by about the kept fraction; equal to the block run on the
        # kept tokens it receives in a routed forward
        for index, kept in ((1, 8 / 16), (4, 12 / 16)):
            row = report.blocks[index]
            assert row.routed_flops < row.dense_flops
            assert abs(row.routed_flops / row.dense_flops - kept) < 0.05
            block = model.blocks[index]
            kept_call = _block_call(model, routed, block, example)
            assert kept_call[0].shape[1] == row.tokens
            assert row.routed_flops == _fwd_bwd_flops(lambda: block(*kept_call))
        assert [b.routed_flops for b in report.blocks][::3] == [dense, dense]
        torch.manual_seed(0)
        assert report.routed_flops == _fwd_bwd_flops(lambda: routed.train()(*example))
        assert report.routed_flops < report.dense_flops
        assert report.saving == pytest.approx(1 - report.routed_flops / report.dense_flops)
    finally:
        model.zero_grad(set_to_none=True)


def test_explain_leaves_the_model_as_it_was():
    model = tiny_dit(depth=4)
    example = dit_inputs()
    routed = tread_fx.route(model, "1:2@0.5", example_inputs=example, seed=3)
    routed.train()
    routed(*example).square().mean().backward()
    routed.eval()
    grads = {n: p.grad for n, p in routed.named_parameters()}
    assert sum(g is not None for g in grads.values()) > 10
    selector = routed.selectors[0]
    indices, generator = selector.last_indices, selector._generators[torch.device("cpu")]
    draws, rng = generator.get_state(), torch.get_rng_state()
    with torch.no_grad():
        report = tread_fx.explain(routed)
    assert report.routes[0].kept == 8 and report.backward
    assert repr(report) == str(report) and str(report).startswith("RoutedDiT (DiT): 4 blocks")
    assert not any(m.training for m in routed.modules())
    assert selector.last_indices is indices and selector.force_active is None
    assert torch.equal(generator.get_state(), draws)
    assert torch.equal(torch.get_rng_state(), rng)
    assert all(p.grad is grads[n] for n, p in routed.named_parameters())
    assert all(g is None or g.abs().sum() > 0 for g in grads.values())


def test_explain_needs_an_example_and_a_routed_module():
    model = tiny_dit(depth=4)
    routed = tread_fx.route(model, "1:2@0.5")
    with pytest.raises(ValueError, match=r"explain\(routed, example_inputs="):
        tread_fx.explain(routed)
    assert [b.tokens for b in tread_fx.explain(routed, dit_inputs()).blocks] == [16, 8, 8, 16]
    with pytest.raises(TypeError, match=r"explain\(\) takes a module returned by"):
        tread_fx.explain(model, dit_inputs())


def test_graph_diff_shows_the_inserted_nodes(routed_dit):
    _, _, routed, report = routed_dit
    diff = report.graph_diff().splitlines()
    assert diff[:2] == ["--- dense train graph", "+++ routed train graph"]
    added = [line[1:].strip() for line in diff[2:] if line.startswith("+")]
    removed = [line[1:].strip() for line in diff[2:] if line.startswith("-")]
    for name in ("tread_select_0", "tread_gather_0", "tread_scatter_0",
                 "tread_select_1", "tread_gather_1", "tread_scatter_1"):
        assert sum(line.startswith(f"{name} = ") for line in added) == 1, name
    assert not any("tread_" in line for line in removed)
    assert any(line.startswith('blocks_1 = getattr(self.blocks, "1")(tread_gather_0')
               for line in added)
    # the dense side is the model's own graph: what unroute() traces anew
    assert strip_routes(routed.graph).python_code("self").src == tread_fx.unroute(routed).code
    assert "tread_gather_0" in report.graph_diff("eval")


def test_routes_show_side_inputs_and_never_routed_rows():
    model, inputs, _ = build("RoPE DiT (models.rope_dit)")
    report = tread_fx.explain(tread_fx.route(model, "1:2@0.5", example_inputs=inputs))
    route = report.routes[0]
    assert len(route.side_inputs) == 4     # a cos and a sin table per routed block
    assert [s.node for s in route.side_inputs] == [n for n in route.nodes
                                                   if n.startswith("tread_side_0_")]
    assert all(s.axes == (0,) for s in route.side_inputs) and route.shared
    text = str(report)
    assert "side inputs gathered:" in text and f"{route.side_inputs[0].node}: " in text

    model, inputs, _ = build("ViT + class token (models.vit)")
    routed = tread_fx.route(model, "1:3@0.5", example_inputs=inputs)
    report = tread_fx.explain(routed)
    assert report.routes[0].fixed == (1, 0)
    seen = block_token_counts(model, model.blocks, lambda: routed.train()(*inputs))
    assert [b.tokens for b in report.blocks] == seen == [17, 9, 9, 9, 17, 17]
    assert "never routed: 1 leading and 0 trailing rows" in str(report)


def test_draw_writes_svg_and_png(routed_dit, tmp_path):
    report = routed_dit[3]
    svg = report.draw(tmp_path / "routes.svg").read_text()
    assert svg.lstrip().startswith("<?xml") and "<svg" in svg and svg.rstrip().endswith("</svg>")
    assert len(svg) > 5000
    png = (tmp_path / "routes.png")
    assert report.draw(png) == png
    data = png.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n" and data[12:16] == b"IHDR"
    width, height = struct.unpack(">II", data[16:24])
    assert width >= 600 and height >= 400 and len(data) > 10_000
    with pytest.raises(ValueError, match=r"\.svg, \.png, \.pdf"):
        report.draw(tmp_path / "routes.gif")


def test_cli_inspects_a_diffusers_zoo_model(capsys, tmp_path):
    png = tmp_path / "pixart.png"
    argv = ["PixArtTransformer2DModel", "--routes", "1:2@0.5", "--front-end", "concrete",
            "--graph", "--draw", str(png)]
    assert inspect_tool.main(_parse(argv)) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()
            if re.match(r"\s+\d+\s+transformer_blocks\.\d+\s", line)]
    assert [(r[1], r[2], r[3]) for r in rows] == [
        ("transformer_blocks.0", "-", "16"), ("transformer_blocks.1", "0", "8/16"),
        ("transformer_blocks.2", "0", "8/16"), ("transformer_blocks.3", "-", "16")]
    assert float(rows[1][5]) < float(rows[1][4]) and rows[0][4] == rows[0][5]
    assert "RoutedPixArtTransformer2DModel (diffusers PixArtTransformer2DModel)" in out
    assert "+    tread_gather_0 = tread_fx_runtime_gather_tokens(" in out
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_cli_keeps_the_older_flags(capsys, tmp_path):
    dot = tmp_path / "g.dot"
    argv = ["--model", "DiT-S/8", "--input-size", "16", "--batch", "2", "--routes", "1:8@0.5",
            "--code", "--dot", str(dot)]
    assert inspect_tool.main(_parse(argv)) == 0
    out = capsys.readouterr().out
    assert "RoutedDiT (DiT-S/8): 12 blocks blocks.0..blocks.11, routes 1:8@0.5, batch 2" in out
    assert "route 0  1:8@0.5  blocks.1..blocks.8  ratio 0.5: keeps 2 of 4 tokens" in out
    assert "tread_gather_0 = tread_fx_runtime_gather_tokens" in out
    assert dot.read_text().startswith("digraph")


def test_cli_takes_a_factory(capsys, tmp_path, monkeypatch):
    name = "tread_inspect_factory_example"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent("""
        import torch
        from tread_fx.models.vit import ViT

        def make():
            torch.manual_seed(0)
            model = ViT(input_size=8, patch_size=2, in_channels=4, hidden_size=32, depth=4,
                        num_heads=2, num_classes=10)
            return model, (torch.randn(2, 4, 8, 8), torch.rand(2), torch.randint(0, 10, (2,)))

        def bare():
            return make()[0]
    """))
    monkeypatch.syspath_prepend(str(tmp_path))
    monkeypatch.delitem(sys.modules, name, raising=False)
    assert inspect_tool.main(_parse([f"{name}:make"])) == 0
    out = capsys.readouterr().out
    assert f"RoutedViT ({name}:make): 4 blocks blocks.0..blocks.3, routes 1:2@0.5" in out
    with pytest.raises(UsageError, match="without example inputs"):
        inspect_tool.main(_parse([f"{name}:bare"]))


@pytest.mark.parametrize("argv, message", [
    (["NoSuchNet"], "MODEL 'NoSuchNet': unknown; give a reference model (DiT-S/2"),
    (["no_such_package_xyz.models:make"], "cannot import 'no_such_package_xyz.models'"),
    (["tread_fx.tools.zoo:no_such_factory"], "has no attribute 'no_such_factory'"),
    (["tread_fx.tools.zoo"], "MODEL 'tread_fx.tools.zoo': unknown"),
    (["DiT", "--routes", "2:x"], "--routes '2:x': route 0 ('2:x'): expected"),
    (["DiT", "--routes", "2:40@0.5"], "--routes '2:40@0.5': route 0 (2:40@0.5): end=40"),
    (["DiT", "--draw", "routes.gif"], "--draw routes.gif: the file must end in .svg"),
    (["U-ViT", "--input-size", "16"], "--input-size and --batch set the example"),
    (["DiT-S/2", "--input-size", "31"], "--input-size 31: DiT-S/2 needs a multiple of"),
    (["DiT", "--model", "U-ViT"], "MODEL 'DiT' and --model 'U-ViT' differ"),
])
def test_cli_bad_input_is_a_usage_error(argv, message):
    with pytest.raises(UsageError) as err:
        inspect_tool.main(_parse(argv))
    assert str(err.value).startswith(message) or message in str(err.value), str(err.value)
    assert "\n" not in str(err.value)
