"""Sharded encoding: images -> model-space latents in safetensors shards that a rerun can trust or redo.

Shard s holds the images ``files[s*shard_size : (s+1)*shard_size]`` that could be read, as
``latents`` [n, C, H, W] float32 (model space, m = (z - latent_mean) / latent_std) and ``labels``
[n] int64: one row per image, stored mirrored with probability ``flip`` (a coin per image), or with
``mirror`` two rows, image i then its mirror. With ``sample_posterior`` a row is a posterior draw.
Coins and posterior noise come from ``seed`` and the image's index in the listing alone, so neither
the batch size nor the number of processes changes a row. The safetensors metadata key
``ucgm`` (JSON) holds the shard's settings fingerprint, its unreadable files and the float64
per-channel sums of the raw latents, so finished shards are recognised and statistics combine.
"""

from __future__ import annotations

import hashlib
import json
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save as safetensors_bytes
from torch import Tensor

from ...errors import UCGMError
from ...vae import encode
from .images import load_image, to_pixel_range
from .vae import ResolvedVae

FORMAT = "ucgm-prepare-data/1"
META_KEY = "ucgm"  # the one safetensors metadata entry (JSON), so the header is byte-stable



def fingerprint(settings: Mapping[str, Any], files: Sequence[str], labels: Sequence[int]) -> str:
    h = hashlib.sha256(json.dumps(settings, sort_keys=True).encode())
    for f, y in zip(files, labels):
        h.update(f"{f}\t{y}\n".encode())
    return h.hexdigest()


def shard_info(path: Path) -> dict[str, Any] | None:
    """The `ucgm` metadata of a finished shard, or None when unreadable / not ours."""
    try:
        with safe_open(str(path), framework="pt") as handle:
            meta = handle.metadata() or {}
            keys = set(handle.keys())
    except (SafetensorError, OSError, RuntimeError, ValueError):
        return None
    try:
        info = json.loads(meta.get(META_KEY, ""))
    except ValueError:
        return None
    if not isinstance(info, dict) or info.get("format") != FORMAT or not {"latents", "labels"} <= keys:
        return None
    return info


def remove_temps(out: Path, name: str) -> None:
    for leftover in out.glob(f".{name}.tmp-*"):
        leftover.unlink(missing_ok=True)


class Pipeline:
    """Images decoded by threads ahead of the encoder, in order; (index, array or error) pairs."""

    def __init__(self, root: Path, files: Sequence[str], resolution: int, workers: int, ahead: int) -> None:
        self.root, self.files, self.resolution, self.ahead = root, files, resolution, max(ahead, 1)
        self.pool = ThreadPoolExecutor(max_workers=max(workers, 1)) if workers > 0 else None

    def _load(self, rel: str) -> np.ndarray | str:
        try:
            return load_image(self.root / rel, self.resolution)
        except Exception as err:
            return f"{type(err).__name__}: {err}".replace("\n", " ").replace("\t", " ")

    def __iter__(self) -> Iterator[np.ndarray | str]:
        if self.pool is None:
            for rel in self.files:
                yield self._load(rel)
            return
        pending: deque[Future] = deque()
        it = iter(self.files)
        for rel in it:
            pending.append(self.pool.submit(self._load, rel))
            if len(pending) >= self.ahead:
                break
        while pending:
            result = pending.popleft().result()
            nxt = next(it, None)
            if nxt is not None:
                pending.append(self.pool.submit(self._load, nxt))
            yield result

    def close(self) -> None:
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


FLIP_TAG, NOISE_TAG = 0xF11B, 0x5EED  # separate per-image streams for the flip coin and the posterior noise


def flipped(seed: int, image: int, probability: float) -> bool:
    """Whether image number `image` of the listing is stored mirrored: a coin of `probability` from `seed`."""
    return probability > 0 and float(np.random.default_rng([seed, image, FLIP_TAG]).random()) < probability


def posterior_noise(seed: int, image: int, mirrored: bool, shape: tuple[int, ...]) -> Tensor:
    """Standard-normal noise of one row's posterior draw z = mean + std * noise (CPU float32, per image)."""
    state = int(np.random.SeedSequence([seed, image, NOISE_TAG, int(mirrored)]).generate_state(1)[0])
    return torch.randn(shape, generator=torch.Generator().manual_seed(state))


