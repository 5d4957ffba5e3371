"""ucgm-convert: load third-party diffusion / flow checkpoints, sample them with UCGM-S,
tune them into few-step generators with UCGM-T, measure and publish them."""

from .guidance import guided
from .objective import UCGMObjective
from .sampler import count_nfe, sample, time_grid
from .transports import TRANSPORTS, Transport, get_transport

__version__ = "0.1.0"

__all__ = [
    "TRANSPORTS",
    "Transport",
    "UCGMObjective",
    "count_nfe",
    "get_transport",
    "guided",
    "sample",
    "time_grid",
]
