"""Which model a job runs on, and its base settings: the recipe / checkpoint precedence, once.

Precedence (the same for sample, eval, search and tune): the recipe named by `--from`, else what
the checkpoint stores (config.json `sampling`, or the recipe.yaml beside it), else the recipe its
family declares for it (`m.recipe`), else, with no checkpoint at all, the embedded demo.
Explicit flags override the result field by field.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from pydantic import Field

from ..checkpoint import RECIPE_NAME, is_checkpoint_dir
from ..errors import UCGMError
from ..loading import load, resolve_source
from ..model import GenerativeModel
from ..recipe import Recipe, load_recipe, parse_recipe, parse_yaml, recipe_names
from ..settings import SamplingSettings
from ..settings.base import Int, Settings, overrides_of
from ..settings.tuning import TuningSettings

DEFAULT_RECIPE = "demo"


class ModelSource(Settings):
    """The flags that pick a model: recipe, checkpoint, family, VAE weights."""

    recipe: str | None = Field(default=None, description="Recipe name (`ucgm recipes list`) or a .yaml file. "
                               "Default: the checkpoint's own settings or recipe; with no --checkpoint, demo.")
    checkpoint: str | None = Field(default=None, description="Checkpoint file, folder, embedded:NAME or Hugging "
                                   "Face repo id. Default: the recipe's.")
    family: str | None = Field(default=None, description="Source family; detected from the contents when omitted.")
    vae: str | None = Field(default=None, description="VAE weights: file, diffusers folder or Hub repo id. Default: "
                            "the VAE stored with the model, else the one its config names.")


class ArchOverrides(Settings):
    """What a checkpoint's shapes cannot tell: `uc.load` overrides by name."""

    num_heads: Int | None = Field(default=None, ge=1, le=4096,
                                  description="Attention heads, when the checkpoint does not determine them.")
    encoder_depth: Int | None = Field(default=None, ge=0, le=4096,
                                      description="DDT encoder blocks (default: the recipe's, else the published "
                                                  "22/6 split scaled to the depth).")
    resolution: Int | None = Field(default=None, ge=1, le=65536,
                                   description="Image resolution in pixels, when the weights do not fix it (DDT).")
    latent_stats: Path | None = Field(default=None, description="Latent statistics file (LightningDiT "
                                      "latents_stats.pt, REPA-E *-latents-stats.pt).")

    def given(self) -> dict[str, Any]:
        """The overrides given, as `uc.load` keywords."""
        return {k: (str(v) if isinstance(v, Path) else v) for k, v in self if v is not None}


SamplingOverrides = overrides_of(SamplingSettings, "SamplingOverrides")
TuningOverrides = overrides_of(TuningSettings, "TuningOverrides")


@dataclass
class Resolved:
    """A loaded model with the recipe and base sampling settings that apply to it."""

    model: GenerativeModel
    source: str  # what was loaded (the checkpoint, or the recipe's)
    recipe: Recipe | None
    sampling: SamplingSettings | None
    origin: str  # where `sampling` came from, for the settings table

    def sampling_with(self, overrides: Settings) -> SamplingSettings:
        """The base sampling settings with the flags applied; UCGMError when there is no base and no --steps."""
        given = overrides.given()  # type: ignore[attr-defined]
        if self.sampling is None:
            if "steps" not in given:
                raise UCGMError(f"{self.source}: stores no sampling settings and names no shipped recipe; pass "
                                "--from RECIPE or --steps")
            settings = SamplingSettings(**given)
        else:
            settings = self.sampling.replace(**given)
        if settings.encoder_refresh != 1 and not self.model.shares_encoder:
            raise UCGMError(f"--encoder-refresh: {self.source}: the {self.model.cfg.arch} network has no shareable "
                            f"condition encoder; expected 1 (recompute at every evaluation), "
                            f"got {settings.encoder_refresh}")
        return settings


def _stored_recipe(path: Path, model: GenerativeModel) -> Recipe | None:
    """The recipe a checkpoint carries: recipe.yaml in our folder format (when it is a recipe, not a training
    record like the demo's), else the shipped one its config names."""
    file = path / RECIPE_NAME
    if is_checkpoint_dir(path) and file.is_file():
        text = file.read_text(encoding="utf-8")
        data = parse_yaml(text, str(file))
        if isinstance(data, dict) and "family" in data:
            return parse_recipe(text, str(file), model.recipe or path.name)
    if model.recipe in recipe_names():
        return load_recipe(model.recipe)
    return None


def resolve(source: ModelSource, arch: ArchOverrides, device: torch.device | str = "cpu") -> Resolved:
    """Load the model `source` names and find its recipe and base sampling settings (see the module doc)."""
    recipe = load_recipe(source.recipe or DEFAULT_RECIPE) if source.recipe or not source.checkpoint else None
    checkpoint = source.checkpoint or (recipe.checkpoint if recipe else None)
    if checkpoint is None:
        raise UCGMError(f"recipe {recipe.name!r} has no default checkpoint: pass --checkpoint FILE")  # type: ignore[union-attr]
    overrides = recipe.load_overrides(arch.given()) if recipe is not None else arch.given()
    model = load(checkpoint, family=source.family, device=device, **overrides)
    if recipe is not None:
        return Resolved(model, checkpoint, recipe, recipe.sampling, f"recipe {recipe.name}")
    stored = _stored_recipe(resolve_source(checkpoint), model)
    if model.cfg.sampling is not None:
        return Resolved(model, checkpoint, stored, model.cfg.sampling, f"{checkpoint} config.json")
    if stored is not None:
        return Resolved(model, checkpoint, stored, stored.sampling, f"recipe {stored.name} (the checkpoint's)")
    return Resolved(model, checkpoint, None, None, "flags only")
