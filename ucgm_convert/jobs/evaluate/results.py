"""From complete chunks to numbers: float64 statistics, FID and IS, results.json, and the optional samples."""

from __future__ import annotations

import io
import json
import os
import platform
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch_fidelity
from PIL import Image

from ..._version import __version__
from ...checkpoint import RESULTS_NAME
from ...errors import UCGMError
from ...foundation import write_file_atomic
from ...metrics.fid import (
    FEATURE_DIM,
    IS_SHUFFLE_SEED,
    IS_SPLITS,
    FeatureStats,
    ReferenceStats,
    frechet_distance,
    inception_score,
)
from ...vae import UINT8_RULE
from .chunks import CLASS_SAMPLING, ChunkPlan, ChunkStore

IMAGES_DIR = "images"
SAMPLES_NPZ = "samples.npz"


def versions() -> dict[str, str]:
    """The versions that determine the numbers, for results.json."""
    return {"ucgm-convert": __version__, "torch": torch.__version__, "torch-fidelity": torch_fidelity.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def finalize(
    plan: ChunkPlan,
    store: ChunkStore,
    reference: ReferenceStats,
    record: dict[str, Any],
    num_classes: int,
    save_npz: bool = False,
    save_images: bool = False,
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
    if stats.n != plan.num:
        raise UCGMError(f"chunks hold {stats.n} samples, expected {plan.num}")
    mu, sigma = stats.mu_sigma()
    fid = frechet_distance(mu, sigma, reference.mu, reference.sigma, factor1=stats.factor())
    all_logits = np.concatenate(logits)
    is_mean, is_std = inception_score(all_logits) if plan.num >= IS_SPLITS else (None, None)
    all_labels = np.concatenate(labels)
    if save_npz or save_images:
        resolution = _write_samples(plan, store, all_labels, save_npz, save_images)
    counts = np.bincount(all_labels, minlength=num_classes)
    results: dict[str, Any] = {
        "fid": fid,
        "inception_score": {"mean": is_mean, "std": is_std, "splits": IS_SPLITS,
                            "shuffle": f"np.random.RandomState({IS_SHUFFLE_SEED}) as torch-fidelity"},
        "num_samples": int(stats.n),
        "seed": record.get("seed"),
        "class_sampling": {"rule": CLASS_SAMPLING, "num_classes": num_classes,
                           "per_class_min": int(counts.min()), "per_class_max": int(counts.max()),
                           "balanced": bool(counts.min() == counts.max())},
        "uint8_conversion": UINT8_RULE,
        "reference": reference.describe(),
        "fid_formula": "|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), float64 statistics (ucgm_convert.fid)",
        "chunk_size": plan.chunk_size,
        **record,
        "versions": versions(),
    }
    if resolution is not None:
        results["image_resolution"] = list(resolution)
    write_file_atomic(plan.out / RESULTS_NAME, (json.dumps(results, indent=2) + "\n").encode())
    return results



def _write_samples(plan: ChunkPlan, store: ChunkStore, labels: np.ndarray, save_npz: bool,
                   save_images: bool) -> tuple[int, int]:
    """OUT/samples.npz (ADM: arr_0 uint8 NHWC, arr_1 labels; streamed) and/or OUT/images/XXXXXX.png."""
    first = store.read(0, ["images"])["images"]
    h, w = first.shape[1:3]

    def image_chunks() -> Iterator[tuple[range, np.ndarray]]:
        for k, r in enumerate(store.ranges):
            images = store.read(k, ["images"])["images"]
            if images.shape[1:3] != (h, w):
                raise UCGMError(f"{store.path(k)}: images are {images.shape[1]}x{images.shape[2]}, expected {h}x{w}")
            yield r, images

    if save_npz:
        _stream_npz(plan.out / SAMPLES_NPZ, (plan.num, h, w, 3), (im for _, im in image_chunks()), labels)
    if save_images:
        folder = plan.out / IMAGES_DIR
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