def _rows(image: int, settings: Mapping[str, Any]) -> list[bool]:
    """The orientations stored for one image: [as is, mirrored] with mirror, else one (a coin)."""
    return [False, True] if settings["mirror"] else [flipped(settings["seed"], image, settings["flip"])]


def encode_shard(
    index: int, files: Sequence[str], labels: Sequence[int], pipeline: Pipeline, resolved: ResolvedVae,
    settings: Mapping[str, Any], latent_shape: tuple[int, int, int], batch_size: int, device: torch.device,
    advance: Callable[[int], None],
) -> bytes:
    """The bytes of shard `index` (safetensors with the `ucgm` metadata)."""
    spec = resolved.spec
    first = index * settings["shard_size"]  # listing index of the shard's first image
    chunks: list[Tensor] = []
    kept_labels: list[int] = []
    skipped: list[list[str]] = []
    batch: list[tuple[np.ndarray, int, int]] = []  # (pixels, listing index, label)
    num_flipped = 0

    def flush() -> None:
        nonlocal num_flipped
        if not batch:
            return
        x = to_pixel_range(np.stack([b[0] for b in batch]), spec.pixel_range)
        rows, keys = [], []
        for pixels, (_, image, y) in zip(x, batch):
            for mirrored in _rows(image, settings):
                rows.append(pixels.flip(-1) if mirrored else pixels)
                keys.append((image, mirrored))
                kept_labels.append(y)
                num_flipped += int(mirrored and not settings["mirror"])
        noise = None
        if settings["sample_posterior"]:
            noise = torch.stack([posterior_noise(settings["seed"], i, m, latent_shape) for i, m in keys])
        m = encode(torch.stack(rows).to(device), spec, resolved.module, noise=noise)
        chunks.append(m.float().cpu())
        advance(len(batch))
        batch.clear()

    for j, (rel, y, image) in enumerate(zip(files, labels, pipeline)):
        if isinstance(image, str):
            skipped.append([rel, image])
            advance(1)
            continue
        batch.append((image, first + j, y))
        if len(batch) >= batch_size:
            flush()
    flush()
    latents = torch.cat(chunks) if chunks else torch.zeros(0, *latent_shape)
    if tuple(latents.shape[1:]) != latent_shape:
        raise UCGMError(f"shard {index}: latents of shape {list(latents.shape[1:])}, expected {list(latent_shape)}")
    raw = latents.double() * _channel_stat(spec.channel_values("latent_std", latent_shape[0])) \
        + _channel_stat(spec.channel_values("latent_mean", latent_shape[0]))
    info = {
        "format": FORMAT,
        "fingerprint": settings["fingerprints"][index],
        "shard": index,
        "num_images": len(files),
        "num_samples": int(latents.shape[0]),
        "num_flipped": num_flipped,
        "skipped": skipped,
        "raw_sum": raw.sum(dim=(0, 2, 3)).tolist(),
        "raw_sumsq": raw.square().sum(dim=(0, 2, 3)).tolist(),
        "raw_count": int(raw.shape[0] * raw.shape[2] * raw.shape[3]),
    }
    tensors = {"latents": latents.contiguous(), "labels": torch.tensor(kept_labels, dtype=torch.int64)}
    return safetensors_bytes(tensors, metadata={META_KEY: json.dumps(info)})


def _channel_stat(values: list[float]) -> Tensor:
    return torch.tensor(values, dtype=torch.float64).view(1, -1, 1, 1)


def measured_statistics(infos: Sequence[Mapping[str, Any]]) -> tuple[list[float], list[float]]:
    """Per-channel mean and std of the raw latents over shards' `raw_sum` / `raw_sumsq` / `raw_count`."""
    count = sum(int(i["raw_count"]) for i in infos)
    if count == 0:
        return [], []
    total = np.sum([i["raw_sum"] for i in infos if i["raw_count"]], axis=0)
    total_sq = np.sum([i["raw_sumsq"] for i in infos if i["raw_count"]], axis=0)
    mean = total / count
    var = np.maximum(total_sq / count - mean**2, 0.0)
    return [float(v) for v in mean], [float(v) for v in np.sqrt(var)]


