"""Reference timm-style ViT backbone for diffusion, with a class token.

A plain Vision Transformer as timm writes it: patch embedding, a learned ``cls_token``
prepended to the patch tokens, a learned position embedding over ``1 + N`` tokens, pre-norm
blocks held in an ``nn.Sequential`` that ``forward`` calls as ONE module
(``x = self.blocks(x)``), a final norm, and the class token dropped before the head.

Conditioning: the blocks take tokens only (a Sequential passes one argument), so the
timestep and class embeddings ``c = t_emb + y_emb [B, D]`` are ADDED TO THE CLASS TOKEN
before it is prepended (DiT's "in-context" conditioning with a single token); patch tokens
see the condition only through attention. No adaLN, so no zero-init: a fresh model already
has non-trivial outputs.

No routing code; ``torch.fx.symbolic_trace`` traces the whole model without example inputs.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import LabelEmbedder, PatchEmbed, SizeLike, TimestepEmbedder, _pair

__all__ = ["ViTAttention", "ViTMlp", "LayerScale", "ViTBlock", "ViT"]


class ViTAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, N, C)
        return self.proj(x)


class ViTMlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class LayerScale(nn.Module):
    def __init__(self, dim: int, init_values: float = 1e-5):
        super().__init__()
        self.gamma = nn.Parameter(init_values * torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.gamma


class ViTBlock(nn.Module):
    """Pre-norm block: x + attn(norm(x)), x + mlp(norm(x)); optional LayerScale."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
    ):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = ViTAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.ls1 = LayerScale(dim, init_values) if init_values else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = ViTMlp(dim, int(dim * mlp_ratio))
        self.ls2 = LayerScale(dim, init_values) if init_values else nn.Identity()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x [B, 1 + N, D] (class token first)."""
        x = x + self.ls1(self.attn(self.norm1(x)))
        x = x + self.ls2(self.mlp(self.norm2(x)))
        return x


class ViT(nn.Module):
    """Class-conditional ViT denoiser with a class token.

    ``forward(x, t, y)``: x [B, C, H, W], t [B], y [B] -> [B, out_channels, H, W],
    ``out_channels = 2 * in_channels`` if ``learn_sigma`` else ``in_channels``.
    """

    num_prefix_tokens = 1

    def __init__(
        self,
        input_size: SizeLike = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 12,
        num_heads: int = 12,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = True,
        qkv_bias: bool = True,
        init_values: Optional[float] = None,
    ):
        super().__init__()
        self.input_size = _pair(input_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_classes = num_classes

        self.patch_embed = PatchEmbed(self.input_size, patch_size, in_channels, hidden_size)
        num_patches = self.patch_embed.num_patches
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, hidden_size))
        self.pos_embed = nn.Parameter(torch.zeros(1, self.num_prefix_tokens + num_patches, hidden_size))

        self.blocks = nn.Sequential(
            *[
                ViTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, init_values=init_values)
                for _ in range(depth)
            ]
        )
        self.norm = nn.LayerNorm(hidden_size, eps=1e-6)
        self.head = nn.Linear(hidden_size, patch_size * patch_size * self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.normal_(self.cls_token, std=1e-6)

        def _init(m: nn.Module) -> None:
            if isinstance(m, nn.Linear):
                nn.init.trunc_normal_(m.weight, std=0.02)
                if m.bias is not None:
                    nn.init.zeros_(m.bias)

        self.apply(_init)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W], using the grid fixed at construction."""
        c = self.out_channels
        p = self.patch_size
        h, w = self.patch_embed.grid_size
        x = x.reshape(-1, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(-1, c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [B, D]
        x = self.patch_embed(x)  # [B, N, D]
        cls_token = self.cls_token.expand(x.shape[0], -1, -1) + c.unsqueeze(1)  # conditioned class token
        x = torch.cat((cls_token, x), dim=1)  # [B, 1 + N, D]
        x = x + self.pos_embed
        x = self.blocks(x)
        x = self.norm(x)
        x = x[:, self.num_prefix_tokens :]  # drop the class token
        x = self.head(x)
        return self.unpatchify(x)
