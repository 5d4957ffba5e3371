"""Building blocks shared by the DiT-family networks (SiT, LightningDiT, DDT, our demo)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Iterator

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
    """Class embedding table with one extra row, the null class (= num_classes) for guidance.

    With dropout_prob p > 0, in train mode only (as upstream's token_drop), label i becomes the null
    class when u_i < p: u are the per-sample uniforms given by `label_dropout_draws` (tiled over a
    batch that stacks several copies), else torch.rand from the global RNG. Eval mode never drops.
    """

    def __init__(self, num_classes: int, hidden_size: int, dropout_prob: float = 0.0) -> None:
        super().__init__()
        if not 0.0 <= dropout_prob <= 1.0:
            raise ValueError(f"class_dropout_prob must be in [0, 1], got {dropout_prob}")
        self.embedding_table = nn.Embedding(num_classes + 1, hidden_size)
        self.num_classes = num_classes
        self.dropout_prob = dropout_prob
        self.draws: Tensor | None = None

    def draws_randomly(self) -> bool:
        """True when a train-mode forward would draw its dropout mask from the global RNG."""
        return self.training and self.dropout_prob > 0 and self.draws is None

    def forward(self, labels: Tensor) -> Tensor:
        if self.training and self.dropout_prob > 0:
            n = labels.shape[0]
            if self.draws is None:
                u = torch.rand(n, device=labels.device)
            elif n % len(self.draws) == 0:
                u = self.draws.to(labels.device).repeat(n // len(self.draws))
            else:
                raise ValueError(f"label dropout: {len(self.draws)} draws do not tile a batch of {n}")
            labels = torch.where(u < self.dropout_prob, torch.full_like(labels, self.num_classes), labels)
        return self.embedding_table(labels)


@contextlib.contextmanager
def label_dropout_draws(net: nn.Module, draws: Tensor) -> Iterator[None]:
    """Within the block, every label embedder of `net` drops label i when draws[i] < its dropout_prob
    (per-sample uniforms, so the mask depends on the sample, not on the batch layout)."""
    embedders = [m for m in net.modules() if isinstance(m, LabelEmbedder)]
    for m in embedders:
        m.draws = draws
    try:
        yield
    finally:
        for m in embedders:
            m.draws = None


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
