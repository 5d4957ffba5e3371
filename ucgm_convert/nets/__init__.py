"""Networks reimplemented from each source family, keyed by architecture name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .ddt import DDT
from .edm2 import EDM2UNet
from .lightningdit import LightningDiT
from .sit import SiT

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "sit": SiT, "edm2-unet": EDM2UNet, "ddt": DDT, "lightningdit": LightningDiT,
}


def build_network(arch: str, **hparams: Any) -> nn.Module:
    """Instantiate architecture `arch` with its hyperparameters; errors name what is wrong."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    try:
        return ARCHITECTURES[arch](**hparams)
    except TypeError as err:
        raise ValueError(f"bad hyperparameters for architecture {arch!r}: {err}") from None
