"""Reference bidirectional state-space diffusion backbone (DiM / ZigMa-style), pure PyTorch.

The DiT skeleton (patchify, sin-cos position embedding, timestep + class conditioning,
adaLN-Zero, final layer, unpatchify) with attention replaced by a bidirectional
Mamba-style selective state-space mixer. Each :class:`SSMBlock`:

    h = modulate(LayerNorm(x), shift, scale)                      # adaLN from c
    u, z = in_proj(h).chunk(2)                                    # [B, L, E] each
    y = scan_fwd(u) + flip(scan_bwd(flip(u)))                     # two directions
    x = x + gate * out_proj(y * silu(z))

where one direction is a depthwise causal Conv1d over tokens, SiLU, input-dependent
(selective) ``delta``, ``B``, ``C``, a diagonal ``A`` and the selective scan

    h_t = exp(delta_t * A) * h_{t-1} + delta_t * B_t * u_t,      y_t = C_t . h_t + D * u_t.

The token ORDER matters: each output token depends on the tokens before it (forward scan)
and after it (backward scan), and reordering tokens changes the result.

:func:`selective_scan` evaluates the recurrence without a Python loop over tokens: the
sequence is cut into chunks; inside a chunk the decays are ``exp`` of masked segment sums
(quadratic in the chunk size), and the states carried between chunks are combined the
same way across chunks (as in Mamba-2's SSD "minimal" form, here with a per-channel,
per-state decay). It is exact up to float rounding, works for any token count (it pads to
a chunk multiple) and traces with ``torch.fx``. Everything is computed in float32.
"""

from __future__ import annotations

import math
from typing import Optional

import torch
import torch.nn as nn
import torch.nn.functional as F

from .dit import (
    FinalLayer,
    LabelEmbedder,
    PatchEmbed,
    SizeLike,
    TimestepEmbedder,
    _pair,
    get_2d_sincos_pos_embed,
    modulate,
)

__all__ = ["selective_scan", "SelectiveSSM", "BiMamba", "SSMBlock", "SSMDiT"]


def _segsum(x: torch.Tensor) -> torch.Tensor:
    """x [..., T] -> [..., T, T] with out[..., i, j] = sum_{j < k <= i} x[..., k] for j <= i, -inf above.

    ``exp`` of it is the lower-triangular decay matrix from step j to step i.
    """
    cs = torch.cumsum(x, dim=-1)
    out = cs.unsqueeze(-1) - cs.unsqueeze(-2)
    n = x.size(-1)
    causal = x.new_ones((n, n), dtype=torch.bool).tril()
    return out.masked_fill(~causal, float("-inf"))


def selective_scan(
    u: torch.Tensor,
    delta: torch.Tensor,
    A: torch.Tensor,
    B: torch.Tensor,
    C: torch.Tensor,
    D: Optional[torch.Tensor] = None,
    chunk_size: int = 16,
) -> torch.Tensor:
    """Selective scan (Mamba's S6 recurrence) over the token axis.

    u, delta [b, l, d]; A [d, n] (negative); B, C [b, l, n]; D [d] or None.
    Returns y [b, l, d] in u's dtype, with the zero initial state::

        h_t = exp(delta_t[:, None] * A) * h_{t-1} + (delta_t * u_t)[:, None] * B_t[None, :]
        y_t = h_t @ C_t + D * u_t
    """
    out_dtype = u.dtype
    u, delta, A, B, C = u.float(), delta.float(), A.float(), B.float(), C.float()
    length = u.size(1)
    q = chunk_size
    pad = (-length) % q  # zero log-decay and zero input after the end leave earlier steps untouched

    log_decay = delta.unsqueeze(-1) * A  # [b, l, d, n]
    inputs = (delta * u).unsqueeze(-1) * B.unsqueeze(2)  # [b, l, d, n]
    log_decay = F.pad(log_decay, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, q)).permute(0, 1, 3, 4, 2)  # [b, c, d, n, q]
    inputs = F.pad(inputs, (0, 0, 0, 0, 0, pad)).unflatten(1, (-1, q)).permute(0, 1, 3, 4, 2)  # [b, c, d, n, q]
    C = F.pad(C, (0, 0, 0, pad)).unflatten(1, (-1, q)).transpose(2, 3).unsqueeze(2)  # [b, c, 1, n, q]

    # 1. States inside each chunk, from the chunk's own inputs only.
    states = (torch.exp(_segsum(log_decay)) * inputs.unsqueeze(-2)).sum(-1)  # [b, c, d, n, q]

    # 2. State entering each chunk: combine the chunks' final states with the chunk decays.
    decay_in_chunk = torch.cumsum(log_decay, dim=-1)  # [b, c, d, n, q]
    chunk_decay = decay_in_chunk[..., -1].movedim(1, -1)  # [b, d, n, c]
    chunk_final = states[..., -1].movedim(1, -1)  # [b, d, n, c]
    across = torch.exp(_segsum(F.pad(chunk_decay, (1, 0))))  # [b, d, n, c + 1, c + 1]
    carried = (across * F.pad(chunk_final, (1, 0)).unsqueeze(-2)).sum(-1)  # [b, d, n, c + 1]
    entering = carried[..., :-1].movedim(-1, 1).unsqueeze(-1)  # [b, c, d, n, 1]

    # 3. Full states, read out with C.
    states = states + torch.exp(decay_in_chunk) * entering  # [b, c, d, n, q]
    y = (states * C).sum(3)  # [b, c, d, q]
    y = y.transpose(2, 3).flatten(1, 2)[:, :length]  # [b, l, d]
    if D is not None:
        y = y + u * D.float()
    return y.to(out_dtype)


