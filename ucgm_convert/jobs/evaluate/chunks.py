"""The evaluation's unit of work: chunks of samples with their features, sharded, resumable, bit-reproducible.

The work is cut into fixed chunks of `chunk_size` consecutive sample indices. Chunk k holds
samples [k*chunk_size, (k+1)*chunk_size); sample i has class i % num_classes and noise seeded by
(seed, i), and a chunk's features (Inception, DINOv2) are computed in ONE forward per network of the
whole chunk, so they never depend on how many processes run or which one computes them. Pending
chunks are dealt round-robin to the ranks; each finished chunk is written atomically to
OUT/features/chunk-XXXXX.npz (temporary file + rename: a killed process leaves no half chunk).
The final statistics are accumulated in float64 from all chunks in index order by one process.
So a 1-process run, an N-process run and a run killed and resumed give bit-identical features
and metrics -- on CPU as long as each process uses the same number of threads (torchrun sets
OMP_NUM_THREADS=1 per worker), on GPUs of the same kind.

OUT/eval.json records what determines the features (model hash, settings, seed, num, chunk
size, the features and their networks' weights, the uint8 rule, versions); a rerun with anything different
refuses to mix chunks.
OUT/results.json is written (atomically) only when every chunk exists, and removed when a run
starts, so an interrupted run never leaves a results.json behind.
"""

from __future__ import annotations

import hashlib
import io
import json
import time
import zipfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from ...checkpoint import RESULTS_NAME
from ...distributed import Context, barrier
from ...errors import UCGMError
from ...foundation import write_file_atomic

FEATURES_DIR = "features"
MANIFEST_NAME = "eval.json"
CLASS_SAMPLING = "balanced: sample i has class i % num_classes"
POLL_S = 1.0

# images for the sample indices `indices` (their classes `labels`): uint8 [n, H, W, 3]
Generator = Callable[[range, Sequence[int]], np.ndarray]
# uint8 images [n, H, W, 3] -> named feature arrays [n, ...] (pool, logits, ...), one forward per chunk
Features = Callable[[np.ndarray], dict[str, np.ndarray]]


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


def fingerprint_hash(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()


# ---------------------------------------------------------------------------------------------
# Chunk files
# ---------------------------------------------------------------------------------------------

@dataclass
class ChunkStore:
    """OUT/features/chunk-XXXXX.npz: the feature arrays (pool, logits, ...), labels, start/stop, images (optional)."""

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
                            f"settings, seed, --num, --chunk-size, --uint8, features or their weights); use a new "
                            f"--out or delete {self.folder}")
        return "missing" if need_images and not has_images else "done"

    def write(self, k: int, features: dict[str, np.ndarray], labels: Sequence[int],
              images: np.ndarray | None) -> None:
        r = self.ranges[k]
        arrays: dict[str, Any] = dict(features, labels=np.asarray(labels, np.int64), start=np.int64(r.start),
                                      stop=np.int64(r.stop), key=np.str_(self.key))
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

@dataclass(frozen=True)
class ChunkPlan:
    """What determines the chunks: where, how many samples, their classes and chunk size, images kept or not."""

    out: Path
    labels: list[int]
    chunk_size: int
    need_images: bool = False
    resolution: tuple[int, int] | None = None  # the reference's image size, when it records one

    @property
    def num(self) -> int:
        return len(self.labels)


def compute_chunks(
    plan: ChunkPlan,
    fingerprint: dict[str, Any],
    generate: Generator,
    features: Features,
    ctx: Context | None = None,
    on_progress: Callable[[int], None] | None = None,
) -> ChunkStore:
    """Compute this rank's share of the missing chunks; on the main rank, wait until all exist.

    Every rank must call this (it has one barrier, after the ranks have listed the chunks).
    `on_progress(samples done)` is called as chunks finish.
    """
    ctx = ctx or Context()
    out = plan.out
    labels = plan.labels
    ranges = chunk_ranges(plan.num, plan.chunk_size)
    store = ChunkStore(out, ranges, fingerprint_hash(fingerprint))
    need_images = plan.need_images
    manifest = out / MANIFEST_NAME
    if ctx.is_main:
        _check_or_write_manifest(manifest, fingerprint)
        (out / RESULTS_NAME).unlink(missing_ok=True)  # a partial run never leaves a results.json
    else:
        _check_manifest_if_present(manifest, fingerprint)
    pending = [k for k in range(len(ranges)) if store.status(k, need_images) != "done"]
    barrier(ctx)  # every rank has listed before any rank writes a chunk
    mine = pending[ctx.rank::ctx.world_size]
    done_before = plan.num - sum(len(ranges[k]) for k in pending)

    def report() -> None:
        if on_progress is not None:
            done = sum(len(ranges[k]) for k in range(len(ranges)) if store.path(k).is_file())
            on_progress(max(done, done_before))

    report()
    expected_res = plan.resolution
    for k in mine:
        r = ranges[k]
        chunk_labels = labels[r.start:r.stop]
        images = generate(r, chunk_labels)
        if images.dtype != np.uint8 or images.ndim != 4 or images.shape[0] != len(r) or images.shape[-1] != 3:
            raise UCGMError(f"generator returned {images.dtype} {list(images.shape)}; "
                            f"expected uint8 [{len(r)}, H, W, 3]")
        if expected_res is not None and tuple(images.shape[1:3]) != expected_res:
            raise UCGMError(f"samples are {images.shape[1]}x{images.shape[2]} but the reference was made from "
                            f"{expected_res[0]}x{expected_res[1]} images; use the reference for this resolution")
        store.write(k, features(images), chunk_labels, images if need_images else None)  # one forward per chunk
        report()
    if ctx.is_main:
        while any(store.status(k, need_images) != "done" for k in pending):
            time.sleep(POLL_S)
            report()
    return store


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
        raise UCGMError(f"{path.parent}: holds an evaluation with different {', '.join(keys)}; use a new --out, "
                        "or --overwrite to start this one over")


