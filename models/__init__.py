"""tread_fx.models: reference backbones (no routing code)."""

from .dit import (
    DiT,
    DiT_B_2,
    DiT_B_4,
    DiT_B_8,
    DiT_L_2,
    DiT_L_4,
    DiT_L_8,
    DiT_models,
    DiT_S_2,
    DiT_S_4,
    DiT_S_8,
    DiT_XL_2,
    DiT_XL_4,
    DiT_XL_8,
)

__all__ = [
    "DiT",
    "DiT_models",
    "DiT_XL_2",
    "DiT_XL_4",
    "DiT_XL_8",
    "DiT_L_2",
    "DiT_L_4",
    "DiT_L_8",
    "DiT_B_2",
    "DiT_B_4",
    "DiT_B_8",
    "DiT_S_2",
    "DiT_S_4",
    "DiT_S_8",
]

from .mmdit import JointBlock, MMDiT
from .rope_dit import RoPEDiT, RoPEDiTBlock
from .ssm import SSMBlock, SSMDiT, selective_scan
from .uvit import UViT, UViTBlock
from .vit import ViT, ViTBlock

__all__ += [
    "UViT",
    "UViTBlock",
    "RoPEDiT",
    "RoPEDiTBlock",
    "MMDiT",
    "JointBlock",
    "SSMDiT",
    "SSMBlock",
    "selective_scan",
    "ViT",
    "ViTBlock",
]
