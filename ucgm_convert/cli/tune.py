"""`ucgm tune`: UCGM-T few-step tuning of a loaded model (single process, torchrun or --nproc N)."""

from __future__ import annotations

from typing import Annotated

from ..console import Reporter
from ..jobs import tune
from .common import clean_errors, relaunch_if_asked
from .eval import NPROC
from .groups import TUNE
from .options import flags


@clean_errors
@flags
def tune_command(config: Annotated[tune.TuneConfig, TUNE], nproc: int = NPROC) -> None:
    """Tune a model into a few-step generator with UCGM-T; OUT becomes a checkpoint folder that
    `ucgm sample --checkpoint OUT` samples with the recipe's few-step settings."""
    relaunch_if_asked(nproc)
    tune.run(config, Reporter())
