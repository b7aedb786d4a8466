"""Tests for the extra reference backbones: U-ViT, RoPE-DiT, MMDiT, SSM-DiT and ViT.

Several models use adaLN-Zero (blocks start as the identity, the output at zero), which
would hide missing gradients and make "the output depends on X" checks vacuous; every
test therefore adds small noise to all parameters first (``perturb_``).
"""

from __future__ import annotations

import pytest
import torch
import torch.fx
import torch.nn.functional as F

from tread_fx.models import MMDiT, RoPEDiT, SSMDiT, UViT, ViT
from tread_fx.models.mmdit import JointBlock
from tread_fx.models.rope_dit import RoPEDiTBlock, apply_rotary, get_2d_rope_tables
from tread_fx.models.ssm import SSMBlock, selective_scan
from tread_fx.models.uvit import UViTBlock
from tread_fx.models.vit import ViTBlock

NUM_CLASSES = 10
BATCH = 2
SIZE = 8  # 8x8 latents, patch 2 -> N = 16 tokens
N_TOKENS = (SIZE // 2) ** 2
CONTEXT_DIM, POOLED_DIM, TEXT_LEN = 12, 6, 5


@torch.no_grad()
def perturb_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def make_uvit(**kw):
    cfg = dict(img_size=SIZE, patch_size=2, in_chans=4, embed_dim=32, depth=5, num_heads=2, num_classes=NUM_CLASSES)
    cfg.update(kw)
    return UViT(**cfg)


def make_rope_dit(**kw):
    cfg = dict(input_size=SIZE, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
               num_classes=NUM_CLASSES, class_dropout_prob=0.1)
    cfg.update(kw)
    return RoPEDiT(**cfg)


def make_mmdit(**kw):
    cfg = dict(input_size=SIZE, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
               context_dim=CONTEXT_DIM, pooled_dim=POOLED_DIM)
    cfg.update(kw)
    return MMDiT(**cfg)


def make_ssm(**kw):
    cfg = dict(input_size=SIZE, patch_size=2, in_channels=4, hidden_size=32, depth=4, d_state=8,
               num_classes=NUM_CLASSES, chunk_size=8)
    cfg.update(kw)
    return SSMDiT(**cfg)


def make_vit(**kw):
    cfg = dict(input_size=SIZE, patch_size=2, in_channels=4, hidden_size=32, depth=3, num_heads=2,
               num_classes=NUM_CLASSES)
    cfg.update(kw)
    return ViT(**cfg)


def class_inputs(seed: int = 0, batch: int = BATCH):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, SIZE, SIZE, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    y = torch.randint(0, NUM_CLASSES, (batch,), generator=gen)
    return x, t, y


def text_inputs(seed: int = 0, batch: int = BATCH, text_len: int = TEXT_LEN):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(batch, 4, SIZE, SIZE, generator=gen)
    t = torch.rand(batch, generator=gen) * 999
    context = torch.randn(batch, text_len, CONTEXT_DIM, generator=gen)
    pooled = torch.randn(batch, POOLED_DIM, generator=gen)
    return x, t, context, pooled


# name -> (builder, inputs, expected output channels)
MODELS = {
    "uvit": (make_uvit, class_inputs, 4),
    "rope_dit": (make_rope_dit, class_inputs, 4),
    "mmdit": (make_mmdit, text_inputs, 4),
    "ssm": (make_ssm, class_inputs, 8),
    "vit": (make_vit, class_inputs, 8),
}
TRACEABLE = ["rope_dit", "mmdit", "ssm", "vit"]


def build(name: str, seed: int = 0, **kw):
    torch.manual_seed(seed)
    builder, inputs, out_c = MODELS[name]
    return perturb_(builder(**kw), seed=seed), inputs(), out_c


# ---------------------------------------------------------------------------
# Shared checks
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("name", list(MODELS))
def test_output_shape(name):
    model, inputs, out_c = build(name)
    for mode in (True, False):
        out = model.train(mode)(*inputs)
        assert out.shape == (BATCH, out_c, SIZE, SIZE)
        assert torch.isfinite(out).all()


# Parameters that legitimately get no gradient. MMDiT (SD3-style, last text stream pre-only):
# the last block's text QUERIES only produce text outputs, which nothing reads, so that
# block's per-head q RMSNorm weight gets no gradient (the q rows of its qkv Linear get zero
# gradient too, but the Linear as a whole does get one).
NO_GRAD = {"mmdit": {"joint_blocks.2.context_block.q_norm.weight"}}


def params_without_grad(model):
    return {n for n, p in model.named_parameters() if p.requires_grad and (p.grad is None or not p.grad.any())}


@pytest.mark.parametrize("name", list(MODELS))
def test_gradients_reach_all_parameters(name):
    kw = {"context_pre_only_last": True} if name == "mmdit" else {}
    model, inputs, _ = build(name, **kw)
    model.train()
    model(*inputs).square().mean().backward()
    assert params_without_grad(model) == NO_GRAD.get(name, set())
    assert all(torch.isfinite(p.grad).all() for p in model.parameters() if p.grad is not None)


@pytest.mark.parametrize("name", TRACEABLE)
def test_symbolic_trace_matches_eager(name):
    model, inputs, _ = build(name)
    model.eval()
    gm = torch.fx.symbolic_trace(model)
    torch.testing.assert_close(gm(*inputs), model(*inputs))


@pytest.mark.parametrize("name", TRACEABLE)
def test_trace_with_blocks_as_leaves(name):
    model, inputs, _ = build(name)
    model.eval()
    block_types = (RoPEDiTBlock, JointBlock, SSMBlock, ViTBlock)

    class LeafTracer(torch.fx.Tracer):
        def is_leaf_module(self, m, qualname):
            return isinstance(m, block_types) or super().is_leaf_module(m, qualname)

    graph = LeafTracer().trace(model)
    gm = torch.fx.GraphModule(model, graph)
    calls = [n for n in graph.nodes if n.op == "call_module" and isinstance(gm.get_submodule(n.target), block_types)]
    assert len(calls) == len([m for m in model.modules() if isinstance(m, block_types)])
    torch.testing.assert_close(gm(*inputs), model(*inputs))


# ---------------------------------------------------------------------------
# U-ViT
# ---------------------------------------------------------------------------


def test_uvit_structure():
    model = make_uvit(depth=7)
    assert len(model.in_blocks) == 3 and len(model.out_blocks) == 3
    assert model.extras == 2
    assert model.pos_embed.shape == (1, 2 + N_TOKENS, 32) and model.pos_embed.requires_grad
    assert all(b.skip_linear is None for b in model.in_blocks) and model.mid_block.skip_linear is None
    assert all(b.skip_linear.in_features == 64 and b.skip_linear.out_features == 32 for b in model.out_blocks)
    assert make_uvit(num_classes=0).extras == 1


def test_uvit_long_skips_are_consumed_in_reverse():
    model, inputs, _ = build("uvit", depth=7)
    model.eval()
    in_outputs, mid_output, out_args = [], [], []
    handles = [b.register_forward_hook(lambda m, a, out: in_outputs.append(out)) for b in model.in_blocks]
    handles.append(model.mid_block.register_forward_hook(lambda m, a, out: mid_output.append(out)))
    handles += [b.register_forward_pre_hook(lambda m, a, kw: out_args.append((a, kw)), with_kwargs=True)
                for b in model.out_blocks]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    k = len(model.in_blocks)
    assert len(in_outputs) == k and len(out_args) == k
    for i, (args, kwargs) in enumerate(out_args):
        skip = args[1] if len(args) > 1 else kwargs["skip"]
        assert skip is in_outputs[k - 1 - i]  # LIFO: last in-block feeds the first out-block
        assert skip.shape == (BATCH, 2 + N_TOKENS, 32)
    assert out_args[0][0][0] is mid_output[0]


def test_uvit_prefix_tokens_and_skips_matter():
    model, (x, t, y), _ = build("uvit")
    model.eval()
    out = model(x, t, y)
    assert not torch.allclose(out, model(x, t.flip(0) + 1.0, y))  # time token
    assert not torch.allclose(out, model(x, t, (y + 1) % NUM_CLASSES))  # label token
    block = UViTBlock(32, 2, skip=True)
    h = torch.randn(BATCH, 7, 32)
    assert not torch.allclose(block(h, torch.zeros_like(h)), block(h, torch.randn_like(h)))


def test_uvit_is_not_symbolically_traceable():
    """As the authors write it, unpatchify calls int(x.shape[1] ** 0.5): fx cannot trace it."""
    model = make_uvit()
    with pytest.raises(TypeError):
        torch.fx.symbolic_trace(model)
    torch.fx.symbolic_trace(model.out_blocks[0])  # the blocks themselves trace


# ---------------------------------------------------------------------------
# RoPE-DiT
# ---------------------------------------------------------------------------


def test_rope_tables_and_rotation_preserve_norms():
    head_dim = 16
    cos, sin = get_2d_rope_tables(head_dim, (4, 4))
    assert cos.shape == sin.shape == (N_TOKENS, head_dim)
    torch.testing.assert_close(cos[0], torch.ones(head_dim))  # position (0, 0) is not rotated
    q = torch.randn(BATCH, 2, N_TOKENS, head_dim)
    k = torch.randn(BATCH, 2, N_TOKENS, head_dim)
    qr, kr = apply_rotary(q, cos, sin), apply_rotary(k, cos, sin)
    torch.testing.assert_close(qr.norm(dim=-1), q.norm(dim=-1))
    torch.testing.assert_close(kr.norm(dim=-1), k.norm(dim=-1))
    # Same rotation on both sides: per-token q.k is unchanged, but the rotation is not the identity.
    torch.testing.assert_close((qr * kr).sum(-1), (q * k).sum(-1))
    assert not torch.allclose(qr, q)
    # Relative: <R(p) q, R(p') k> depends only on p' - p (shift both by one grid row).
    q1, k1 = torch.randn(head_dim), torch.randn(head_dim)
    dot = lambda i, j: (apply_rotary(q1, cos[i], sin[i]) * apply_rotary(k1, cos[j], sin[j])).sum()  # noqa: E731
    torch.testing.assert_close(dot(1, 6), dot(5, 10))


def test_rope_dit_blocks_share_one_rope_tuple():
    model, inputs, _ = build("rope_dit")
    assert model.freqs_cos.shape == model.freqs_sin.shape == (N_TOKENS, 32 // 2)
    assert "freqs_cos" not in model.state_dict() and "freqs_sin" not in model.state_dict()
    seen = []
    handles = [b.register_forward_pre_hook(lambda m, a, kw: seen.append((a, kw)), with_kwargs=True)
               for b in model.blocks]
    try:
        model(*inputs)
    finally:
        for h in handles:
            h.remove()
    assert len(seen) == len(model.blocks)
    ropes = [kw["rope"] for _, kw in seen]
    assert all(r is ropes[0] for r in ropes)
    assert ropes[0][0] is model.freqs_cos and ropes[0][1] is model.freqs_sin
    for args, _ in seen:
        assert args[0].shape == (BATCH, N_TOKENS, 32) and args[1].shape == (BATCH, 32)


def test_rope_dit_rope_changes_attention():
    torch.manual_seed(0)
    block = perturb_(RoPEDiTBlock(32, 2))
    x, c = torch.randn(BATCH, N_TOKENS, 32), torch.randn(BATCH, 32)
    cos, sin = get_2d_rope_tables(16, (4, 4))
    assert not torch.allclose(block(x, c, rope=(cos, sin)), block(x, c))


# ---------------------------------------------------------------------------
# MMDiT
# ---------------------------------------------------------------------------


@pytest.mark.parametrize("text_len", [1, 5, 16, 23])
def test_mmdit_text_length_may_differ(text_len):
    model, _, _ = build("mmdit")
    inputs = text_inputs(text_len=text_len)
    seen = []
    handles = [b.register_forward_hook(lambda m, a, kw, out: seen.append((a, kw, out)), with_kwargs=True)
               for b in model.joint_blocks]
    try:
        out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    assert out.shape == (BATCH, 4, SIZE, SIZE)
    for args, kwargs, (ctx_out, x_out) in seen:
        x, context, c = args
        cos, sin = kwargs["rope"]
        assert x.shape == (BATCH, N_TOKENS, 32) and context.shape == (BATCH, text_len, 32)
        assert c.shape == (BATCH, 32)
        assert cos.shape == sin.shape == (text_len + N_TOKENS, 16)
        torch.testing.assert_close(cos[:text_len], torch.ones(text_len, 16))  # text rows first, unrotated
        torch.testing.assert_close(sin[:text_len], torch.zeros(text_len, 16))
        assert ctx_out.shape == context.shape and x_out.shape == x.shape  # (context, x), text first
    assert all(kw["rope"] is seen[0][1]["rope"] for _, kw, _ in seen)


def test_mmdit_output_depends_on_text():
    model, (x, t, context, pooled), _ = build("mmdit")
    out = model(x, t, context, pooled)
    assert not torch.allclose(out, model(x, t, context + torch.randn_like(context), pooled))
    assert not torch.allclose(out, model(x, t, context[:, :3], pooled))
    assert not torch.allclose(out, model(x, t, context, pooled + 1.0))


def test_mmdit_unused_last_context_output():
    """Fully joint last block: its text-side output projection, MLP and q norm get no gradient."""
    model, inputs, _ = build("mmdit")
    model(*inputs).square().mean().backward()
    last = f"joint_blocks.{len(model.joint_blocks) - 1}.context_block."
    expected = {last + s for s in ("proj.weight", "proj.bias", "mlp.fc1.weight", "mlp.fc1.bias",
                                   "mlp.fc2.weight", "mlp.fc2.bias", "q_norm.weight")}
    assert params_without_grad(model) == expected
    pre_only = make_mmdit(context_pre_only_last=True)
    assert pre_only.joint_blocks[-1].context_block.pre_only
    assert not hasattr(pre_only.joint_blocks[-1].context_block, "mlp")
    ctx, x = perturb_(pre_only).joint_blocks[-1](
        torch.randn(BATCH, N_TOKENS, 32), torch.randn(BATCH, 3, 32), torch.randn(BATCH, 32),
        rope=(torch.ones(3 + N_TOKENS, 16), torch.zeros(3 + N_TOKENS, 16)),
    )
    assert ctx is None and x.shape == (BATCH, N_TOKENS, 32)


# ---------------------------------------------------------------------------
# SSM
# ---------------------------------------------------------------------------


def naive_scan(u, delta, A, B, C, D):
    """The S6 recurrence, one token at a time (float64 reference)."""
    u, delta, A, B, C, D = (v.double() for v in (u, delta, A, B, C, D))
    h = torch.zeros(u.shape[0], u.shape[2], A.shape[1], dtype=torch.float64)
    ys = []
    for i in range(u.shape[1]):
        h = torch.exp(delta[:, i, :, None] * A) * h + (delta[:, i] * u[:, i])[:, :, None] * B[:, i, None, :]
        ys.append((h * C[:, i, None, :]).sum(-1) + D * u[:, i])
    return torch.stack(ys, dim=1)


@pytest.mark.parametrize("length", [1, 3, 8, 16, 21])
@pytest.mark.parametrize("chunk_size", [4, 8])
def test_selective_scan_matches_loop(length, chunk_size):
    gen = torch.Generator().manual_seed(length * 10 + chunk_size)
    b, d, n = 2, 5, 4
    u = torch.randn(b, length, d, generator=gen)
    delta = F.softplus(torch.randn(b, length, d, generator=gen))
    A = -3 * torch.rand(d, n, generator=gen)
    B = torch.randn(b, length, n, generator=gen)
    C = torch.randn(b, length, n, generator=gen)
    D = torch.randn(d, generator=gen)
    y = selective_scan(u, delta, A, B, C, D, chunk_size=chunk_size)
    assert y.shape == (b, length, d) and y.dtype == torch.float32
    torch.testing.assert_close(y.double(), naive_scan(u, delta, A, B, C, D), rtol=1e-5, atol=1e-5)


def ssm_block(seed: int = 0) -> SSMBlock:
    torch.manual_seed(seed)
    return perturb_(SSMBlock(32, d_state=8, chunk_size=8), std=0.1, seed=seed)


def test_ssm_block_is_bidirectional():
    block = ssm_block()
    x = torch.randn(1, N_TOKENS, 32, requires_grad=True)
    c = torch.randn(1, 32)
    mid = N_TOKENS // 2
    block(x, c)[0, mid].sum().backward()
    influence = x.grad[0].abs().sum(-1)  # [N]
    assert (influence[:mid] > 0).all() and (influence[mid + 1 :] > 0).all()

    # Each direction alone is causal in its own direction.
    u = torch.randn(1, N_TOKENS, 64, requires_grad=True)
    block.mixer.ssm_fwd(u)[0, mid].sum().backward()
    assert (u.grad[0, mid + 1 :] == 0).all() and (u.grad[0, :mid].abs().sum() > 0)
    u.grad = None
    block.mixer.ssm_bwd(u.flip(1)).flip(1)[0, mid].sum().backward()
    assert (u.grad[0, :mid] == 0).all() and (u.grad[0, mid + 1 :].abs().sum() > 0)


def test_ssm_token_order_matters():
    block = ssm_block()
    x, c = torch.randn(BATCH, N_TOKENS, 32), torch.randn(BATCH, 32)
    perm = torch.randperm(N_TOKENS, generator=torch.Generator().manual_seed(0))
    assert not torch.allclose(block(x[:, perm], c), block(x, c)[:, perm], atol=1e-4)
    # Any token count works (routing hands a block fewer tokens), as long as order is kept.
    kept = torch.tensor([0, 2, 3, 7, 11, 12, 15])
    assert block(x[:, kept], c).shape == (BATCH, len(kept), 32)


def test_ssm_model_scan_chunking_is_invisible():
    model, inputs, _ = build("ssm", chunk_size=4)
    model.eval()
    out = model(*inputs)
    for block in model.blocks:
        block.mixer.ssm_fwd.chunk_size = block.mixer.ssm_bwd.chunk_size = 16
    torch.testing.assert_close(model(*inputs), out, rtol=1e-4, atol=1e-5)


# ---------------------------------------------------------------------------
# ViT
# ---------------------------------------------------------------------------


def test_vit_drops_cls_token():
    model, inputs, _ = build("vit")
    assert model.cls_token.shape == (1, 1, 32) and model.pos_embed.shape == (1, 1 + N_TOKENS, 32)
    assert isinstance(model.blocks, torch.nn.Sequential)
    seen = {"blocks": []}

    def record_blocks(m, args, out):
        seen["blocks"].append(args[0].shape)

    def record_head(m, args):
        seen["head"] = args[0].shape

    handles = [model.blocks.register_forward_hook(record_blocks), model.head.register_forward_pre_hook(record_head)]
    try:
        out = model(*inputs)
    finally:
        for h in handles:
            h.remove()
    assert seen["blocks"] == [(BATCH, 1 + N_TOKENS, 32)]  # the Sequential is called once
    assert seen["head"] == (BATCH, N_TOKENS, 32)  # cls token gone before the head
    assert out.shape == (BATCH, 8, SIZE, SIZE)
    # The condition rides on the class token: token 0 differs per label, patch tokens do not.
    x, t, y = inputs
    model.eval()
    first = {}

    def record_first(m, args):
        first["x"] = args[0]

    h = model.blocks[0].register_forward_pre_hook(record_first)
    try:
        model(x, t, y)
        a = first["x"]
        model(x, t, (y + 1) % NUM_CLASSES)
        b = first["x"]
    finally:
        h.remove()
    assert not torch.allclose(a[:, 0], b[:, 0])
    torch.testing.assert_close(a[:, 1:], b[:, 1:])
