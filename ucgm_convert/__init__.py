"""ucgm-convert: load third-party diffusion / flow checkpoints, sample them with UCGM-S,
tune them into few-step generators with UCGM-T, measure and publish them."""

from .checkpoint import load_checkpoint, save_checkpoint
from .errors import UCGMError
from .guidance import guided
from .loading import load
from .model import GenerativeModel, ModelConfig
from .objective import UCGMObjective
from .sampler import count_nfe, sample, time_grid
from .transports import TRANSPORTS, Transport, get_transport

__version__ = "0.1.0"

__all__ = [
    "GenerativeModel",
    "ModelConfig",
    "UCGMError",
    "load",
    "load_checkpoint",
    "save_checkpoint",
    "TRANSPORTS",
    "Transport",
    "UCGMObjective",
    "count_nfe",
    "get_transport",
    "guided",
    "sample",
    "time_grid",
]
