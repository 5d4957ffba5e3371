"""DDT (Wang et al. 2025, "DDT: Decoupled Diffusion Transformer"), our implementation of the
published architecture (formulas and key layout of MCG-NJU/DDT's decoupled_improved_dit.py).

An encoder of `encoder_depth` blocks turns the noisy latent into a condition stream s (adaLN on
c = silu(t_emb + y_emb)); a decoder of the remaining blocks denoises the x stream with adaLN
conditioned per token on silu(t_emb + s). Blocks use RMSNorm, qk-RMSNorm, 2-D RoPE and SwiGLU.
State-dict keys equal upstream's (x_embedder.proj, s_embedder.proj, t_embedder.mlp,
y_embedder.embedding_table, blocks.N.{norm1,attn,norm2,mlp,adaLN_modulation.0}, final_layer).
The encoder's output silu(t_emb + s) is computed through `sharing.shared_encoder`, so a sampler
may reuse it across adjacent steps (the paper's encoder sharing; upstream `state_refresh_rate`).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..sharing import shared_encoder
from .blocks import LabelEmbedder, TimestepEmbedder
from .layers import RMSNorm

TIME_MAX_PERIOD = 10.0  # DDT's sinusoidal time features use max_period 10, not DiT's 10000
ROPE_THETA = 10000.0
ROPE_SPAN = 16.0  # RoPE positions are linspace(0, 16, side) whatever the grid side


def modulate_tokens(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN x (1 + scale) + shift with shift/scale [B, 1 or N, D] (per sample or per token)."""
    return x * (1 + scale) + shift


