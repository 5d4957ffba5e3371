"""LightningDiT (Yao et al. 2025, "Reconstruction vs. Generation"), a DiT with optional modern parts.

Each part is a switch, as in the released code: RMSNorm instead of LayerNorm, SwiGLU instead of
the GELU MLP, axial 2-D RoPE on queries and keys (on top of the absolute sin-cos table), q/k
normalisation, and adaLN without shifts. State-dict keys equal upstream's (x_embedder.proj,
pos_embed, feat_rope.freqs_{cos,sin}, blocks.N.{norm1,norm2,attn,mlp,adaLN_modulation},
final_layer) so released weights load as-is.
"""

from __future__ import annotations

import torch.nn.functional as F
from timm.layers import Mlp, PatchEmbed
from torch import Tensor, nn

from .blocks import FinalLayer, LabelEmbedder, TimestepEmbedder, modulate, sincos_2d, unpatchify
from .layers import RMSNorm, rope_2d_axial, rotate_pairs


def _norm(dim: int, rmsnorm: bool, norm_weights: bool = True) -> nn.Module:
    """RMSNorm (with a learnt weight unless norm_weights is False), or LayerNorm without affine parameters
    (eps 1e-6 both)."""
    return RMSNorm(dim, affine=norm_weights) if rmsnorm else nn.LayerNorm(dim, elementwise_affine=False, eps=1e-6)


class AxialRoPE(nn.Module):
    """The RoPE tables as persistent buffers (upstream's `feat_rope`, saved in every checkpoint)."""

    def __init__(self, head_dim: int, grid: int) -> None:
        super().__init__()
        cos, sin = rope_2d_axial(head_dim, grid)
        self.register_buffer("freqs_cos", cos)
        self.register_buffer("freqs_sin", sin)

    def forward(self, x: Tensor) -> Tensor:
        return rotate_pairs(x, self.freqs_cos, self.freqs_sin)


class SwiGLU(nn.Module):
    """w3(silu(a) * b) with [a, b] = w12(x) (both halves from one fused linear, with biases)."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.w12 = nn.Linear(dim, 2 * hidden)
        self.w3 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        a, b = self.w12(x).chunk(2, dim=-1)
        return self.w3(F.silu(a) * b)


class RoPEAttention(nn.Module):
    """Multi-head self-attention (SDPA); optional q/k norm per head, then RoPE on q and k."""

    def __init__(self, dim: int, num_heads: int, qk_norm: bool, rmsnorm: bool, norm_weights: bool = True) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"hidden size {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        head_dim = dim // num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        # Upstream: RMSNorm(head_dim) with use_rmsnorm, else an affine nn.LayerNorm (eps 1e-5).
        make_norm = (lambda: RMSNorm(head_dim, affine=norm_weights)) if rmsnorm else (lambda: nn.LayerNorm(head_dim))
        self.q_norm = make_norm() if qk_norm else nn.Identity()
        self.k_norm = make_norm() if qk_norm else nn.Identity()
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: Tensor, rope: AxialRoPE | None) -> Tensor:
        b, n, d = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.num_heads, d // self.num_heads).permute(2, 0, 3, 1, 4)
        q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = rope(q), rope(k)
        out = F.scaled_dot_product_attention(q, k, v)
        return self.proj(out.transpose(1, 2).reshape(b, n, d))


class LightningDiTBlock(nn.Module):
    """adaLN-Zero block: x += g1 attn(mod(norm1 x)); x += g2 mlp(mod(norm2 x)); no shifts if wo_shift."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_hidden: int, qk_norm: bool, swiglu: bool,
                 rmsnorm: bool, wo_shift: bool, norm_weights: bool = True) -> None:
        super().__init__()
        self.norm1 = _norm(hidden_size, rmsnorm, norm_weights)
        self.attn = RoPEAttention(hidden_size, num_heads, qk_norm, rmsnorm, norm_weights)
        self.norm2 = _norm(hidden_size, rmsnorm, norm_weights)
        self.mlp = (SwiGLU(hidden_size, mlp_hidden) if swiglu else
                    Mlp(hidden_size, mlp_hidden, act_layer=lambda: nn.GELU(approximate="tanh")))
        self.wo_shift = wo_shift
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, (4 if wo_shift else 6) * hidden_size))

    def forward(self, x: Tensor, c: Tensor, rope: AxialRoPE | None) -> Tensor:
        if self.wo_shift:
            scale_msa, gate_msa, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(4, dim=1)
            h = self.norm1(x) * (1 + scale_msa.unsqueeze(1))
        else:
            shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
            h = modulate(self.norm1(x), shift_msa, scale_msa)
        x = x + gate_msa.unsqueeze(1) * self.attn(h, rope)
        h = self.norm2(x)
        h = h * (1 + scale_mlp.unsqueeze(1)) if self.wo_shift else modulate(h, shift_mlp, scale_mlp)
        return x + gate_mlp.unsqueeze(1) * self.mlp(h)


class LightningDiT(nn.Module):
    """Class-conditional LightningDiT: F = net(x_t, t, y) = data - noise (t = 0 noise, t = 1 data).

    `mlp_hidden` is the MLP width itself (SwiGLU: int(2/3 * 4 D) upstream), so any checkpoint's
    shapes rebuild exactly. With learn_sigma the net has 2C outputs and returns the first C.
    `norm_weights=False` makes every RMSNorm parameter-free: UCGM's TiT (networks/tit.py) is this network
    with use_qknorm and weightless RMSNorms.
    class_dropout_prob: in train mode labels are dropped to the null class with this probability
    (upstream's and the UCGM reference's default 0.1); eval mode is unaffected.
    """

    def __init__(
        self,
        input_size: int = 16,
        patch_size: int = 1,
        in_channels: int = 32,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_hidden: int = 3072,
        num_classes: int = 1000,
        use_qknorm: bool = False,
        use_swiglu: bool = True,
        use_rope: bool = True,
        use_rmsnorm: bool = True,
        wo_shift: bool = False,
        learn_sigma: bool = False,
        norm_weights: bool = True,
        class_dropout_prob: float = 0.1,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = 2 * in_channels if learn_sigma else in_channels
        self.patch_size = patch_size
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size, class_dropout_prob)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, grid).unsqueeze(0), requires_grad=False)
        self.feat_rope = AxialRoPE(hidden_size // num_heads, grid) if use_rope else None
        self.blocks = nn.ModuleList(
            LightningDiTBlock(hidden_size, num_heads, mlp_hidden, use_qknorm, use_swiglu, use_rmsnorm, wo_shift,
                              norm_weights)
            for _ in range(depth)
        )
        self.final_layer = FinalLayer(hidden_size, patch_size, self.out_channels)
        if use_rmsnorm:  # upstream's final norm is an RMSNorm (key final_layer.norm_final.weight)
            self.final_layer.norm_final = RMSNorm(hidden_size, affine=norm_weights)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        height, width = x.shape[-2:]
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c, self.feat_rope)
        out = unpatchify(self.final_layer(h, c), self.out_channels, self.patch_size, height, width)
        return out[:, : self.in_channels]
