"""Small layers several families share (beyond the DiT blocks in blocks.py)."""

from __future__ import annotations

import torch
from torch import Tensor, nn


class RMSNorm(nn.Module):
    """x / rms(x) * weight, computed in float32 (LightningDiT and DDT keep the weight key; UCGM's TiT has
    no weight: affine=False)."""

    def __init__(self, dim: int, eps: float = 1e-6, affine: bool = True) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim)) if affine else None

    def forward(self, x: Tensor) -> Tensor:
        out = (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + self.eps)).type_as(x)
        return out if self.weight is None else out * self.weight


def rope_2d_axial(head_dim: int, grid: int, theta: float = 10000.0) -> tuple[Tensor, Tensor]:
    """EVA-02 axial 2-D RoPE tables (cos, sin), each [grid^2, head_dim], tokens row-major.

    The first half of a head turns with the row index, the second with the column, at
    angles p * theta^(-2k / (head_dim/2)), each angle shared by an adjacent pair of features.
    """
    half = head_dim // 2
    if half % 2:
        raise ValueError(f"axial 2-D RoPE needs head_dim divisible by 4, got {head_dim}")
    freqs = 1.0 / theta ** (torch.arange(0, half, 2).float() / half)
    positions = torch.arange(grid) / grid * grid  # EVA's (ft/pt rescaled) positions, bit for bit
    angles = torch.outer(positions, freqs).repeat_interleave(2, dim=-1)  # [grid, half]
    table = torch.cat([angles[:, None].expand(grid, grid, half), angles[None].expand(grid, grid, half)], dim=-1)
    table = table.reshape(grid * grid, head_dim)
    return table.cos(), table.sin()


def rotate_pairs(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """RoPE on adjacent pairs: x cos + R(x) sin with R(x)_(2i, 2i+1) = (-x_(2i+1), x_(2i))."""
    even, odd = x.unflatten(-1, (-1, 2)).unbind(-1)
    return x * cos + torch.stack((-odd, even), dim=-1).flatten(-2) * sin
