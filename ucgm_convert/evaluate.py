"""FID / Inception Score evaluation as a library: sharded over processes, resumable, bit-reproducible.

The work is cut into fixed chunks of `chunk_size` consecutive sample indices. Chunk k holds
samples [k*chunk_size, (k+1)*chunk_size); sample i has class i % num_classes and noise seeded by
(seed, i), and a chunk's Inception features are computed in ONE forward of the whole chunk, so a
chunk's features never depend on how many processes run or which one computes it. Pending
chunks are dealt round-robin to the ranks; each finished chunk is written atomically to
OUT/features/chunk-XXXXX.npz (temporary file + rename: a killed process leaves no half chunk).
The final statistics are accumulated in float64 from all chunks in index order by one process.
So a 1-process run, an N-process run and a run killed and resumed give bit-identical features,
FID and IS -- on CPU as long as each process uses the same number of threads (torchrun sets
OMP_NUM_THREADS=1 per worker), on GPUs of the same kind.

OUT/eval.json records what determines the features (model hash, settings, seed, num, chunk
size, Inception weights, versions); a rerun with anything different refuses to mix chunks.
OUT/results.json is written (atomically) only when every chunk exists, and removed when a run
starts, so an interrupted run never leaves a results.json behind.
"""

from __future__ import annotations

import dataclasses
import hashlib
import io
import json
import os
import platform
import time
import zipfile
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from .checkpoint import write_file_atomic
from .distributed import Context, barrier
from .errors import UCGMError
from .fid import (
    FEATURE_DIM,
    IS_SHUFFLE_SEED,
    IS_SPLITS,
    FeatureStats,
    ReferenceStats,
    frechet_distance,
    inception_score,
)
from .inception import InceptionFeatures

FEATURES_DIR = "features"
MANIFEST_NAME = "eval.json"
RESULTS_NAME = "results.json"
IMAGES_DIR = "images"
SAMPLES_NPZ = "samples.npz"
UINT8_CONVERSION = "ucgm_convert.vae.to_uint8: round(255 * x) for x in [0, 1], clamped to [0, 255] (round to nearest)"
CLASS_SAMPLING = "balanced: sample i has class i % num_classes"
IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".bmp", ".webp", ".tif", ".tiff")
POLL_S = 1.0

# images for the sample indices `indices` (their classes `labels`): uint8 [n, H, W, 3]
Generator = Callable[[range, Sequence[int]], np.ndarray]


# ---------------------------------------------------------------------------------------------
# Classes, chunks, hashes
# ---------------------------------------------------------------------------------------------

def class_labels(num: int, num_classes: int, allow_unbalanced: bool = False) -> list[int]:
    """Sample i gets class i % num_classes (num / num_classes per class, like the reference evaluations).

    Raises when num is not a multiple of num_classes, unless allow_unbalanced (then the first
    num % num_classes classes get one sample more).
    """
    if num < 1:
        raise UCGMError(f"--num: expected a number of samples >= 1, got {num}")
    if num % num_classes and not allow_unbalanced:
        lo = num - num % num_classes
        choices = f"{lo} or {lo + num_classes}" if lo else f"{num_classes}"
        raise UCGMError(f"--num {num} is not a multiple of the model's {num_classes} classes, so classes would be "
                        f"unbalanced; use --num {choices}, or pass --allow-unbalanced")
    return [i % num_classes for i in range(num)]


def chunk_ranges(num: int, chunk_size: int) -> list[range]:
    """Chunk k = indices [k*chunk_size, min((k+1)*chunk_size, num))."""
    if chunk_size < 1:
        raise UCGMError(f"--chunk-size: expected an integer >= 1, got {chunk_size}")
    return [range(s, min(s + chunk_size, num)) for s in range(0, num, chunk_size)]


