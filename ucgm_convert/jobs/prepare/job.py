"""`ucgm prepare-data` as a library: `run(PrepareConfig) -> PrepareResult`, also under torchrun.

Input: an ImageNet-style tree (one sub-folder per class) or a folder with a labels file
(jobs/prepare/images.py). Output: the prepared latent folder (formats/latent_folder.py) with
``shard-*.safetensors``, ``meta.json`` (num_samples, latent_shape, num_classes, latent_mean,
latent_std, vae, shards, measured_mean / measured_std of the RAW latents, the settings) and
``skipped.txt`` (``path<TAB>reason`` for every file not encoded).

Every shard is written to a temporary file and renamed, so a shard under its final name is
complete. A rerun keeps the finished shards whose fingerprint matches and encodes the rest; the
result is byte-identical to an uninterrupted run (same device and kernels). Under torchrun the
unfinished shards go round-robin over the ranks and rank 0 writes skipped.txt and meta.json.
"""

from __future__ import annotations

import json
import math
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Annotated, Any

import numpy as np
import torch
from pydantic import Field

from ... import distributed
from ...console import SILENT, Reporter
from ...errors import UCGMError
from ...formats.latent_folder import META_NAME, shard_name
from ...foundation import DTYPES, output_folder, path_sort_key, resolve_device, write_file_atomic
from ...settings.base import Bool, Float, Hint, Int, Settings, choice
from ...settings.model import PIXEL_RANGES
from ...vae import encode
from ..source import ArchOverrides, ModelSource
from .encode import FORMAT, Pipeline, encode_shard, fingerprint, measured_statistics, remove_temps, shard_info
from .images import ImageList, list_images, shown, to_pixel_range
from .vae import ResolvedVae, resolve_vae

SKIPPED_NAME = "skipped.txt"
DEFAULT_SHARD_SIZE = 10_000
OWNED = ("shard-*.safetensors", META_NAME, SKIPPED_NAME)


class PrepareConfig(Settings):
    """Everything `ucgm prepare-data` needs; see `ucgm prepare-data --help` for each field."""

    images: Path = Field(description="Image folder: one sub-folder per class (classes = sorted sub-folder names -> "
                         "labels 0..K-1), or any folder with --labels.")
    out: Path = Field(description="Output folder: shard-*.safetensors, meta.json, skipped.txt. Rerunning into it "
                      "resumes (finished shards are kept).")
    source: ModelSource = ModelSource()
    arch: ArchOverrides = ArchOverrides()
    labels: Path | None = Field(default=None, description="Labels file for a folder without class sub-folders: CSV "
                                "rows 'file,label' or JSON {file: label}; file names relative to IMAGES.")
    flip: Annotated[Float, Hint(lambda v: isinstance(v, bool), "--flip is a probability now; --mirror stores both "
                                "orientations")] = Field(
        default=0.5, ge=0.0, le=1.0, description="Probability that an image is stored mirrored, decided per image "
        "from --seed: the reference's 50% random horizontal flip (0 = never).")
    mirror: Bool = Field(default=False, description="Store every image twice, as is and mirrored (the reference's "
                         "latents / latents_flip pair; doubles the samples); --flip is then not used.")
    sample_posterior: Bool = Field(default=True, description="Store a draw from the VAE posterior, as the reference "
                                   "does (noise per image from --seed); --no-sample-posterior stores its mean.")
    seed: Int = Field(default=0, ge=0, le=2**63 - 1, description="Seed of the per-image flips and posterior draws.")
    shard_size: Int = Field(default=DEFAULT_SHARD_SIZE, ge=1, le=10_000_000, description="Source images per shard.")
    batch_size: Int = Field(default=32, ge=1, le=65_536, description="Images per VAE forward pass (does not change "
                            "the result on CPU).")
    workers: Int | None = Field(default=None, ge=0, le=256, description="Threads decoding and cropping images (0 = "
                                "in the main thread). Default: min(8, CPU cores).")
    latent_mean: str | None = Field(default=None, description="Override the spec's latent mean: a number or one per "
                                    "channel, comma-separated (raw-latent units).")
    latent_std: str | None = Field(default=None, description="Override the spec's latent std: a number or one per "
                                   "channel, comma-separated (raw-latent units).")
    pixel_range: choice(*PIXEL_RANGES) | None = Field(default=None, description="Override the VAE's input range: "  # type: ignore[valid-type]
                                                      "'-1,1' or '0,1'.")
    overwrite: Bool = Field(default=False, description="Re-encode shards in --out that were made from other images "
                            "or settings (otherwise that is an error).")
    device: str | None = Field(default=None, description="Torch device of the VAE. Default: cuda if available, else "
                               "cpu.")
    dtype: choice(*DTYPES) = Field(default="float32", description="VAE precision (latents are stored as "  # type: ignore[valid-type]
                                   "float32).")


