"""Bad input to the ``tread-fx`` commands: one ``tread-fx <command>: error: ...`` line on
stderr, exit status 2, no traceback, and nothing loaded, built or written first."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import torch

from tread_fx.tools import convergence, train
from tread_fx.tools.cli import main
from tread_fx.tools.errors import UsageError
from tread_fx.tools.train_checkpoint import output_folder

TINY = ["--depth", "4", "--hidden", "32", "--heads", "2", "--patch", "2", "--batch", "8"]
BAD_ROUTES = {"2:99@0.5": "end=99 is outside", "8:2@0.5": "start=8 is outside",
              "2:4@1.5": "selection_ratio=1.5 is outside [0, 1)",
              "garbage": "expected 'start:end@selection_ratio'"}


@pytest.fixture()
def no_data_loading(monkeypatch):
    """Fail the test if a command gets as far as loading its data."""

    def load_data(*args, **kwargs):
        raise AssertionError("the data were loaded before the bad flag was reported")

    monkeypatch.setattr(train, "load_data", load_data)
    monkeypatch.setattr(convergence, "load_data", load_data)


def _error(capsys, argv: list[str], command: str, status_lines: int = 0) -> str:
    """Run ``tread-fx argv``; the one error line it prints (after checking the form: only
    ``status_lines`` lines of progress before it)."""
    assert main(argv) == 2
    captured = capsys.readouterr()
    lines = captured.err.splitlines()
    assert len(lines) == 1 + status_lines, captured.err
    assert lines[-1].startswith(f"tread-fx {command}: error: "), lines[-1]
    assert not any("error" in line for line in lines[:-1]), captured.err
    assert "Traceback" not in captured.err + captured.out
    return lines[-1]


@pytest.mark.parametrize("command", ["train", "convergence"])
@pytest.mark.parametrize("spec", list(BAD_ROUTES))
def test_bad_routes_fail_before_loading_data(tmp_path, capsys, no_data_loading, command, spec):
    out = tmp_path / "out"
    line = _error(capsys, [command, "--routes", spec, "--out", str(out), *TINY], command)
    assert f"--routes {spec}" in line and BAD_ROUTES[spec] in line
    assert "blocks 0..3" in line  # what --depth 4 allows
    assert not out.exists()


@pytest.mark.parametrize("spec", list(BAD_ROUTES))
def test_bench_bad_routes(capsys, spec):
    line = _error(capsys, ["bench", "--model", "DiT-S/8", "--routes", spec], "bench")
    expected = dict(BAD_ROUTES, **{"8:2@0.5": "start=8 comes after end=2"})[spec]
    assert f"--routes {spec}" in line and expected in line
    assert "blocks 0..11 and 16 tokens" in line


def test_a_ratio_that_routes_no_token_is_refused_before_building_the_model(tmp_path, capsys,
                                                                          monkeypatch):
    import numpy as np

    np.savez(tmp_path / "d.npz", images=np.zeros((20, 8, 8), np.uint8))

    def trainer(*args, **kwargs):
        raise AssertionError("the model was built before the bad --routes was reported")

    monkeypatch.setattr(train, "Trainer", trainer)
    line = _error(capsys, ["train", "--data", str(tmp_path / "d.npz"), "--routes", "1:2@0.05",
                           "--out", str(tmp_path / "out"), *TINY, "--no-progress"], "train",
                  status_lines=1)  # "loading the data ...": the token count needs the data
    assert "routes no token of 16" in line and "--patch 2" in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command, argv, expected", [
    ("train", ["--steps", "-5"], "--steps must be >= 0"),
    ("train", ["--sample-steps", "0"], "--sample-steps must be >= 1"),
    ("train", ["--hidden", "30"], "--hidden 30 must be divisible"),
    ("train", ["--depth", "2"], "--routes auto needs at least 3 blocks"),
    ("train", ["--routes", "none", "--guidance", "sparse", "--depth", "2"],
     "--guidance sparse routes at inference"),
    ("train", ["--eval-every", "-1"], "--eval-every must be >= 0"),
    ("convergence", ["--routes", "none"], "--routes must not be none"),
    ("convergence", ["--chunk", "0"], "--chunk must be >= 1"),
    ("convergence", ["--eval-every", "0"], "--eval-every must be > 0"),
    ("bench", ["--steps", "0"], "--steps must be >= 1"),
    ("bench", ["--model", "DiT-S/8", "--input-size", "30"], "not divisible by patch size 8"),
    ("bench", ["--device", "nowhere"], "--device nowhere: not a device"),
    ("bench", ["--compile-mode", "reduce-overhead"], "needs --compile full or --compile blocks"),
    pytest.param("bench", ["--device", "cuda"], "CUDA is not available",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="has CUDA")),
])
def test_bad_flags_give_one_line(tmp_path, capsys, no_data_loading, command, argv, expected):
    out = [] if command == "bench" else ["--out", str(tmp_path / "out")]
    line = _error(capsys, [command, *argv, *out], command)
    assert expected in line
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("command", ["train", "convergence"])
@pytest.mark.parametrize("where", ["file", "under-file"])
def test_out_naming_a_file(tmp_path, capsys, no_data_loading, command, where):
    blocker = tmp_path / "taken"
    blocker.write_text("keep me")
    out = blocker if where == "file" else blocker / "run"
    line = _error(capsys, [command, "--out", str(out), *TINY], command)
    assert f"--out {out}" in line and "not a folder" in line and "choose another --out" in line
    assert blocker.read_text() == "keep me"


def test_bad_data_leaves_no_output_folder(tmp_path, capsys):
    out = tmp_path / "new" / "run"
    line = _error(capsys, ["train", "--data", str(tmp_path / "missing.npz"), "--out", str(out),
                           *TINY], "train", status_lines=1)  # "loading the data ..."
    assert "no such file or folder" in line
    assert not (tmp_path / "new").exists()


def test_output_folder_removes_only_what_it_created_while_empty(tmp_path):
    existing = tmp_path / "existing"
    existing.mkdir()
    with pytest.raises(RuntimeError):
        with output_folder(existing / "a" / "b") as out:
            assert out.is_dir()
            raise RuntimeError("the run failed")
    assert existing.is_dir() and not (existing / "a").exists()
    with pytest.raises(RuntimeError):
        with output_folder(tmp_path / "c" / "d") as out:
            (out / "metrics.jsonl").write_text("{}\n")
            raise RuntimeError("the run failed after writing")
    assert (tmp_path / "c" / "d" / "metrics.jsonl").exists()
    with output_folder(tmp_path / "e") as out:
        pass
    assert out.is_dir()  # a run that succeeds keeps its folder, empty or not
    with pytest.raises(UsageError, match="--out .*is a file"):
        with output_folder(tmp_path / "c" / "d" / "metrics.jsonl"):
            pass


def test_the_installed_command_prints_one_line_and_exits_2(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "tread_fx.tools.cli", "train", "--routes",
                           "2:99@0.5", "--out", str(tmp_path / "out")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert proc.stderr.splitlines() == [proc.stderr.strip()]
    assert proc.stderr.startswith("tread-fx train: error: --routes 2:99@0.5: ")
    assert not Path(tmp_path / "out").exists()


def test_without_the_train_extra_the_parser_builds_and_train_says_what_to_install():
    script = (
        "import sys\n"
        "for name in ('PIL', 'matplotlib', 'mlxtend', 'tqdm'):\n"
        "    sys.modules[name] = None  # as if not installed\n"
        "from tread_fx.tools.cli import build_parser, main\n"
        "build_parser().parse_args(['convergence', '--minutes', '1'])\n"
        "sys.exit(main(['train', '--steps', '1']))\n")
    proc = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True,
                          timeout=120)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.splitlines() == [
        "tread-fx train: error: needs mlxtend, which the train extra installs: "
        "pip install 'tread-fx[train]'"]