def state_sha256(model: torch.nn.Module, extra: dict[str, torch.Tensor] | None = None) -> str:
    """sha256 over (name, dtype, shape, bytes) of every tensor of the state dict, in sorted order."""
    h = hashlib.sha256()
    items = sorted(model.state_dict().items()) + sorted((f"extra.{k}", v) for k, v in (extra or {}).items())
    for name, tensor in items:
        t = tensor.detach().cpu().contiguous()
        h.update(f"{name}|{t.dtype}|{list(t.shape)}\n".encode())
        h.update(t.view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


def versions() -> dict[str, str]:
    import torch_fidelity

    from . import __version__

    return {"ucgm-convert": __version__, "torch": torch.__version__, "torch-fidelity": torch_fidelity.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


# ---------------------------------------------------------------------------------------------
# Chunk files
# ---------------------------------------------------------------------------------------------

@dataclass
class ChunkStore:
    """OUT/features/chunk-XXXXX.npz: pool [n, 2048], logits [n, 1008], labels, start/stop, images (optional)."""

    out_dir: Path
    ranges: list[range]
    key: str  # fingerprint hash: a chunk made under other settings is never used

    @property
    def folder(self) -> Path:
        return self.out_dir / FEATURES_DIR

    def path(self, k: int) -> Path:
        return self.folder / f"chunk-{k:05d}.npz"

    def status(self, k: int, need_images: bool) -> str:
        """'done', 'missing' (absent, unreadable, or lacking images when they are needed)."""
        path = self.path(k)
        if not path.is_file():
            return "missing"
        try:
            with np.load(path, allow_pickle=False) as data:
                key, start, stop = str(data["key"]), int(data["start"]), int(data["stop"])
                has_images = "images" in data.files
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError):
            return "missing"  # cannot happen with atomic writes; recompute rather than trust it
        r = self.ranges[k]
        if key != self.key or (start, stop) != (r.start, r.stop):
            raise UCGMError(f"{path}: computed with other settings than this run (different model, sampling "
                            f"settings, seed, --num, --chunk-size or Inception weights); use a new --out or "
                            f"delete {self.folder}")
        return "missing" if need_images and not has_images else "done"

    def write(self, k: int, pool: np.ndarray, logits: np.ndarray, labels: Sequence[int],
              images: np.ndarray | None) -> None:
        r = self.ranges[k]
        arrays: dict[str, Any] = dict(pool=pool, logits=logits, labels=np.asarray(labels, np.int64),
                                      start=np.int64(r.start), stop=np.int64(r.stop), key=np.str_(self.key))
        if images is not None:
            arrays["images"] = images
        buffer = io.BytesIO()
        np.savez(buffer, **arrays)
        write_file_atomic(self.path(k), buffer.getvalue())

    def read(self, k: int, keys: Sequence[str]) -> dict[str, np.ndarray]:
        path = self.path(k)
        try:
            with np.load(path, allow_pickle=False) as data:
                return {key: data[key] for key in keys}
        except (OSError, ValueError, KeyError, zipfile.BadZipFile, EOFError) as err:
            raise UCGMError(f"{path}: unreadable chunk ({err}); delete it and rerun to recompute it") from None


# ---------------------------------------------------------------------------------------------
# The evaluation
# ---------------------------------------------------------------------------------------------

@dataclass
class EvalConfig:
    """What the evaluation loop needs besides the model: see `ucgm eval fid --help`."""

    out_dir: Path
    num: int
    num_classes: int
    seed: int = 0
    chunk_size: int = 250
    allow_unbalanced: bool = False
    save_images: bool = False
    save_npz: bool = False


def sampler(model: Any, settings: Any, seed: int, dtype: str = "float32", batch_size: int = 64,
            vae_module: torch.nn.Module | None = None) -> Generator:
    """A Generator sampling `model` with UCGM-S in batches of `batch_size`, decoding with `vae_module`."""
    from .generate import batches, generate_batch

    def generate(indices: range, labels: Sequence[int]) -> np.ndarray:
        out = []
        for sub in batches(len(indices), batch_size):
            idx = indices[sub.start:sub.stop]
            _, images = generate_batch(model, settings, [labels[j] for j in sub], idx, seed, dtype,
                                       vae_module=vae_module)
            out.append(images.numpy())
        return np.concatenate(out)

    return generate


def compute_chunks(
    config: EvalConfig,
    fingerprint: dict[str, Any],
    generate: Generator,
    inception: InceptionFeatures,
    ctx: Context | None = None,
    reference: ReferenceStats | None = None,
    on_progress: Callable[[int, int], None] | None = None,
) -> ChunkStore:
    """Compute this rank's share of the missing chunks; on the main rank, wait until all exist.

    Every rank must call this (it has one barrier, after the ranks have listed the chunks).
    """
    ctx = ctx or Context()
    out = config.out_dir
    labels = class_labels(config.num, config.num_classes, config.allow_unbalanced)
    ranges = chunk_ranges(config.num, config.chunk_size)
    store = ChunkStore(out, ranges, fingerprint_hash(fingerprint))
    need_images = config.save_images or config.save_npz
    manifest = out / MANIFEST_NAME
    if ctx.is_main:
        _check_or_write_manifest(manifest, fingerprint)
        (out / RESULTS_NAME).unlink(missing_ok=True)  # a partial run never leaves a results.json
    else:
        _check_manifest_if_present(manifest, fingerprint)
    pending = [k for k in range(len(ranges)) if store.status(k, need_images) != "done"]
    barrier(ctx)  # every rank has listed before any rank writes a chunk
    mine = pending[ctx.rank::ctx.world_size]
    done_before = config.num - sum(len(ranges[k]) for k in pending)

    def report() -> None:
        if on_progress is not None:
            done = sum(len(ranges[k]) for k in range(len(ranges)) if store.path(k).is_file())
            on_progress(max(done, done_before), config.num)

    report()
    expected_res = reference.resolution if reference is not None else None
    for k in mine:
        r = ranges[k]
        chunk_labels = labels[r.start:r.stop]
        images = generate(r, chunk_labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(r) or images.shape[-1] != 3:
            raise UCGMError(f"generator returned {images.dtype} {list(images.shape)}; expected uint8 [{len(r)}, H, W, 3]")
        if expected_res is not None and tuple(images.shape[1:3]) != expected_res:
            raise UCGMError(f"samples are {images.shape[1]}x{images.shape[2]} but the reference {reference.path} "  # type: ignore[union-attr]
                            f"was made from {expected_res[0]}x{expected_res[1]} images; use the reference for "
                            f"this resolution")
        pool, logits = inception(images)  # one forward per chunk: fixed batch composition
        store.write(k, pool, logits, chunk_labels, images if need_images else None)
        report()
    if ctx.is_main:
        while any(store.status(k, need_images) != "done" for k in pending):
            time.sleep(POLL_S)
            report()
    return store


def finalize(
    config: EvalConfig,
    store: ChunkStore,
    reference: ReferenceStats,
    record: dict[str, Any],
) -> dict[str, Any]:
    """From complete chunks, in index order: float64 statistics, FID, IS; writes results.json (and samples)."""
    stats = FeatureStats(FEATURE_DIM)
    logits, labels = [], []
    resolution = None
    for k in range(len(store.ranges)):
        data = store.read(k, ["pool", "logits", "labels", "start", "stop"])
        r = store.ranges[k]
        if (int(data["start"]), int(data["stop"])) != (r.start, r.stop) or len(data["pool"]) != len(r):
            raise UCGMError(f"{store.path(k)}: holds {len(data['pool'])} samples for indices "
                            f"{int(data['start'])}..{int(data['stop'])}, expected {r.start}..{r.stop}")
        stats.update(data["pool"])
        logits.append(data["logits"])
        labels.append(data["labels"])
    if stats.n != config.num:
        raise UCGMError(f"chunks hold {stats.n} samples, expected {config.num}")
    mu, sigma = stats.mu_sigma()
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma, factor1=stats.factor())
    all_logits = np.concatenate(logits)
    is_mean, is_std = inception_score(all_logits) if config.num >= IS_SPLITS else (None, None)
    all_labels = np.concatenate(labels)
    if config.save_npz or config.save_images:
        resolution = _write_samples(config, store, all_labels)
    counts = np.bincount(all_labels, minlength=config.num_classes)
    results: dict[str, Any] = {
        "fid": fid,
        "inception_score": {"mean": is_mean, "std": is_std, "splits": IS_SPLITS,
                            "shuffle": f"np.random.RandomState({IS_SHUFFLE_SEED}) as torch-fidelity"},
        "num_samples": int(stats.n),
        "seed": record.get("seed"),
        "class_sampling": {"rule": CLASS_SAMPLING, "num_classes": config.num_classes,
                           "per_class_min": int(counts.min()), "per_class_max": int(counts.max()),
                           "balanced": bool(counts.min() == counts.max())},
        "uint8_conversion": UINT8_CONVERSION,
        "reference": reference.describe(),
        "fid_formula": "|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), float64 statistics (ucgm_convert.fid)",
        "chunk_size": config.chunk_size,
        **record,
        "versions": versions(),
    }
    if resolution is not None:
        results["image_resolution"] = list(resolution)
    write_file_atomic(config.out_dir / RESULTS_NAME, (json.dumps(results, indent=2) + "\n").encode())
    return results


# ---------------------------------------------------------------------------------------------
# Helpers
# ---------------------------------------------------------------------------------------------

def _check_or_write_manifest(path: Path, fingerprint: dict[str, Any]) -> None:
    if path.is_file():
        _compare_manifest(path, fingerprint)
    else:
        write_file_atomic(path, (json.dumps(fingerprint, indent=2, sort_keys=True) + "\n").encode())


def _check_manifest_if_present(path: Path, fingerprint: dict[str, Any]) -> None:
    if path.is_file():
        _compare_manifest(path, fingerprint)


def _compare_manifest(path: Path, fingerprint: dict[str, Any]) -> None:
    try:
        old = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as err:
        raise UCGMError(f"{path}: unreadable ({err}); delete it and the features folder to start over") from None
    canon = json.loads(json.dumps(fingerprint))
    if old != canon:
        keys = sorted(k for k in set(old) | set(canon) if old.get(k) != canon.get(k))
        raise UCGMError(f"{path.parent}: holds an evaluation with different {', '.join(keys)}; "
                        f"use a new --out (or delete {path.parent}) to evaluate these settings")


def _write_samples(config: EvalConfig, store: ChunkStore, labels: np.ndarray) -> tuple[int, int]:
    """OUT/samples.npz (ADM: arr_0 uint8 NHWC, arr_1 labels; streamed) and/or OUT/images/XXXXXX.png."""
    first = store.read(0, ["images"])["images"]
    h, w = first.shape[1:3]

    def image_chunks() -> Iterator[tuple[range, np.ndarray]]:
        for k, r in enumerate(store.ranges):
            images = store.read(k, ["images"])["images"]
            if images.shape[1:3] != (h, w):
                raise UCGMError(f"{store.path(k)}: images are {images.shape[1]}x{images.shape[2]}, expected {h}x{w}")
            yield r, images

    if config.save_npz:
        _stream_npz(config.out_dir / SAMPLES_NPZ, (config.num, h, w, 3), (im for _, im in image_chunks()), labels)
    if config.save_images:
        from PIL import Image

        folder = config.out_dir / IMAGES_DIR
        folder.mkdir(parents=True, exist_ok=True)
        for r, images in image_chunks():
            for i, image in zip(r, images):
                buffer = io.BytesIO()
                Image.fromarray(image).save(buffer, format="PNG")
                write_file_atomic(folder / f"{i:06d}.png", buffer.getvalue())
    return int(h), int(w)


def _stream_npz(path: Path, shape: tuple[int, ...], chunks: Iterator[np.ndarray], labels: np.ndarray) -> None:
    """np.savez(path, arr_0=..., arr_1=labels) without holding all images in memory; atomic."""
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with zipfile.ZipFile(tmp, "w", zipfile.ZIP_STORED, allowZip64=True) as zf:
            with zf.open("arr_0.npy", "w", force_zip64=True) as f:
                np.lib.format.write_array_header_1_0(f, {"descr": "|u1", "fortran_order": False, "shape": shape})
                written = 0
                for images in chunks:
                    f.write(np.ascontiguousarray(images, dtype=np.uint8).tobytes())
                    written += len(images)
                if written != shape[0]:
                    raise UCGMError(f"{path}: wrote {written} images, expected {shape[0]}")
            with zf.open("arr_1.npy", "w") as f:
                np.lib.format.write_array(f, np.asarray(labels, np.int64))
        os.replace(tmp, path)
    except BaseException:
        tmp.unlink(missing_ok=True)
        raise


def list_images(source: Path) -> list[Path]:
    """Image files under a folder (recursive), sorted by relative path."""
    files = sorted((p for p in source.rglob("*") if p.is_file() and p.suffix.lower() in IMAGE_SUFFIXES),
                   key=lambda p: p.relative_to(source).as_posix())
    if not files:
        raise UCGMError(f"{source}: no images ({', '.join(IMAGE_SUFFIXES)}) found")
    return files


def _image_batches(source: Path, batch_size: int) -> Iterator[tuple[np.ndarray, tuple[int, int]]]:
    """uint8 [n, H, W, 3] batches from a folder of images or an .npz sample batch (arr_0); one size only."""
    if source.is_file() and source.suffix == ".npz":
        try:
            with np.load(source, allow_pickle=False) as data:
                if "arr_0" not in data.files:
                    raise UCGMError(f"{source}: no 'arr_0' image array (ADM sample batch format)")
                arr = data["arr_0"]
        except (OSError, ValueError, zipfile.BadZipFile) as err:
            raise UCGMError(f"{source}: not a readable .npz ({err})") from None
        if arr.dtype != np.uint8 or arr.ndim != 4 or arr.shape[-1] != 3:
            raise UCGMError(f"{source}: arr_0 must be uint8 [N, H, W, 3], got {arr.dtype} {list(arr.shape)}")
        for s in range(0, len(arr), batch_size):
            yield arr[s:s + batch_size], (int(arr.shape[1]), int(arr.shape[2]))
        return
    if not source.is_dir():
        raise UCGMError(f"{source}: not a folder of images or an .npz sample batch")
    from PIL import Image, UnidentifiedImageError

    files = list_images(source)
    size = None
    batch: list[np.ndarray] = []
    for path in files:
        try:
            with Image.open(path) as im:
                image = np.asarray(im.convert("RGB"), dtype=np.uint8)
        except (OSError, UnidentifiedImageError) as err:
            raise UCGMError(f"{path}: not a readable image ({err})") from None
        hw = (int(image.shape[0]), int(image.shape[1]))
        if size is None:
            size = hw
        elif hw != size:
            raise UCGMError(f"{path}: image is {hw[0]}x{hw[1]} (HxW) but {files[0]} is {size[0]}x{size[1]}; "
                            f"reference images must all have the evaluation resolution (resize them first, "
                            f"e.g. ADM's center crop)")
        batch.append(image)
        if len(batch) == batch_size:
            yield np.stack(batch), size
            batch = []
    if batch:
        yield np.stack(batch), size  # type: ignore[misc]


def reference_from_images(
    source: Path, inception: InceptionFeatures, batch_size: int = 64,
    on_progress: Callable[[int], None] | None = None,
) -> tuple[np.ndarray, np.ndarray, dict[str, Any]]:
    """mu, sigma (float64) of the Inception pool features of every image, and metadata for the .npz."""
    if batch_size < 1:
        raise UCGMError(f"--batch-size: expected an integer >= 1, got {batch_size}")
    stats = FeatureStats(FEATURE_DIM)
    size: tuple[int, int] | None = None
    for images, hw in _image_batches(Path(source), batch_size):
        if size is not None and hw != size:
            raise UCGMError(f"{source}: images of different sizes ({size} and {hw})")
        size = hw
        pool, _ = inception(images)
        stats.update(pool)
        if on_progress is not None:
            on_progress(stats.n)
    if stats.n < 2:
        raise UCGMError(f"{source}: need at least 2 images for a covariance, found {stats.n}")
    mu, sigma = stats.mu_sigma()
    desc = inception.describe()
    meta = {"num_images": stats.n, "resolution": list(size or ()), "evaluator": desc["name"],
            "evaluator_version": desc["version"], "inception_weights_sha256": inception.weights_sha256}
    return mu, sigma, meta


def settings_record(settings: Any) -> dict[str, Any]:
    """Sampling settings as JSON-ready data."""
    return json.loads(json.dumps(dataclasses.asdict(settings)))
