"""`ucgm eval ref` as a library: a reference file for every metric of the table, from images, in one pass."""

from __future__ import annotations

import os
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from ...console import SILENT, Reporter
from ...errors import UCGMError
from ...foundation import check_writable_dir, image_files, resolve_device
from ...metrics.dinov2 import WEIGHTS_ENV as DINOV2_ENV
from ...metrics.extract import DINOV2_KEY, load_extractors
from ...metrics.fid import FEATURE_DIM, FeatureStats, save_reference
from ...metrics.reference import DINO_MU, DINO_SIGMA, POOL_KEY
from ...metrics.sfid import SPATIAL_DIM
from ...settings.base import Bool, Int, Settings


class RefConfig(Settings):
    """What `ucgm eval ref` needs; see `ucgm eval ref --help`."""

    source: Path = Field(description="A folder of images (searched recursively; all at the evaluation resolution) "
                         "or an .npz sample batch (arr_0 uint8 NHWC).")
    out: Path = Field(description="Output .npz: mu, sigma (pool, 2048-d), mu_s, sigma_s (sFID, 2023-d), pool (every "
                      "image's features), mu_dinov2, sigma_dinov2 (with DINOv2 weights), num_images, resolution, "
                      "evaluator.")
    batch_size: Int = Field(default=64, ge=1, le=65_536, description="Images per Inception forward.")
    device: str | None = Field(default=None, description="Torch device. Default: cuda if available, else cpu.")
    inception_weights: Path | None = Field(default=None, description="torch-fidelity's Inception weights file.")
    dinov2_weights: Path | None = Field(default=None, description="Official DINOv2 ViT-L/14 weights: also store "
                                        "FD_DINOv2 statistics (default: none unless given or $UCGM_DINOV2_WEIGHTS).")
    features: Bool = Field(default=True, description="Store every image's pool features (precision / recall need "
                           "them; ADM uses 10k reference images; 50k images take 400 MB).")
    overwrite: Bool = Field(default=False, description="Replace an existing --out file.")


@dataclass
class RefResult:
    out: Path
    num_images: int
    resolution: tuple[int, int]


class _Images:
    """uint8 [n, H, W, 3] batches of a folder of images or an .npz sample batch (arr_0), with the count known."""

    def __init__(self, source: Path) -> None:
        self.source = source
        self.array: np.ndarray | None = None
        self.files: list[Path] = []
        if source.is_file() and source.suffix == ".npz":
            self.array = _npz_images(source)
        elif source.is_dir():
            self.files = image_files(source)
        elif not source.exists():
            raise UCGMError(f"{source}: no such folder or file")
        else:
            raise UCGMError(f"{source}: not a folder of images or an .npz sample batch")

    def __len__(self) -> int:
        return len(self.array) if self.array is not None else len(self.files)

    def batches(self, batch_size: int) -> Iterator[np.ndarray]:
        if self.array is not None:
            for s in range(0, len(self.array), batch_size):
                yield self.array[s:s + batch_size]
            return
        size = None
        batch: list[np.ndarray] = []
        for path in self.files:
            image = _read_image(path)
            if size is None:
                size = image.shape[:2]
            elif image.shape[:2] != size:
                raise UCGMError(f"{path}: image is {image.shape[0]}x{image.shape[1]} (HxW) but {self.files[0]} is "
                                f"{size[0]}x{size[1]}; reference images must all have the evaluation resolution "
                                "(resize them first, e.g. ADM's center crop)")
            batch.append(image)
            if len(batch) == batch_size:
                yield np.stack(batch)
                batch = []
        if batch:
            yield np.stack(batch)


def _npz_images(source: Path) -> np.ndarray:
    try:
        with np.load(source, allow_pickle=False) as data:
            if "arr_0" not in data.files:
                raise UCGMError(f"{source}: no 'arr_0' image array (ADM sample batch format)")
            arr = data["arr_0"]
    except (OSError, ValueError, zipfile.BadZipFile, EOFError) as err:
        raise UCGMError(f"{source}: not a readable .npz ({err})") from None
    if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
        raise UCGMError(f"{source}: arr_0 must be uint8 [N, H, W, 3], got {arr.dtype} {list(arr.shape)}")
    return arr


