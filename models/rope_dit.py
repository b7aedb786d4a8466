"""Reference DiT with 2-D rotary position embeddings (LightningDiT-style).

The blocks are adaLN-Zero DiT blocks with the modern LightningDiT parts: RMSNorm in
place of LayerNorm, a SwiGLU feed-forward network, optional per-head RMSNorm on q and
k, and 2-D axial rotary embeddings applied to q and k inside attention (on top of
DiT's fixed sin-cos absolute position embedding, as LightningDiT does).

The rotary tables are computed once, at construction, for the fixed patch grid and
stored as non-persistent buffers ``freqs_cos`` / ``freqs_sin`` of shape
``[N, head_dim]``. ``forward`` hands the same ``(freqs_cos, freqs_sin)`` tuple to every
block as the keyword argument ``rope``; the attention broadcasts the ``[N, head_dim]``
tables against q/k of shape ``[B, heads, N, head_dim]``. The tables are indexed by token
position, so a block that sees a subset of the tokens needs the matching rows.

No routing code; ``torch.fx.symbolic_trace`` traces the whole model without example
inputs (the grid is a Python constant).
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import (
    LabelEmbedder,
    PatchEmbed,
    SizeLike,
    TimestepEmbedder,
    _pair,
    get_2d_sincos_pos_embed,
    modulate,
)

__all__ = [
    "RMSNorm",
    "SwiGLUFFN",
    "rotate_half",
    "apply_rotary",
    "rope_frequencies",
    "axial_rope_tables",
    "get_2d_rope_tables",
    "RoPEAttention",
    "RoPEDiTBlock",
    "RoPEFinalLayer",
    "RoPEDiT",
]

Rope = Tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------
# Norm / MLP
# ---------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """Root-mean-square norm over the last dimension (computed in float32)."""

    def __init__(self, dim: int, eps: float = 1e-6, elementwise_affine: bool = True):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if elementwise_affine else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        out = (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        if self.weight is not None:
            out = out * self.weight
        return out


class SwiGLUFFN(nn.Module):
    """SwiGLU feed-forward: w3(silu(x W1) * (x W2)), with W1 and W2 fused into ``w12``."""

    def __init__(self, in_features: int, hidden_features: int, out_features: Optional[int] = None):
        super().__init__()
        out_features = out_features or in_features
        self.w12 = nn.Linear(in_features, 2 * hidden_features, bias=True)
        self.w3 = nn.Linear(hidden_features, out_features, bias=True)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x1, x2 = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(x1) * x2)


# ---------------------------------------------------------------------------
# Rotary position embedding
# ---------------------------------------------------------------------------


def rotate_half(x: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved channel pairs by 90 degrees: (x0, x1) -> (-x1, x0)."""
    x = x.unflatten(-1, (-1, 2))
    x1, x2 = x[..., 0], x[..., 1]
    return torch.stack((-x2, x1), dim=-1).flatten(-2)


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate x [..., L, head_dim] by the angle tables cos/sin [L, head_dim].

    Channel pairs (2i, 2i+1) share one angle, so the rotation preserves the norm of every
    head vector. The result has x's dtype.
    """
    return (x * cos + rotate_half(x) * sin).type_as(x)


def rope_frequencies(axis_dim: int, theta: float = 10000.0) -> torch.Tensor:
    """The ``axis_dim // 2`` angular frequencies of one rotary axis (float64)."""
    if axis_dim % 2:
        raise ValueError(f"rotary axis dimension must be even, got {axis_dim}")
    return 1.0 / theta ** (torch.arange(0, axis_dim, 2, dtype=torch.float64) / axis_dim)


def axial_rope_tables(positions: torch.Tensor, omega: torch.Tensor) -> Rope:
    """cos/sin tables [M, A * 2F] for M positions on A axes.

    positions [M, A] (any float or int dtype), omega [F] frequencies per axis. The channels
    of axis a occupy the contiguous slice [a * 2F, (a + 1) * 2F), each frequency repeated for
    its interleaved channel pair.
    """
    angles = positions.float()[..., None] * omega.float()  # [M, A, F]
    angles = angles.repeat_interleave(2, dim=-1).flatten(-2)  # [M, A * 2F]
    return angles.cos(), angles.sin()


