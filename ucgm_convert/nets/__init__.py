"""Networks reimplemented from each source family, keyed by architecture name."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from torch import nn

from .sit import SiT

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {"sit": SiT}


def build_network(arch: str, **hparams: Any) -> nn.Module:
    """Instantiate architecture `arch` with its hyperparameters; errors name what is wrong."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    try:
        return ARCHITECTURES[arch](**hparams)
    except TypeError as err:
        raise ValueError(f"bad hyperparameters for architecture {arch!r}: {err}") from None
