"""Reference MMDiT backbone (SD3 / Flux-style joint attention over text and image tokens).

Two token streams run side by side through every block: image tokens ``x [B, N, D]`` and
text tokens ``context [B, T, D]``. Each :class:`JointBlock` holds separate weights for the
two streams (adaLN modulation, qkv, output projection, MLP), concatenates their q/k/v
along the token axis as ``[text, image]``, runs one attention over the ``T + N`` tokens,
splits the result back at ``T`` and finishes each stream with its own weights. It returns
``(context, x)``, text first, as SD3 does.

Positions are rotary only (Flux-style, no absolute embedding): one 2-axis RoPE table of
``T + N`` rows, text rows first, is built in ``forward`` and handed to every block as
``rope=(cos, sin)`` (each ``[T + N, head_dim]``). Text tokens sit at position (0, 0),
i.e. they are not rotated; image tokens at their (row, column) on the patch grid. The text
length T is read from the ``context`` input and may differ from N.

Conditioning ``c [B, D]`` is the timestep embedding plus an MLP of the pooled text vector.
adaLN-Zero init: blocks start as the identity, the output at zero.

No routing code; ``torch.fx.symbolic_trace`` traces the whole model without example
inputs.
"""

from __future__ import annotations

from typing import Optional, Tuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import FinalLayer, Mlp, PatchEmbed, SizeLike, TimestepEmbedder, _pair, modulate
from .rope_dit import RMSNorm, apply_rotary, axial_rope_tables, rope_frequencies

__all__ = ["AxialRoPE", "StreamBlock", "JointBlock", "MMDiT"]

Rope = Tuple[torch.Tensor, torch.Tensor]


class AxialRoPE(nn.Module):
    """Positions ``ids [M, axes]`` -> rotary tables ``(cos, sin)``, each [M, head_dim].

    ``head_dim`` is split evenly over the axes (Flux's ``EmbedND`` with equal axis dims).
    """

    def __init__(self, head_dim: int, num_axes: int = 2, theta: float = 10000.0):
        super().__init__()
        if head_dim % (2 * num_axes):
            raise ValueError(f"head_dim {head_dim} must be divisible by 2 * num_axes = {2 * num_axes}")
        self.num_axes = num_axes
        self.register_buffer("omega", rope_frequencies(head_dim // num_axes, theta).float(), persistent=False)

    def forward(self, ids: torch.Tensor) -> Rope:
        return axial_rope_tables(ids, self.omega)


class StreamBlock(nn.Module):
    """One stream's weights in a joint block (SD3's "dismantled" block).

    ``pre_attention`` produces this stream's q/k/v; ``post_attention`` applies the output
    projection, the gated residual and the MLP. With ``pre_only`` (SD3's last context
    block) the stream only contributes keys and values and has no output.
    """

    def __init__(
        self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = True, pre_only: bool = False
    ):
        super().__init__()
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.head_dim = hidden_size // num_heads
        self.pre_only = pre_only
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(hidden_size, 3 * hidden_size, bias=True)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else nn.Identity()
        if not pre_only:
            self.proj = nn.Linear(hidden_size, hidden_size)
            self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
            self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio))
        n_mod = 2 if pre_only else 6
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, n_mod * hidden_size, bias=True))

    def pre_attention(self, x: torch.Tensor, c: torch.Tensor):
        """x [B, L, D], c [B, D] -> ((q, k, v) each [B, H, L, hd], modulation for post_attention)."""
        if self.pre_only:
            shift_msa, scale_msa = self.adaLN_modulation(c).chunk(2, dim=1)
            mods = None
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            mods = (gate_msa, shift_mlp, scale_mlp, gate_mlp)
        qkv = self.qkv(modulate(self.norm1(x), shift_msa, scale_msa))
        qkv = qkv.unflatten(-1, (3, self.num_heads, self.head_dim)).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        return (self.q_norm(q), self.k_norm(k), v), mods

    def post_attention(self, attn: torch.Tensor, x: torch.Tensor, mods) -> torch.Tensor:
        """attn [B, L, D] (this stream's rows of the joint attention), x [B, L, D] residual."""
        gate_msa, shift_mlp, scale_mlp, gate_mlp = mods
        x = x + gate_msa.unsqueeze(1) * self.proj(attn)
        x = x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))
        return x