@dataclass
class PrepareResult:
    """What `run` did (on this process; `num_samples` etc. are of the whole folder)."""

    out: Path
    num_images: int  # images listed (after the extension filter)
    num_samples: int  # rows written (x2 with mirror)
    num_shards: int
    encoded_shards: list[int]  # encoded by this process in this run
    reused_shards: list[int]  # finished earlier and kept (all processes)
    skipped: list[tuple[str, str]]  # every file not encoded, with the reason
    latent_shape: tuple[int, int, int]
    seconds: float
    meta: dict[str, Any] = field(default_factory=dict)


def run(config: PrepareConfig, reporter: Reporter = SILENT) -> PrepareResult:
    """Encode `config.images` into the prepared latent folder `config.out` (see the module doc).

    Under torchrun every process calls this. Bad input raises one UCGMError (on every process)
    before anything is encoded.
    """
    deterministic = torch.backends.cudnn.deterministic
    torch.backends.cudnn.deterministic = True  # a resumed shard must be bit-identical to the first run's
    try:
        with distributed.session(str(resolve_device(config.device))) as ctx:
            return _prepare(config, ctx, reporter if ctx.is_main else SILENT)
    finally:
        torch.backends.cudnn.deterministic = deterministic


def _latent_shape(resolved: ResolvedVae, device: torch.device) -> tuple[int, int, int]:
    """The latent shape, from one encoded blank image; checked against the model's when known."""
    res = resolved.resolution
    probe = to_pixel_range(np.zeros((1, res, res, 3), dtype=np.uint8), resolved.spec.pixel_range)
    shape = tuple(int(v) for v in encode(probe.to(device), resolved.spec, resolved.module).shape[1:])
    if resolved.latent_shape is not None and tuple(resolved.latent_shape) != shape:
        raise UCGMError(f"{resolved.origin}: the model expects latents of shape {list(resolved.latent_shape)} but "
                        f"{res}x{res} images encode to {list(shape)}; pass the model's --resolution")
    return shape  # type: ignore[return-value]


def _augmentation(config: PrepareConfig) -> dict[str, Any]:
    """The settings that decide each row (meta.json and the shard fingerprints): flip probability (None with
    mirror), mirror, posterior draw or mean, and the seed when something random uses it."""
    flip = None if config.mirror else config.flip
    random = bool(flip) or config.sample_posterior
    return {"flip": flip, "mirror": config.mirror, "sample_posterior": config.sample_posterior,
            "seed": config.seed if random else None}


def _settings_text(config: PrepareConfig) -> str:
    """The row settings in words, printed before encoding."""
    if config.mirror:
        flips = "every image stored as is and mirrored (--mirror)"
    elif config.flip > 0:
        flips = f"each image mirrored with probability {config.flip:g} (--flip)"
    else:
        flips = "no flips (--flip 0)"
    draws = "a VAE posterior draw per row (--sample-posterior)" if config.sample_posterior else \
        "the VAE posterior mean (--no-sample-posterior)"
    random = config.sample_posterior or (config.flip > 0 and not config.mirror)
    return f"{flips}; {draws}{f'; seed {config.seed}' if random else ''}"


