"""Condition-encoder sharing across sampler steps (DDT, arXiv 2504.05741, "encoder sharing").

A network whose forward is encoder -> decoder, with the decoder reading the encoder's output
s = enc(x_t, t, y) as its condition, may reuse s from an earlier evaluation instead of
recomputing it. The network opts in by computing s through `shared_encoder(self, batch, fn)`;
`uc.sample(..., encoder_refresh=...)` opens a `sharing` scope that decides, per evaluation,
whether s is recomputed, and counts encoder and decoder evaluations separately. Outside a
scope (training, plain forwards) `shared_encoder` always computes.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import Any

from torch import Tensor


@dataclass
class EncoderUse:
    """Counts of one sampling run: encoder and decoder evaluations (batched forwards), and the cache."""

    encoder_evals: int = 0
    decoder_evals: int = 0
    refresh: bool = True
    cache: dict[tuple[int, int], Any] = field(default_factory=dict, repr=False)


_ACTIVE: ContextVar[EncoderUse | None] = ContextVar("ucgm_encoder_sharing", default=None)


@contextmanager
def sharing(use: EncoderUse) -> Iterator[EncoderUse]:
    """A scope in which networks that share their encoder read `use.refresh` and update its counts."""
    token = _ACTIVE.set(use)
    try:
        yield use
    finally:
        _ACTIVE.reset(token)
        use.cache.clear()


def shared_encoder(owner: object, batch: int, compute: Callable[[], Tensor]) -> Tensor:
    """The encoder output for this forward of `owner`: reused from the scope's cache when the current
    evaluation does not refresh and one for the same network and batch size exists, else computed."""
    use = _ACTIVE.get()
    if use is None:
        return compute()
    use.decoder_evals += 1
    key = (id(owner), int(batch))
    if not use.refresh and key in use.cache:
        return use.cache[key]
    out = compute()
    use.encoder_evals += 1
    use.cache[key] = out
    return out
