"""Writing samples: an ADM-style .npz (arr_0 uint8 NHWC, arr_1 labels) and a PNG grid, atomically."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
from PIL import Image

from .foundation import write_file_atomic


def save_npz(path: Path, images: np.ndarray, labels: np.ndarray) -> None:
    """Save uint8 [N, H, W, 3] images and int labels as arr_0 / arr_1 (the ADM evaluator layout)."""
    buffer = io.BytesIO()
    np.savez(buffer, arr_0=images, arr_1=labels)
    write_file_atomic(path, buffer.getvalue())


def grid_image(images: np.ndarray, ncols: int | None = None, pad: int = 2) -> Image.Image:
    """Tile uint8 [N, H, W, 3] images into one picture with `pad` pixels of black between them."""
    n, h, w, _ = images.shape
    ncols = ncols or math.ceil(math.sqrt(n))
    nrows = math.ceil(n / ncols)
    canvas = np.zeros((nrows * (h + pad) + pad, ncols * (w + pad) + pad, 3), dtype=np.uint8)
    for i, img in enumerate(images):
        r, c = divmod(i, ncols)
        canvas[pad + r * (h + pad): pad + r * (h + pad) + h, pad + c * (w + pad): pad + c * (w + pad) + w] = img
    picture = Image.fromarray(canvas)
    scale = max(1, 256 // max(h, w))  # upscale tiny images so a grid is readable
    return picture.resize((picture.width * scale, picture.height * scale), Image.NEAREST) if scale > 1 else picture


def save_grid(path: Path, images: np.ndarray, ncols: int | None = None) -> None:
    """Write the PNG grid of `images` to `path` atomically."""
    buffer = io.BytesIO()
    grid_image(images, ncols).save(buffer, format="PNG")
    write_file_atomic(path, buffer.getvalue())