def _finished_shards(out: Path, fingerprints: list[str], overwrite: bool) -> dict[int, dict[str, Any]]:
    """The shards already in `out` with this run's fingerprint; shards of other settings are an error unless
    `overwrite` (every process checks all, so all agree on the error)."""
    finished: dict[int, dict[str, Any]] = {}
    stale: list[str] = []
    for s, expected in enumerate(fingerprints):
        path = out / shard_name(s)
        info = shard_info(path) if path.exists() else None
        if info is not None and info.get("fingerprint") == expected:
            finished[s] = info
        elif info is not None:
            stale.append(path.name)
    if stale and not overwrite:
        raise UCGMError(f"--out {out}: {len(stale)} shard(s) were made from other images or settings "
                        f"({shown(stale)}); pass a new --out, or --overwrite to encode them again")
    return finished


def _prepare(config: PrepareConfig, ctx: distributed.Context, reporter: Reporter) -> PrepareResult:
    t0 = time.perf_counter()
    out = config.out
    listing = list_images(config.images, config.labels, exclude=out)
    output_folder(out, OWNED, "prepared latent", resume=True)
    arch = config.arch.given()
    src = config.source
    resolved = resolve_vae(src.vae, src.recipe, src.checkpoint, arch.pop("resolution", None), config.latent_mean,
                           config.latent_std, config.pixel_range, src.family, arch, device=ctx.device,
                           dtype=DTYPES[config.dtype])
    spec, res = resolved.spec, resolved.resolution
    latent_shape = _latent_shape(resolved, ctx.device)
    files, file_labels, shard_size = listing.files, listing.labels, config.shard_size
    num_shards = math.ceil(len(files) / shard_size)
    spec_key = {k: v for k, v in spec.to_dict().items() if k != "source"}
    base = {"format": FORMAT, "vae": spec_key, "resolution": res, **_augmentation(config),
            "shard_size": shard_size, "latent_shape": list(latent_shape)}
    fingerprints = [fingerprint({**base, "shard": s}, files[s * shard_size:(s + 1) * shard_size],
                                file_labels[s * shard_size:(s + 1) * shard_size]) for s in range(num_shards)]
    settings = {"flip": config.flip, "mirror": config.mirror, "sample_posterior": config.sample_posterior,
                "seed": config.seed, "shard_size": shard_size, "fingerprints": fingerprints}
    finished = _finished_shards(out, fingerprints, config.overwrite)
    # Everyone has looked before anyone writes; the unfinished shards go round-robin over the ranks
    # (which rank encodes a shard does not change its bytes).
    unfinished = [s for s in range(num_shards) if s not in finished]
    if unfinished and ctx.is_main:  # until every shard is there again, the folder is not a dataset
        (out / META_NAME).unlink(missing_ok=True)
    distributed.barrier(ctx)
    todo = unfinished[ctx.rank :: ctx.world_size]
    reused = sorted(finished)
    reporter.info(f"{len(files)} images in {listing.num_classes} classes from {config.images} -> {out} "
                  f"({num_shards} shard(s) of {shard_size} images; VAE {spec.name} from {resolved.origin}, "
                  f"{res}x{res} -> latents {list(latent_shape)}"
                  f"{f'; {ctx.world_size} processes' if ctx.distributed else ''})")
    reporter.info(f"settings: {_settings_text(config)}")
    if finished:
        reporter.info(f"resuming: {len(finished)} finished shard(s) kept, {num_shards - len(finished)} to encode")

    _encode(config, ctx, reporter, listing, resolved, settings, latent_shape, todo)
    distributed.barrier(ctx)
    meta, skipped = _finish(config, ctx, reporter, listing, resolved, latent_shape, fingerprints, t0)
    distributed.barrier(ctx)
    return PrepareResult(out, len(files), meta["num_samples"], num_shards, todo, reused, skipped, latent_shape,
                         time.perf_counter() - t0, meta)

