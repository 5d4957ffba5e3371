"""Procedural "shapes" dataset of the embedded demo model: 10 classes of 16x16 RGB images.

Each image is one anti-aliased shape on a dark background, with random position, size and
colour jitter. Everything is drawn from a seeded `torch.Generator`, so `make_shapes(n, seed)`
is the same on every machine, needs no download, and makes 100k images in about a second.
Pixels are in [-1, 1], the range the demo model is trained on.
"""

from __future__ import annotations

import math

import torch
from torch import Tensor

__all__ = ["CLASS_NAMES", "IMAGE_SIZE", "NUM_CLASSES", "make_shapes"]

IMAGE_SIZE = 16
CLASS_NAMES: tuple[str, ...] = (
    "red disc",
    "green square",
    "blue ring",
    "yellow horizontal bar",
    "magenta vertical bar",
    "cyan X",
    "white plus",
    "orange triangle",
    "two purple dots",
    "grey checker",
)
NUM_CLASSES = len(CLASS_NAMES)

# Base colour of each class in [0, 1] RGB (jittered per image).
_COLOURS = torch.tensor(
    [
        [0.95, 0.15, 0.15],  # red
        [0.15, 0.85, 0.20],  # green
        [0.20, 0.35, 1.00],  # blue
        [0.95, 0.90, 0.15],  # yellow
        [0.95, 0.20, 0.90],  # magenta
        [0.15, 0.90, 0.95],  # cyan
        [0.95, 0.95, 0.95],  # white
        [1.00, 0.55, 0.10],  # orange
        [0.60, 0.25, 0.90],  # purple
        [0.60, 0.60, 0.60],  # grey
    ]
)
_NUM_PARAMS = 8  # uniform draws per image: centre x/y, size, aux, colour r/g/b, background


def _lerp(u: Tensor, lo: float, hi: float) -> Tensor:
    """Map u in [0, 1] linearly onto [lo, hi]."""
    return lo + (hi - lo) * u


def _box(dx: Tensor, dy: Tensor, hx: Tensor | float, hy: Tensor | float) -> Tensor:
    """Signed distance (pixels) to an axis-aligned box with half-sizes hx, hy."""
    qx, qy = dx.abs() - hx, dy.abs() - hy
    outside = torch.sqrt(qx.clamp(min=0) ** 2 + qy.clamp(min=0) ** 2)
    return outside + torch.maximum(qx, qy).clamp(max=0)


def _sdf(label: int, dx: Tensor, dy: Tensor, size: Tensor, aux: Tensor) -> Tensor:
    """Signed distance (pixels, < 0 inside) of class `label`'s shape; size/aux in [0, 1], [m, 1, 1]."""
    if label == 0:  # disc
        return torch.sqrt(dx**2 + dy**2) - _lerp(size, 3.0, 5.5)
    if label == 1:  # square
        return _box(dx, dy, _lerp(size, 2.5, 4.5), _lerp(size, 2.5, 4.5))
    if label == 2:  # ring
        return (torch.sqrt(dx**2 + dy**2) - _lerp(size, 3.5, 5.5)).abs() - _lerp(aux, 0.8, 1.3)
    if label == 3:  # horizontal bar
        return _box(dx, dy, _lerp(size, 4.0, 6.5), _lerp(aux, 1.0, 1.6))
    if label == 4:  # vertical bar
        return _box(dx, dy, _lerp(aux, 1.0, 1.6), _lerp(size, 4.0, 6.5))
    if label == 5:  # X: two diagonal strokes clipped to a square
        half, width = _lerp(size, 4.0, 6.0), _lerp(aux, 0.9, 1.3)
        strokes = torch.minimum((dx - dy).abs(), (dx + dy).abs()) / math.sqrt(2) - width
        return torch.maximum(strokes, _box(dx, dy, half, half))
    if label == 6:  # plus
        half, width = _lerp(size, 4.0, 6.0), _lerp(aux, 1.0, 1.5)
        return torch.minimum(_box(dx, dy, half, width), _box(dx, dy, width, half))
    if label == 7:  # upward equilateral triangle with inradius r/2 (y grows downwards)
        r = _lerp(size, 4.0, 6.0)
        s3 = math.sqrt(3) / 2
        sides = torch.maximum(s3 * dx - 0.5 * dy, -s3 * dx - 0.5 * dy)
        return torch.maximum(dy, sides) - r / 2
    if label == 8:  # two dots side by side
        radius, gap = _lerp(size, 1.6, 2.4), _lerp(aux, 2.5, 4.0)
        left = torch.sqrt((dx + gap) ** 2 + dy**2)
        right = torch.sqrt((dx - gap) ** 2 + dy**2)
        return torch.minimum(left, right) - radius
    if label == 9:  # 2x2 checker: top-left and bottom-right quadrants of a square
        half = _lerp(size, 4.0, 6.0)
        square = _box(dx, dy, half, half)
        diagonal = -(dx * dy).sign() * torch.minimum(dx.abs(), dy.abs())  # > 0 on the off quadrants
        return torch.maximum(square, diagonal)
    raise ValueError(f"label must be in [0, {NUM_CLASSES}), got {label}")


def make_shapes(n: int, seed: int = 0) -> tuple[Tensor, Tensor]:
    """n images [n, 3, 16, 16] float32 in [-1, 1] and balanced shuffled labels [n] int64, from `seed`."""
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    gen = torch.Generator().manual_seed(int(seed))
    labels = (torch.arange(n) % NUM_CLASSES)[torch.randperm(n, generator=gen)]
    u = torch.rand(n, _NUM_PARAMS, 1, 1, generator=gen)
    coords = torch.arange(IMAGE_SIZE, dtype=torch.float32) + 0.5
    centre = IMAGE_SIZE / 2
    alpha = torch.empty(n, IMAGE_SIZE, IMAGE_SIZE)
    for label in range(NUM_CLASSES):
        idx = (labels == label).nonzero().squeeze(1)
        if idx.numel() == 0:
            continue
        p = u[idx]
        dx = coords.view(1, 1, -1) - (centre + _lerp(p[:, 0], -2.0, 2.0))
        dy = coords.view(1, -1, 1) - (centre + _lerp(p[:, 1], -2.0, 2.0))
        alpha[idx] = (0.5 - _sdf(label, dx, dy, p[:, 2], p[:, 3])).clamp(0.0, 1.0)
    colour = (_COLOURS[labels] + _lerp(u[:, 4:7, 0, 0], -0.12, 0.12)).clamp(0.0, 1.0)
    background = _lerp(u[:, 7:8, 0, 0], 0.02, 0.15).expand(n, 3)
    a = alpha.unsqueeze(1)
    images = background[:, :, None, None] * (1 - a) + colour[:, :, None, None] * a
    return (images * 2 - 1).float().contiguous(), labels.long()
