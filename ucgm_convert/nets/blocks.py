"""Building blocks shared by the DiT-family networks (SiT, LightningDiT, DDT, our demo)."""

from __future__ import annotations

import math

import torch
from torch import Tensor, nn


def modulate(x: Tensor, shift: Tensor, scale: Tensor) -> Tensor:
    """adaLN modulation x (1 + scale) + shift, with per-sample [B, D] shift and scale."""
    return x * (1 + scale.unsqueeze(1)) + shift.unsqueeze(1)


def timestep_frequencies(t: Tensor, dim: int, max_period: float = 10000.0) -> Tensor:
    """DiT's sinusoidal embedding [cos(t w_k), sin(t w_k)], w_k = max_period^(-k / (dim/2))."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[:, :1])], dim=-1)
    return emb


class TimestepEmbedder(nn.Module):
    """Sinusoidal features of the raw time t followed by a SiLU MLP (keys mlp.0, mlp.2)."""

    def __init__(self, hidden_size: int, frequency_size: int = 256, max_period: float = 10000.0) -> None:
        super().__init__()
        self.mlp = nn.Sequential(
            nn.Linear(frequency_size, hidden_size), nn.SiLU(), nn.Linear(hidden_size, hidden_size)
        )
        self.frequency_size = frequency_size
        self.max_period = max_period

    def forward(self, t: Tensor) -> Tensor:
        return self.mlp(timestep_frequencies(t, self.frequency_size, self.max_period).to(self.mlp[0].weight.dtype))


class LabelEmbedder(nn.Module):
    """Class embedding table with one extra row, the null class (= num_classes) for guidance."""

    def __init__(self, num_classes: int, hidden_size: int) -> None:
        super().__init__()
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes

    def forward(self, labels: Tensor) -> Tensor:
        return self.embedding_table(labels)


def sincos_1d(dim: int, positions: Tensor) -> Tensor:
    """MAE 1-D sin-cos features [sin(p w), cos(p w)] with w_k = 10000^(-k / (dim/2))."""
    omega = 1.0 / 10000 ** (torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0))
    out = positions.double().reshape(-1)[:, None] * omega[None]
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_size: int) -> Tensor:
    """MAE 2-D sin-cos position table [grid_size^2, dim]: half for rows, half for columns."""
    coords = torch.arange(grid_size, dtype=torch.float64)
    grid_w, grid_h = torch.meshgrid(coords, coords, indexing="xy")
    return torch.cat([sincos_1d(dim // 2, grid_w), sincos_1d(dim // 2, grid_h)], dim=1).float()


class FinalLayer(nn.Module):
    """adaLN-modulated LayerNorm (no affine) and a linear map to patch pixels."""

    def __init__(self, hidden_size: int, patch_size: int, out_channels: int) -> None:
        super().__init__()
        self.norm_final = nn.LayerNorm(hidden_size, elementwise_affine=False, eps=1e-6)
        self.linear = nn.Linear(hidden_size, patch_size * patch_size * out_channels)
        self.adaLN_modulation = nn.Sequential(nn.SiLU(), nn.Linear(hidden_size, 2 * hidden_size))

    def forward(self, x: Tensor, c: Tensor) -> Tensor:
        shift, scale = self.adaLN_modulation(c).chunk(2, dim=1)
        return self.linear(modulate(self.norm_final(x), shift, scale))


def unpatchify(x: Tensor, channels: int, patch: int, height: int, width: int) -> Tensor:
    """[B, (H/p)(W/p), p*p*C] tokens (row-major, (p, p, C) inside) -> [B, C, H, W]."""
    b = x.shape[0]
    h, w = height // patch, width // patch
    x = x.reshape(b, h, w, patch, patch, channels)
    return torch.einsum("nhwpqc->nchpwq", x).reshape(b, channels, h * patch, w * patch)
