"""Data-parallel training of routed modules on two CPU processes (gloo): DDP, FSDP2 and
accelerate around the routed module, and ``tread-fx train --nproc``.

Every multi-process run has a deadline, so a hang fails its test instead of blocking the
suite.  The library runs start their ranks with ``torch.multiprocessing``; ``tread-fx train
--nproc`` starts them with torch.distributed's elastic launcher (torchrun's machinery).
"""

from __future__ import annotations

import datetime
import gc
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp

import tread_fx
from conftest import dit_inputs, tiny_dit
from tread_fx.losses import patchify_loss, tread_loss
from tread_fx.tools.cli import main

WORLD = 2
BATCH = 4            # the global batch: 2 samples per rank
SPEC = "1:2@0.5"     # blocks 1..2 of 4 see 8 of the 16 tokens
DEADLINE = 150       # seconds for one multi-process run on a loaded 2-core machine


# ---------------------------------------------------------------------------------------
# running ranks
# ---------------------------------------------------------------------------------------


def _rank_main(rank: int, fn, out: str, store: str, args: tuple) -> None:
    """One rank: join the group, run ``fn``, save its result for the test."""
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=WORLD,
                            timeout=datetime.timedelta(seconds=DEADLINE))
    try:
        torch.save(fn(rank, *args), os.path.join(out, f"rank{rank}.pt"))
    finally:
        # fn has freed its DistributedDataParallel; collect it before the group goes, or
        # gloo's worker threads can wait forever
        gc.collect()
        if dist.is_initialized():
            dist.destroy_process_group()


def _run_ranks(fn, tmp_path: Path, *args) -> list[dict]:
    """``fn(rank, *args)`` on WORLD gloo processes; each rank's returned dict."""
    store = str(tmp_path / "store")   # a file store: no port to pick
    ctx = mp.start_processes(_rank_main, args=(fn, str(tmp_path), store, args), nprocs=WORLD,
                             join=False, start_method="spawn")
    deadline = time.monotonic() + DEADLINE
    try:
        while not ctx.join(timeout=1):   # raises with a rank's traceback when one fails
            if time.monotonic() > deadline:
                pytest.fail(f"{fn.__name__}: the ranks did not finish within {DEADLINE} s")
    finally:
        for p in ctx.processes:
            if p.is_alive():
                p.kill()
    return [torch.load(tmp_path / f"rank{r}.pt", weights_only=False) for r in range(WORLD)]


