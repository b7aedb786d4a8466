"""The inspection tools and the CLI, end to end on small models."""

import json

import pytest

import tread_fx
from tread_fx.tools.cli import main
from tread_fx.tools.inspect import route_nodes, summary, to_dot
from conftest import dit_inputs, tiny_dit


def test_summary_and_dot_show_the_inserted_nodes():
    routed = tread_fx.route(tiny_dit(depth=6), "1:2@0.5,4:5@0.25", example_inputs=dit_inputs())
    text = summary(routed)
    assert "6 blocks (blocks.0..blocks.5)" in text
    assert "1..2 (blocks.1..blocks.2)" in text and "tread_scatter_1" in text
    rows = [line.split() for line in text.splitlines()[2:]]
    assert [(r[0], r[3], r[4], r[5]) for r in rows] == [("0", "0.5", "16", "8"),
                                                        ("1", "0.25", "16", "12")]
    assert [n.name for n in route_nodes(routed.graph)] == [
        "tread_select_0", "tread_gather_0", "tread_scatter_0",
        "tread_select_1", "tread_gather_1", "tread_scatter_1"]
    dot = to_dot(routed.graph)
    assert dot.startswith('digraph "routed"') and dot.count('fillcolor="orange"') == 6
    assert '"blocks_2" -> "tread_scatter_0";' in dot


def test_cli_bench_profile_splits_the_time_by_kind(capsys):
    from tread_fx.tools.bench_profile import KINDS, OTHER, busy_speedup, kind_of, report

    assert main(["bench", "--model", "DiT-S/8", "--input-size", "32", "--batch", "2",
                 "--steps", "1", "--warmup", "0", "--routes", "1:8@0.5", "--profile",
                 "--json"]) == 0
    profile = json.loads(capsys.readouterr().out)["profile"]
    kinds = [k for k, _ in KINDS] + [OTHER]
    for name in ("dense", "routed", "hand-written"):
        t = profile["seconds"][name]
        assert abs(sum(t[k] for k in kinds) - t["operators"]) < 1e-9
        assert t["matmul"] > 0 and t["wall"] >= t["operators"] > 0
    # the routed models gather and scatter; the dense one only draws its label dropout
    assert profile["seconds"]["routed"]["routing"] > profile["seconds"]["dense"]["routing"]
    flops = profile["flops"]
    assert 0.3 < flops["routed"]["matmul"] / flops["dense"]["matmul"] < 0.95
    # the operators' own speed-up against the FLOP prediction, and how busy each model kept
    # the device, printed under the table
    text = report(profile["seconds"], flops)
    speedup, ratio = busy_speedup(profile["seconds"], {n: sum(k.values())
                                                        for n, k in flops.items()})
    assert ratio < 0.95 and f"dense / routed {speedup:.2f}x = {speedup * ratio:.2f} of " \
        "predicted" in text and "busy (operators / wall): dense " in text
    assert flops["routed"]["matmul"] == flops["hand-written"]["matmul"]
    # attention is counted on CPU too, and shrinks with the square of the kept tokens
    assert flops["routed"]["attention"] / flops["dense"]["attention"] < \
        flops["routed"]["matmul"] / flops["dense"]["matmul"]
    assert [kind_of(n) for n in ("aten::addmm", "aten::gather", "aten::native_layer_norm",
                                 "aten::_scaled_dot_product_flash_attention_for_cpu",
                                 "aten::gelu")] == ["matmul", "routing", "norm", "attention",
                                                    OTHER]


def test_cli_inspect(capsys, tmp_path):
    assert main(["inspect", "--model", "DiT-S/8", "--input-size", "32", "--code",
                 "--dot", str(tmp_path / "g.dot")]) == 0
    out = capsys.readouterr().out
    assert "tread_gather_0 = tread_fx_runtime_gather_tokens" in out
    assert (tmp_path / "g.dot").read_text().startswith("digraph")


def test_cli_bench_reports_ratios(capsys):
    assert main(["bench", "--model", "DiT-S/8", "--input-size", "32", "--batch", "2",
                 "--steps", "2", "--warmup", "0", "--routes", "1:8@0.5", "--json"]) == 0
    result = json.loads(capsys.readouterr().out)
    assert result["tokens"] == 16
    assert 0.3 < result["flop_ratio"] < 0.95
    assert abs(result["predicted_speedup"] * result["flop_ratio"] - 1) < 1e-9
    assert result["dense_step_s"] > 0 and result["routed_step_s"] > 0
    assert 0 < result["routed_fwd_bwd_s"] <= result["routed_step_s"]
    # the hand-written routed forward routes the same span: the same FLOPs
    assert result["hand_gflop"] == result["routed_gflop"] and result["hand_fwd_bwd_s"] > 0
    # activations saved for backward shrink with the kept tokens
    assert result["routed_saved_mb"] < 0.95 * result["dense_saved_mb"]


@pytest.mark.parametrize("inside", [False, True])
def test_cli_bench_counts_flops_after_a_routed_models_first_autocast_call(capsys, inside):
    # the exported SD3 routed on fp32 examples traces a graph for the bf16 autocast key on
    # its first call, whose (symbolic) ops the FLOP counter must not count as the step's;
    # routed inside the autocast, route() traced that graph already
    assert main(["bench", "--model", "diffusers-SD3-S/2", "--input-size", "8", "--batch", "1",
                 "--steps", "1", "--warmup", "0", "--dtype", "bf16", "--json", "--no-progress"]
                + (["--route-in-autocast"] if inside else [])) == 0
    result = json.loads(capsys.readouterr().out)
    assert 0.5 < result["flop_ratio"] < 0.95
    assert result["retraces"] == (0 if inside else 1)
