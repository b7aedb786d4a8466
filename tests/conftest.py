"""Shared fixtures: small reference models with non-trivial weights."""

from __future__ import annotations

import os

import torch
from torch import nn

from tread_fx.models import DiT
from tread_fx.tools.zoo import perturb_  # noqa: F401  (used by the tests too)

# The tests run tiny models, for which one intra-op thread is faster than several (and a
# shared machine does not oversubscribe); TREAD_FX_TEST_THREADS overrides.
torch.set_num_threads(int(os.environ.get("TREAD_FX_TEST_THREADS", "1")))


class AttentionBlock(nn.Module):
    """A pre-norm-free transformer block written as people write them: attention through
    ``scaled_dot_product_attention``, then an MLP, each with a residual."""

    def __init__(self, dim: int):
        super().__init__()
        self.qkv, self.out = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))

    def forward(self, hidden_states):
        q, k, v = self.qkv(hidden_states).chunk(3, dim=-1)
        h = hidden_states + self.out(torch.nn.functional.scaled_dot_product_attention(q, k, v))
        return h + self.mlp(h)


def tiny_dit(depth: int = 6, hidden: int = 32, heads: int = 2, input_size: int = 8,
             patch: int = 2, num_classes: int = 10, class_dropout_prob: float = 0.1,
             seed: int = 0) -> DiT:
    torch.manual_seed(seed)
    model = DiT(input_size=input_size, patch_size=patch, in_channels=4, hidden_size=hidden,
                depth=depth, num_heads=heads, num_classes=num_classes,
                class_dropout_prob=class_dropout_prob)
    return perturb_(model, seed=seed)


def dit_inputs(batch: int = 2, input_size: int = 8, num_classes: int = 10, seed: int = 1):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, input_size, input_size, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    y = torch.randint(0, num_classes, (batch,), generator=gen)
    return x, t, y


def block_inputs(blocks, run) -> dict:
    """The hidden-state tensor each block receives during ``run()`` (forward pre-hooks)."""
    seen = {}
    handles = []
    for i, blk in enumerate(blocks):
        def hook(mod, args, kwargs, i=i):
            seen[i] = args[0] if args else kwargs.get(
                "x", kwargs.get("hidden_states", next(iter(kwargs.values()))))
        handles.append(blk.register_forward_pre_hook(hook, with_kwargs=True))
    try:
        run()
    finally:
        for h in handles:
            h.remove()
    return seen


def block_token_counts(model: nn.Module, blocks, run) -> list[int]:
    """Token count each block sees during ``run()``, observed with forward pre-hooks."""
    seen = block_inputs(blocks, run)
    return [seen[i].shape[1] if i in seen else None for i in range(len(blocks))]


def break_side_gather(monkeypatch) -> None:
    """Make every side-input gather return the table's first rows instead of the kept ones
    (right shape, wrong positions), wherever tread_fx's passes took ``gather_side`` from."""
    import sys

    from tread_fx import runtime

    original = runtime.gather_side

    def truncated(value, indices, *args, **kwargs):
        if indices is not None:
            indices = torch.arange(indices.shape[1], device=indices.device).expand_as(indices)
        return original(value, indices, *args, **kwargs)

    patched = 0
    for module in list(sys.modules.values()):
        if (getattr(module, "__name__", "").startswith("tread_fx")
                and getattr(module, "gather_side", None) is original):
            monkeypatch.setattr(module, "gather_side", truncated)
            patched += 1
    assert patched >= 2  # the runtime and the pass that inserts the nodes
