"""`ucgm prepare-data`: an image folder -> a prepared latent folder for `ucgm tune --data`."""

from __future__ import annotations

from typing import Annotated

from ..console import Reporter
from ..jobs import prepare
from .common import clean_errors, relaunch_if_asked
from .eval import NPROC
from .groups import PREPARE
from .options import flags


@clean_errors
@flags
def prepare_command(config: Annotated[prepare.PrepareConfig, PREPARE], nproc: int = NPROC) -> None:
    """Encode an image folder with a VAE into latent shards (+ labels, statistics) for `ucgm tune --data OUT`."""
    relaunch_if_asked(nproc)
    prepare.run(config, Reporter())
