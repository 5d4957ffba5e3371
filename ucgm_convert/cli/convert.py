"""`ucgm convert`: a published checkpoint -> our format (safetensors + config.json + recipe)."""

from __future__ import annotations

from typing import Annotated

from ..console import Reporter
from ..jobs import convert
from .common import clean_errors
from .groups import CONVERT
from .options import flags


@clean_errors
@flags
def convert_command(config: Annotated[convert.ConvertConfig, CONVERT]) -> None:
    """Convert a checkpoint to our format: model.safetensors, config.json (architecture, transport,
    classes, latent shape, VAE and latent statistics, default recipe) and recipe.yaml."""
    convert.run(config, Reporter())
