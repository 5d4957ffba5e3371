"""`ucgm convert` as a library: a published checkpoint -> our format (safetensors + config.json + recipe.yaml)."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from pydantic import Field

from ..checkpoint import (
    CARD_NAME,
    CONFIG_NAME,
    RECIPE_NAME,
    RESULTS_NAME,
    VAE_WEIGHTS_NAME,
    WEIGHTS_NAME,
    save_checkpoint,
)
from ..console import SILENT, Reporter
from ..foundation import output_folder
from ..loading import load
from ..model import GenerativeModel
from ..recipe import recipe_names, recipe_text
from ..settings.base import Bool, Settings
from .source import ArchOverrides

OWNED = (WEIGHTS_NAME, VAE_WEIGHTS_NAME, CONFIG_NAME, RECIPE_NAME, CARD_NAME, RESULTS_NAME)


class ConvertConfig(Settings):
    """What `ucgm convert` needs; see `ucgm convert --help`."""

    checkpoint: str = Field(description="Checkpoint file or folder as published (or a Hub repo id).")
    out: Path = Field(description="Output folder (written atomically; a previous conversion there is replaced only "
                      "with --overwrite).")
    family: str | None = Field(default=None, description="Source family; detected from the contents when omitted.")
    arch: ArchOverrides = ArchOverrides()
    overwrite: Bool = Field(default=False, description="Replace a checkpoint folder already at --out.")


@dataclass
class ConvertResult:
    out: Path
    model: GenerativeModel


def run(config: ConvertConfig, reporter: Reporter = SILENT) -> ConvertResult:
    """Load `config.checkpoint` and write it in our format to `config.out`; reloading gives bit-identical outputs."""
    output_folder(config.out, OWNED, "checkpoint", overwrite=config.overwrite)
    model = load(config.checkpoint, family=config.family, **config.arch.given())
    recipe = recipe_text(model.recipe) if model.recipe in recipe_names() else None
    save_checkpoint(model, config.out, recipe_yaml=recipe)
    reporter.info(f"converted {config.checkpoint} ({model.family}, {model.cfg.arch}, "
                  f"{model.num_parameters() / 1e6:.1f}M parameters, {model.transport.name} transport) -> {config.out}")
    return ConvertResult(config.out, model)
