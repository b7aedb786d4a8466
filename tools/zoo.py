"""Small configurations of every backbone tread_fx is checked on, with example inputs.

Shared by the tests and by ``tread-fx backbones``, which prints the support table of the
README by running the same checks.
"""

from __future__ import annotations

from typing import Any, Callable

import torch
from torch import nn

__all__ = ["BACKBONES", "DIFFUSERS", "build", "perturb_"]

B = 3


def perturb_(model: nn.Module, std: float = 0.05, seed: int = 0) -> nn.Module:
    """Add noise to every parameter (zero-initialised layers would hide routing effects)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn(p.shape, generator=gen) * std)
    return model


def _image(batch=B):
    return torch.randn(batch, 4, 8, 8)


def _t_y(batch=B):
    return torch.rand(batch) * 999, torch.randint(0, 10, (batch,))


def _dit():
    from tread_fx.models import DiT
    return DiT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=6,
               num_heads=2, num_classes=10), (_image(), *_t_y())


def _uvit():
    from tread_fx.models.uvit import UViT
    return UViT(img_size=8, patch_size=2, in_chans=4, embed_dim=48, depth=7, num_heads=2,
                num_classes=11), (_image(), *_t_y())


def _rope_dit():
    from tread_fx.models.rope_dit import RoPEDiT
    return RoPEDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=6,
                   num_heads=2, num_classes=10), (_image(), *_t_y())


def _mmdit():
    from tread_fx.models.mmdit import MMDiT
    return MMDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=64, depth=6,
                 num_heads=2, context_dim=12, pooled_dim=10), \
        (_image(), torch.rand(B), torch.randn(B, 5, 12), torch.randn(B, 10))


def _ssm():
    from tread_fx.models.ssm import SSMDiT
    return SSMDiT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=6,
                  num_classes=10), (_image(), *_t_y())


def _vit():
    from tread_fx.models.vit import ViT
    return ViT(input_size=8, patch_size=2, in_channels=4, hidden_size=48, depth=6, num_heads=2,
               num_classes=10), (_image(), *_t_y())


def _diffusers_dit():
    from diffusers import DiTTransformer2DModel
    model = DiTTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                  num_layers=4, sample_size=8, patch_size=2,
                                  num_embeds_ada_norm=10)
    for m in model.modules():  # its label dropout (0.1, not configurable) draws per block
        if hasattr(m, "dropout_prob"):
            m.dropout_prob = 0.0
    return model, dict(hidden_states=_image(), timestep=torch.randint(0, 1000, (B,)),
                       class_labels=torch.randint(0, 10, (B,)), return_dict=False)


def _pixart():
    from diffusers import PixArtTransformer2DModel
    model = PixArtTransformer2DModel(num_attention_heads=2, attention_head_dim=8, in_channels=4,
                                     out_channels=8, num_layers=4, cross_attention_dim=16,
                                     sample_size=8, patch_size=2, caption_channels=12)
    return model, dict(hidden_states=_image(), encoder_hidden_states=torch.randn(B, 5, 12),
                       timestep=torch.randint(0, 1000, (B,)),
                       added_cond_kwargs={"resolution": None, "aspect_ratio": None},
                       return_dict=False)


def _sd3():
    from diffusers import SD3Transformer2DModel
    model = SD3Transformer2DModel(sample_size=8, patch_size=2, in_channels=4, num_layers=4,
                                  attention_head_dim=8, num_attention_heads=2,
                                  joint_attention_dim=12, caption_projection_dim=16,
                                  pooled_projection_dim=10, out_channels=4, pos_embed_max_size=8)
    return model, dict(hidden_states=_image(), encoder_hidden_states=torch.randn(B, 5, 12),
                       pooled_projections=torch.randn(B, 10),
                       timestep=torch.randint(0, 1000, (B,)), return_dict=False)


# name -> (builder returning (model, example inputs), a route span that exercises it)
BACKBONES: dict[str, tuple[Callable[[], tuple[nn.Module, Any]], str]] = {
    "DiT (models.dit)": (_dit, "1:3"),
    "U-ViT (models.uvit)": (_uvit, "1:5"),
    "RoPE DiT (models.rope_dit)": (_rope_dit, "1:3"),
    "MMDiT (models.mmdit)": (_mmdit, "1:3"),
    "bidirectional SSM (models.ssm)": (_ssm, "1:3"),
    "ViT + class token (models.vit)": (_vit, "1:3"),
}
DIFFUSERS = {
    "diffusers DiTTransformer2DModel": (_diffusers_dit, "1:2"),
    "diffusers PixArtTransformer2DModel": (_pixart, "1:2"),
    "diffusers SD3Transformer2DModel": (_sd3, "1:2"),
}


def build(name: str, seed: int = 0) -> tuple[nn.Module, Any, str]:
    make, span = {**BACKBONES, **DIFFUSERS}[name]
    torch.manual_seed(seed)
    model, inputs = make()
    return perturb_(model, seed=seed), inputs, span
