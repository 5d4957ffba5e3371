"""`ucgm convert`: a published checkpoint -> our format (safetensors + config.json + recipe)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import typer

from ..checkpoint import save_checkpoint
from ..errors import UCGMError
from ..loading import load
from ..recipe import recipe_names, recipe_text
from .common import clean_errors, console


def arch_overrides(num_heads: int | None, encoder_depth: int | None, resolution: int | None,
                   latent_stats: Path | None) -> dict[str, Any]:
    """The architecture / statistics overrides the user gave, by `uc.load` keyword."""
    given = {"num_heads": num_heads, "encoder_depth": encoder_depth, "resolution": resolution,
             "latent_stats": str(latent_stats) if latent_stats else None}
    return {key: value for key, value in given.items() if value is not None}


NUM_HEADS = typer.Option(None, "--num-heads", help="Attention heads, when the checkpoint does not determine them.")
ENCODER_DEPTH = typer.Option(None, "--encoder-depth", help="DDT encoder blocks (default: the published 22/6 split).")
RESOLUTION = typer.Option(None, "--resolution", help="Image resolution in pixels, when the weights do not fix it.")
LATENT_STATS = typer.Option(None, "--latent-stats", help="Latent statistics file (LightningDiT latents_stats.pt).")


@clean_errors
def convert_command(
    source: str = typer.Argument(..., help="Checkpoint file or folder as published (or a Hub repo id)."),
    out: Path = typer.Option(..., "--out", help="Output folder (written atomically)."),
    family: Optional[str] = typer.Option(None, "--family", help="Source family; detected from the contents when omitted."),
    num_heads: Optional[int] = NUM_HEADS,
    encoder_depth: Optional[int] = ENCODER_DEPTH,
    resolution: Optional[int] = RESOLUTION,
    latent_stats: Optional[Path] = LATENT_STATS,
) -> None:
    """Convert a checkpoint to our format: model.safetensors, config.json (architecture, transport,
    classes, latent shape, VAE and latent statistics, default recipe) and recipe.yaml."""
    model = load(source, family=family, **arch_overrides(num_heads, encoder_depth, resolution, latent_stats))
    if out.exists() and not out.is_dir():
        raise UCGMError(f"--out {out}: exists and is not a folder")
    recipe = recipe_text(model.recipe) if model.recipe in recipe_names() else None
    save_checkpoint(model, out, recipe_yaml=recipe)
    params = sum(p.numel() for p in model.net.parameters())
    console.print(f"converted {source} ({model.family}, {model.cfg.arch}, {params / 1e6:.1f}M parameters, "
                  f"{model.transport.name} transport) -> {out}")
