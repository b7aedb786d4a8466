"""``tread-fx train`` end to end on tiny models and tiny generated data."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from tread_fx.models import DiT
from tread_fx.tools.cli import main
from tread_fx.tools.data import DataError, load_data
from tread_fx.tools.train import image_grid, label_rows, sample_images, write_png

TINY = ["--depth", "4", "--hidden", "32", "--heads", "2", "--patch", "2", "--batch", "8",
        "--sample-steps", "2", "--samples-per-class", "3", "--no-progress"]


def _digits_npz(path: Path, n: int = 48, classes: int = 4, size: int = 8) -> Path:
    """Tiny class-dependent images: a bright square whose position depends on the label."""
    rng = np.random.default_rng(0)
    x = (rng.random((n, size, size)) * 40).astype(np.uint8)
    y = np.arange(n) % classes
    for i in range(n):
        r, c = divmod(int(y[i]), 2)
        x[i, r * 4:r * 4 + 4, c * 4:c * 4 + 4] = 220
    np.savez(path, images=x, labels=y)
    return path


@pytest.fixture()
def data(tmp_path):
    return _digits_npz(tmp_path / "digits.npz")


def _png_size(path: Path) -> tuple[int, int]:
    raw = path.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n", f"{path} is not a PNG"
    assert raw[12:16] == b"IHDR"
    return struct.unpack(">II", raw[16:24])


def _records(out: Path, kind: str = "train") -> list[dict]:
    path = out / "metrics.jsonl"
    records = []
    for line in path.read_text().splitlines() if path.exists() else []:
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:  # a line being written right now
            continue
    return [r for r in records if r["kind"] == kind]


def _train(out: Path, data: Path, *extra: str) -> int:
    return main(["train", "--data", str(data), "--out", str(out), *TINY, *extra])


def test_cli_run_writes_metrics_checkpoint_samples_and_plot(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert _train(out, data, "--steps", "6", "--log-every", "2", "--ckpt-every", "3",
                  "--eval-every", "3") == 0
    assert "wrote" in capsys.readouterr().out

    train = _records(out)
    assert [r["step"] for r in train] == [2, 4, 6]
    for r in train:
        assert {"step", "loss", "steps_per_s", "wall_s", "train_s", "lr"} <= r.keys()
        assert np.isfinite(r["loss"]) and r["steps_per_s"] > 0
        assert r["lr"] == pytest.approx(2e-3 * r["step"] / 100)  # linear warm-up
    evals = _records(out, "eval")
    assert [r["step"] for r in evals] == [3, 6]
    assert set(evals[0]["heldout_per_t"]) == {"0.1", "0.3", "0.5", "0.7", "0.9"}

    state = torch.load(out / "checkpoint.pt", weights_only=False)
    assert state["step"] == 6
    ref = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2,
              num_classes=4, learn_sigma=False)
    assert list(state["model"]) == list(ref.state_dict())  # the original model's keys
    assert {"optimizer", "ema", "rng", "config", "data"} <= state.keys()
    assert state["config"]["routes"] == "auto"
    assert not list(out.glob(".*.tmp")), "no temporary files left behind"

    # 4 classes x 3 samples of 8x8 images, 2 px padding, upscaled 2x, behind a label strip
    grid_w, grid_h = (3 * 10 + 2) * 2, (4 * 10 + 2) * 2
    w, h = _png_size(out / "samples.png")
    assert h == grid_h and grid_w + 8 < w < grid_w + 60
    with Image.open(out / "samples.png") as im:
        samples = np.asarray(im)
    strip = samples[:, :w - grid_w]
    for row in range(4):  # each row's band of the strip holds its class label
        assert (strip[(2 + 10 * row) * 2:(10 + 10 * row) * 2] < 128).any(), row
    w, h = _png_size(out / "loss.png")
    assert w >= 300 and h >= 200


def _params(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)


def _assert_same_run(a: dict, b: dict) -> None:
    assert a["step"] == b["step"]
    assert a["model"].keys() == b["model"].keys()
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    for k in a["ema"]["shadow"]:
        assert torch.equal(a["ema"]["shadow"][k], b["ema"]["shadow"][k]), k
    sa, sb = a["optimizer"]["state"], b["optimizer"]["state"]
    assert sa.keys() == sb.keys()
    for i in sa:
        for k in sa[i]:
            assert torch.equal(sa[i][k], sb[i][k]), (i, k)


@pytest.mark.parametrize("extra", [["--loss", "adapted", "--aux-weight", "0.1"],
                                   ["--routes", "none"]], ids=["routed-adapted", "dense"])
def test_resume_gives_the_parameters_of_an_uninterrupted_run(tmp_path, data, extra):
    common = ["--log-every", "1", "--ckpt-every", "2", "--eval-every", "0", *extra]
    assert _train(tmp_path / "full", data, "--steps", "9", *common) == 0
    assert _train(tmp_path / "split", data, "--steps", "4", *common) == 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--steps", "9",
                 "--no-progress", "--sample-steps", "2"]) == 0
    _assert_same_run(_params(tmp_path / "full"), _params(tmp_path / "split"))
    assert [r["step"] for r in _records(tmp_path / "split")] == list(range(1, 10))


def test_killed_run_resumes_bit_identically(tmp_path, data):
    """SIGKILL a real run mid-way; the resumed run matches an uninterrupted one."""
    out = tmp_path / "killed"
    args = ["--data", str(data), *TINY, "--log-every", "1", "--ckpt-every", "3",
            "--eval-every", "0", "--loss", "adapted"]
    cmd = [sys.executable, "-m", "tread_fx.tools.cli", "train", "--out", str(out), *args]
    proc = subprocess.Popen(cmd + ["--steps", "100000"], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE)
    try:
        deadline = time.time() + 90
        while time.time() < deadline and proc.poll() is None:
            if (out / "checkpoint.pt").exists() and len(_records(out)) >= 8:
                break
            time.sleep(0.05)
        assert proc.poll() is None, proc.stderr.read().decode()[-2000:]
        os.kill(proc.pid, signal.SIGKILL)
        proc.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    saved = _params(out)["step"]
    assert saved >= 3 and saved % 3 == 0
    logged = max(r["step"] for r in _records(out))
    target = saved + 4
    assert main(["train", "--out", str(out), "--resume", "--steps", str(target),
                 "--no-progress", "--sample-steps", "2"]) == 0
    assert main(["train", "--out", str(tmp_path / "straight"), *args,
                 "--steps", str(target)]) == 0
    _assert_same_run(_params(tmp_path / "straight"), _params(out))
    # metrics logged after the checkpoint by the killed run were dropped and logged again
    assert logged >= saved
    assert [r["step"] for r in _records(out)] == list(range(1, target + 1))


def test_routes_none_trains_the_dense_model(tmp_path, data, capsys):
    # the dense run samples with sparse guidance (routing at inference, the default placement)
    assert _train(tmp_path / "dense", data, "--steps", "4", "--routes", "none",
                  "--guidance", "sparse-cfg") == 0
    err = capsys.readouterr().err
    assert "routes none (dense)" in err
    # the slow phases say what they do; --no-progress leaves out the bars only
    assert "step 4: evaluating the held-out loss (4 images x 5 noise levels" in err
    assert "sampling 12 images (4 rows x 3; 2 Euler steps, guidance sparse-cfg" in err
    assert "%|" not in err
    with_bars = [a for a in TINY if a != "--no-progress"]
    assert main(["train", "--data", str(data), "--out", str(tmp_path / "routed"), *with_bars,
                 "--steps", "4", "--routes", "1:2@0.5"]) == 0
    err = capsys.readouterr().err
    assert "routes 1:2@0.5" in err
    assert "training: 100%" in err and "sampling: 100%" in err and "2/2" in err
    dense, routed = _params(tmp_path / "dense"), _params(tmp_path / "routed")
    assert dense["config"]["routes"] == "none"
    # same seed, same data and draws: only the routing makes the parameters differ
    assert any(not torch.equal(dense["model"][k], routed["model"][k]) for k in dense["model"])


def test_existing_run_needs_resume_or_overwrite_and_resume_keeps_settings(tmp_path, data, capsys):
    out = tmp_path / "run"
    assert _train(out, data, "--steps", "2") == 0
    assert _train(out, data, "--steps", "2") == 2
    assert "--resume" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--lr", "0.01", "--steps", "3",
                 "--no-progress"]) == 2
    err = capsys.readouterr().err
    assert "--lr 0.01" in err and "checkpoint" in err
    assert _train(out, data, "--steps", "2", "--overwrite", "--seed", "1") == 0


@pytest.mark.parametrize("make, expected", [
    (lambda d: d / "missing.npz", "no such file or folder"),
    (lambda d: (np.save(d / "flat.npy", np.zeros(10)), d / "flat.npy")[1], "expected images"),
    (lambda d: ((d / "notes.txt").write_text("hi"), d / "notes.txt")[1], "unsupported data file"),
    (lambda d: ((d / "empty").mkdir(), d / "empty")[1], "no image files"),
    (lambda d: (np.save(d / "odd.npy", np.zeros((4, 8, 8, 7), np.uint8)), d / "odd.npy")[1],
     "channel axis"),
])
def test_bad_data_gives_a_clear_error(tmp_path, capsys, make, expected):
    path = make(tmp_path)
    assert main(["train", "--data", str(path), "--out", str(tmp_path / "o"), *TINY,
                 "--steps", "1"]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and expected in err
    assert not (tmp_path / "o" / "checkpoint.pt").exists()


def test_data_formats(tmp_path):
    rng = np.random.default_rng(0)
    nhwc = rng.integers(0, 256, (20, 6, 6, 3), dtype=np.uint8)
    np.save(tmp_path / "nhwc.npy", nhwc)
    d = load_data(tmp_path / "nhwc.npy", patch=4, holdout=2)
    assert d.shape == (3, 8, 8) and d.num_classes == 1 and d.kind == "images"
    assert d.train_x.shape[0] == 18 and d.eval_x.shape[0] == 2
    assert d.train_x.min() >= -1 and d.train_x.max() <= 1
    assert d.train_x[0, :, 0, 0].eq(-1).all()  # padding is black

    nchw = rng.random((10, 1, 8, 8)).astype(np.float32)  # floats in [0, 1]
    np.savez(tmp_path / "f.npz", x=nchw, y=np.array(list("ab") * 5))
    d = load_data(tmp_path / "f.npz", patch=4, holdout=0)
    assert d.shape == (1, 8, 8) and d.num_classes == 2 and d.class_names == ["a", "b"]
    assert d.eval_is_train and torch.allclose(d.train_x, torch.from_numpy(nchw) * 2 - 1)

    lat = rng.standard_normal((10, 4, 4, 4)).astype(np.float32) * 3
    np.savez(tmp_path / "lat.npz", latents=lat, labels=np.arange(10) % 3)
    d = load_data(tmp_path / "lat.npz", patch=2, holdout=1)
    assert d.kind == "latents" and d.shape == (4, 4, 4) and d.num_classes == 3
    together = torch.cat([d.train_x, d.eval_x]).flatten().sort().values
    assert torch.equal(together, torch.from_numpy(lat).flatten().sort().values)  # used as given

    with pytest.raises(DataError, match="labels must be a 1-D array"):
        np.savez(tmp_path / "badlab.npz", images=nhwc, labels=np.zeros(3))
        load_data(tmp_path / "badlab.npz")


def test_image_folder_with_class_subfolders(tmp_path, capsys):
    for cls, value in (("cats", 40), ("dogs", 200)):
        (tmp_path / "imgs" / cls).mkdir(parents=True)
        for i in range(6):
            write_png(tmp_path / "imgs" / cls / f"{i}.png", np.full((12, 10), value + i, np.uint8))
    d = load_data(tmp_path / "imgs", patch=4, image_size=8, holdout=2)
    assert d.shape == (1, 8, 8) and d.num_classes == 2 and d.class_names == ["cats", "dogs"]
    assert _train(tmp_path / "run", tmp_path / "imgs", "--steps", "2", "--image-size", "8",
                  "--holdout", "2") == 0
    assert (tmp_path / "run" / "samples.png").exists()


def test_default_dataset_is_the_bundled_mnist_digits():
    d = load_data(None)
    assert d.shape == (1, 32, 32) and d.num_classes == 10 and d.kind == "images"
    assert d.train_x.shape[0] == 4500 and d.eval_x.shape[0] == 500
    assert float(d.train_x.min()) == -1.0 and float(d.train_x.max()) == 1.0
    assert sorted(torch.unique(d.train_y).tolist()) == list(range(10))
    assert "MNIST" in d.source


@pytest.mark.parametrize("guidance", ["none", "cfg", "sparse", "sparse-cfg"])
def test_samplers_are_deterministic_under_a_seed(guidance):
    import tread_fx

    torch.manual_seed(0)
    model = DiT(input_size=8, patch_size=2, in_channels=1, hidden_size=32, depth=4, num_heads=2,
                num_classes=3, learn_sigma=False)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    routed = tread_fx.route(model, "1:2@0.5")
    labels = torch.tensor([0, 1, 2, 0])

    def draw(seed):
        torch.manual_seed(1000 + seed)  # the global RNG state must not matter
        return sample_images(model, labels, (1, 8, 8), steps=3, seed=seed, guidance=guidance,
                             null_class=3, routed=routed)

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a, b)
    assert not torch.equal(a, c)
    assert model.training  # mode restored
    assert image_grid(a, rows=2).shape == ((8 + 2) * 2 * 2 + 4, (8 + 2) * 2 * 2 + 4)


def test_resume_with_a_relative_data_path(tmp_path, data, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert main(["train", "--data", data.name, "--out", "run", *TINY, "--steps", "2"]) == 0
    assert main(["train", "--out", "run", "--resume", "--steps", "3", "--no-progress",
                 "--sample-steps", "2"]) == 0
    assert _params(tmp_path / "run")["step"] == 3


def test_sample_grid_rows_are_labelled_and_written_as_png(tmp_path):
    images = torch.linspace(-1, 1, 6 * 3 * 8 * 8).reshape(6, 3, 8, 8)  # 3 rows x 2, RGB
    grid = image_grid(images, rows=3)
    assert grid.shape == ((8 + 2) * 3 * 2 + 4, (8 + 2) * 2 * 2 + 4, 3)
    labelled = label_rows(grid, ["cats", "dogs", "a-very-long-class-name-indeed"])
    strip = labelled.shape[1] - grid.shape[1]
    assert labelled.shape[0] == grid.shape[0] and 8 < strip < 200
    assert np.array_equal(labelled[:, strip:], grid)  # the samples themselves are unchanged
    row_h = grid.shape[0] // 3
    bands = [labelled[r * row_h:(r + 1) * row_h, :strip] for r in range(3)]
    assert all((band < 128).any() for band in bands)  # black text on white in every row
    assert not np.array_equal(bands[0], bands[1])  # and it is each row's own label
    write_png(tmp_path / "grid.png", labelled)
    with Image.open(tmp_path / "grid.png") as im:
        assert im.format == "PNG" and im.mode == "RGB"
        assert np.array_equal(np.asarray(im), labelled)
    gray = label_rows(image_grid(images[:, :1], rows=3), ["0", "1", "2"])
    assert gray.ndim == 2 and (gray[:, :8] < 128).any()
    with pytest.raises(ValueError, match="expected"):
        write_png(tmp_path / "bad.png", np.zeros((4, 4, 2), np.uint8))


def test_trainer_ema_is_the_warm_up_average_that_swa_utils_does_not_give():
    """The trainer keeps tread_fx.diffusion.EMA: ``shadow <- d shadow + (1 - d) param`` with
    ``d = min(decay, (1 + n) / (10 + n))`` from the initial weights.  torch's AveragedModel
    with get_ema_multi_avg_fn copies the parameters at its first update and uses a fixed
    decay, so it ends elsewhere (and would change the checkpoint format)."""
    from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

    from tread_fx.diffusion import EMA

    torch.manual_seed(0)
    model = torch.nn.Linear(4, 3)
    ema = EMA(model, decay=0.999)
    swa = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.999))
    expected = {n: p.detach().clone().double() for n, p in model.named_parameters()}
    for _ in range(5):
        with torch.no_grad():
            for p in model.parameters():
                p.add_(torch.randn_like(p))
        n = ema.num_updates
        d = min(ema.decay, (1 + n) / (10 + n))
        ema.update(model, decay=d)
        swa.update_parameters(model)
        for name, p in model.named_parameters():
            expected[name] = d * expected[name] + (1 - d) * p.detach().double()
    for name, p in swa.module.named_parameters():
        torch.testing.assert_close(ema.shadow[name].double(), expected[name])
        assert (ema.shadow[name] - p.detach()).abs().max() > 0.1, name


# ---------------------------------------------------------------------------------------
# --device and --dtype
# ---------------------------------------------------------------------------------------


@pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is available here")
@pytest.mark.parametrize("device", ["cuda", "cuda:0", "cuda:1"])
def test_device_cuda_without_cuda_is_one_line_and_exit_2(tmp_path, data, capsys, monkeypatch,
                                                         device):
    from tread_fx.tools import train

    def load_data(*args, **kwargs):
        raise AssertionError("the data were loaded before the bad --device was reported")

    monkeypatch.setattr(train, "load_data", load_data)
    out = tmp_path / "out"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY, "--steps", "1",
                 "--device", device]) == 2
    captured = capsys.readouterr()
    assert captured.err.splitlines() == [
        f"tread-fx train: error: --device {device}: CUDA is not available on this machine; "
        f"use --device cpu"]
    assert "Traceback" not in captured.err + captured.out
    assert not out.exists()


def test_device_and_dtype_flags_parse_and_bad_ones_are_argparse_errors(capsys):
    from tread_fx.tools.cli import build_parser

    parser = build_parser()
    args = parser.parse_args(["train"])
    assert args.device is None and args.dtype is None   # not given: cpu; a resumed run's dtype
    args = parser.parse_args(["train", "--device", "CUDA:1", "--dtype", "bf16"])
    assert args.device == "cuda:1" and args.dtype == "bf16"
    args = parser.parse_args(["convergence", "--device", "auto"])
    assert args.device == "auto" and args.dtype == "fp32"
    for bad in (["--dtype", "f16"], ["--device", "gpu"], ["--device", "cuda:x"]):
        with pytest.raises(SystemExit) as e:
            parser.parse_args(["train", *bad])
        assert e.value.code == 2
        assert f"argument {bad[0]}:" in capsys.readouterr().err


def test_resolve_device_without_cuda(monkeypatch):
    from tread_fx.tools.errors import UsageError
    from tread_fx.tools.train_config import resolve_device

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert resolve_device(None) == torch.device("cpu")
    assert resolve_device("auto") == torch.device("cpu")
    assert resolve_device(None, distributed=True, world=2) == torch.device("cpu")
    with pytest.raises(UsageError, match="CUDA is not available"):
        resolve_device("cuda", "bf16")


def test_bf16_run_on_cpu_writes_its_outputs_and_records_device_and_dtype(tmp_path, data, capsys):
    out = tmp_path / "bf16"
    assert _train(out, data, "--steps", "3", "--log-every", "1", "--eval-every", "0",
                  "--device", "cpu", "--dtype", "bf16", "--threads", "1") == 0
    assert "device cpu, dtype bf16 (autocast)" in capsys.readouterr().err
    for name in ("metrics.jsonl", "checkpoint.pt", "samples.png", "loss.png"):
        assert (out / name).exists(), name
    train = _records(out)
    assert [r["step"] for r in train] == [1, 2, 3]
    assert all(r["device"] == "cpu" and r["dtype"] == "bf16" for r in train)
    assert all(np.isfinite(r["loss"]) for r in train)
    state = _params(out)
    assert state["config"]["dtype"] == "bf16" and state["device"] == "cpu"
    assert all(t.dtype == torch.float32 for t in state["model"].values() if t.is_floating_point())
    # the dtype is a setting of the run: kept on --resume, a different one refused
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--dtype", "fp16",
                 "--no-progress"]) == 2
    assert "--dtype fp16 (checkpoint: bf16)" in capsys.readouterr().err
    assert main(["train", "--out", str(out), "--resume", "--steps", "4", "--no-progress",
                 "--sample-steps", "1", "--threads", "1"]) == 0
    assert _records(out)[-1]["dtype"] == "bf16"


def test_fp16_on_cpu_uses_a_grad_scaler_and_resumes_bit_identically(tmp_path, data):
    common = ["--log-every", "1", "--ckpt-every", "2", "--eval-every", "0", "--dtype", "fp16",
              "--threads", "1"]
    assert _train(tmp_path / "full", data, "--steps", "4", *common) == 0
    assert _train(tmp_path / "split", data, "--steps", "2", *common) == 0
    assert _params(tmp_path / "split")["scaler"]["scale"] > 0
    assert main(["train", "--out", str(tmp_path / "split"), "--resume", "--steps", "4",
                 "--no-progress", "--sample-steps", "2", "--threads", "1"]) == 0
    _assert_same_run(_params(tmp_path / "full"), _params(tmp_path / "split"))
    assert _params(tmp_path / "full")["config"]["dtype"] == "fp16"


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_sharded_checkpoint_replaces_the_last_one_and_a_kill_leaves_a_whole_one(tmp_path):
    """``checkpoint.dcp`` (written here by one process) replaces the previous one by renames;
    --resume finds the last whole checkpoint in every state a kill can leave."""
    import torch.distributed.checkpoint as dcp

    from tread_fx.tools.train_checkpoint import (CHECKPOINT_FORMAT, find_checkpoint,
                                                 load_checkpoint, save_checkpoint,
                                                 save_sharded_checkpoint)

    def save(step: int) -> None:
        save_sharded_checkpoint(tmp_path, step, {"w": torch.full((3,), float(step))},
                                {"format": CHECKPOINT_FORMAT, "step": step}, main=True)

    def step_of(path) -> int:
        return load_checkpoint(path)["step"]

    assert find_checkpoint(tmp_path) is None
    save(2)
    save(4)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.dcp"]
    assert step_of(find_checkpoint(tmp_path)) == 4
    loaded = {"w": torch.zeros(3)}
    dcp.load(loaded, checkpoint_id=tmp_path / "checkpoint.dcp")
    assert loaded["w"].tolist() == [4.0] * 3
    # killed between the two renames: the previous checkpoint is the whole one, and the
    # next save puts its successor in place
    (tmp_path / "checkpoint.dcp").rename(tmp_path / ".checkpoint.dcp.old")
    (tmp_path / ".checkpoint.dcp.6.tmp").mkdir()   # a half-written successor
    assert find_checkpoint(tmp_path).name == ".checkpoint.dcp.old"
    save(6)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.dcp"]
    assert step_of(find_checkpoint(tmp_path)) == 6
    # both kinds (a kill before the other kind was removed): the one written last
    save_checkpoint(tmp_path / "checkpoint.pt", {"format": CHECKPOINT_FORMAT, "step": 7})
    written = (tmp_path / "checkpoint.dcp" / "meta.pt").stat().st_mtime
    os.utime(tmp_path / "checkpoint.pt", (written + 1, written + 1))
    assert find_checkpoint(tmp_path).name == "checkpoint.pt"
    os.utime(tmp_path / "checkpoint.pt", (written - 1, written - 1))
    assert find_checkpoint(tmp_path).name == "checkpoint.dcp"
    save(8)   # and a save removes the other kind
    assert not (tmp_path / "checkpoint.pt").exists() and step_of(find_checkpoint(tmp_path)) == 8
