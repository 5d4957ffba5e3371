"""The EDM2 magnitude-preserving U-Net (Karras et al. 2024, "Analyzing and Improving the Training
Dynamics of Diffusion Models", config G), written from the paper's equations.

Parameter names follow the released snapshots' `unet.*` state dict (enc/dec blocks keyed
"{R}x{R}_conv|down|up|in0|in1|block{i}", conv_res0/conv_res1/conv_skip/emb_linear/attn_qkv/attn_proj,
emb_fourier.freqs/phases, emb_noise, emb_label, out_conv, emb_gain/out_gain), so released weights
load as-is. No biases, no normalisation parameters: every weight is re-normalised in the forward.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import Tensor, nn


def normalize(x: Tensor, dim: Sequence[int] | int | None = None, eps: float = 1e-4) -> Tensor:
    """x / (eps + ||x|| / sqrt(N)) over `dim` (default: all but the first), N = elements reduced."""
    dims = list(range(1, x.ndim)) if dim is None else dim
    norm = torch.linalg.vector_norm(x, dim=dims, keepdim=True, dtype=torch.float32)
    count = x.numel() // norm.numel()
    return x / (eps + norm / math.sqrt(count)).to(x.dtype)


def mp_silu(x: Tensor) -> Tensor:
    """Magnitude-preserving SiLU (paper eq. 81): silu(x) / 0.596."""
    return F.silu(x) / 0.596


def mp_sum(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving blend (eq. 88): ((1 - t) a + t b) / sqrt((1 - t)^2 + t^2)."""
    return a.lerp(b, t) / math.sqrt((1 - t) ** 2 + t**2)


def mp_cat(a: Tensor, b: Tensor, t: float = 0.5) -> Tensor:
    """Magnitude-preserving channel concatenation (eq. 103) with balance t towards b."""
    na, nb = a.shape[1], b.shape[1]
    scale = math.sqrt((na + nb) / ((1 - t) ** 2 + t**2))
    return torch.cat([a * (scale * (1 - t) / math.sqrt(na)), b * (scale * t / math.sqrt(nb))], dim=1)


def resample(x: Tensor, filt: Sequence[float], mode: str) -> Tensor:
    """Depthwise 2x down- or up-sampling with the separable filter outer(filt, filt) / sum^2."""
    if mode == "keep":
        return x
    taps = torch.tensor(filt, dtype=torch.float32, device=x.device)
    kernel = torch.outer(taps, taps) / taps.sum() ** 2
    channels, pad = x.shape[1], (len(filt) - 1) // 2
    if mode == "down":
        weight = kernel.to(x.dtype).expand(channels, 1, -1, -1)
        return F.conv2d(x, weight, stride=2, padding=pad, groups=channels)
    weight = (kernel * 4).to(x.dtype).expand(channels, 1, -1, -1)
    return F.conv_transpose2d(x, weight, stride=2, padding=pad, groups=channels)


class MPFourier(nn.Module):
    """Fourier features sqrt(2) cos(f c + phi) (eq. 75); f and phi are random buffers stored in the file."""

    def __init__(self, channels: int) -> None:
        super().__init__()
        self.register_buffer("freqs", 2 * math.pi * torch.randn(channels))
        self.register_buffer("phases", 2 * math.pi * torch.rand(channels))

    def forward(self, c: Tensor) -> Tensor:
        y = torch.outer(c.float(), self.freqs.float()) + self.phases.float()
        return (y.cos() * math.sqrt(2)).to(c.dtype)


