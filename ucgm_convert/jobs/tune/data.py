"""Training data of `ucgm tune`: a prepared latent folder, or the demo shapes made on the fly, and its order.

`--data demo` is `ucgm_convert.demo_data.make_shapes(size, seed)`: the 16x16 procedural shapes the
embedded demo model was trained on, made deterministically in memory.

The order in which samples are visited is `batch_indices(num_samples, global_batch, seed, step)`:
a pure function of (seed, step), so a resumed run and a run on any number of processes see
exactly the same batches; every random draw of micro-batch c of step s comes from `chunk_seed`.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import Tensor

from ...demo_data import IMAGE_SIZE, NUM_CLASSES, make_shapes
from ...errors import UCGMError
from ...formats.latent_folder import LatentFolder
from ...settings import VaeSpec

DEMO = "demo"
DEMO_SIZE = 50_000


class DemoShapes:
    """`--data demo`: make_shapes(size, seed) images in [-1, 1], the demo model's training data."""

    def __init__(self, size: int = DEMO_SIZE, seed: int = 0) -> None:
        if size < 1:
            raise UCGMError(f"--demo-size: expected an integer >= 1, got {size}")
        self.images, self.labels = make_shapes(size, seed)
        self.num_samples = size
        self.latent_shape = (3, IMAGE_SIZE, IMAGE_SIZE)
        self.num_classes = NUM_CLASSES
        self.description = f"demo shapes (make_shapes({size}, seed={seed}): 16x16 RGB, {NUM_CLASSES} classes)"

    def get(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        return self.images[indices], self.labels[indices]

    def check_statistics(self, vae_spec: VaeSpec) -> None:
        if vae_spec.name != "identity":
            raise UCGMError(f"--data demo: the demo shapes are pixels, but the model works in {vae_spec.name!r} "
                            "latents; pass --data with a prepared latent folder")


Dataset = LatentFolder | DemoShapes


def open_dataset(data: str | Path, demo_size: int = DEMO_SIZE, demo_seed: int = 0) -> Dataset:
    """`demo` -> DemoShapes; anything else -> LatentFolder (checked)."""
    if str(data) == DEMO:
        return DemoShapes(demo_size, demo_seed)
    return LatentFolder(data)


def check_against_model(data: Dataset, latent_shape: Sequence[int], num_classes: int,
                        vae_spec: VaeSpec | None = None) -> None:
    """UCGMError (naming both sides) when the data does not fit the model."""
    model_shape = tuple(int(v) for v in latent_shape)
    if tuple(data.latent_shape) != model_shape:
        raise UCGMError(f"--data: latents have shape {list(data.latent_shape)} (C, H, W) but the model expects "
                        f"{list(model_shape)}; prepare the data with this model's VAE and resolution")
    labels = data.labels
    bad = (labels < 0) | (labels >= num_classes)
    if bool(bad.any()):
        first = int(bad.nonzero()[0, 0])
        raise UCGMError(f"--data: {int(bad.sum())} label(s) outside the model's classes [0, {num_classes - 1}] "
                        f"(first: sample {first} has label {int(labels[first])})")
    if vae_spec is not None:
        data.check_statistics(vae_spec)


def _epoch_seed(seed: int, epoch: int) -> int:
    state = np.random.SeedSequence([int(seed), int(epoch), 0x7A11]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


_PERM_CACHE: dict[tuple[int, int, int], Tensor] = {}


def epoch_permutation(num_samples: int, seed: int, epoch: int) -> Tensor:
    """The visiting order of epoch `epoch`: a permutation of range(num_samples) from (seed, epoch)."""
    key = (num_samples, seed, epoch)
    if key not in _PERM_CACHE:
        if len(_PERM_CACHE) >= 4:
            _PERM_CACHE.pop(next(iter(_PERM_CACHE)))
        gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
        _PERM_CACHE[key] = torch.randperm(num_samples, generator=gen)
    return _PERM_CACHE[key]


def batch_indices(num_samples: int, global_batch: int, seed: int, step: int) -> Tensor:
    """Sample indices of global batch `step` (0-based): positions step*B .. step*B+B-1 of the
    concatenated epoch permutations. A pure function of its arguments."""
    start = step * global_batch
    pos = torch.arange(start, start + global_batch)
    epochs = pos // num_samples
    out = torch.empty(global_batch, dtype=torch.long)
    for epoch in torch.unique(epochs).tolist():
        mask = epochs == epoch
        out[mask] = epoch_permutation(num_samples, seed, epoch)[pos[mask] % num_samples]
    return out


def epochs_seen(num_samples: int, global_batch: int, steps: int) -> float:
    """How many passes over the data `steps` batches make."""
    return steps * global_batch / num_samples if num_samples else math.inf


def chunk_seed(seed: int, step: int, chunk: int) -> int:
    """The RNG seed of micro-batch `chunk` of step `step` (0-based): t, z and any dropout."""
    state = np.random.SeedSequence([int(seed), int(step), int(chunk), 0x0CC7]).generate_state(2, dtype=np.uint64)
    return int(state[0] >> np.uint64(1))


def chunk_drops(global_batch: int, group: int, label_drop: float, micro: int) -> list[int]:
    """Null-class rows of each micro-batch: of every `group` consecutive rows of the global batch (a
    last group may be shorter) the last round(label_drop * size) are dropped (the reference's count
    per process batch), and each micro-batch drops as many rows, at its end, as it holds of those
    (exact positions when micro divides group). So the count depends on neither accumulation nor
    the process count."""
    pos = torch.arange(global_batch)
    size = torch.clamp(global_batch - (pos // group) * group, max=group)
    keep = size - torch.tensor([round(label_drop * int(n)) for n in size.tolist()])
    dropped = (pos % group) >= keep
    return [int(n) for n in dropped.view(-1, micro).sum(dim=1)]


def label_draws(seed: int, step: int, global_batch: int) -> Tensor:
    """[2, B] uniforms of step `step`: per-sample train-mode label dropout of the student (row 0: its
    forward and the replayed forwards) and of the teacher (row 1: a fresh mask, as the reference)."""
    state = np.random.SeedSequence([int(seed), int(step), 0x1AB3]).generate_state(2, dtype=np.uint64)
    gen = torch.Generator().manual_seed(int(state[0] >> np.uint64(1)))
    return torch.rand((2, global_batch), generator=gen)
