"""safetensors files: read whole, with one clear error for a truncated or corrupted file."""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file

from ..errors import UCGMError


def read_safetensors(path: str | Path) -> dict[str, torch.Tensor]:
    """All tensors of a safetensors file; a truncated or corrupted file gives one UCGMError naming it."""
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, RuntimeError) as err:
        raise UCGMError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None
