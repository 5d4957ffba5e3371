"""`ucgm tune`: UCGM-T few-step tuning, split into config, data, checkpoints, parallel wrapping and a trainer."""

from .checkpoints import latest_checkpoint
from .config import TuneConfig
from .data import chunk_seed
from .job import TuneDiverged, TuneResult, run

__all__ = ["TuneConfig", "TuneDiverged", "TuneResult", "chunk_seed", "latest_checkpoint", "run"]
