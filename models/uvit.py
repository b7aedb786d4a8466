"""Reference U-ViT backbone (Bao et al., "All are Worth Words: A ViT Backbone for Diffusion Models").

Everything is a token: the timestep and the class label are embedded as two extra tokens
prepended to the patch tokens (``[time, label, patches]``), and a learned position
embedding covers all ``2 + N`` of them. The blocks form a U: ``in_blocks`` (depth // 2), a
``mid_block`` and ``out_blocks`` (depth // 2). Each in-block's output is pushed on a stack
of long skips; each out-block pops one (so the last in-block feeds the first out-block) and
fuses it into its input with ``skip_linear(cat([x, skip], -1))`` before attention.

Written the way the authors write it, including ``unpatchify`` recovering the grid from
the token count with ``int(x.shape[1] ** 0.5)`` and a shape ``assert`` -- which means
``torch.fx.symbolic_trace`` cannot trace ``UViT.forward`` (the blocks themselves trace).
There is no label dropout inside the model: as in U-ViT, classifier-free guidance uses an
extra class id (pass ``num_classes = classes + 1``) chosen by the training loop.
"""

from __future__ import annotations

from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import PatchEmbed, TimestepEmbedder

__all__ = ["timestep_embedding", "unpatchify", "UViTAttention", "UViTMlp", "UViTBlock", "UViT"]


def timestep_embedding(timesteps: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """Sinusoidal timestep features [B, dim]."""
    return TimestepEmbedder.timestep_embedding(timesteps, dim, max_period)


def unpatchify(x: torch.Tensor, channels: int = 3) -> torch.Tensor:
    """[B, N, p*p*C] -> [B, C, H, W] for a square grid inferred from N (U-ViT style)."""
    patch_size = int((x.shape[2] // channels) ** 0.5)
    h = w = int(x.shape[1] ** 0.5)
    assert h * w == x.shape[1] and patch_size**2 * channels == x.shape[2]
    x = x.reshape(x.shape[0], h, w, patch_size, patch_size, channels)
    x = torch.einsum("bhwpqc->bchpwq", x)
    return x.reshape(x.shape[0], channels, h * patch_size, w * patch_size)


class UViTAttention(nn.Module):
    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = False):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, L, C = x.shape
        qkv = self.qkv(x).reshape(B, L, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, L, hd]
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).reshape(B, L, C)
        return self.proj(x)


class UViTMlp(nn.Module):
    def __init__(self, in_features: int, hidden_features: int):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class UViTBlock(nn.Module):
    """Pre-norm transformer block; with ``skip=True`` it first fuses a long skip."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float = 4.0, qkv_bias: bool = False, skip: bool = False):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim)
        self.attn = UViTAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias)
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = UViTMlp(dim, int(dim * mlp_ratio))
        self.skip_linear = nn.Linear(2 * dim, dim) if skip else None

    def forward(self, x: torch.Tensor, skip: Optional[torch.Tensor] = None) -> torch.Tensor:
        """x [B, L, D] with L = extras + N; skip [B, L, D] (out blocks only)."""
        if self.skip_linear is not None:
            x = self.skip_linear(torch.cat([x, skip], dim=-1))
        x = x + self.attn(self.norm1(x))
        x = x + self.mlp(self.norm2(x))
        return x


class UViT(nn.Module):
    """U-ViT for (latent) diffusion.

    ``forward(x, timesteps, y)``: x [B, in_chans, H, W], timesteps [B], y [B] class ids
    (ignored when ``num_classes <= 0``); returns the noise prediction [B, in_chans, H, W].
    """

    def __init__(
        self,
        img_size: int = 32,
        patch_size: int = 2,
        in_chans: int = 4,
        embed_dim: int = 512,
        depth: int = 13,
        num_heads: int = 8,
        mlp_ratio: float = 4,
        num_classes: int = 1000,
        qkv_bias: bool = False,
        mlp_time_embed: bool = False,
        conv: bool = True,
        skip: bool = True,
    ):
        super().__init__()
        self.num_features = self.embed_dim = embed_dim
        self.num_classes = num_classes
        self.in_chans = in_chans
        self.patch_size = patch_size

        self.patch_embed = PatchEmbed(img_size, patch_size, in_chans, embed_dim)
        num_patches = self.patch_embed.num_patches

        self.time_embed = (
            nn.Sequential(nn.Linear(embed_dim, 4 * embed_dim), nn.SiLU(), nn.Linear(4 * embed_dim, embed_dim))
            if mlp_time_embed
            else nn.Identity()
        )
        if self.num_classes > 0:
            self.label_emb = nn.Embedding(self.num_classes, embed_dim)
            self.extras = 2
        else:
            self.extras = 1
        self.pos_embed = nn.Parameter(torch.zeros(1, self.extras + num_patches, embed_dim))

        self.in_blocks = nn.ModuleList(
            [UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias) for _ in range(depth // 2)]
        )
        self.mid_block = UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias)
        self.out_blocks = nn.ModuleList(
            [UViTBlock(embed_dim, num_heads, mlp_ratio, qkv_bias, skip=skip) for _ in range(depth // 2)]
        )

        self.norm = nn.LayerNorm(embed_dim)
        self.patch_dim = patch_size**2 * in_chans
        self.decoder_pred = nn.Linear(embed_dim, self.patch_dim, bias=True)
        self.final_layer = nn.Conv2d(in_chans, in_chans, 3, padding=1) if conv else nn.Identity()

        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(m: nn.Module) -> None:
        if isinstance(m, nn.Linear):
            nn.init.trunc_normal_(m.weight, std=0.02)
            if m.bias is not None:
                nn.init.zeros_(m.bias)
        elif isinstance(m, nn.LayerNorm):
            nn.init.ones_(m.weight)
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor, timesteps: torch.Tensor, y: Optional[torch.Tensor] = None) -> torch.Tensor:
        x = self.patch_embed(x)  # [B, N, D]
        time_token = self.time_embed(timestep_embedding(timesteps, self.embed_dim))
        time_token = time_token.unsqueeze(dim=1)  # [B, 1, D]
        if self.num_classes > 0:
            label_token = self.label_emb(y).unsqueeze(dim=1)  # [B, 1, D]
            x = torch.cat([time_token, label_token, x], dim=1)
        else:
            x = torch.cat([time_token, x], dim=1)
        x = x + self.pos_embed  # [B, extras + N, D]

        skips = []
        for blk in self.in_blocks:
            x = blk(x)
            skips.append(x)
        x = self.mid_block(x)
        for blk in self.out_blocks:
            x = blk(x, skips.pop())

        x = self.norm(x)
        x = self.decoder_pred(x)
        x = x[:, self.extras :, :]
        x = unpatchify(x, self.in_chans)
        x = self.final_layer(x)
        return x
