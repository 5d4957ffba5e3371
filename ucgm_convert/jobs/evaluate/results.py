"""From complete chunks to numbers: float64 statistics, the requested metrics, results.json, optional samples."""

from __future__ import annotations

import io
import json
import os
import platform
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import timm
import torch
import torch_fidelity
from PIL import Image

from ..._version import __version__
from ...checkpoint import RESULTS_NAME
from ...errors import UCGMError
from ...foundation import write_file_atomic
from ...metrics import frechet_from_stats
from ...metrics.fid import IS_SHUFFLE_SEED, IS_SPLITS, FeatureStats, inception_score
from ...metrics.precision_recall import precision_recall
from ...metrics.reference import ReferenceSet
from ...settings.evaluation import UINT8_RULES
from .chunks import CLASS_SAMPLING, ChunkPlan, ChunkStore

IMAGES_DIR = "images"
SAMPLES_NPZ = "samples.npz"
FRECHET = {"fid": "pool", "sfid": "spatial", "fd_dinov2": "dinov2"}  # Frechet metric -> its chunk feature key


@dataclass
class Outputs:
    """What finalize computes and writes: the metrics, the uint8 rule recorded, the optional samples."""

    metrics: list[str]
    uint8: str
    reference_pool: np.ndarray | None = None  # reference pool rows (prec / rec)
    prc_device: str = "cpu"
    save_npz: bool = False
    save_images: bool = False


def versions() -> dict[str, str]:
    """The versions that determine the numbers, for results.json."""
    return {"ucgm-convert": __version__, "torch": torch.__version__, "torch-fidelity": torch_fidelity.__version__,
            "timm": timm.__version__,
            "numpy": np.__version__, "python": platform.python_version()}


def _accumulate(store: ChunkStore, plan: ChunkPlan, metrics: list[str], reference: ReferenceSet) -> dict[str, Any]:
    """One pass over the chunks in index order: float64 statistics per Frechet metric, logits, pool rows, labels."""
    stats = {name: FeatureStats(len(reference.stats[name][0])) for name in metrics if name in FRECHET}
    rows: dict[str, list[np.ndarray]] = {"logits": [], "pool": [], "labels": []}
    keep = {"logits": "is" in metrics, "pool": bool(set(metrics) & {"prec", "rec"}), "labels": True}
    keys = sorted({FRECHET[n] for n in stats} | {k for k, on in keep.items() if on} | {"start", "stop"})
    for k, r in enumerate(store.ranges):
        data = store.read(k, keys)
        if (int(data["start"]), int(data["stop"])) != (r.start, r.stop) or len(data["labels"]) != len(r):
            raise UCGMError(f"{store.path(k)}: holds {len(data['labels'])} samples for indices "
                            f"{int(data['start'])}..{int(data['stop'])}, expected {r.start}..{r.stop}")
        for name, acc in stats.items():
            acc.update(data[FRECHET[name]])
        for key, on in keep.items():
            if on:
                rows[key].append(data[key])
    total = sum(len(x) for x in rows["labels"])
    if total != plan.num:
        raise UCGMError(f"chunks hold {total} samples, expected {plan.num}")
    return {"stats": stats, **{k: np.concatenate(v) if v else None for k, v in rows.items()}}


def compute_metrics(metrics: list[str], acc: dict[str, Any], reference: ReferenceSet,
                    reference_pool: np.ndarray | None, device: str = "cpu") -> dict[str, Any]:
    """name -> value (float, or None when too few samples) and, for is / prec / rec, their details."""
    values: dict[str, Any] = {}
    for name, stats in acc["stats"].items():
        values[name] = frechet_from_stats(stats, *reference.stats[name])
    details: dict[str, Any] = {}
    if "is" in metrics:
        logits = acc["logits"]
        mean, std = inception_score(logits) if len(logits) >= IS_SPLITS else (None, None)
        values["is"] = mean
        details["inception_score"] = {"mean": mean, "std": std, "splits": IS_SPLITS,
                                      "shuffle": f"np.random.RandomState({IS_SHUFFLE_SEED}) as torch-fidelity"}
    if reference_pool is not None:
        prc = precision_recall(reference_pool, acc["pool"], device=device)
        values.update({"prec": prc.precision, "rec": prc.recall})
        details["precision_recall"] = prc.describe()
    return {"values": {name: values[name] for name in metrics}, **details}


def finalize(
    plan: ChunkPlan,
    store: ChunkStore,
    reference: ReferenceSet,
    record: dict[str, Any],
    num_classes: int,
    outputs: Outputs,
) -> dict[str, Any]:
    """From complete chunks, in index order: the requested metrics; writes results.json (and samples)."""
    metrics = outputs.metrics
    acc = _accumulate(store, plan, metrics, reference)
    measured = compute_metrics(metrics, acc, reference, outputs.reference_pool, outputs.prc_device)
    values = measured.pop("values")
    resolution = None
    all_labels = acc["labels"]
    if outputs.save_npz or outputs.save_images:
        resolution = _write_samples(plan, store, all_labels, outputs.save_npz, outputs.save_images)
    counts = np.bincount(all_labels, minlength=num_classes)
    results: dict[str, Any] = {
        **({"fid": values["fid"]} if "fid" in values else {}),
        "metrics": values,
        **measured,
        "num_samples": len(all_labels),
        "seed": record.get("seed"),
        "class_sampling": {"rule": CLASS_SAMPLING, "num_classes": num_classes,
                           "per_class_min": int(counts.min()), "per_class_max": int(counts.max()),
                           "balanced": bool(counts.min() == counts.max())},
        "uint8": outputs.uint8,
        "uint8_conversion": UINT8_RULES[outputs.uint8],
        "reference": reference.describe(),
        "fid_formula": "|mu1-mu2|^2 + tr(S1) + tr(S2) - 2 tr((S1 S2)^(1/2)), float64 statistics (ucgm_convert.fid); "
                       "the same for sfid and fd_dinov2 on their features",
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


