"""Per-sample random streams: sample i depends only on (seed, i), never on batching."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch
from torch import Tensor


def sample_seed(seed: int, index: int) -> int:
    """A well-mixed 63-bit seed for sample `index` of a run seeded with `seed`."""
    state = np.random.SeedSequence([int(seed), int(index)]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def sample_generators(seed: int, indices: Sequence[int]) -> list[torch.Generator]:
    """One CPU generator per sample index (CPU, so noise is identical on every device)."""
    return [torch.Generator().manual_seed(sample_seed(seed, i)) for i in indices]


def initial_noise(generators: Sequence[torch.Generator], shape: Sequence[int]) -> Tensor:
    """Stack one standard-normal draw of `shape` per generator: the sampler's starting noise."""
    return torch.stack([torch.randn(tuple(shape), generator=g) for g in generators])