class MPConv(nn.Module):
    """Magnitude-preserving conv / linear (eqs. 47, 66): weight w_i / ||w_i|| * gain / sqrt(fan_in).

    In a train-mode forward with gradients the stored weight is first replaced by its normalised
    value (forced weight normalisation, eq. 66, as upstream's and the UCGM reference's train mode):
    the output is unchanged and the gradient's scale (1 / ||w||) stays that of unit-norm weights.
    No-grad forwards (UCGM-T's extra forwards) leave it alone: an in-place write there would
    invalidate the graph of the gradient forward before its backward."""

    def __init__(self, in_channels: int, out_channels: int, kernel: Sequence[int]) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(out_channels, in_channels, *kernel))

    def forward(self, x: Tensor, gain: Tensor | float = 1.0) -> Tensor:
        if self.training and torch.is_grad_enabled():
            with torch.no_grad():
                self.weight.copy_(normalize(self.weight.float()))
        w = normalize(self.weight.float())
        w = (w * (gain / math.sqrt(w[0].numel()))).to(x.dtype)
        if w.ndim == 2:
            return x @ w.t()
        return F.conv2d(x, w, padding=w.shape[-1] // 2)


class Block(nn.Module):
    """Encoder/decoder residual block with optional cosine self-attention (paper Fig. 21)."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        flavor: str,
        resample_mode: str = "keep",
        resample_filter: Sequence[float] = (1, 1),
        attention: bool = False,
        channels_per_head: int = 64,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
    ) -> None:
        super().__init__()
        self.flavor = flavor
        self.out_channels = out_channels
        self.resample_mode = resample_mode
        self.resample_filter = list(resample_filter)
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.res_balance = res_balance
        self.attn_balance = attn_balance
        self.clip_act = clip_act
        self.emb_gain = nn.Parameter(torch.zeros([]))
        self.conv_res0 = MPConv(out_channels if flavor == "enc" else in_channels, out_channels, [3, 3])
        self.emb_linear = MPConv(emb_channels, out_channels, [])
        self.conv_res1 = MPConv(out_channels, out_channels, [3, 3])
        self.conv_skip = MPConv(in_channels, out_channels, [1, 1]) if in_channels != out_channels else None
        self.attn_qkv = MPConv(out_channels, 3 * out_channels, [1, 1]) if self.num_heads else None
        self.attn_proj = MPConv(out_channels, out_channels, [1, 1]) if self.num_heads else None

    def _attention(self, x: Tensor) -> Tensor:
        """Multi-head attention whose q, k, v are unit-normalised per head and pixel (cosine attention)."""
        b, c, h, w = x.shape
        # attn_qkv's output channels are laid out as (head, head_dim, {q,k,v}).
        qkv = normalize(self.attn_qkv(x).reshape(b, self.num_heads, c // self.num_heads, 3, h * w), dim=2)
        q, k, v = (t.transpose(2, 3) for t in qkv.unbind(3))  # [b, heads, tokens, head_dim]
        y = F.scaled_dot_product_attention(q, k, v)
        return self.attn_proj(y.transpose(2, 3).reshape(b, c, h, w))

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        x = resample(x, self.resample_filter, self.resample_mode)
        if self.flavor == "enc":
            if self.conv_skip is not None:
                x = self.conv_skip(x)
            x = normalize(x, dim=1)
        y = self.conv_res0(mp_silu(x))
        scale = self.emb_linear(emb, gain=self.emb_gain) + 1
        y = self.conv_res1(mp_silu(y * scale[:, :, None, None].to(y.dtype)))
        if self.flavor == "dec" and self.conv_skip is not None:
            x = self.conv_skip(x)
        x = mp_sum(x, y, self.res_balance)
        if self.num_heads:
            x = mp_sum(x, self._attention(x), self.attn_balance)
        return x if self.clip_act is None else x.clamp(-self.clip_act, self.clip_act)


class EDM2UNet(nn.Module):
    """EDM2 U-Net as the EDM transport's F: `forward(x_t, t, y)` with x_t = c_in x_sigma already scaled.

    The noise label is c_noise = ln(sigma) / 4 = 2.68 t - 1.59; the output is the raw F_theta
    (D = c_skip x_sigma + c_out F is the transport's business). Labels y == label_dim (the null
    class; EDM2 has none) skip the label embedding, and an unconditional net (label_dim 0) ignores y.
    """

    def __init__(
        self,
        img_resolution: int = 64,
        img_channels: int = 4,
        label_dim: int = 1000,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        noise_channels: int | None = None,
        emb_channels: int | None = None,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (16, 8),
        channels_per_head: int = 64,
        label_balance: float = 0.5,
        concat_balance: float = 0.5,
        res_balance: float = 0.3,
        attn_balance: float = 0.3,
        clip_act: float | None = 256,
        resample_filter: Sequence[float] = (1, 1),
    ) -> None:
        super().__init__()
        widths = [model_channels * m for m in channel_mult]
        cnoise = noise_channels or widths[0]
        cemb = emb_channels or max(widths)
        self.img_channels = img_channels
        self.label_dim = label_dim
        self.label_balance = label_balance
        self.concat_balance = concat_balance
        block_kwargs = dict(resample_filter=resample_filter, channels_per_head=channels_per_head,
                            res_balance=res_balance, attn_balance=attn_balance, clip_act=clip_act)
        self.out_gain = nn.Parameter(torch.zeros([]))
        self.emb_fourier = MPFourier(cnoise)
        self.emb_noise = MPConv(cnoise, cemb, [])
        self.emb_label = MPConv(label_dim, cemb, []) if label_dim else None

        # Encoder: a stem conv at full resolution (input + a constant-ones channel), then per level
        # a downsampling block (except level 0) and num_blocks blocks; every output is a skip.
        self.enc = nn.ModuleDict()
        skip_widths = []
        width = img_channels + 1
        for level, level_width in enumerate(widths):
            res = img_resolution >> level
            if level == 0:
                self.enc[f"{res}x{res}_conv"] = MPConv(width, level_width, [3, 3])
                width = level_width
            else:
                self.enc[f"{res}x{res}_down"] = Block(width, width, cemb, "enc", "down", **block_kwargs)
            skip_widths.append(width)
            for i in range(num_blocks):
                self.enc[f"{res}x{res}_block{i}"] = Block(width, level_width, cemb, "enc",
                                                          attention=res in attn_resolutions, **block_kwargs)
                width = level_width
                skip_widths.append(width)

        # Decoder: two blocks at the lowest resolution (the first always attends), then per level an
        # upsampling block (except the lowest) and num_blocks + 1 blocks that each consume one skip.
        self.dec = nn.ModuleDict()
        for level in reversed(range(len(widths))):
            res = img_resolution >> level
            if level == len(widths) - 1:
                self.dec[f"{res}x{res}_in0"] = Block(width, width, cemb, "dec", attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = Block(width, width, cemb, "dec", **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = Block(width, width, cemb, "dec", "up", **block_kwargs)
            for i in range(num_blocks + 1):
                in_width = width + skip_widths.pop()
                width = widths[level]
                self.dec[f"{res}x{res}_block{i}"] = Block(in_width, width, cemb, "dec",
                                                          attention=res in attn_resolutions, **block_kwargs)
        self.out_conv = MPConv(width, img_channels, [3, 3])

    def embed(self, t: Tensor, y: Tensor) -> Tensor:
        """Conditioning vector mp_silu(mp_sum(noise embedding, label embedding)); null rows skip the label."""
        c_noise = (t.float() * 2.68 - 1.59).flatten()
        emb = self.emb_noise(self.emb_fourier(c_noise).to(self.out_gain.dtype))
        if self.emb_label is None:
            return mp_silu(emb)
        y = y.flatten().long()
        null = y == self.label_dim
        onehot = F.one_hot(torch.where(null, torch.zeros_like(y), y), self.label_dim).to(emb.dtype)
        with_label = mp_sum(emb, self.emb_label(onehot * math.sqrt(self.label_dim)), self.label_balance)
        return mp_silu(torch.where(null[:, None], emb, with_label))

    def forward(self, x_t: Tensor, t: Tensor, y: Tensor) -> Tensor:
        out_dtype = x_t.dtype
        emb = self.embed(t, y)
        x = x_t.to(self.out_gain.dtype)
        x = torch.cat([x, torch.ones_like(x[:, :1])], dim=1)
        skips = []
        for name, layer in self.enc.items():
            x = layer(x) if name.endswith("_conv") else layer(x, emb)
            skips.append(x)
        for name, block in self.dec.items():
            if "_block" in name:
                x = mp_cat(x, skips.pop(), self.concat_balance)
            x = block(x, emb)
        return self.out_conv(x, gain=self.out_gain).to(out_dtype)