def _shard(rank: int):
    """Rank ``rank``'s slice of the global batch."""
    part = slice(rank * BATCH // WORLD, (rank + 1) * BATCH // WORLD)
    return tuple(v[part] for v in dit_inputs(batch=BATCH))


def _loss(routed, out: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Paper-v1 adapted loss over each route's kept tokens plus the MaskDiT term on the
    routed ones: both read ``kept_masks`` of this rank's forward."""
    pred = out[:, :4]
    per_token = patchify_loss((pred - x) ** 2, 2)
    return tread_loss(per_token, tread_fx.kept_masks(routed), mode="adapted", aux_weight=0.1,
                      prediction=pred, noisy_input=x, patch_size=2)


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


@pytest.fixture(scope="module")
def reference():
    """One process, the concatenated batch, the same seeded selection: the gradients,
    kept mask and eval output that the ranks together must give."""
    model = tiny_dit(depth=4, class_dropout_prob=0.0)
    routed = tread_fx.route(model, SPEC, seed=0).train()
    x, t, y = dit_inputs(batch=BATCH)
    _loss(routed, routed(x, t, y), x).backward()
    (mask,) = tread_fx.kept_masks(routed)
    with torch.no_grad():
        dense = routed.eval()(x, t, y)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(0)   # the default (unseeded) draw from a seeded global generator
        default = tread_fx.route(model, SPEC).train()
        default(x, t, y)
    return {"grads": _grads(model), "mask": mask, "eval": dense,
            "default_mask": tread_fx.kept_masks(default)[0]}


def _assert_grads_match(ranks: list[dict], reference: dict) -> None:
    for r, result in enumerate(ranks):
        assert result["grads"].keys() == reference["grads"].keys()
        for name, ref in reference["grads"].items():
            assert ref.abs().max() > 0, name   # every parameter takes part in the loss
            torch.testing.assert_close(result["grads"][name], ref, rtol=1e-4, atol=1e-6,
                                       msg=lambda m: f"rank {r}, {name}: {m}")


# ---------------------------------------------------------------------------------------
# DistributedDataParallel
# ---------------------------------------------------------------------------------------


def _ddp_rank(rank: int) -> dict:
    from torch.nn.parallel import DistributedDataParallel

    model = tiny_dit(depth=4, class_dropout_prob=0.0)
    routed = tread_fx.route(model, SPEC, seed=0).train()   # route first, wrap the result
    ddp = DistributedDataParallel(routed)
    x, t, y = _shard(rank)
    _loss(routed, ddp(x, t, y), x).backward()
    result = {"grads": _grads(model), "mask": tread_fx.kept_masks(routed)[0]}
    opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
    for _ in range(2):   # a parameter left out of a step would fail the next one
        opt.step()
        opt.zero_grad()
        _loss(routed, ddp(x, t, y), x).backward()
    again = tread_fx.route(tiny_dit(depth=4, class_dropout_prob=0.0), SPEC, seed=0).train()
    again(x, t, y)
    result["seeded_again"] = tread_fx.kept_masks(again)[0]
    torch.manual_seed(0)   # every rank seeds the global generator alike
    default = tread_fx.route(model, SPEC).train()
    default(x, t, y)
    result["default_mask"] = tread_fx.kept_masks(default)[0]
    del ddp, opt
    return result


@pytest.fixture(scope="module")
def ddp_ranks(tmp_path_factory):
    return _run_ranks(_ddp_rank, tmp_path_factory.mktemp("ddp"))


def test_ddp_gradients_equal_one_process_on_the_concatenated_batch(ddp_ranks, reference):
    # the same seed= on every rank: together the ranks keep the tokens one process keeps
    masks = [r["mask"] for r in ddp_ranks]
    assert all(m.shape == (BATCH // WORLD, 16) and m.sum(1).eq(8).all() for m in masks)
    assert torch.equal(torch.cat(masks), reference["mask"])
    _assert_grads_match(ddp_ranks, reference)


def test_ranks_draw_different_tokens_by_default_and_reproducibly_with_a_seed(ddp_ranks,
                                                                              reference):
    first, second = ddp_ranks
    # unseeded, from the same global seed on both ranks: different tokens per rank, the
    # draw one process makes for the concatenated batch
    assert not torch.equal(first["default_mask"], second["default_mask"])
    assert torch.equal(torch.cat([first["default_mask"], second["default_mask"]]),
                       reference["default_mask"])
    # seed=: each rank draws its own tokens, and the same again in a new routed module
    assert not torch.equal(first["mask"], second["mask"])
    for r in ddp_ranks:
        assert torch.equal(r["seeded_again"], r["mask"])


# ---------------------------------------------------------------------------------------
# FSDP2
# ---------------------------------------------------------------------------------------


def _fsdp_rank(rank: int, saved_by_one: str, saved_by_two: str) -> dict:
    import torch.distributed.checkpoint as dcp
    from torch.distributed.checkpoint.state_dict import (get_model_state_dict,
                                                         set_model_state_dict)
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import FSDPModule, fully_shard
    from torch.distributed.tensor import DTensor

    model = tiny_dit(depth=4, class_dropout_prob=0.0)
    routed = tread_fx.route(model, SPEC, seed=0).train()
    mesh = init_device_mesh("cpu", (WORLD,))
    tokens_seen = []
    for block in model.blocks:   # the routed module's blocks are these very modules
        fully_shard(block, mesh=mesh)
        block.register_forward_hook(lambda m, args, out: tokens_seen.append(args[0].shape[1]))
    fully_shard(routed, mesh=mesh)
    assert isinstance(routed, FSDPModule) and routed.blocks[1] is model.blocks[1]
    weight = model.blocks[1].mlp.fc1.weight
    assert isinstance(weight, DTensor) and weight.to_local().shape[0] == weight.shape[0] // WORLD
    x, t, y = _shard(rank)
    _loss(routed, routed(x, t, y), x).backward()
    result = {"grads": {n: p.grad.full_tensor() for n, p in model.named_parameters()
                        if p.requires_grad},
              "mask": tread_fx.kept_masks(routed)[0], "tokens_seen": list(tokens_seen)}
    with torch.no_grad():   # eval: the dense graph, through the same sharded blocks
        result["eval"] = routed.eval()(x, t, y)
    routed.train()
    before = weight.full_tensor()
    opt = torch.optim.AdamW(routed.parameters(), lr=1e-3)
    for _ in range(2):
        opt.step()
        opt.zero_grad()
        _loss(routed, routed(x, t, y), x).backward()
    opt.step()
    after = model.blocks[1].mlp.fc1.weight.full_tensor()
    result["trained"] = bool(torch.isfinite(after).all()) and not torch.equal(after, before)
    # sharded checkpoints of the routed module (the model's keys): 2 ranks -> 1 process
    state = get_model_state_dict(routed)
    dcp.save(state, checkpoint_id=saved_by_two)
    result["saved"] = {k: v.full_tensor() for k, v in state.items()}
    # and 1 process -> 2 ranks: resharded on load
    state = get_model_state_dict(routed)
    dcp.load(state, checkpoint_id=saved_by_one)
    set_model_state_dict(routed, state)
    result["loaded"] = {k: v.full_tensor() for k, v in routed.state_dict().items()}
    return result


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_fsdp2_per_block_and_root_gradients_equal_one_process(tmp_path, reference):
    import torch.distributed.checkpoint as dcp
    import torch.distributed.fsdp

    if not hasattr(torch.distributed.fsdp, "fully_shard"):
        pytest.skip("FSDP2 (torch.distributed.fsdp.fully_shard) is public from torch 2.6")

    one = tiny_dit(depth=4, class_dropout_prob=0.0, seed=3).state_dict()
    dcp.save(one, checkpoint_id=tmp_path / "saved_by_one")   # no process group: one process
    ranks = _run_ranks(_fsdp_rank, tmp_path, str(tmp_path / "saved_by_one"),
                       str(tmp_path / "saved_by_two"))
    _assert_grads_match(ranks, reference)
    assert torch.equal(torch.cat([r["mask"] for r in ranks]), reference["mask"])
    # the user's forward hooks on the sharded blocks fire, the routed blocks on 8 tokens
    assert all(r["tokens_seen"] == [16, 8, 8, 16] for r in ranks)
    torch.testing.assert_close(torch.cat([r["eval"] for r in ranks]), reference["eval"],
                               rtol=1e-5, atol=1e-6)
    assert all(r["trained"] for r in ranks)
    for r in ranks:
        assert r["loaded"].keys() == one.keys()
        for key, value in one.items():
            assert torch.equal(r["loaded"][key], value), key
    loaded = tiny_dit(depth=4, class_dropout_prob=0.0, seed=4).state_dict()
    dcp.load(loaded, checkpoint_id=tmp_path / "saved_by_two")
    assert loaded.keys() == ranks[0]["saved"].keys()
    for key, value in ranks[0]["saved"].items():
        assert torch.equal(loaded[key], value), key


# ---------------------------------------------------------------------------------------
# HF accelerate
# ---------------------------------------------------------------------------------------


def _accelerate_rank(rank: int) -> dict:
    from accelerate import Accelerator

    # what `accelerate launch` / torchrun set; the Accelerator takes the group joined already
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(WORLD),
                      LOCAL_WORLD_SIZE=str(WORLD), OMP_NUM_THREADS="1")
    accelerator = Accelerator(cpu=True)
    model = tiny_dit(depth=4, class_dropout_prob=0.0)
    routed = tread_fx.route(model, SPEC, seed=0).train()
    opt = torch.optim.SGD(routed.parameters(), lr=0.1)
    wrapped, opt = accelerator.prepare(routed, opt)
    x, t, y = _shard(rank)
    accelerator.backward(_loss(routed, wrapped(x, t, y), x))
    result = {"grads": _grads(model), "mask": tread_fx.kept_masks(routed)[0],
              "processes": accelerator.num_processes, "wrapper": type(wrapped).__name__,
              "unwrapped": accelerator.unwrap_model(wrapped) is routed}
    before = model.blocks[1].mlp.fc1.weight.detach().clone()
    opt.step()
    result["stepped"] = not torch.equal(model.blocks[1].mlp.fc1.weight, before)
    del wrapped, opt
    return result


def test_accelerate_prepare_and_one_step(tmp_path, reference):
    pytest.importorskip("accelerate")
    ranks = _run_ranks(_accelerate_rank, tmp_path)
    assert all(r["processes"] == WORLD and r["wrapper"] == "DistributedDataParallel"
               and r["unwrapped"] and r["stepped"] for r in ranks)
    assert torch.equal(torch.cat([r["mask"] for r in ranks]), reference["mask"])
    _assert_grads_match(ranks, reference)


# ---------------------------------------------------------------------------------------
# tread-fx train --nproc
# ---------------------------------------------------------------------------------------

TINY = ["--depth", "4", "--hidden", "32", "--heads", "2", "--patch", "2", "--batch", "8",
        "--sample-steps", "2", "--samples-per-class", "3", "--no-progress"]
# no draw depends on the rank (dense, no label dropout): --nproc 2 computes the run of one
# process, up to the order of floating-point sums
EXACT = ["--routes", "none", "--class-dropout", "0"]


@pytest.fixture()
def data(tmp_path) -> Path:
    """Tiny class-dependent images: a bright square whose position depends on the label."""
    rng = np.random.default_rng(0)
    y = np.arange(48) % 4
    x = (rng.random((48, 8, 8)) * 40).astype(np.uint8)
    for i, label in enumerate(y):
        r, c = divmod(int(label), 2)
        x[i, r * 4:r * 4 + 4, c * 4:c * 4 + 4] = 220
    np.savez(tmp_path / "digits.npz", images=x, labels=y)
    return tmp_path / "digits.npz"


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "tread_fx.tools.cli", *args]


def _finish(proc: subprocess.Popen, what: str) -> tuple[str, str]:
    """Wait for ``proc`` (a session of its own: its ranks too) until the deadline."""
    try:
        return proc.communicate(timeout=DEADLINE)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.communicate()
        pytest.fail(f"{what} did not finish within {DEADLINE} s")


def _state(out: Path) -> dict:
    return torch.load(out / "checkpoint.pt", weights_only=False)


def _steps(out: Path, kind: str = "train") -> list[int]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r["step"] for r in map(json.loads, lines) if r["kind"] == kind]


def test_nproc_2_continues_a_one_process_run_as_one_process_would(tmp_path, data):
    common = [*TINY, *EXACT, "--log-every", "1", "--ckpt-every", "2", "--eval-every", "0"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    for out, steps in ((straight, "4"), (split, "2")):
        assert main(["train", "--data", str(data), "--out", str(out), *common, "--steps", steps]) == 0
    proc = subprocess.Popen(_cli("train", "--out", str(split), "--resume", "--steps", "4",
                                 "--nproc", "2", "--no-progress", "--sample-steps", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = _finish(proc, "tread-fx train --nproc 2")
    assert proc.returncode == 0, err[-3000:]
    assert "2 processes (DDP, batch 4 each)" in err and "saved by 1" in err
    assert err.count("loading the data") == 1   # rank 0 speaks for the run
    assert "wrote" in out
    # rank 0 wrote the outputs of a run: metrics continued, samples, plot, checkpoint
    assert _steps(split) == [1, 2, 3, 4] and _steps(split, "eval") == [2, 4]
    assert (split / "samples.png").stat().st_size > 0 and (split / "loss.png").stat().st_size > 0
    a, b = _state(straight), _state(split)
    assert b["step"] == 4 and b["world_size"] == 2 and a["world_size"] == 1
    assert list(b["model"]) == list(a["model"])   # the model's own keys, no DDP prefix
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], rtol=1e-5, atol=1e-6)
    for key in a["ema"]["shadow"]:
        torch.testing.assert_close(b["ema"]["shadow"][key], a["ema"]["shadow"][key],
                                   rtol=1e-5, atol=1e-6)


def test_killed_nproc_2_run_resumes_on_one_process(tmp_path, data):
    out = tmp_path / "killed"
    log = open(tmp_path / "stderr.txt", "w")
    proc = subprocess.Popen(_cli("train", "--data", str(data), "--out", str(out), *TINY,
                                 "--nproc", "2", "--loss", "adapted", "--aux-weight", "0.1",
                                 "--log-every", "1", "--ckpt-every", "2", "--eval-every", "0",
                                 "--steps", "100000"),
                            stdout=subprocess.DEVNULL, stderr=log, start_new_session=True)
    try:
        deadline = time.monotonic() + DEADLINE
        while not (out / "checkpoint.pt").exists() and proc.poll() is None:
            assert time.monotonic() < deadline, "no checkpoint within the deadline"
            time.sleep(0.05)
        assert proc.poll() is None, (tmp_path / "stderr.txt").read_text()[-3000:]
    finally:   # the launcher and both ranks
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        log.close()
    saved = _state(out)
    assert saved["world_size"] == 2 and saved["step"] >= 2 and saved["step"] % 2 == 0
    target = saved["step"] + 2
    assert main(["train", "--out", str(out), "--resume", "--steps", str(target),
                 "--no-progress", "--sample-steps", "2"]) == 0
    resumed = _state(out)
    assert resumed["step"] == target and resumed["world_size"] == 1
    assert resumed["config"]["loss"] == "adapted"
    # what the killed run logged past its checkpoint was dropped and logged again
    assert _steps(out) == list(range(1, target + 1))
    assert any(not torch.equal(saved["model"][k], resumed["model"][k]) for k in saved["model"])


def _fail_on_rank_1() -> int:
    """A rank that raises while the other waits for it in a collective."""
    dist.init_process_group("gloo")
    if dist.get_rank() == 1:
        raise RuntimeError("injected failure on rank 1")
    dist.barrier()
    return 0


def test_a_failing_rank_ends_the_job_with_its_error():
    """``launch``, which ``tread-fx train --nproc`` uses, stops the waiting rank and names
    the failed one first (in a process of its own, so a hang would meet the deadline)."""
    tests = str(Path(__file__).parent)
    code = ("import sys; sys.path.insert(0, sys.argv[1]); from test_distributed import "
            "_fail_on_rank_1; from tread_fx.tools.train_distributed import launch; "
            "launch(_fail_on_rank_1, (), 2)")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, tests], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = _finish(proc, "the launch")
    assert proc.returncode != 0
    assert ("DistributedError: rank 1 of 2 failed: RuntimeError: injected failure on rank 1"
            in err), err[-3000:]
    assert time.monotonic() - start < 60


@pytest.mark.parametrize("flags, expected", [
    (["--nproc", "3"], "must split evenly over 3 processes"),
    (["--nproc", "0"], "--nproc must be >= 1"),
    (["--fsdp"], "--fsdp: FSDP shards the model over several processes; pass --nproc N"),
    (["--fsdp", "--nproc", "1"], "--fsdp with --nproc 1: FSDP shards the model"),
])
def test_nproc_flag_errors_before_any_process_starts(tmp_path, data, capsys, flags, expected):
    out = tmp_path / "run"
    assert main(["train", "--data", str(data), "--out", str(out), *TINY, *flags]) == 2
    assert expected in capsys.readouterr().err
    assert not out.exists()


# ---------------------------------------------------------------------------------------
# tread-fx train --nproc N --fsdp
# ---------------------------------------------------------------------------------------


def _sharded_state(out: Path) -> dict:
    """``checkpoint.dcp`` read whole in this process: model, optimizer (by parameter name)
    and EMA, with the header ``meta.pt``."""
    from torch.distributed.checkpoint.format_utils import dcp_to_torch_save

    folder = out / "checkpoint.dcp"
    assert (folder / ".metadata").is_file() and (folder / "meta.pt").is_file()
    dcp_to_torch_save(folder, out / "whole.pt")
    state = torch.load(out / "whole.pt", weights_only=False)
    (out / "whole.pt").unlink()
    meta = torch.load(folder / "meta.pt", weights_only=False)
    state["ema"].update(meta.pop("ema"))   # the EMA's tensors and its update count
    return dict(meta, **state)


def _assert_close_run(a: dict, b: dict) -> None:
    """The model, EMA and AdamW state of ``b`` equal ``a``'s to float tolerance (``a``'s
    optimizer state by parameter index, as ``checkpoint.pt`` holds it; ``b``'s either way)."""
    assert a["step"] == b["step"]
    assert list(b["model"]) == list(a["model"])
    close = dict(rtol=1e-5, atol=1e-6)
    for key in a["model"]:
        torch.testing.assert_close(b["model"][key], a["model"][key], **close, msg=key)
    for key in a["ema"]["shadow"]:
        torch.testing.assert_close(b["ema"]["shadow"][key], a["ema"]["shadow"][key], **close,
                                   msg=key)
    assert b["ema"]["num_updates"] == a["ema"]["num_updates"] == a["step"]
    names = list(a["model"])   # the optimizer's parameter order
    for i, state in a["optimizer"]["state"].items():
        other = b["optimizer"]["state"]
        other = other[names[i]] if names[i] in other else other[i]
        for k, v in state.items():
            torch.testing.assert_close(other[k], v, **close, msg=f"{names[i]}.{k}")


@pytest.mark.filterwarnings("ignore:torch.distributed is disabled:UserWarning")
def test_fsdp_continues_a_one_process_run_and_its_checkpoint_resumes_in_one_process(tmp_path,
                                                                                  data):
    """One process to step 2, ``--nproc 2 --fsdp`` to 4 (checkpoint.pt sharded on load;
    writes checkpoint.dcp), one process again to 6 (the DCP checkpoint read whole): the
    parameters, EMA and AdamW state are those of an uninterrupted one-process run."""
    common = [*TINY, *EXACT, "--log-every", "1", "--ckpt-every", "2", "--eval-every", "0"]
    resume = ["--resume", "--no-progress", "--sample-steps", "2", "--samples-per-class", "3"]
    straight, split = tmp_path / "straight", tmp_path / "split"
    assert main(["train", "--data", str(data), "--out", str(straight), *common,
                 "--steps", "4"]) == 0
    at_4 = _state(straight)
    assert main(["train", "--out", str(straight), *resume, "--steps", "6"]) == 0
    at_6 = _state(straight)
    assert main(["train", "--data", str(data), "--out", str(split), *common, "--steps", "2"]) == 0
    proc = subprocess.Popen(_cli("train", "--out", str(split), *resume, "--steps", "4",
                                 "--nproc", "2", "--fsdp"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    out, err = _finish(proc, "tread-fx train --nproc 2 --fsdp")
    assert proc.returncode == 0, err[-3000:]
    assert "2 processes (FSDP2, sharded, batch 4 each)" in err and "saved by 1" in err
    assert err.count("loading the data") == 1 and "wrote" in out
    # rank 0 wrote the outputs of the run; the sharded checkpoint took the place of the other
    assert _steps(split) == [1, 2, 3, 4] and _steps(split, "eval") == [2, 4]
    assert (split / "samples.png").stat().st_size > 0 and (split / "loss.png").stat().st_size > 0
    assert not (split / "checkpoint.pt").exists()
    assert sorted(p.name for p in (split / "checkpoint.dcp").iterdir()) == [
        ".metadata", "__0_0.distcp", "__1_0.distcp", "meta.pt"]
    sharded = _sharded_state(split)
    assert sharded["world_size"] == 2 and sharded["sharded"]
    _assert_close_run(at_4, sharded)
    # and read whole by one process, which continues it as the uninterrupted run did
    assert main(["train", "--out", str(split), *resume, "--steps", "6"]) == 0
    assert not (split / "checkpoint.dcp").exists()
    resumed = _state(split)
    assert resumed["world_size"] == 1 and not resumed["sharded"]
    _assert_close_run(at_6, resumed)
    assert _steps(split) == list(range(1, 7))


def test_routed_fsdp_run_writes_metrics_samples_plot_and_a_sharded_checkpoint(tmp_path, data):
    """A routed run (TREAD loss with the auxiliary term, bf16 autocast) sharded from the
    start: the metrics, samples, plot and a sharded checkpoint with EMA and AdamW state."""
    out = tmp_path / "fsdp"
    proc = subprocess.Popen(_cli("train", "--data", str(data), "--out", str(out), *TINY,
                                 "--nproc", "2", "--fsdp", "--loss", "adapted", "--aux-weight",
                                 "0.1", "--dtype", "bf16", "--device", "cpu", "--steps", "3",
                                 "--log-every", "1", "--ckpt-every", "2", "--eval-every", "2"),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            start_new_session=True)
    stdout, err = _finish(proc, "tread-fx train --nproc 2 --fsdp")
    assert proc.returncode == 0, err[-3000:]
    assert "routes 1:2@0.5" in err and "FSDP2" in err and "dtype bf16 (autocast)" in err
    assert f"{out / 'checkpoint.dcp'}" in stdout
    assert _steps(out) == [1, 2, 3] and _steps(out, "eval") == [2, 3]
    lines = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert all(np.isfinite(r["heldout_loss_ema"]) for r in lines if r["kind"] == "eval")
    assert (out / "samples.png").stat().st_size > 0 and (out / "loss.png").stat().st_size > 0
    assert not (out / "checkpoint.pt").exists() and not list(out.glob(".*"))
    state = _sharded_state(out)
    assert state["step"] == 3 and state["config"]["dtype"] == "bf16"
    assert state["run_options"]["ckpt_every"] == 2
    assert state["ema"]["num_updates"] == 3
    assert state["ema"]["shadow"].keys() == state["model"].keys()
    assert all(torch.isfinite(v).all() for v in state["model"].values())
    adam = state["optimizer"]["state"]["blocks.1.mlp.fc1.weight"]
    assert adam["exp_avg"].shape == state["model"]["blocks.1.mlp.fc1.weight"].shape


def _fsdp_rank_failing_in_save(args):
    """A rank of ``tread-fx train --fsdp`` whose rank 1 raises when it comes to write the
    sharded checkpoint, while rank 0 waits for it in torch.distributed.checkpoint's
    collectives."""
    from tread_fx.tools import train, train_distributed

    if os.environ["RANK"] == "1":
        def fail(self, *args):
            raise RuntimeError("injected failure on rank 1 while saving")
        train.Trainer.save = fail
    return train_distributed.worker(args)


def test_a_rank_failing_under_fsdp_ends_the_job_with_its_error(tmp_path, data):
    tests = str(Path(__file__).parent)
    flags = ["train", "--data", str(data), "--out", str(tmp_path / "run"), *TINY, "--fsdp",
             "--steps", "4", "--ckpt-every", "2", "--threads", "1"]
    code = ("import sys, argparse; sys.path.insert(0, sys.argv[1]); from test_distributed import "
            "_fsdp_rank_failing_in_save as entry; from tread_fx.tools.cli import build_parser; "
            "from tread_fx.tools.train_distributed import launch; "
            "args = vars(build_parser().parse_args(sys.argv[2:])); args.pop('func', None); "
            "launch(entry, (argparse.Namespace(**args),), 2)")
    start = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-c", code, tests, *flags], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, start_new_session=True)
    _, err = _finish(proc, "the launch")
    assert proc.returncode != 0
    assert ("DistributedError: rank 1 of 2 failed: RuntimeError: injected failure on rank 1 "
            "while saving" in err), err[-3000:]
    assert time.monotonic() - start < 60
