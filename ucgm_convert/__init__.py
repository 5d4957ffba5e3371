"""ucgm-convert: load third-party diffusion / flow checkpoints, sample them with UCGM-S,
tune them into few-step generators with UCGM-T, measure and publish them."""

from ._version import __version__
from .checkpoint import load_checkpoint, save_checkpoint
from .errors import UCGMError
from .guidance import guided
from .loading import load
from .model import GenerativeModel, ModelConfig
from .objective import UCGMObjective
from .sampler import count_encoder_evals, count_nfe, sample, time_grid
from .searcher import search
from .sharing import EncoderUse
from .transports import TRANSPORTS, Transport, get_transport

__all__ = [
    "TRANSPORTS",
    "EncoderUse",
    "GenerativeModel",
    "ModelConfig",
    "Transport",
    "UCGMError",
    "UCGMObjective",
    "__version__",
    "count_encoder_evals",
    "count_nfe",
    "get_transport",
    "guided",
    "load",
    "load_checkpoint",
    "sample",
    "save_checkpoint",
    "search",
    "time_grid",
]
