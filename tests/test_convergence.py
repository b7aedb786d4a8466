"""``tread-fx convergence`` with a tiny budget, and its time-to-reach arithmetic."""

from __future__ import annotations

import json
import struct

import numpy as np
import pytest

from tread_fx.tools.cli import main
from tread_fx.tools.convergence import time_to_reach


def test_time_to_reach_interpolates_between_evaluations():
    curve = [(0.0, 2.0), (10.0, 1.0), (20.0, 0.5), (30.0, 0.4)]
    assert time_to_reach(curve, 0.75) == (15.0, 20.0)
    assert time_to_reach(curve, 0.5) == (20.0, 20.0)
    assert time_to_reach(curve, 3.0) == (0.0, 0.0)
    assert time_to_reach(curve, 0.1) == (None, None)


def test_convergence_tiny_budget_writes_jsonl_png_and_summary(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (40, 8, 8), dtype=np.uint8)
    np.savez(tmp_path / "d.npz", images=x, labels=np.arange(40) % 2)
    out = tmp_path / "conv"
    assert main(["convergence", "--data", str(tmp_path / "d.npz"), "--out", str(out),
                 "--minutes", "0.015", "--eval-every", "0.3", "--chunk", "2",
                 "--depth", "4", "--hidden", "32", "--heads", "2", "--patch", "2",
                 "--batch", "8", "--holdout", "8"]) == 0
    printed = capsys.readouterr().out
    assert "dense :" in printed and "routed:" in printed and "target <= 0.7" in printed

    lines = [json.loads(line) for line in (out / "convergence.jsonl").read_text().splitlines()]
    summary = lines[-1]
    assert summary["kind"] == "summary"
    evals = {name: [r for r in lines[:-1] if r["run"] == name] for name in ("dense", "routed")}
    for name, recs in evals.items():
        assert len(recs) >= 2, name
        assert recs[0]["step"] == 0 and recs[0]["train_s"] == 0
        times = [r["train_s"] for r in recs]
        assert times == sorted(times)
        assert recs[-1]["train_s"] >= 0.015 * 60  # each run trained for its whole budget
        assert set(recs[0]["heldout_per_t"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}
    # same initial weights, same held-out set and noise: identical first evaluation
    assert evals["dense"][0]["heldout_loss"] == evals["routed"][0]["heldout_loss"]
    assert summary["routes"] == "1:2@0.5"
    assert summary["dense_final_heldout"] == evals["dense"][-1]["heldout_loss"]
    assert summary["dense_steps"] > 0 and summary["routed_steps"] > 0
    if summary["time_ratio"] is not None:
        assert summary["meets_target"] == (summary["time_ratio"] <= 0.7)
        assert f"{summary['time_ratio']:.2f} of the dense" in printed
    else:
        assert "did not reach" in printed

    raw = (out / "convergence.png").read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n"
    w, h = struct.unpack(">II", raw[16:24])
    assert w >= 300 and h >= 200


def test_convergence_refuses_routes_none(tmp_path, capsys):
    assert main(["convergence", "--routes", "none", "--out", str(tmp_path), "--minutes", "0.01",
                 "--depth", "4", "--hidden", "32", "--heads", "2"]) == 2
    assert "--routes must not be none" in capsys.readouterr().err


@pytest.mark.parametrize("spec", ["2:8@0.5", "1:2@0.5"])
def test_convergence_parser_accepts_fractional_minutes(spec):
    from tread_fx.tools.cli import build_parser

    args = build_parser().parse_args(["convergence", "--minutes", "0.25", "--routes", spec])
    assert args.minutes == 0.25 and args.routes == spec and args.depth == 12


def test_convergence_takes_device_and_dtype_and_records_them(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(tmp_path / "d.npz", images=rng.integers(0, 256, (24, 8, 8), dtype=np.uint8))
    out = tmp_path / "conv"
    assert main(["convergence", "--data", str(tmp_path / "d.npz"), "--out", str(out),
                 "--minutes", "0.004", "--eval-every", "1", "--chunk", "2", "--depth", "4",
                 "--hidden", "32", "--heads", "2", "--patch", "2", "--batch", "4",
                 "--holdout", "4", "--threads", "1", "--device", "cpu", "--dtype", "bf16"]) == 0
    captured = capsys.readouterr()
    assert "device cpu, dtype bf16" in captured.out
    assert "device cpu, dtype bf16 (autocast)" in captured.err
    summary = json.loads((out / "convergence.jsonl").read_text().splitlines()[-1])
    assert summary["device"] == "cpu" and summary["dtype"] == "bf16"
    assert summary["dense_steps"] > 0 and summary["routed_steps"] > 0
    assert (out / "convergence.png").exists()


@pytest.mark.skipif(__import__("torch").cuda.is_available(), reason="CUDA is available here")
def test_convergence_device_cuda_without_cuda_is_one_line(tmp_path, capsys):
    assert main(["convergence", "--out", str(tmp_path / "c"), "--device", "cuda",
                 "--depth", "4", "--hidden", "32", "--heads", "2"]) == 2
    assert capsys.readouterr().err.splitlines() == [
        "tread-fx convergence: error: --device cuda: CUDA is not available on this machine; "
        "use --device cpu"]
    assert not (tmp_path / "c").exists()
