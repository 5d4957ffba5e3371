"""Classifier-free guidance with an interval, as a model_fn wrapper for `uc.sample`.

    F = F_u + scale * (F_c - F_u)     when lo <= t <= hi (t in the model's own convention)
    F = F_c                           otherwise

F_u comes from the null class (= num_classes) in the same batched forward as F_c, or from a
separate network (`uncond_model`: EDM2's guidance network, autoguidance).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import torch
from torch import Tensor

Channels = int | str | None


def _null_class(model: Any, null_class: int | None) -> int:
    if null_class is not None:
        return int(null_class)
    for attr in ("null_class", "num_classes"):
        value = getattr(model, attr, None)
        if value is not None:
            return int(value)
    raise ValueError("guided() needs null_class= for a model without a null_class or num_classes attribute")


def _guided_channels(model: Any, channels: Channels) -> int | None:
    """How many leading channels guidance touches (None: all); None defers to the model's policy."""
    if channels is None:
        channels = getattr(model, "guidance_channels", None)
    if channels is None or channels == "all":
        return None
    if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
        raise ValueError(f"channels must be None, 'all' or a positive integer, got {channels!r}")
    return channels


def guided(
    model: Callable[..., Tensor],
    scale: float,
    interval: Sequence[float] = (0.0, 1.0),
    channels: Channels = None,
    uncond_model: Callable[..., Tensor] | None = None,
    null_class: int | None = None,
) -> Callable[..., Tensor]:
    """Wrap `model(x_t, t, y)` into a guided model_fn with the same signature.

    `channels`: None uses the model's declared policy (`model.guidance_channels`, e.g. 3 for
    LightningDiT's published guidance), "all" guides every channel, n guides the first n.
    Batches with no row inside the interval run the conditional forward only (deciding that reads t on the
    host, one device sync per call; an interval covering [0, 1] skips the check).
    """
    lo, hi = (float(v) for v in interval)
    if lo > hi:
        raise ValueError(f"guidance interval must be (lo, hi) with lo <= hi, got {tuple(interval)!r}")
    n_channels = _guided_channels(model, channels)
    null = None if uncond_model is not None else _null_class(model, null_class)
    scale = float(scale)

    # Sampling times lie in [0, 1]: an interval covering it needs no look at t on the host (no device sync).
    covers_all = lo <= 0.0 and hi >= 1.0

    def guided_fn(x_t: Tensor, t: Tensor, y: Tensor, **kwargs: Any) -> Tensor:
        inside = (t >= lo) & (t <= hi)
        if not covers_all and not bool(inside.any()):
            return model(x_t, t, y, **kwargs)
        if uncond_model is None:
            both = model(
                torch.cat([x_t, x_t]), torch.cat([t, t]), torch.cat([y, torch.full_like(y, null)]), **kwargs
            )
            cond, uncond = both.chunk(2)
        else:
            cond, uncond = model(x_t, t, y, **kwargs), uncond_model(x_t, t, y, **kwargs)
        mixed = uncond + scale * (cond - uncond)
        if n_channels is not None:
            mixed = torch.cat([mixed[:, :n_channels], cond[:, n_channels:]], dim=1)
        mask = inside.view((-1,) + (1,) * (cond.ndim - 1))
        return torch.where(mask, mixed, cond)

    guided_fn.guidance = {"scale": scale, "interval": (lo, hi), "channels": n_channels}  # type: ignore[attr-defined]
    return guided_fn