def _encode(config: PrepareConfig, ctx: distributed.Context, reporter: Reporter, listing: ImageList,
            resolved: ResolvedVae, settings: dict[str, Any], latent_shape: tuple[int, int, int],
            todo: list[int]) -> None:
    """Encode this process's shards `todo`, each written atomically under its final name."""
    files, file_labels, shard_size, out = listing.files, listing.labels, config.shard_size, config.out
    total = sum(len(files[s * shard_size : (s + 1) * shard_size]) for s in todo)
    nworkers = min(8, os.cpu_count() or 1) if config.workers is None else config.workers
    batch_size, res = config.batch_size, resolved.resolution
    with reporter.progress("images") as bar:
        task = bar.add_task(f"encoding (rank 0 of {ctx.world_size})" if ctx.distributed else "encoding", total=total)
        for s in todo:
            sl = slice(s * shard_size, (s + 1) * shard_size)
            name = shard_name(s)
            remove_temps(out, name)
            pipeline = Pipeline(listing.root, files[sl], res, nworkers, ahead=max(2 * batch_size, 4 * nworkers))
            try:
                data = encode_shard(s, files[sl], file_labels[sl], pipeline, resolved, settings, latent_shape,
                                    batch_size, ctx.device, lambda n: bar.advance(task, n))
            finally:
                pipeline.close()
            write_file_atomic(out / name, data)


def _finish(config: PrepareConfig, ctx: distributed.Context, reporter: Reporter, listing: ImageList,
            resolved: ResolvedVae, latent_shape: tuple[int, int, int], fingerprints: list[str], t0: float
            ) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """After every shard exists: skipped.txt and meta.json (rank 0); (meta, every file not encoded)."""
    out, spec, files, res = config.out, resolved.spec, listing.files, resolved.resolution
    infos = []
    for s in range(len(fingerprints)):
        info = shard_info(out / shard_name(s))
        if info is None or info.get("fingerprint") != fingerprints[s]:
            raise UCGMError(f"--out {out}: {shard_name(s)} is missing or unreadable after encoding")
        infos.append(info)
    skipped = sorted([*listing.skipped, *((f, r) for i in infos for f, r in i["skipped"])],
                     key=lambda x: path_sort_key(x[0]))
    num_samples = sum(int(i["num_samples"]) for i in infos)
    if ctx.is_main:
        write_file_atomic(out / SKIPPED_NAME, "".join(f"{f}\t{r}\n" for f, r in skipped).encode())
    if num_samples == 0:
        raise UCGMError(f"image folder {config.images}: none of the {len(files)} image(s) could be read "
                        f"(first: {listing.files[0]}: {skipped[0][1] if skipped else '?'}); see {out / SKIPPED_NAME}")
    measured_mean, measured_std = measured_statistics(infos)
    used = [i for i in infos if i["num_samples"] > 0]
    meta = {
        "num_samples": num_samples,
        "latent_shape": list(latent_shape),
        "num_classes": listing.num_classes,
        "latent_mean": spec.latent_mean,
        "latent_std": spec.latent_std,
        "vae": spec.to_dict(),
        "shards": [shard_name(i["shard"]) for i in used],
        "shard_samples": [int(i["num_samples"]) for i in used],
        "class_names": listing.class_names,
        "resolution": res,
        **_augmentation(config),
        "num_flipped": sum(int(i.get("num_flipped", 0)) for i in infos),
        "shard_size": config.shard_size,
        "num_images": len(files) - sum(len(i["skipped"]) for i in infos),
        "num_skipped": len(skipped),
        "measured_mean": measured_mean,
        "measured_std": measured_std,
        "labels_from": "labels file" if listing.mode == "labels" else "class folders",
        "format": FORMAT,
    }
    if ctx.is_main:
        write_file_atomic(out / META_NAME, (json.dumps(meta, indent=2) + "\n").encode())
        if skipped:
            reporter.note(f"skipped {len(skipped)} file(s): {shown([f for f, _ in skipped])} "
                          f"(list with reasons: {out / SKIPPED_NAME})")
        reporter.info(f"wrote {num_samples} latents {list(latent_shape)} in {len(used)} shard(s) + {META_NAME} to "
                      f"{out} ({time.perf_counter() - t0:.1f} s)")
    return meta, skipped