class SelectiveSSM(nn.Module):
    """One scan direction: depthwise causal Conv1d, SiLU, selective parameters, scan."""

    def __init__(
        self,
        d_inner: int,
        d_state: int = 16,
        d_conv: int = 4,
        dt_rank: Optional[int] = None,
        dt_min: float = 1e-3,
        dt_max: float = 0.1,
        chunk_size: int = 16,
    ):
        super().__init__()
        self.d_inner = d_inner
        self.d_state = d_state
        self.d_conv = d_conv
        self.dt_rank = dt_rank or math.ceil(d_inner / 32)
        self.chunk_size = chunk_size

        self.conv1d = nn.Conv1d(d_inner, d_inner, kernel_size=d_conv, groups=d_inner, bias=True)
        self.x_proj = nn.Linear(d_inner, self.dt_rank + 2 * d_state, bias=False)
        self.dt_proj = nn.Linear(self.dt_rank, d_inner, bias=True)

        # Mamba init: dt_proj bias so that softplus(bias) is log-uniform in [dt_min, dt_max].
        nn.init.uniform_(self.dt_proj.weight, -self.dt_rank**-0.5, self.dt_rank**-0.5)
        dt = torch.exp(torch.rand(d_inner) * (math.log(dt_max) - math.log(dt_min)) + math.log(dt_min))
        with torch.no_grad():
            self.dt_proj.bias.copy_(dt + torch.log(-torch.expm1(-dt)))  # inverse softplus
        # S4D-real init: A[:, i] = -(i + 1).
        A = torch.arange(1, d_state + 1, dtype=torch.float32).repeat(d_inner, 1)
        self.A_log = nn.Parameter(torch.log(A))  # [d_inner, d_state]
        self.D = nn.Parameter(torch.ones(d_inner))

    def forward(self, u: torch.Tensor) -> torch.Tensor:
        """u [B, L, E] -> [B, L, E]; token t sees tokens 0..t only."""
        u = self.conv1d(F.pad(u.transpose(1, 2), (self.d_conv - 1, 0))).transpose(1, 2)  # causal
        u = F.silu(u)
        dt, B, C = self.x_proj(u).split([self.dt_rank, self.d_state, self.d_state], dim=-1)
        delta = F.softplus(self.dt_proj(dt))  # [B, L, E]
        A = -torch.exp(self.A_log.float())  # [E, N]
        return selective_scan(u, delta, A, B, C, self.D, chunk_size=self.chunk_size)


class BiMamba(nn.Module):
    """Bidirectional Mamba mixer: shared in/out projections, one SSM per direction."""

    def __init__(self, d_model: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, chunk_size: int = 16):
        super().__init__()
        d_inner = expand * d_model
        self.in_proj = nn.Linear(d_model, 2 * d_inner, bias=False)
        self.ssm_fwd = SelectiveSSM(d_inner, d_state, d_conv, chunk_size=chunk_size)
        self.ssm_bwd = SelectiveSSM(d_inner, d_state, d_conv, chunk_size=chunk_size)
        self.out_proj = nn.Linear(d_inner, d_model, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        u, z = self.in_proj(x).chunk(2, dim=-1)  # [B, L, E] each
        y = self.ssm_fwd(u) + self.ssm_bwd(u.flip(1)).flip(1)
        return self.out_proj(y * F.silu(z))


class SSMBlock(nn.Module):
    """adaLN-Zero residual block around a bidirectional selective SSM."""

    def __init__(self, hidden_size: int, d_state: int = 16, d_conv: int = 4, expand: int = 2, chunk_size: int = 16):
        super().__init__()
        self.norm = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mixer = BiMamba(hidden_size, d_state=d_state, d_conv=d_conv, expand=expand, chunk_size=chunk_size)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 3 * hidden_size, bias=True))

    def forward(self, x: torch.Tensor, c: torch.Tensor) -> torch.Tensor:
        """x [B, N, D] tokens in grid order, c [B, D] conditioning."""
        shift, scale, gate = self.adaLN_modulation(c).chunk(3, dim=1)
        return x + gate.unsqueeze(1) * self.mixer(modulate(self.norm(x), shift, scale))


class SSMDiT(nn.Module):
    """Class-conditional diffusion backbone built from bidirectional SSM blocks.

    ``forward(x, t, y)``: x [B, C, H, W], t [B], y [B] -> [B, out_channels, H, W].
    Tokens are scanned in row-major patch order. adaLN-Zero init (identity blocks, zero
    output).
    """

    def __init__(
        self,
        input_size: SizeLike = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 768,
        depth: int = 24,
        d_state: int = 16,
        num_classes: int = 1000,
        class_dropout_prob: float = 0.1,
        learn_sigma: bool = True,
        d_conv: int = 4,
        expand: int = 2,
        chunk_size: int = 16,
    ):
        super().__init__()
        self.input_size = _pair(input_size)
        self.patch_size = patch_size
        self.in_channels = in_channels
        self.out_channels = in_channels * 2 if learn_sigma else in_channels
        self.hidden_size = hidden_size
        self.num_classes = num_classes

        self.x_embedder = PatchEmbed(self.input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        self.pos_embed = nn.Parameter(torch.zeros(1, self.x_embedder.num_patches, hidden_size), requires_grad=False)
        self.blocks = nn.ModuleList(
            [
                SSMBlock(hidden_size, d_state=d_state, d_conv=d_conv, expand=expand, chunk_size=chunk_size)
                for _ in range(depth)
            ]
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        self.initialize_weights()

    def initialize_weights(self) -> None:
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
        for block in self.blocks:
            x = block(x, c)
        x = self.final_layer(x, c)
        return self.unpatchify(x)