def get_2d_rope_tables(head_dim: int, grid_size: SizeLike, theta: float = 10000.0) -> Rope:
    """2-D axial rotary tables ``(cos, sin)``, each [gh * gw, head_dim] (float32).

    Tokens are row-major over the patch grid. The first half of the head channels rotates
    with the row index, the second half with the column index (EVA / LightningDiT layout).
    """
    if head_dim % 4:
        raise ValueError(f"2-D rotary embedding needs head_dim divisible by 4, got {head_dim}")
    gh, gw = _pair(grid_size)
    rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
    positions = torch.stack([rows.flatten(), cols.flatten()], dim=-1)  # [N, 2]
    return axial_rope_tables(positions, rope_frequencies(head_dim // 2, theta))


# ---------------------------------------------------------------------------
# Transformer components
# ---------------------------------------------------------------------------


class RoPEAttention(nn.Module):
    """Multi-head self-attention with rotary q/k and optional per-head RMSNorm on q/k."""

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, qk_norm: bool = False):
        super().__init__()
        if dim % num_heads != 0:
            raise ValueError(f"dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Optional[Rope] = None) -> torch.Tensor:
        """x [B, N, D]; rope = (cos, sin), each [N, head_dim]."""
        qkv = self.qkv(x).unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]  # [B, H, N, hd]
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            cos, sin = rope
            q = apply_rotary(q, cos, sin)
            k = apply_rotary(k, cos, sin)
        x = F.scaled_dot_product_attention(q, k, v)
        x = x.transpose(1, 2).flatten(2)
        return self.proj(x)


class RoPEDiTBlock(nn.Module):
    """adaLN-Zero block: RMSNorm, rotary attention, SwiGLU MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False):
        super().__init__()
        self.norm1 = RMSNorm(hidden_size, eps=1e-6)
        self.attn = RoPEAttention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm)
        self.norm2 = RMSNorm(hidden_size, eps=1e-6)
        # LightningDiT keeps the parameter count of a GELU MLP: 2/3 of the hidden width.
        self.mlp = SwiGLUFFN(hidden_size, int(2 / 3 * mlp_ratio * hidden_size))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor, rope: Optional[Rope] = None) -> torch.Tensor:
        """x [B, N, D] tokens, c [B, D] conditioning, rope = (cos, sin) each [N, head_dim]."""
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa), rope=rope)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class RoPEFinalLayer(nn.Module):
    """adaLN-modulated RMSNorm + Linear to per-patch pixels [B, N, p*p*C_out]."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int):
        super().__init__()
        self.norm_final = RMSNorm(hidden_size, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels, bias=True)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


# ---------------------------------------------------------------------------
# Model
# ---------------------------------------------------------------------------


class RoPEDiT(nn.Module):
    """Class-conditional DiT with 2-D RoPE, RMSNorm and SwiGLU (LightningDiT-style).

    ``forward(x, t, y)``: x [B, C, H, W], t [B], y [B] -> [B, out_channels, H, W] with
    ``out_channels = 2 * in_channels`` if ``learn_sigma`` else ``in_channels``.

    adaLN-Zero init: every block starts as the identity and the output as zero.
    """

    def __init__(
        self,
        input_size: SizeLike = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        class_dropout_prob: float = 0.1,
        num_classes: int = 1000,
        learn_sigma: bool = False,
        qk_norm: bool = False,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        self.input_size = _pair(input_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.num_classes = num_classes
        self.learn_sigma = learn_sigma
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads

        self.x_embedder = PatchEmbed(self.input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        num_patches = self.x_embedder.num_patches
        self.pos_embed = nn.Parameter(torch.zeros(1, num_patches, hidden_size), requires_grad=False)

        # Rotary tables for the fixed grid, shared by every block.
        freqs_cos, freqs_sin = get_2d_rope_tables(head_dim, self.x_embedder.grid_size, theta=rope_theta)
        self.register_buffer("freqs_cos", freqs_cos, persistent=False)  # [N, head_dim]
        self.register_buffer("freqs_sin", freqs_sin, persistent=False)  # [N, head_dim]

        self.blocks = nn.ModuleList(
            [RoPEDiTBlock(hidden_size, num_heads, mlp_ratio=mlp_ratio, qk_norm=qk_norm) for _ in range(depth)]
        )
        self.final_layer = RoPEFinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        self.pos_embed.data.copy_(get_2d_sincos_pos_embed(self.hidden_size, self.x_embedder.grid_size).unsqueeze(0))

        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)

        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)

        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].weight)
        nn.init.zeros_(self.final_layer.adaLN_modulation[-1].bias)
        nn.init.zeros_(self.final_layer.linear.weight)
        nn.init.zeros_(self.final_layer.linear.bias)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """[B, N, p*p*C] -> [B, C, H, W], using the grid fixed at construction."""
        c = self.out_channels
        p = self.patch_size
        h, w = self.x_embedder.grid_size
        x = x.reshape(-1, h, w, p, p, c)
        x = torch.einsum("nhwpqc->nchpwq", x)
        return x.reshape(-1, c, h * p, w * p)

    def forward(self, x: torch.Tensor, t: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x) + self.pos_embed  # [B, N, D]
        c = self.t_embedder(t) + self.y_embedder(y, self.training)  # [B, D]
        rope = (self.freqs_cos, self.freqs_sin)  # one tuple, handed to every block
        for block in self.blocks:
            x = block(x, c, rope=rope)
        x = self.final_layer(x, c)
        return self.unpatchify(x)
