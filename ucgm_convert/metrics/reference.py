"""Everything a reference file holds for the metrics of the table: statistics, pool features or images.

| metric | what it needs | ADM VIRTUAL_*.npz | `ucgm eval ref` .npz | EDM2 img*.pkl | torch-fidelity .pt |
|---|---|---|---|---|---|
| fid | mu, sigma (pool3) | mu, sigma | mu, sigma | fid.mu/sigma | mu, sigma |
| sfid | mu_s, sigma_s (2023) | mu_s, sigma_s | mu_s, sigma_s | -- | -- |
| prec, rec | the reference's pool rows | arr_0 images (run through Inception) | pool [N, 2048] | -- | -- |
| fd_dinov2 | mu, sigma of DINOv2 CLS | -- | mu_dinov2, sigma_dinov2 | fd_dinov2.mu/sigma | -- |
| is | nothing | | | | |

arr_0 may also hold pool features directly (float [N, 2048]). A reference with only statistics
cannot give precision / recall: the k-NN radii of the real manifold need every reference row.
"""

from __future__ import annotations

import zipfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import UCGMError
from ..foundation import sha256_file
from . import METRICS, parse_metrics
from .dinov2 import read_edm2_dinov2_stats
from .fid import FEATURE_DIM, load_reference
from .sfid import read_adm_spatial_stats

POOL_KEY, DINO_MU, DINO_SIGMA = "pool", "mu_dinov2", "sigma_dinov2"
_PRC = ("prec", "rec")


@dataclass
class ReferenceSet:
    """The parts of one reference file the requested metrics use (stats: metric -> (mu, sigma))."""

    path: str
    sha256: str
    format: str
    meta: dict[str, Any] = field(default_factory=dict)
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = field(default_factory=dict)
    pool: np.ndarray | None = None  # reference pool features [N, 2048] (prec / rec)
    images: np.ndarray | None = None  # reference images uint8 [N, H, W, 3] to run through Inception (prec / rec)

    @property
    def resolution(self) -> tuple[int, int] | None:
        res = self.meta.get("resolution")
        if res is not None:
            return int(res[0]), int(res[1])
        return (int(self.images.shape[1]), int(self.images.shape[2])) if self.images is not None else None

    def describe(self) -> dict[str, Any]:
        """What results.json records about the reference."""
        rows = len(self.pool) if self.pool is not None else len(self.images) if self.images is not None else None
        return {"path": self.path, "sha256": self.sha256, "format": self.format, **self.meta,
                "holds": sorted(self.stats) + (["pool rows"] if self.pool is not None else [])
                + (["images (arr_0)"] if self.images is not None else []),
                **({"prc_rows": rows} if rows is not None else {})}


def _npz_arrays(path: Path, keys: tuple[str, ...]) -> dict[str, np.ndarray]:
    try:
        with np.load(path, allow_pickle=False) as data:
            return {k: data[k] for k in keys if k in data.files}
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UCGMError(f"--ref {path}: not a readable .npz file ({err})") from None


def _is_npz(path: Path) -> bool:
    with open(path, "rb") as f:
        if f.read(2) != b"PK":
            return False
    try:
        with zipfile.ZipFile(path) as zf:
            return any(name.endswith(".npy") for name in zf.namelist())
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return False


def _has_any(path: Path, keys: tuple[str, ...]) -> bool:
    """Whether the .npz holds one of `keys` (its index only; nothing is read)."""
    try:
        with np.load(path, allow_pickle=False) as data:
            return any(k in data.files for k in keys)
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UCGMError(f"--ref {path}: not a readable .npz file ({err})") from None


