"""`ucgm eval ref` as a library: reference statistics (mu, sigma of Inception pool features) from images."""

from __future__ import annotations

import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError
from pydantic import Field

from ...console import SILENT, Reporter
from ...errors import UCGMError
from ...foundation import check_writable_dir, image_files, resolve_device
from ...metrics.fid import FEATURE_DIM, FeatureStats, save_reference
from ...metrics.inception import load_inception
from ...settings.base import Bool, Int, Settings


class RefConfig(Settings):
    """What `ucgm eval ref` needs; see `ucgm eval ref --help`."""

    source: Path = Field(description="A folder of images (searched recursively; all at the evaluation resolution) "
                         "or an .npz sample batch (arr_0 uint8 NHWC).")
    out: Path = Field(description="Output .npz: mu, sigma (float64, 2048-d) plus num_images, resolution, evaluator.")
    batch_size: Int = Field(default=64, ge=1, le=65_536, description="Images per Inception forward.")
    device: str | None = Field(default=None, description="Torch device. Default: cuda if available, else cpu.")
    inception_weights: Path | None = Field(default=None, description="torch-fidelity's Inception weights file.")
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


def run_ref(config: RefConfig, reporter: Reporter = SILENT) -> RefResult:
    """Inception pool statistics of every image of `config.source`, written to `config.out` (.npz, atomic)."""
    if config.out.is_dir():
        raise UCGMError(f"--out {config.out}: is a folder; expected the path of the .npz to write")
    if config.out.exists() and not config.overwrite:
        raise UCGMError(f"--out {config.out}: exists; pass --overwrite to replace it, or choose another file")
    images = _Images(config.source)
    check_writable_dir(config.out.parent, "--out")
    inception = load_inception(config.inception_weights, resolve_device(config.device))
    stats = FeatureStats(FEATURE_DIM)
    size: tuple[int, int] | None = None
    with reporter.progress("images") as bar:
        task = bar.add_task("Inception features", total=len(images))
        for batch in images.batches(config.batch_size):
            size = (int(batch.shape[1]), int(batch.shape[2]))
            stats.update(inception(batch)[0])
            bar.advance(task, len(batch))
    if stats.n < 2 or size is None:
        raise UCGMError(f"{config.source}: need at least 2 images for a covariance, found {stats.n}")
    mu, sigma = stats.mu_sigma()
    desc = inception.describe()
    save_reference(config.out, mu, sigma, num_images=stats.n, resolution=list(size), evaluator=desc["name"],
                   evaluator_version=desc["version"], inception_weights_sha256=inception.weights_sha256)
    reporter.info(f"wrote {config.out}: {stats.n} images at {size[0]}x{size[1]}")
    return RefResult(config.out, stats.n, size)
