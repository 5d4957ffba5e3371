"""Sharded encoding: images -> model-space latents in safetensors shards that a rerun can trust or redo.

Shard s holds the images ``files[s*shard_size : (s+1)*shard_size]`` that could be read, as
``latents`` [n, C, H, W] float32 (model space, m = (z - latent_mean) / latent_std) and ``labels``
[n] int64; with ``flip`` row 2i is image i and row 2i+1 its mirror. The safetensors metadata key
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


def encode_shard(
    index: int, files: Sequence[str], labels: Sequence[int], pipeline: Pipeline, resolved: ResolvedVae,
    settings: Mapping[str, Any], latent_shape: tuple[int, int, int], batch_size: int, device: torch.device,
    advance: Callable[[int], None],
) -> bytes:
    """The bytes of shard `index` (safetensors with the `ucgm` metadata)."""
    spec = resolved.spec
    generator = None
    if settings["sample_posterior"]:
        seed = int(np.random.SeedSequence([settings["seed"], index, 0x5EED]).generate_state(1)[0])
        generator = torch.Generator(device=device).manual_seed(seed)
    chunks: list[Tensor] = []
    kept_labels: list[int] = []
    skipped: list[list[str]] = []
    batch: list[np.ndarray] = []
    batch_labels: list[int] = []

    def flush() -> None:
        if not batch:
            return
        x = to_pixel_range(np.stack(batch), spec.pixel_range)
        if settings["flip"]:
            x = torch.stack([x, x.flip(-1)], dim=1).flatten(0, 1)  # image, mirror, image, mirror, ...
        m = encode(x.to(device), spec, resolved.module, sample=settings["sample_posterior"], generator=generator)
        chunks.append(m.float().cpu())
        for y in batch_labels:
            kept_labels.extend([y, y] if settings["flip"] else [y])
        advance(len(batch))
        batch.clear()
        batch_labels.clear()

    for rel, y, image in zip(files, labels, pipeline):
        if isinstance(image, str):
            skipped.append([rel, image])
            advance(1)
            continue
        batch.append(image)
        batch_labels.append(y)
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