def rope_angles(head_dim: int, height: int, width: int, device: torch.device | None = None) -> Tensor:
    """2-D RoPE angles [H*W, head_dim/2] for adjacent channel pairs (2k, 2k+1).

    Pair 2j rotates by x * w_j and pair 2j+1 by y * w_j, w_j = theta^(-4j / head_dim), with the
    token's column x in linspace(0, 16, W) and row y in linspace(0, 16, H) (row-major tokens).
    """
    xs = torch.linspace(0, ROPE_SPAN, width, device=device)
    ys = torch.linspace(0, ROPE_SPAN, height, device=device)
    grid_y, grid_x = torch.meshgrid(ys, xs, indexing="ij")
    freqs = 1.0 / ROPE_THETA ** (torch.arange(0, head_dim, 4, device=device)[: head_dim // 4].float() / head_dim)
    angles = torch.stack([torch.outer(grid_x.reshape(-1), freqs), torch.outer(grid_y.reshape(-1), freqs)], dim=-1)
    return angles.reshape(height * width, -1)


def apply_rope(x: Tensor, angles: Tensor) -> Tensor:
    """Rotate adjacent pairs (a, b) of x [B, N, heads, head_dim] by angles [N, head_dim/2] (float32)."""
    pairs = x.float().reshape(*x.shape[:-1], -1, 2)
    a, b = pairs.unbind(-1)
    cos, sin = angles.cos()[:, None], angles.sin()[:, None]
    return torch.stack([a * cos - b * sin, a * sin + b * cos], dim=-1).flatten(-2).type_as(x)


class RoPEAttention(nn.Module):
    """Self-attention with bias-free qkv, RMSNorm on q and k per head, then 2-D RoPE."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim, bias=False)
        self.q_norm = RMSNorm(self.head_dim)
        self.k_norm = RMSNorm(self.head_dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, angles: Tensor) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, self.head_dim).unbind(2)
        q = apply_rope(self.q_norm(q), angles)
        k = apply_rope(self.k_norm(k), angles)
        out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class SwiGLU(nn.Module):
    """w2(silu(w1 x) * w3 x), no biases (hidden = int(2/3 * mlp_ratio * dim) in DDT)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w1 = nn.Linear(dim, hidden, bias=False)
        self.w3 = nn.Linear(dim, hidden, bias=False)
        self.w2 = nn.Linear(hidden, dim, bias=False)

    def forward(self, x: Tensor) -> Tensor:
        return self.w2(F.silu(self.w1(x)) * self.w3(x))


class DDTBlock(nn.Module):
    """adaLN block (RMSNorm, RoPE attention, SwiGLU); the condition c is [B, 1 or N, D]."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int) -> None:
        super().__init__()
        self.norm1 = RMSNorm(hidden_size)
        self.attn = RoPEAttention(hidden_size, num_heads)
        self.norm2 = RMSNorm(hidden_size)
        self.mlp = SwiGLU(hidden_size, mlp_hidden)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor, angles: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=-1)
        x = x + gate_msa * self.attn(modulate_tokens(self.norm1(x), shift_msa, scale_msa), angles)
        return x + gate_mlp * self.mlp(modulate_tokens(self.norm2(x), shift_mlp, scale_mlp))


class DDTFinalLayer(nn.Module):
    """LayerNorm (no affine) modulated per token by s, then a linear map to patch values."""

    def __init__(self, hidden_size: int, patch_values: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_values)
        self.adaLN_modulation = nn.Sequential(nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=-1)
        return self.linear(modulate_tokens(self.norm_final(x), shift, scale))


class PatchLinear(nn.Module):
    """Linear embedding of unfolded patches (key `proj`): C*p*p values per token -> hidden."""

    def __init__(self, patch_values: int, hidden_size: int) -> None:
        super().__init__()
        self.proj = nn.Linear(patch_values, hidden_size)

    def forward(self, tokens: Tensor) -> Tensor:
        return self.proj(tokens)


class DDT(nn.Module):
    """Class-conditional DDT: F = net(x_t, t, y) on [B, C, H, W] latents of any H, W divisible by p.

    t is raw in [0, 1] (t=0 noise, t=1 data); y == num_classes is the null class.
    """

    shares_encoder = True  # the condition stream s may be reused across sampler steps (see `sharing`)

    def __init__(
        self,
        in_channels: int = 4,
        patch_size: int = 2,
        hidden_size: int = 1152,
        depth: int = 28,
        encoder_depth: int = 22,
        num_heads: int = 16,
        mlp_hidden: int = 3072,
        num_classes: int = 1000,
    ) -> None:
        super().__init__()
        if not 0 <= encoder_depth <= depth:
            raise ValueError(f"encoder_depth must be in [0, depth={depth}], got {encoder_depth}")
        if hidden_size % num_heads or (hidden_size // num_heads) % 4:
            raise ValueError(f"hidden_size {hidden_size} / num_heads {num_heads} must be a multiple of 4 "
                             "(2-D RoPE rotates pairs per axis)")
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.hidden_size = hidden_size
        self.encoder_depth = encoder_depth
        self.num_heads = num_heads
        self.num_classes = num_classes
        patch_values = in_channels * patch_size * patch_size
        self.x_embedder = PatchLinear(patch_values, hidden_size)
        self.s_embedder = PatchLinear(patch_values, hidden_size)
        self.t_embedder = TimestepEmbedder(hidden_size, max_period=TIME_MAX_PERIOD)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        self.blocks = nn.ModuleList(DDTBlock(hidden_size, num_heads, mlp_hidden) for _ in range(depth))
        self.final_layer = DDTFinalLayer(hidden_size, patch_values)

    def encode(self, tokens: Tensor, t_emb: Tensor, y: Tensor, angles: Tensor) -> Tensor:
        """The decoder's condition silu(t_emb + enc(tokens)), the encoder adaLN-conditioned on silu(t_emb + y_emb)."""
        c = F.silu(t_emb + self.y_embedder(y).unsqueeze(1))
        s = self.s_embedder(tokens)
        for block in self.blocks[: self.encoder_depth]:
            s = block(s, c, angles)
        return F.silu(t_emb + s)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        p = self.patch_size
        angles = rope_angles(self.hidden_size // self.num_heads, height // p, width // p, x.device)
        # tokens row-major over the (H/p, W/p) grid, values ordered (C, p, p) as torch's unfold
        tokens = F.unfold(x, kernel_size=p, stride=p).transpose(1, 2)
        t_emb = self.t_embedder(t.reshape(-1)).unsqueeze(1)
        s = shared_encoder(self, x.shape[0], lambda: self.encode(tokens, t_emb, y, angles))
        h = self.x_embedder(tokens)
        for block in self.blocks[self.encoder_depth:]:
            h = block(h, s, angles)
        h = self.final_layer(h, s)
        return F.fold(h.transpose(1, 2), (height, width), kernel_size=p, stride=p)
