"""What an adapter declares about its family, for the rest of the package (installed as ucgm_convert.adapters.family).

Nothing outside `adapters/` branches on a family name: model cards ask for the licence and the
dataset, prepare-data for the VAE spec a recipe implies, guidance for the channels, `ucgm sample`
for the default recipe, and every one of them reads it from the `Family` the adapter declares.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from ucgm_convert.model import GenerativeModel


@dataclass(frozen=True)
class License:
    """The Hub license id of a family's weights and where that comes from."""

    spdx: str
    note: str
    name: str | None = None  # license_name / license_link: for "other" only
    link: str | None = None


IMAGENET = "ILSVRC/imagenet-1k"
# How a message names an option: the CLI flag first, the Python keyword after it.
PASS_HEADS = "pass --num-heads N (num_heads=N in Python)"
PASS_STATS = "--latent-stats PATH (latent_stats=PATH in Python)"
UNKNOWN_LICENSE = License(
    "other",
    "The source model's license is not known to ucgm-convert; check the base model's terms before reuse "
    "(pass --license to record them).",
    name="unknown",
)

Detect = Callable[[Path], bool]
Load = Callable[..., GenerativeModel]


@dataclass(frozen=True)
class Family:
    """One source family: how to recognise and load its files, and the facts the rest of the code asks for.

    `vae_defaults`: the VAE spec fields its recipes imply (the recipe's `vae` is the weights);
    `latent_stats_in_checkpoint`: its latent statistics come with each checkpoint (LightningDiT's
    latents_stats.pt, REPA-E's BN buffers), so preparing data needs the checkpoint (or explicit
    statistics). `overrides`: the `uc.load` keywords it accepts.
    """

    name: str
    title: str
    detect: Detect
    load: Load
    license: License
    dataset: str | None = None  # Hub dataset id of the data the released weights were trained on
    default_recipe: str | None = None
    overrides: tuple[str, ...] = ()
    vae_defaults: Mapping[str, Any] = field(default_factory=dict)
    latent_stats_in_checkpoint: bool = False
    guidance_channels: int | None = None  # leading channels its published guidance touches (None: all)
    # Families whose files can hold the same keys and shapes (DiT / SiT): detection refuses to guess between them.
    confusable_with: tuple[str, ...] = ()