def _prc_rows(path: Path, arrays: dict[str, np.ndarray]) -> tuple[np.ndarray | None, np.ndarray | None]:
    """(pool features, images) for precision / recall, from `pool` or `arr_0`; UCGMError when there are none."""
    if POOL_KEY in arrays:
        pool = arrays[POOL_KEY]
        if pool.ndim != 2 or pool.shape[1] != FEATURE_DIM or pool.dtype.kind != "f":
            raise UCGMError(f"--ref {path}: 'pool' must be float [N, {FEATURE_DIM}], got {pool.dtype} "
                            f"{list(pool.shape)}")
        return pool, None
    arr = arrays.get("arr_0")
    if arr is not None and arr.dtype == np.uint8 and arr.ndim == 4 and arr.shape[-1] == 3:
        return None, arr
    if arr is not None and arr.dtype.kind == "f" and arr.ndim == 2 and arr.shape[1] == FEATURE_DIM:
        return arr, None
    found = f"arr_0 is {arr.dtype} {list(arr.shape)}" if arr is not None else "it holds only statistics"
    raise UCGMError(f"--ref {path}: precision/recall need every reference row (pool features [N, {FEATURE_DIM}] or "
                    f"arr_0 images), but {found}; use ADM's VIRTUAL_*.npz or a reference from `ucgm eval ref`, or "
                    "drop prec,rec from --metrics")


def _checked(mu: np.ndarray, sigma: np.ndarray, path: Path, what: str) -> tuple[np.ndarray, np.ndarray]:
    mu, sigma = np.asarray(mu, np.float64), np.asarray(sigma, np.float64)
    if mu.ndim != 1 or sigma.shape != (len(mu), len(mu)) or not (np.isfinite(mu).all() and np.isfinite(sigma).all()):
        raise UCGMError(f"--ref {path}: {what} mu/sigma must be finite [D] and [D, D], got {list(mu.shape)} and "
                        f"{list(sigma.shape)}")
    return mu, sigma


def _dinov2_stats(path: Path, npz: bool) -> tuple[np.ndarray, np.ndarray]:
    if not npz:
        return read_edm2_dinov2_stats(path)
    arrays = _npz_arrays(path, (DINO_MU, DINO_SIGMA))
    if len(arrays) != 2:
        raise UCGMError(f"--ref {path}: no FD_DINOv2 statistics ({DINO_MU}, {DINO_SIGMA}); build the reference with "
                        "`ucgm eval ref --dinov2-weights FILE`, or use EDM2's dataset-refs/*.pkl")
    return _checked(arrays[DINO_MU], arrays[DINO_SIGMA], path, "DINOv2")


def load_reference_set(path: str | Path, metrics: list[str] | str, rows: bool = True) -> ReferenceSet:
    """Read what `metrics` need from one reference file; one UCGMError line naming what is missing.

    rows=False only checks that prec / rec rows exist (a cheap check before anything slow, on every rank).
    """
    names, path = parse_metrics(metrics), Path(path)
    if not path.is_file():
        raise UCGMError(f"--ref {path}: no such file")
    meta: dict[str, Any] = {}
    stats: dict[str, tuple[np.ndarray, np.ndarray]] = {}
    npz = _is_npz(path)
    fmt = "npz" if npz else "pickle"
    if "fid" in names or all(METRICS[n].reference == "none" for n in names):
        fid = load_reference(path, FEATURE_DIM)
        stats["fid"], meta, fmt = (fid.mu, fid.sigma), fid.meta, fid.format
    if any(n in names for n in ("sfid", *_PRC)) and not npz:
        raise UCGMError(f"--ref {path}: sFID / precision / recall need an .npz reference (ADM's VIRTUAL_*.npz or "
                        "`ucgm eval ref` output); this file holds only FID / FD_DINOv2 statistics")
    if "sfid" in names:
        stats["sfid"] = read_adm_spatial_stats(path)
    if "fd_dinov2" in names:
        stats["fd_dinov2"] = _dinov2_stats(path, npz)
    pool = images = None
    if any(n in names for n in _PRC):
        keys = (POOL_KEY, "arr_0") if rows or not _has_any(path, (POOL_KEY, "arr_0")) else ()
        pool, images = _prc_rows(path, _npz_arrays(path, keys)) if keys else (None, None)
    return ReferenceSet(path=str(path), sha256=sha256_file(path), format=fmt, meta=meta, stats=stats, pool=pool,
                        images=images)