class JointBlock(nn.Module):
    """Joint text-image attention block with separate weights per stream."""

    def __init__(
        self,
        hidden_size: int,
        num_heads: int,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        context_pre_only: bool = False,
    ):
        super().__init__()
        self.context_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm, pre_only=context_pre_only)
        self.x_block = StreamBlock(hidden_size, num_heads, mlp_ratio, qk_norm)

    def forward(
        self, x: torch.Tensor, context: torch.Tensor, c: torch.Tensor, rope: Rope
    ) -> Tuple[Optional[torch.Tensor], torch.Tensor]:
        """x [B, N, D] image tokens, context [B, T, D] text tokens, c [B, D],
        rope = (cos, sin) each [T + N, head_dim], text rows first.

        Returns ``(context, x)``; ``context`` is None for a ``context_pre_only`` block.
        """
        (cq, ck, cv), c_mods = self.context_block.pre_attention(context, c)
        (xq, xk, xv), x_mods = self.x_block.pre_attention(x, c)

        q = torch.cat([cq, xq], dim=2)  # [B, H, T + N, hd]
        k = torch.cat([ck, xk], dim=2)
        v = torch.cat([cv, xv], dim=2)
        cos, sin = rope
        q = apply_rotary(q, cos, sin)
        k = apply_rotary(k, cos, sin)
        out = F.scaled_dot_product_attention(q, k, v)
        out = out.transpose(1, 2).flatten(2)  # [B, T + N, D]

        text_len = context.shape[1]
        context_attn, x_attn = out[:, :text_len], out[:, text_len:]

        if self.context_block.pre_only:
            context = None
        else:
            context = self.context_block.post_attention(context_attn, context, c_mods)
        x = self.x_block.post_attention(x_attn, x, x_mods)
        return context, x


class MMDiT(nn.Module):
    """Text-conditional MMDiT.

    ``forward(x, t, context, pooled)``: x [B, C, H, W] latents, t [B] timesteps,
    context [B, T, context_dim] text token features, pooled [B, pooled_dim] pooled text
    vector; returns [B, out_channels, H, W].

    ``context_pre_only_last=True`` makes the last block's text stream key/value-only (as in
    SD3), so no parameter is left without a gradient; by default every block is fully
    joint and the last block's text output is simply unused.
    """

    def __init__(
        self,
        input_size: SizeLike = 32,
        patch_size: int = 2,
        in_channels: int = 16,
        hidden_size: int = 1536,
        depth: int = 24,
        num_heads: int = 24,
        mlp_ratio: float = 4.0,
        context_dim: int = 4096,
        pooled_dim: int = 2048,
        learn_sigma: bool = False,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        context_pre_only_last: bool = False,
    ):
        super().__init__()
        self.input_size = _pair(input_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_heads = num_heads
        self.context_dim = context_dim
        self.pooled_dim = pooled_dim
        if hidden_size % num_heads:
            raise ValueError(f"hidden_size {hidden_size} is not divisible by num_heads {num_heads}")
        head_dim = hidden_size // num_heads

        self.x_embedder = PatchEmbed(self.input_size, patch_size, in_channels, hidden_size, bias=True)
        self.context_embedder = nn.Linear(context_dim, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = nn.Sequential(
            nn.Linear(pooled_dim, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.pe_embedder = AxialRoPE(head_dim, num_axes=2, theta=rope_theta)

        gh, gw = self.x_embedder.grid_size
        rows, cols = torch.meshgrid(torch.arange(gh), torch.arange(gw), indexing="ij")
        img_ids = torch.stack([rows.flatten(), cols.flatten()], dim=-1).float()  # [N, 2]
        self.register_buffer("img_ids", img_ids, persistent=False)

        self.joint_blocks = nn.ModuleList(
            [
                JointBlock(
                    hidden_size,
                    num_heads,
                    mlp_ratio=mlp_ratio,
                    qk_norm=qk_norm,
                    context_pre_only=context_pre_only_last and i == depth - 1,
                )
                for i in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
        def _basic_init(module: nn.Module) -> None:
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                if module.bias is not None:
                    nn.init.zeros_(module.bias)

        self.apply(_basic_init)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        nn.init.normal_(self.y_embedder[0].weight, std=0.02)
        nn.init.normal_(self.y_embedder[2].weight, std=0.02)

        for block in self.joint_blocks:
            for stream in (block.context_block, block.x_block):
                nn.init.zeros_(stream.adaLN_modulation[-1].weight)
                nn.init.zeros_(stream.adaLN_modulation[-1].bias)
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

    def forward(self, x: torch.Tensor, t: torch.Tensor, context: torch.Tensor, pooled: torch.Tensor) -> torch.Tensor:
        x = self.x_embedder(x)  # [B, N, D]
        context = self.context_embedder(context)  # [B, T, D]
        c = self.t_embedder(t) + self.y_embedder(pooled)  # [B, D]

        # Flux-style position ids: every text token at (0, 0), image tokens at (row, col).
        txt_ids = self.img_ids.new_zeros((context.shape[1], 2))  # [T, 2]
        rope = self.pe_embedder(torch.cat([txt_ids, self.img_ids], dim=0))  # (cos, sin) [T + N, hd]

        for block in self.joint_blocks:
            context, x = block(x, context, c, rope=rope)
        x = self.final_layer(x, c)  # [B, N, p*p*C_out]
        return self.unpatchify(x)
