"""Networks reimplemented from each source family, keyed by architecture name.

A checkpoint's config.json is untrusted input: `check_hyperparameters` validates every
constructor argument against the constructor's own type hints (strict types, every integer in
[0, 2^20], every float finite, sequences of at most 64 entries) before anything is built, and
`build_network(..., device="meta")` builds without allocating so the size can be checked first.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types
import typing
from collections.abc import Callable, Sequence
from typing import Annotated, Any

import annotated_types as at
import torch
from pydantic import Field, create_model
from torch import nn

from ..settings.base import Bool, Float, Int, Settings
from .ddt import DDT
from .edm2 import EDM2UNet
from .lightningdit import LightningDiT
from .sit import SiT

ARCHITECTURES: dict[str, Callable[..., nn.Module]] = {
    "sit": SiT, "edm2-unet": EDM2UNet, "ddt": DDT, "lightningdit": LightningDiT,
}
MAX_INT = 1 << 20  # no released network has a width or class count near this
# Counts of repeated modules, bounded tighter: building a million blocks (even on meta) takes minutes.
LIMITS = {"depth": 1024, "encoder_depth": 1024, "num_blocks": 64, "num_heads": 4096}
MAX_FLOAT = 1e6
MAX_ITEMS = 64

BoundedInt = Annotated[Int, at.Ge(0), at.Le(MAX_INT)]
BoundedFloat = Annotated[Float, at.Ge(-MAX_FLOAT), at.Le(MAX_FLOAT)]


def _field_type(hint: Any) -> Any:
    """The validated type of a constructor argument annotated `hint` (int, float, bool, sequences, optionals)."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        return typing.Union[tuple(_field_type(a) if a is not type(None) else a for a in typing.get_args(hint))]
    if origin in (Sequence, list, tuple) or hint in (Sequence, list):
        (item,) = typing.get_args(hint)[:1] or (int,)
        return Annotated[list[_field_type(item)], at.MaxLen(MAX_ITEMS)]
    return {int: BoundedInt, float: BoundedFloat, bool: Bool}.get(hint, hint)


@functools.cache
def hyperparameter_model(arch: str) -> type[Settings]:
    """A settings model of `arch`'s constructor arguments, from its signature and type hints."""
    init = ARCHITECTURES[arch].__init__  # type: ignore[misc]
    hints = typing.get_type_hints(init)
    fields: dict[str, Any] = {}
    for name, param in inspect.signature(init).parameters.items():
        if name == "self":
            continue
        default = param.default if param.default is not inspect.Parameter.empty else ...
        if isinstance(default, tuple):
            default = list(default)
        kind = _field_type(hints[name])
        if name in LIMITS:
            kind = Annotated[kind, at.Le(LIMITS[name])]
        fields[name] = (kind, Field(default=default))
    return create_model(f"{ARCHITECTURES[arch].__name__}Hyperparameters", __base__=Settings, **fields)


def check_hyperparameters(arch: str, hparams: dict[str, Any]) -> dict[str, Any]:
    """`hparams` validated for architecture `arch` (ValueError naming the architecture or the argument)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"unknown architecture {arch!r}; known: {', '.join(sorted(ARCHITECTURES))}")
    return hyperparameter_model(arch)(**hparams).model_dump()


def build_network(arch: str, device: torch.device | str | None = None, **hparams: Any) -> nn.Module:
    """Instantiate architecture `arch` (on `device`; "meta" allocates nothing) after checking its arguments."""
    kwargs = check_hyperparameters(arch, hparams)
    try:
        with torch.device(device) if device is not None else contextlib.nullcontext():
            return ARCHITECTURES[arch](**kwargs)
    except (TypeError, ValueError, ZeroDivisionError, IndexError, RuntimeError) as err:
        raise ValueError(f"bad hyperparameters for architecture {arch!r}: {err}") from None


def size_in_bytes(net: nn.Module) -> int:
    """Bytes the network's parameters and buffers take as float32 (works on the meta device)."""
    return 4 * sum(t.numel() for t in [*net.parameters(), *net.buffers()])
