"""Tests for the reference DiT backbone (tread_fx.models.dit)."""

import pytest
import torch
import torch.fx

from tread_fx.models import DiT, DiT_models
from tread_fx.models.dit import DiTBlock, get_2d_sincos_pos_embed

NUM_CLASSES = 10


def tiny_dit(**overrides) -> DiT:
    cfg = dict(
        input_size=8,
        patch_size=2,
        in_channels=4,
        hidden_size=32,
        depth=2,
        num_heads=2,
        num_classes=NUM_CLASSES,
        class_dropout_prob=0.1,
        learn_sigma=True,
    )
    cfg.update(overrides)
    return DiT(**cfg)


@torch.no_grad()
def perturb_(model: torch.nn.Module, std: float = 0.05, seed: int = 0) -> torch.nn.Module:
    """Add small noise to every trainable parameter (breaks the adaLN-Zero init)."""
    gen = torch.Generator().manual_seed(seed)
    for p in model.parameters():
        if p.requires_grad:
            p.add_(std * torch.randn(p.shape, generator=gen, dtype=p.dtype))
    return model


def make_inputs(model: DiT, batch: int = 3, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    h, w = model.input_size
    x = torch.randn(batch, model.in_channels, h, w, generator=gen)
    t = torch.randint(0, 1000, (batch,), generator=gen)
    y = torch.randint(0, model.num_classes, (batch,), generator=gen)
    return x, t, y


@pytest.mark.parametrize("learn_sigma", [True, False])
@pytest.mark.parametrize("patch_size", [2, 4])
def test_output_shape(learn_sigma, patch_size):
    model = tiny_dit(patch_size=patch_size, learn_sigma=learn_sigma, input_size=16, in_channels=3).eval()
    x, t, y = make_inputs(model)
    out = model(x, t, y)
    expected_c = 6 if learn_sigma else 3
    assert model.out_channels == expected_c
    assert out.shape == (3, expected_c, 16, 16)
    assert model.x_embedder.grid_size == (16 // patch_size, 16 // patch_size)
    assert model.x_embedder.num_patches == (16 // patch_size) ** 2
    assert model.pos_embed.shape == (1, model.x_embedder.num_patches, 32)
    assert not model.pos_embed.requires_grad


def test_non_square_input():
    model = perturb_(tiny_dit(input_size=(8, 12), patch_size=2)).eval()
    x, t, y = make_inputs(model)
    assert model.x_embedder.grid_size == (4, 6)
    assert model(x, t, y).shape == (3, 8, 8, 12)


def test_pos_embed_is_fixed_sincos():
    model = tiny_dit()
    expected = get_2d_sincos_pos_embed(32, model.x_embedder.grid_size).unsqueeze(0)
    assert torch.equal(model.pos_embed.data, expected)
    assert "pos_embed" in dict(model.named_parameters())


def test_block_preserves_token_shape():
    block = DiTBlock(32, 4)
    x, c = torch.randn(2, 7, 32), torch.randn(2, 32)
    assert block(x, c).shape == x.shape


@pytest.mark.parametrize("input_size", [8, (8, 12)])
@pytest.mark.parametrize("learn_sigma", [True, False])
def test_symbolic_trace_matches_eager(input_size, learn_sigma):
    model = perturb_(tiny_dit(input_size=input_size, learn_sigma=learn_sigma, depth=3)).eval()
    traced = torch.fx.symbolic_trace(model)
    assert isinstance(traced, torch.fx.GraphModule)
    x, t, y = make_inputs(model)
    with torch.no_grad():
        assert torch.equal(traced(x, t, y), model(x, t, y))
        # Float timesteps and a different batch size go through the same graph.
        x2, _, y2 = make_inputs(model, batch=5, seed=1)
        t2 = torch.rand(5) * 999
        assert torch.equal(traced(x2, t2, y2), model(x2, t2, y2))


def test_label_dropout_train_replaces_all_labels_with_null():
    model = perturb_(tiny_dit(class_dropout_prob=1.0))
    emb = model.y_embedder
    assert emb.embedding_table.num_embeddings == NUM_CLASSES + 1
    y = torch.arange(NUM_CLASSES)
    null_row = emb.embedding_table.weight[NUM_CLASSES]

    out = emb(y, train=True)
    assert torch.equal(out, null_row.expand_as(out))

    # Model level: train mode equals eval mode with every label forced to the null class.
    x, t, _ = make_inputs(model, batch=NUM_CLASSES)
    with torch.no_grad():
        model.train()
        out_train = model(x, t, y)
        model.eval()
        out_null = model(x, t, torch.full_like(y, NUM_CLASSES))
    assert torch.equal(out_train, out_null)


def test_label_dropout_never_in_eval():
    model = perturb_(tiny_dit(class_dropout_prob=1.0)).eval()
    emb = model.y_embedder
    y = torch.arange(NUM_CLASSES)
    assert torch.equal(emb(y, train=False), emb.embedding_table.weight[y])
    # In eval the model uses the real labels.
    x, t, _ = make_inputs(model, batch=NUM_CLASSES)
    with torch.no_grad():
        assert not torch.equal(model(x, t, y), model(x, t, torch.full_like(y, NUM_CLASSES)))


def test_force_drop_ids():
    emb = tiny_dit(class_dropout_prob=0.1).y_embedder
    y = torch.tensor([1, 2, 3, 4])
    force = torch.tensor([1, 0, 1, 0])
    out = emb(y, train=False, force_drop_ids=force)
    expected = emb.embedding_table.weight[torch.tensor([NUM_CLASSES, 2, NUM_CLASSES, 4])]
    assert torch.equal(out, expected)


def test_no_null_class_without_dropout():
    model = tiny_dit(class_dropout_prob=0.0).train()
    assert model.y_embedder.embedding_table.num_embeddings == NUM_CLASSES
    y = torch.arange(NUM_CLASSES)
    assert torch.equal(model.y_embedder(y, train=True), model.y_embedder.embedding_table.weight)


def test_adaln_zero_init_gives_zero_output():
    model = tiny_dit().eval()
    x, t, y = make_inputs(model)
    with torch.no_grad():
        out = model(x, t, y)
    assert torch.equal(out, torch.zeros_like(out))
    for block in model.blocks:
        assert torch.count_nonzero(block.adaLN_modulation[-1].weight) == 0
        assert torch.count_nonzero(block.adaLN_modulation[-1].bias) == 0


def test_perturbed_output_depends_on_x_t_y():
    model = perturb_(tiny_dit()).eval()
    x, t, y = make_inputs(model)
    with torch.no_grad():
        base = model(x, t, y)
        assert base.abs().sum() > 0
        assert not torch.allclose(base, model(x + 1.0, t, y))
        assert not torch.allclose(base, model(x, (t + 100) % 1000, y))
        assert not torch.allclose(base, model(x, t, (y + 1) % NUM_CLASSES))


def test_backward_reaches_every_trainable_parameter():
    model = perturb_(tiny_dit()).train()
    x, t, y = make_inputs(model)
    model(x, t, y).square().mean().backward()
    for name, p in model.named_parameters():
        if p.requires_grad:
            assert p.grad is not None, name
            assert torch.isfinite(p.grad).all(), name
            assert p.grad.abs().sum() > 0, name
        else:
            assert name == "pos_embed" and p.grad is None


def test_forward_with_cfg():
    model = perturb_(tiny_dit()).eval()
    x, t, y = make_inputs(model, batch=2)
    xx = torch.cat([x, x])
    tt = torch.cat([t, t])
    yy = torch.cat([y, torch.full_like(y, NUM_CLASSES)])
    with torch.no_grad():
        out = model.forward_with_cfg(xx, tt, yy, cfg_scale=1.0)
        ref = model(xx, tt, yy)
    assert out.shape == (4, 8, 8, 8)
    # cfg_scale=1 reduces to the conditional prediction for both halves.
    torch.testing.assert_close(out[:2], ref[:2])
    torch.testing.assert_close(out[2:, :4], ref[:2, :4])


def test_config_registry():
    assert len(DiT_models) == 12
    expected = {"S": (12, 384, 6), "B": (12, 768, 12), "L": (24, 1024, 16), "XL": (28, 1152, 16)}
    for name, fn in DiT_models.items():
        size, patch = name[len("DiT-"):].split("/")
        depth, hidden, heads = expected[size]
        # Build on the meta device: no memory, no real init cost.
        with torch.device("meta"):
            model = fn(input_size=16, num_classes=NUM_CLASSES)
        assert len(model.blocks) == depth
        assert model.hidden_size == hidden
        assert model.num_heads == heads
        assert model.patch_size == int(patch)
        del model
