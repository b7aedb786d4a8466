"""A routed model under DistributedDataParallel (gloo, one CPU process): trains, and the
kept-token masks are there for the loss."""

import gc
import os
import tempfile

import torch
import torch.distributed as dist
from torch.nn.parallel import DistributedDataParallel

import tread_fx
from conftest import dit_inputs, tiny_dit


def test_ddp_train_step_and_masks():
    store = tempfile.NamedTemporaryFile(delete=False)
    store.close()
    dist.init_process_group("gloo", init_method=f"file://{store.name}", rank=0, world_size=1)
    ddp = None
    try:
        model = tiny_dit(depth=4, class_dropout_prob=0.0)
        routed = tread_fx.route(model, "1:2@0.5").train()
        ddp = DistributedDataParallel(routed)
        before = model.blocks[1].mlp.fc1.weight.detach().clone()
        opt = torch.optim.SGD(ddp.parameters(), lr=0.1)
        out = ddp(*dit_inputs(batch=4))
        (mask,) = tread_fx.kept_masks(routed)
        assert mask.shape == (4, 16) and mask.sum(1).tolist() == [8] * 4
        out.square().mean().backward()
        opt.step()
        assert not torch.equal(model.blocks[1].mlp.fc1.weight, before)
    finally:
        # DDP's reducer holds the process group: free it first, or destroying the group
        # and then the reducer can wait forever on gloo's worker threads
        del ddp
        gc.collect()
        dist.destroy_process_group()
        if os.path.exists(store.name):   # the file store removes it once all are done
            os.unlink(store.name)