def _read_image(path: Path) -> np.ndarray:
    try:
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"), dtype=np.uint8)
    except (OSError, UnidentifiedImageError) as err:
        raise UCGMError(f"{path}: not a readable image ({err})") from None


def _features(config: RefConfig, images: _Images, reporter: Reporter) -> tuple[dict[str, Any], tuple[int, int]]:
    """One pass: pool rows, pool / spatial (and DINOv2) statistics of every image."""
    dinov2 = config.dinov2_weights is not None or bool(os.environ.get(DINOV2_ENV))
    metrics = ["fid", "sfid", *(["fd_dinov2"] if dinov2 else [])]
    extract = load_extractors(metrics, config.inception_weights, config.dinov2_weights, resolve_device(config.device))
    stats = {"pool": FeatureStats(FEATURE_DIM), "spatial": FeatureStats(SPATIAL_DIM)}
    pool: list[np.ndarray] = []
    size: tuple[int, int] | None = None
    with reporter.progress("images") as bar:
        task = bar.add_task(" + ".join(extract.networks) + " features", total=len(images))
        for batch in images.batches(config.batch_size):
            size = (int(batch.shape[1]), int(batch.shape[2]))
            features = extract(batch)
            if extract.dinov2 is not None and DINOV2_KEY not in stats:
                stats[DINOV2_KEY] = FeatureStats(features[DINOV2_KEY].shape[1])
            for key, acc in stats.items():
                acc.update(features[key])
            if config.features:
                pool.append(features["pool"])
            bar.advance(task, len(batch))
    if stats["pool"].n < 2 or size is None:
        raise UCGMError(f"{config.source}: need at least 2 images for a covariance, found {stats['pool'].n}")
    (mu, sigma), (mu_s, sigma_s) = stats["pool"].mu_sigma(), stats["spatial"].mu_sigma()
    arrays: dict[str, Any] = {"mu": mu, "sigma": sigma, "mu_s": mu_s, "sigma_s": sigma_s}
    if DINOV2_KEY in stats:
        arrays[DINO_MU], arrays[DINO_SIGMA] = stats[DINOV2_KEY].mu_sigma()
        arrays["dinov2_weights_sha256"] = extract.dinov2.weights_sha256  # type: ignore[union-attr]
    if pool:
        arrays[POOL_KEY] = np.concatenate(pool).astype(np.float32)
    desc = extract.inception.describe()  # type: ignore[union-attr]
    arrays.update(num_images=stats["pool"].n, resolution=list(size), evaluator=desc["name"],
                  evaluator_version=desc["version"], inception_weights_sha256=desc["weights_sha256"])
    return arrays, size


def run_ref(config: RefConfig, reporter: Reporter = SILENT) -> RefResult:
    """Inception pool and sFID statistics, pool rows (prec / rec) and DINOv2 statistics of every image of
    `config.source`, written to `config.out` (.npz, atomic)."""
    if config.out.is_dir():
        raise UCGMError(f"--out {config.out}: is a folder; expected the path of the .npz to write")
    if config.out.exists() and not config.overwrite:
        raise UCGMError(f"--out {config.out}: exists; pass --overwrite to replace it, or choose another file")
    images = _Images(config.source)
    check_writable_dir(config.out.parent, "--out")
    arrays, size = _features(config, images, reporter)
    mu, sigma = arrays.pop("mu"), arrays.pop("sigma")
    save_reference(config.out, mu, sigma, **arrays)
    held = "pool rows, " if POOL_KEY in arrays else ""
    reporter.info(f"wrote {config.out}: {arrays['num_images']} images at {size[0]}x{size[1]} (FID and sFID statistics, "
                  f"{held}{'FD_DINOv2 statistics' if DINO_MU in arrays else 'no DINOv2 statistics'})")
    return RefResult(config.out, int(arrays["num_images"]), size)
