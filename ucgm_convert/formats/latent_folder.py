"""The prepared latent folder: what `ucgm prepare-data` writes and `ucgm tune --data` reads.

A prepared latent folder (what `ucgm prepare-data` writes) holds

- ``shard-00000.safetensors``, ``shard-00001.safetensors``, ...: tensors ``latents``
  [n, C, H, W] (any float dtype; read as float32) and ``labels`` [n] int64;
- ``meta.json``: ``{"num_samples", "latent_shape", "num_classes", "latent_mean",
  "latent_std", "vae", "shards": [file names in order]}``.

Latents are MODEL-SPACE latents, m = (z - latent_mean) / latent_std (what `vae.encode`
returns), so they feed the network as they are; `latent_mean` / `latent_std` record the
statistics they were normalised with and are checked against the model's VAE spec.

Rows are read lazily (memory-mapped safetensors slices), so a dataset larger than memory works
and eight processes on one machine share the page cache. Labels are read up front (N int64)
so that they can be checked against the model's classes before training starts.

"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import Tensor

from ..errors import UCGMError
from ..foundation import write_file_atomic
from ..settings import VaeSpec

__all__ = ["META_NAME", "LatentFolder", "shard_name", "write_latent_folder"]

META_NAME = "meta.json"
META_KEYS = ("num_samples", "latent_shape", "num_classes", "latent_mean", "latent_std", "vae", "shards")


def shard_name(index: int) -> str:
    """File name of shard `index`: shard-00000.safetensors."""
    return f"shard-{index:05d}.safetensors"


class LatentFolder:
    """A prepared latent folder, checked on opening; `get(indices)` returns (latents, labels)."""

    def __init__(self, folder: str | Path) -> None:
        self.folder = Path(folder)
        where = f"--data {self.folder}"
        if not self.folder.exists():
            raise UCGMError(f"{where}: no such folder (make one with `ucgm prepare-data`, or pass --data demo)")
        if not self.folder.is_dir():
            raise UCGMError(f"{where}: not a folder; expected a prepared latent folder "
                            "(meta.json + shard-*.safetensors)")
        if not any(self.folder.iterdir()):
            raise UCGMError(f"{where}: the folder is empty; expected meta.json + shard-*.safetensors "
                            "(made by `ucgm prepare-data`)")
        meta_path = self.folder / META_NAME
        if not meta_path.is_file():
            raise UCGMError(f"{where}: no {META_NAME}; not a prepared latent folder (made by `ucgm prepare-data`)")
        try:
            meta = json.loads(meta_path.read_text())
        except ValueError as err:
            raise UCGMError(f"{meta_path}: invalid JSON ({err})") from None
        if not isinstance(meta, dict):
            raise UCGMError(f"{meta_path}: expected a JSON object with keys {', '.join(META_KEYS)}")
        missing = [k for k in ("num_samples", "latent_shape", "shards") if k not in meta]
        if missing:
            raise UCGMError(f"{meta_path}: missing key(s) {', '.join(missing)}")
        self.meta: dict[str, Any] = meta
        shards = meta["shards"]
        if not isinstance(shards, list) or not all(isinstance(s, str) for s in shards):
            raise UCGMError(f"{meta_path}: shards must be a list of file names, got {shards!r}")
        try:
            shape = tuple(int(v) for v in meta["latent_shape"])
            self.num_samples = int(meta["num_samples"])
        except (TypeError, ValueError):
            raise UCGMError(f"{meta_path}: latent_shape must be [C, H, W] and num_samples an integer, got "
                            f"{meta['latent_shape']!r} and {meta['num_samples']!r}") from None
        if len(shape) != 3:
            raise UCGMError(f"{meta_path}: latent_shape must be [C, H, W], got {list(shape)}")
        self.latent_shape: tuple[int, int, int] = shape  # type: ignore[assignment]
        self.num_classes = meta.get("num_classes")
        if self.num_samples < 1 or not shards:
            raise UCGMError(f"{where}: the dataset is empty (num_samples {self.num_samples}, "
                            f"{len(shards)} shard(s))")

        self._handles: list[Any] = []
        self._slices: list[Any] = []
        labels: list[Tensor] = []
        sizes: list[int] = []
        for name in shards:
            path = self.folder / name
            if not path.is_file():
                raise UCGMError(f"{where}: {META_NAME} lists {name}, which does not exist")
            try:
                handle = safe_open(str(path), framework="pt")
                keys = set(handle.keys())
                if not {"latents", "labels"} <= keys:
                    raise UCGMError(f"{path}: expected tensors 'latents' and 'labels', found {', '.join(sorted(keys))}")
                latents = handle.get_slice("latents")
                got = tuple(latents.get_shape())
                shard_labels = handle.get_tensor("labels")
            except (SafetensorError, OSError, RuntimeError) as err:
                raise UCGMError(f"{path}: not a readable safetensors file (truncated or corrupted?): {err}") from None
            if len(got) != 4 or got[1:] != shape:
                raise UCGMError(f"{path}: latents have shape {list(got)} but {META_NAME} says "
                                f"[N, {', '.join(map(str, shape))}]")
            if latents.get_dtype() not in ("F32", "F16", "BF16", "F64"):
                raise UCGMError(f"{path}: latents must be floating point, got {latents.get_dtype()}")
            if shard_labels.shape != (got[0],) or shard_labels.dtype.is_floating_point:
                raise UCGMError(f"{path}: labels must be integers of shape [{got[0]}], got "
                                f"{shard_labels.dtype} {list(shard_labels.shape)}")
            self._handles.append(handle)
            self._slices.append(latents)
            labels.append(shard_labels.long())
            sizes.append(got[0])
        total = sum(sizes)
        if total != self.num_samples:
            raise UCGMError(f"{where}: {META_NAME} says num_samples {self.num_samples} but the shards hold {total}")
        self.labels = torch.cat(labels)
        self._starts = np.cumsum([0, *sizes])

    @property
    def description(self) -> str:
        return (f"{self.folder} ({self.num_samples} latents of shape {list(self.latent_shape)}, "
                f"{len(self._slices)} shard(s))")

    def get(self, indices: Tensor) -> tuple[Tensor, Tensor]:
        """Rows `indices` as (latents [n, C, H, W] float32, labels [n] int64)."""
        idx = indices.tolist()
        shard_of = np.searchsorted(self._starts, idx, side="right") - 1
        rows = []
        for i, s in zip(idx, shard_of):
            r = int(i - self._starts[s])
            rows.append(self._slices[s][r : r + 1])
        latents = torch.cat(rows).float() if rows else torch.empty(0, *self.latent_shape)
        return latents, self.labels[indices]

    def check_statistics(self, vae_spec: VaeSpec) -> None:
        """UCGMError when the latents were normalised with other statistics than the model's VAE spec."""
        for key in ("latent_mean", "latent_std"):
            ours, theirs = self.meta.get(key), getattr(vae_spec, key)
            if ours is None or theirs is None:
                continue
            a = np.atleast_1d(np.asarray(ours, dtype=np.float64))
            b = np.atleast_1d(np.asarray(theirs, dtype=np.float64))
            comparable = a.shape == b.shape or a.size == 1 or b.size == 1
            if not comparable or not np.allclose(a, b, rtol=1e-4, atol=1e-6):
                raise UCGMError(f"--data {self.folder}: latents were normalised with {key} {ours!r} but the model's "
                                f"VAE expects {theirs!r}; prepare the data for this model (`ucgm prepare-data`)")


def write_latent_folder(
    folder: str | Path,
    latents: Tensor,
    labels: Tensor,
    shard_size: int = 10_000,
    num_classes: int | None = None,
    latent_mean: Any = 0.0,
    latent_std: Any = 1.0,
    vae: Any = "identity",
) -> Path:
    """Write latents [N, C, H, W] and labels [N] as a prepared latent folder (shards + meta.json)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    n = latents.shape[0]
    names = []
    for i, start in enumerate(range(0, n, shard_size)):
        name = shard_name(i)
        save_file({"latents": latents[start : start + shard_size].contiguous(),
                   "labels": labels[start : start + shard_size].long().contiguous()}, str(folder / name))
        names.append(name)
    meta = {
        "num_samples": int(n),
        "latent_shape": list(latents.shape[1:]),
        "num_classes": int(num_classes if num_classes is not None else int(labels.max()) + 1),
        "latent_mean": latent_mean,
        "latent_std": latent_std,
        "vae": vae,
        "shards": names,
    }
    write_file_atomic(folder / META_NAME, (json.dumps(meta, indent=2) + "\n").encode())
    return folder
