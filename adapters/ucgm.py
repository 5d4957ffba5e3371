"""Our own format (written by `ucgm convert` and `ucgm tune`): safetensors + config.json.

Files: a folder with config.json (the ModelConfig: family, arch + arch_kwargs, transport, latent shape, VAE),
model.safetensors (the network's state dict, unprefixed), optionally vae.safetensors (a tuned VAE),
recipe.yaml and README.md. The config fixes the architecture, so no overrides apply.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch

from ucgm_convert.adapters.family import Family, License
from ucgm_convert.checkpoint import CONFIG_NAME, WEIGHTS_NAME, is_checkpoint_dir, load_checkpoint
from ucgm_convert.errors import UCGMError
from ucgm_convert.model import GenerativeModel

NAME = "ucgm"


def _folder(path: Path) -> Path:
    """A checkpoint folder, or the folder of its config.json / model.safetensors."""
    return path.parent if path.is_file() and path.name in (CONFIG_NAME, WEIGHTS_NAME) else path


def detect(path: Path) -> bool:
    """True when `path` is (a file inside) a folder in our format."""
    return is_checkpoint_dir(_folder(path))


def load(path: Path, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32,
         **overrides: Any) -> GenerativeModel:
    """Load our format; architecture overrides are refused (config.json fixes the architecture)."""
    if overrides:
        raise UCGMError(f"{path}: a ucgm-convert checkpoint stores its architecture; "
                        f"overrides {', '.join(sorted(overrides))} do not apply")
    return load_checkpoint(_folder(path), device=device, dtype=dtype)


FAMILY = Family(
    name=NAME,
    title="ucgm-convert",
    detect=detect,
    load=load,
    license=License("apache-2.0", "A model of this project (ucgm-convert), released under Apache-2.0."),
    default_recipe="demo",
    vae_defaults={"name": "sd-vae", "pixel_range": "-1,1"},
)
