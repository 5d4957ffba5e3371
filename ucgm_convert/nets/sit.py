"""SiT (Ma et al. 2024) = DiT (Peebles & Xie 2023): the transformer of REPA-E, REPA, SiT, DiT and our demo.

State-dict keys equal upstream's (x_embedder.proj, t_embedder.mlp, y_embedder.embedding_table,
pos_embed, blocks.N.{attn,mlp,adaLN_modulation}, final_layer) so released weights load as-is.
`learn_sigma`: the final layer has 2C output channels (DiT's learned variance); the second half is
dropped, as SiT's forward does. The time is embedded as given (the model passes transport.network_time).
"""

from __future__ import annotations

from timm.layers import Attention, Mlp, PatchEmbed
from torch import Tensor, nn

from .blocks import FinalLayer, LabelEmbedder, TimestepEmbedder, modulate, sincos_2d, unpatchify


class SiTBlock(nn.Module):
    """Transformer block with adaLN-Zero conditioning: attention and a GELU(tanh) MLP."""

    def __init__(self, hidden_size: int, num_heads: int, mlp_ratio: float = 4.0, qk_norm: bool = False) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        # q/k norm = LayerNorm(head_dim), the default of timm 1.0.11 that upstream pins (newer timm has none).
        self.attn = Attention(hidden_size, num_heads=num_heads, qkv_bias=True, qk_norm=qk_norm, norm_layer=nn.LayerNorm)
        self.norm2 = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.mlp = Mlp(hidden_size, int(hidden_size * mlp_ratio), act_layer=lambda: nn.GELU(approximate="tanh"))
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 6 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = self.adaLN_modulation(c).chunk(6, dim=1)
        x = x + gate_msa.unsqueeze(1) * self.attn(modulate(self.norm1(x), shift_msa, scale_msa))
        return x + gate_mlp.unsqueeze(1) * self.mlp(modulate(self.norm2(x), shift_mlp, scale_mlp))


class SiT(nn.Module):
    """Class-conditional SiT: F = net(x_t, t, y) on [B, C, H, W] latents, t raw in [0, 1]."""

    def __init__(
        self,
        input_size: int = 32,
        patch_size: int = 2,
        in_channels: int = 4,
        hidden_size: int = 1152,
        depth: int = 28,
        num_heads: int = 16,
        mlp_ratio: float = 4.0,
        num_classes: int = 1000,
        qk_norm: bool = False,
        learn_sigma: bool = False,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.patch_size = patch_size
        self.input_size = input_size
        self.num_classes = num_classes
        self.x_embedder = PatchEmbed(input_size, patch_size, in_channels, hidden_size, bias=True)
        self.t_embedder = TimestepEmbedder(hidden_size)
        self.y_embedder = LabelEmbedder(num_classes, hidden_size)
        grid = input_size // patch_size
        self.pos_embed = nn.Parameter(sincos_2d(hidden_size, grid).unsqueeze(0), requires_grad=False)
        self.blocks = nn.ModuleList(SiTBlock(hidden_size, num_heads, mlp_ratio, qk_norm) for _ in range(depth))
        self.final_layer = FinalLayer(hidden_size, patch_size, in_channels * (2 if learn_sigma else 1))

    def initialize_weights(self) -> None:
        """DiT initialisation: xavier linears, N(0, 0.02) embeddings, zeroed adaLN and output."""
        for module in self.modules():
            if isinstance(module, nn.Linear):
                nn.init.xavier_uniform_(module.weight)
                nn.init.zeros_(module.bias)
        w = self.x_embedder.proj.weight.data
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.x_embedder.proj.bias)
        nn.init.normal_(self.y_embedder.embedding_table.weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[0].weight, std=0.02)
        nn.init.normal_(self.t_embedder.mlp[2].weight, std=0.02)
        for block in self.blocks:
            nn.init.zeros_(block.adaLN_modulation[-1].weight)
            nn.init.zeros_(block.adaLN_modulation[-1].bias)
        for layer in (self.final_layer.adaLN_modulation[-1], self.final_layer.linear):
            nn.init.zeros_(layer.weight)
            nn.init.zeros_(layer.bias)

    def forward(self, x: Tensor, t: Tensor, y: Tensor) -> Tensor:
        """F(x_t, t, y): the first C output channels (a learned variance, when there is one, is dropped)."""
        height, width = x.shape[-2:]
        h = self.x_embedder(x) + self.pos_embed
        c = self.t_embedder(t) + self.y_embedder(y)
        for block in self.blocks:
            h = block(h, c)
        h = self.final_layer(h, c)
        out_channels = h.shape[-1] // (self.patch_size * self.patch_size)
        return unpatchify(h, out_channels, self.patch_size, height, width)[:, : self.in_channels]
